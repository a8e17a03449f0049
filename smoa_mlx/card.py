"""Model cards (`README.md` with Hugging Face metadata) for adapter directories and fused models.

A card is derived from what the directory holds (adapter_config.json, the adapter's
tensors) plus optional training metrics, so it can be rewritten at any time: metrics
given once are kept in the card's metadata (`training_metrics`) and survive a rewrite
without them. The base model's license and Hub id are read from the base's own card.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .files import atomic_write, read_json

CARD = "README.md"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
METHODS = {"smoa": "SMoA (high-rank structured modulation)", "lora": "LoRA", "dora": "DoRA",
           "full": "full fine-tuning"}


def read_metadata(directory) -> dict:
    """The YAML metadata block of `directory/README.md` ({} when there is none)."""
    path = Path(directory) / CARD
    if not path.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(path) or {}
    except Exception:  # a hand-written card with broken YAML: treat it as having none
        return {}


def base_info(base) -> dict:
    """{"base_model": Hub id or None, "license": str or None} of a base model path or id."""
    if base is None:
        return {"base_model": None, "license": None}
    base = str(base)
    path = Path(base)
    meta = read_metadata(path) if path.is_dir() else {}
    repo = base if REPO_ID.match(base) and not path.exists() else None
    if repo is None:  # a local directory: the repo it came from, if its card says so
        named = meta.get("base_model")
        named = named[0] if isinstance(named, list) and named else named
        repo = named if isinstance(named, str) and REPO_ID.match(named) else None
    return {"base_model": repo, "license": meta.get("license")}


def count_parameters(adapter_dir, config: dict) -> int:
    """Trainable parameters saved in the adapter (SMoA's fixed permutations do not count)."""
    from .files import load_safetensors

    weights = load_safetensors(Path(adapter_dir) / "adapters.safetensors")
    skip = ("row_order", "col_order") if config.get("fine_tune_type") == "smoa" else ()
    return sum(v.size for k, v in weights.items() if not k.endswith(skip))


def _targets(modules: list[str]) -> str:
    """`q_proj, v_proj in 12 layers` from full module paths."""
    kinds, layers = {}, set()
    for m in modules:
        match = re.search(r"layers\.(\d+)\.(.+)$", m)
        kind = match.group(2) if match else m
        if match:
            layers.add(match.group(1))
        kinds.setdefault(kind, None)
    where = f" in {len(layers)} layers" if layers else ""
    return ", ".join(f"`{k}`" for k in kinds) + where


def _hyperparameters(config: dict) -> list[tuple[str, str]]:
    kind = config.get("fine_tune_type", "lora")
    if kind == "smoa":
        p = config.get("smoa_parameters", {})
        rows = [("rank r (per block)", p.get("rank")), ("blocks K", p.get("num_blocks")),
                ("branch ranks", p.get("branch_ranks")), ("alpha", p.get("alpha")),
                ("dropout", p.get("dropout"))]
        modules = config.get("modules", [])
    else:
        p = config.get("lora_parameters", {})
        rows = [("rank r", p.get("rank")), ("scale", p.get("scale")), ("dropout", p.get("dropout")),
                ("layers", config.get("num_layers"))]
        modules = p.get("keys") or []
    if modules:
        rows.append(("targets", _targets(modules)))
    return [(k, str(v)) for k, v in rows if v is not None]


def _metric_rows(metrics: dict) -> list[tuple[str, str]]:
    rows = []
    for key, label in (("data", "data"), ("steps", "steps"), ("train_loss", "final train loss"),
                       ("val_loss", "final validation loss"), ("test_loss", "test loss")):
        v = metrics.get(key)
        if v is not None:
            rows.append((label, f"{v:.4f}" if isinstance(v, float) else f"`{v}`" if key == "data" else str(v)))
    summary = (metrics.get("rank_report") or {}).get("summary", {}).get("all")
    if summary:
        a, e = summary["rank_1pct"], summary["entropy_rank"]
        rows.append(("effective rank of ΔW (1% cut, mean / min / max)",
                     f"{a['mean']:.1f} / {a['min']:.0f} / {a['max']:.0f} of at most {summary['max_rank']}"))
        rows.append(("entropy effective rank (mean / min / max)", f"{e['mean']:.1f} / {e['min']:.1f} / {e['max']:.1f}"))
    return rows


def _kept_metrics(metrics: dict | None, directory) -> dict:
    """The card-worthy part of `metrics` (the trainer's result dict), or the metrics the
    existing card already holds."""
    if metrics is None:
        return read_metadata(directory).get("training_metrics") or {}
    keep = ("data", "steps", "train_loss", "val_loss", "test_loss", "trainable")
    out = {k: metrics[k] for k in keep if metrics.get(k) is not None}
    summary = (metrics.get("rank_report") or {}).get("summary", {}).get("all")
    if summary:
        out["rank_report"] = {"summary": {"all": summary}}
    return json.loads(json.dumps(out, default=str))  # plain YAML-safe values


def _license(info: dict) -> str:
    return (f"License: {info['license']}, as the base model." if info["license"]
            else "License: that of the base model (its card names none).")


def _table(rows) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def _front_matter(info: dict, library: str, tags: list[str], extra: dict) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=info["base_model"], library_name=library,
                         license=info["license"], tags=tags, **extra)
    return f"---\n{data.to_yaml()}\n---\n"


def adapter_card(adapter_dir, metrics: dict | None = None, name: str | None = None) -> str:
    """The card text of an adapter directory (see `write_adapter_card`)."""
    adapter_dir = Path(adapter_dir)
    config = read_json(adapter_dir / "adapter_config.json")
    kind = config.get("fine_tune_type", "lora")
    base = config.get("model")
    info = base_info(base)
    kept = _kept_metrics(metrics, adapter_dir)
    trainable = kept.get("trainable") or count_parameters(adapter_dir, config)
    tags = ["mlx", "smoa-mlx", kind, "adapter"]
    name = name or adapter_dir.name
    base_ref = base or "BASE_MODEL"
    peft_format = "hira" if kind == "smoa" and config.get("smoa_parameters", {}).get("num_blocks") == 1 else (
        "smoa" if kind == "smoa" else None)
    lines = [
        _front_matter(info, "mlx", tags, {"training_metrics": kept} if kept else {}),
        f"# {name}", "",
        f"A {METHODS.get(kind, kind)} adapter for `{base_ref}`, made with smoa-mlx on MLX. "
        + _license(info), "",
        "## Adapter", "",
        _table([("method", METHODS.get(kind, kind))] + _hyperparameters(config)
               + [("trainable parameters", f"{trainable:,}")]),
        "",
    ]
    rows = _metric_rows(kept)
    if rows:
        lines += ["## Training", "", _table(rows), ""]
    lines += [
        "## Use", "",
        "In smoa-mlx (MLX):", "", "```python",
        "import smoa_mlx, mlx_lm",
        f"model, tokenizer = smoa_mlx.load({base_ref!r}, adapter_path={name!r})",
        'print(mlx_lm.generate(model, tokenizer, "Hello", max_tokens=50))', "```", "",
        "```sh",
        f"python -m smoa_mlx.generate --model {base_ref} --adapter-path {name} --prompt Hello",
        f"python -m smoa_mlx.serve --model {base_ref} --adapter-path {name}",
        "```", "",
    ]
    if peft_format is not None:
        lines += [
            "In PyTorch / PEFT, after converting:", "", "```sh",
            f"python -m smoa_mlx.convert export --format {peft_format} --model {base_ref} "
            f"--adapter-path {name} --out {name}-peft", "```", "",
        ]
        if peft_format == "hira":
            lines += ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                      f"base = AutoModelForCausalLM.from_pretrained({base_ref!r})",
                      f"model = PeftModel.from_pretrained(base, {name + '-peft'!r})", "```", ""]
        else:
            lines += ["The `smoa` layout loads with `smoa_mlx.torch` (the authors' SMoA module); "
                      "`--format lora` writes a PEFT LoRA approximation that `PeftModel.from_pretrained` loads.", ""]
    lines += [
        "In transformers, fused into the base:", "", "```sh",
        f"python -m smoa_mlx.fuse --model {base_ref} --adapter-path {name} --save-path {name}-fused --hf",
        "```", "", "```python", "from transformers import AutoModelForCausalLM",
        f"model = AutoModelForCausalLM.from_pretrained({name + '-fused'!r})", "```", "",
    ]
    return "\n".join(lines)


def write_adapter_card(adapter_dir, metrics: dict | None = None, name: str | None = None) -> Path:
    """Write `adapter_dir/README.md`. `metrics` is the trainer's result dict (train_loss,
    val_loss, test_loss, steps, trainable, rank_report) plus "data"; None keeps the
    metrics of the existing card. `name`: the directory's final name when it is staged."""
    text = adapter_card(adapter_dir, metrics, name)
    return atomic_write(Path(adapter_dir) / CARD, lambda t: t.write_text(text))


def write_fused_card(save_path, base, adapter_path, hf: bool, parity: dict | None = None,
                     name: str | None = None) -> Path:
    """Write the card of a fused model: the adapter's card facts, and how to load the result."""
    save_path, adapter_path = Path(save_path), Path(adapter_path)
    config = read_json(adapter_path / "adapter_config.json")
    kind = config.get("fine_tune_type", "lora")
    info = base_info(base)
    kept = _kept_metrics(None, adapter_path)
    trainable = kept.get("trainable") or count_parameters(adapter_path, config)
    library = "transformers" if hf else "mlx"
    tags = [library, "smoa-mlx", kind, "fused"]
    name = name or save_path.name
    extra = {"training_metrics": kept} if kept else {}
    if parity:
        extra["fuse_check"] = parity
    rows = [("method", METHODS.get(kind, kind))] + _hyperparameters(config) + [
        ("trainable parameters (before fusing)", f"{trainable:,}"), ("adapter", f"`{adapter_path.name}`")]
    if parity:
        rows.append(("fused vs unfused logits (max abs diff / adapter effect)",
                     f"{parity['max_abs_diff']:.3g} / {parity['adapter_effect']:.3g}"))
    load = (["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f"model = AutoModelForCausalLM.from_pretrained({name!r})",
             f"tokenizer = AutoTokenizer.from_pretrained({name!r})", "```"] if hf else
            ["```python", "import mlx_lm", f"model, tokenizer = mlx_lm.load({name!r})",
             'print(mlx_lm.generate(model, tokenizer, "Hello", max_tokens=50))', "```", "", "```sh",
             f"python -m mlx_lm.generate --model {name} --prompt Hello", "```"])
    lines = [
        _front_matter(info, library, tags, extra), f"# {name}", "",
        f"`{base}` with the {METHODS.get(kind, kind)} adapter `{adapter_path.name}` merged into its weights "
        f"by smoa-mlx: a plain {'Hugging Face' if hf else 'MLX'} model, no adapter code needed. "
        + _license(info), "",
        "## Adapter", "", _table(rows), "",
    ]
    return _write(save_path, lines, kept, load)


def write_peft_card(out, adapter_path, fmt: str, base, name: str | None = None) -> Path:
    """Write the card of a PyTorch adapter exported by `convert export` from `adapter_path`."""
    out, adapter_path = Path(out), Path(adapter_path)
    config = read_json(adapter_path / "adapter_config.json")
    info = base_info(base)
    kept = _kept_metrics(None, adapter_path)
    trainable = kept.get("trainable") or count_parameters(adapter_path, config)
    peft = fmt in ("hira", "lora")
    tags = ["peft" if peft else "pytorch", "smoa-mlx", fmt, "adapter"]
    rows = [("layout", {"hira": "Hugging Face PEFT HiRA", "lora": "Hugging Face PEFT LoRA (a rank-R "
                        "approximation of the SMoA update)", "smoa": "the SMoA authors' PyTorch layout"}[fmt]),
            ("converted from", f"`{adapter_path.name}` ({METHODS['smoa']})")]
    rows += _hyperparameters(config) + [("trainable parameters (MLX adapter)", f"{trainable:,}")]
    name, base_ref = name or out.name, str(base)
    load = (["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
             f"base = AutoModelForCausalLM.from_pretrained({base_ref!r})",
             f"model = PeftModel.from_pretrained(base, {name!r})", "```"] if peft else
            ["Load it with the `smoa_mlx.torch` SMoA module, or back into MLX:", "", "```sh",
             f"python -m smoa_mlx.convert import --format smoa --model {base_ref} --src {name} --out {name}-mlx",
             "```"])
    lines = [_front_matter(info, "peft" if peft else None, tags, {"training_metrics": kept} if kept else {}),
             f"# {name}", "", f"A PyTorch adapter for `{base_ref}`, exported by smoa-mlx. " + _license(info), "",
             "## Adapter", "", _table(rows), ""]
    return _write(out, lines, kept, load)


def _write(folder: Path, lines: list[str], kept: dict, load: list[str]) -> Path:
    """A card's closing sections (training metrics when known, how to load it), written."""
    metric_rows = _metric_rows(kept)
    if metric_rows:
        lines = lines + ["## Training", "", _table(metric_rows), ""]
    text = "\n".join(lines + ["## Use", ""] + load + [""])
    return atomic_write(Path(folder) / CARD, lambda t: t.write_text(text))
