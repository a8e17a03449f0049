"""Module paths across frameworks, and PEFT's rules for which modules an adapter targets.

mlx-lm names the modules of most models exactly as Hugging Face does
(`model.layers.3.self_attn.q_proj`); a wrapper model may nest them differently
(mlx-lm's gemma3 `language_model.model.layers.3...` is transformers 5's
`model.language_model.layers.3...`). A PEFT key is `base_model.model.` + the
transformers path + a tensor suffix. Every crossing of the boundary goes through
`hf_path` / `mlx_path` with the model type, so a family with other names needs
one entry in RENAMES.
"""

from __future__ import annotations

import re

from ..errors import AdapterError, ModelError

PEFT_PREFIX = "base_model.model."
# mlx-lm model types whose module and parameter names equal the transformers ones (for the MoE
# types: every module but the experts and routers; tests/test_convert_archs.py checks each).
SAME_NAMES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "starcoder2",
              "olmo2", "cohere", "glm4", "phi", "granite", "smollm3", "seed_oss",
              "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")
# model type -> (mlx-lm module prefix, transformers module prefix) pairs for wrapper models. Their
# transformers model holds modules mlx-lm drops (gemma3: the vision tower), so an exported
# target_modules is scoped to SCOPE, where the decoder layers live.
RENAMES = {
    "gemma3": (("language_model.model", "model.language_model"), ("language_model.lm_head", "lm_head")),
}
SCOPE = {"gemma3": "model.language_model"}
KNOWN = SAME_NAMES + tuple(RENAMES)
# model type -> submodules of transformers' `model` that mlx-lm's model drops (checkpoint keys
# `<name>.*`, module paths `model.<name>.*`): `fuse --hf` copies their weights from the base,
# import leaves out an adapter's tensors on them (they cannot change the text logits).
UNSEEN = {"gemma3": ("vision_tower", "multi_modal_projector")}


def check_model_type(model_type: str | None) -> None:
    if model_type not in KNOWN:
        raise ModelError(
            f"model type {model_type!r}: mlx-lm and Hugging Face module names are only "
            f"known for {', '.join(KNOWN)}"
        )


# MoE routers: a linear layer in mlx-lm, a TopKRouter module (not nn.Linear) in transformers 5.
ROUTER = re.compile(r".*\.(mlp|block_sparse_moe)\.gate")
# MoE experts: mlx-lm's stacked switch_mlp.{gate,up,down}_proj (E, out, in) are, in transformers 5,
# the 3-D parameters experts.gate_up_proj (gate rows, then up rows) and experts.down_proj of the
# MoE block (mixtral's is `block_sparse_moe` in mlx-lm, `mlp` in transformers), which PEFT's LoRA
# targets with `target_parameters`. EXPERT_PARAMS is their declaration order, in which PEFT nests
# the wrappers of one module's parameters (the first innermost).
SWITCH = re.compile(r"(.*)\.(?:mlp|block_sparse_moe)\.switch_mlp\.(gate_proj|up_proj|down_proj)")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def check_peft_targets(adapter, paths, expert_paths, fmt: str) -> None:
    """PEFT targets linear modules, and LoRA alone 3-D parameters: routers (router modules in
    transformers 5) have no PyTorch layout, MoE experts only a LoRA one."""
    routers = [p for p in paths if ROUTER.fullmatch(p)]
    if routers:
        raise AdapterError(
            f"{adapter}: {len(routers)} adapted modules are MoE routers (e.g. {routers[0]}), TopKRouter "
            "modules in transformers 5 that PEFT cannot target; use `fuse --hf` instead, or train with "
            "--targets without them"
        )
    if expert_paths and fmt != "lora":
        raise AdapterError(
            f"{adapter}: {len(expert_paths)} adapted modules are MoE experts (e.g. {list(expert_paths)[0]}), "
            f"for which the {fmt} layout has no form; export --format lora (experts as PEFT "
            "target_parameters), use `fuse --hf`, or train with --targets without them"
        )


def hf_expert(path: str) -> tuple[str, int | None]:
    """(transformers parameter path, half) of mlx-lm expert layer `path`: half 0 / 1 are the
    gate / up rows of `gate_up_proj`, None the whole `down_proj`."""
    m = SWITCH.fullmatch(path)
    if m is None:
        raise ModelError(f"{path}: not an MoE expert layer (mlp.switch_mlp.<gate|up|down>_proj) of a known family")
    if m[2] == "down_proj":
        return f"{m[1]}.mlp.experts.down_proj", None
    return f"{m[1]}.mlp.experts.gate_up_proj", 0 if m[2] == "gate_proj" else 1


def peft_param_key(param: str, targeted, leaf: str) -> str:
    """The key PEFT saves tensor `leaf` of the LoRA on 3-D parameter `param` (a transformers
    path) under, `targeted` being every parameter the adapter targets: one `base_layer.` per
    targeted parameter of the same module that PEFT wraps around it (EXPERT_PARAMS order)."""
    module, name = param.rsplit(".", 1)
    outer = [n for n in EXPERT_PARAMS[EXPERT_PARAMS.index(name) + 1:] if f"{module}.{n}" in targeted]
    return f"{PEFT_PREFIX}{module}.{'base_layer.' * len(outer)}{leaf}"


def _rename(path: str, pairs) -> str:
    for old, new in pairs:
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return path


def hf_path(path: str, model_type: str | None) -> str:
    """The transformers module path of an mlx-lm module path (identical for SAME_NAMES)."""
    return _rename(path, RENAMES.get(model_type, ()))


def mlx_path(path: str, model_type: str | None) -> str:
    """The mlx-lm module path of a transformers one (unchanged if mlx-lm has no such prefix)."""
    return _rename(path, [(hf, mlx) for mlx, hf in RENAMES.get(model_type, ())])


def unseen(key: str, model_type: str | None) -> bool:
    """Whether PEFT key `key` is on a module the mlx-lm model of `model_type` lacks."""
    path = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return any(path.startswith(f"model.{name}.") for name in UNSEEN.get(model_type, ()))


def peft_key(path: str, leaf: str, model_type: str | None) -> str:
    """The key PEFT saves for tensor `leaf` of the adapter on mlx-lm module `path`."""
    return f"{PEFT_PREFIX}{hf_path(path, model_type)}.{leaf}"


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


def _short(path: str, reserved) -> str:
    parent, leaf = path.rsplit(".", 1)
    return f"{parent.rsplit('.', 1)[-1]}.{leaf}" if leaf in reserved else leaf


def target_modules(selected, paths, model_type: str | None, experts=()) -> list[str] | str:
    """The config entry for mlx-lm modules `selected` among `paths`, in transformers names:
    short names when they select exactly it (within SCOPE, as a regex, for a wrapper model
    whose other modules mlx-lm never sees), else full paths.

    A short name that is also a leaf of the model's MoE `experts` (mlx-lm's switch_mlp.up_proj,
    transformers 4's experts.N.up_proj) keeps its parent (`shared_expert.up_proj`): PEFT >= 0.22
    maps a bare `up_proj` onto transformers 5's fused experts too, and refuses it without `gate_proj`.
    """
    reserved = {p.rsplit(".", 1)[-1] for p in experts}
    selected = [hf_path(p, model_type) for p in selected]
    paths = [hf_path(p, model_type) for p in paths]
    short = sorted({_short(p, reserved) for p in selected})
    scope = SCOPE.get(model_type)
    entry = short if scope is None else rf"{re.escape(scope)}\..*\.({'|'.join(map(re.escape, short))})"
    if set(select_targets(paths, entry)) == set(selected):
        return entry
    return selected


def pattern_value(patterns: dict | None, path: str, default):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the first key matching the path's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
