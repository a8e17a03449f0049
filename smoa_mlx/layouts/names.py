"""Module paths across frameworks, and PEFT's rules for which modules an adapter targets.

mlx-lm names the modules of the models below exactly as Hugging Face does
(`model.layers.3.self_attn.q_proj`), so a PEFT key is `base_model.model.` + that
path + a tensor suffix. Every crossing of the boundary goes through `hf_path` /
`mlx_path`, so a model family with different names needs one change here.
"""

from __future__ import annotations

import re

from ..errors import AdapterError, ModelError

PEFT_PREFIX = "base_model.model."
# mlx-lm model types whose module and parameter names equal the transformers ones (for the MoE
# types: every module but the experts and routers; tests/test_convert_archs.py checks each).
SAME_NAMES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "starcoder2", "olmo2",
              "cohere", "glm4", "phi", "granite", "smollm3", "seed_oss",
              "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")


def check_model_type(model_type: str | None) -> None:
    if model_type not in SAME_NAMES:
        raise ModelError(
            f"model type {model_type!r}: mlx-lm and Hugging Face module names are only "
            f"known to agree for {', '.join(SAME_NAMES)}"
        )


# MoE routers: a linear layer in mlx-lm, a TopKRouter module (not nn.Linear) in transformers 5.
ROUTER = re.compile(r".*\.(mlp|block_sparse_moe)\.gate")


def check_peft_targets(adapter, paths, expert_paths) -> None:
    """PEFT targets only linear modules: transformers 5 stores MoE experts fused as 3-D
    parameters and routers as router modules, so an adapter on them has no PyTorch layout."""
    bad = list(expert_paths) + [p for p in paths if ROUTER.fullmatch(p)]
    if bad:
        raise AdapterError(
            f"{adapter}: {len(bad)} adapted modules are MoE experts or routers (e.g. {bad[0]}), "
            "which PEFT cannot target; use `fuse --hf` instead, or train with --targets without them"
        )


def hf_path(path: str) -> str:
    """The transformers module path of an mlx-lm module path (identical for SAME_NAMES)."""
    return path


def mlx_path(path: str) -> str:
    return path


def peft_key(path: str, leaf: str) -> str:
    """The key PEFT saves for tensor `leaf` of the adapter on mlx-lm module `path`."""
    return f"{PEFT_PREFIX}{hf_path(path)}.{leaf}"


def natural_key(path: str):
    """Sort key putting `layers.10` after `layers.9`."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in path.split(".")]


def _layer_index(path: str, pattern) -> int | None:
    if not pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", path)
    else:
        pats = [pattern] if isinstance(pattern, str) else pattern
        m = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", path) for p in pats)), None)
    return None if m is None else int(m.group(1))


def _listed(spec, path: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == t or path.endswith("." + t) for t in spec)


def select_targets(paths, targets, exclude=None, layers=None, layers_pattern=None) -> list[str]:
    """The modules (HF paths among `paths`) PEFT's matching rules select, in order.

    A list of names matches a path equal to one or ending in `.name`; a string is a
    regex matched against the whole path; `all-linear` is every linear layer but
    the output head; `exclude` and `layers` (`layers_to_transform`) narrow the set.
    """
    selected = []
    for p in paths:
        if targets == "all-linear":
            hit = p != "lm_head"
        else:
            hit = _listed(targets, p)
        if hit and exclude:
            hit = not _listed(exclude, p)
        if hit and layers and not isinstance(targets, str):
            hit = _layer_index(p, layers_pattern) in layers
        if hit:
            selected.append(p)
    return selected


def target_modules(selected, paths) -> list[str]:
    """The config entry for `selected`: short names when they select exactly it, else full paths."""
    selected = list(selected)
    short = sorted({p.rsplit(".", 1)[-1] for p in selected})
    if set(select_targets(paths, short)) == set(selected):
        return short
    return selected


def pattern_value(patterns: dict | None, path: str, default):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the first key matching the path's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
