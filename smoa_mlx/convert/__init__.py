"""Adapters across frameworks (SPEC §2): PyTorch PEFT-style directories <-> MLX adapters.

One module per PyTorch layout: `smoa` (the authors' SMoA layout), `hira` and
`lora` (Hugging Face PEFT). Import writes an MLX adapter directory that
`smoa_mlx.load`, chat and generate use; export writes a PEFT-style directory.
Input is validated before anything is written, outputs are staged and renamed
into place, and MLX-vs-PyTorch parity is measured when PyTorch is installed.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters import CONFIG, load_adapter
from ..card import write_adapter_card, write_peft_card
from ..files import read_json
from . import hira, lora, parity, smoa
from .names import check_model_type
from .peft_io import read_peft_dir, staged_dir

# format -> (peft_type, import function, export function)
FORMATS = {
    "smoa": (smoa.PEFT_TYPE, smoa.import_smoa, smoa.export_smoa),
    "hira": (hira.PEFT_TYPE, hira.import_hira, hira.export_hira),
    "lora": (lora.PEFT_TYPE, lora.import_lora, lora.export_lora),
}


def local_dir(path_or_repo: str) -> Path:
    """The local directory of a model path or an already downloaded Hugging Face repo."""
    from mlx_lm.utils import hf_repo_to_path

    path = Path(path_or_repo)
    return path if path.exists() else hf_repo_to_path(path_or_repo)


def load_base(model: str, adapter_path=None):
    """(mlx-lm model with the adapter if given, tokenizer, config, local model dir)."""
    from mlx_lm.utils import load

    mlx_model, tokenizer, config = load(model, return_config=True)
    if adapter_path is not None:
        load_adapter(mlx_model, adapter_path)
    mlx_model.eval()
    return mlx_model, tokenizer, config, local_dir(model)


def _format(fmt: str):
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _parity(fmt, model_dir, mlx_model, torch_adapter, log):
    reason = parity.skip_reason(fmt, model_dir)
    if reason:
        log(f"parity: skipped ({reason})")
        return None
    result = parity.measure(fmt, model_dir, mlx_model, torch_adapter)
    log(parity.describe(result))
    return result


def import_adapter(fmt: str, model: str, src, out, measure_parity: bool = True, log=print) -> dict:
    """Convert the PyTorch adapter in `src` (trained on `model`) into the MLX adapter `out`."""
    peft_type, importer, _ = _format(fmt)
    peft = read_peft_dir(src, peft_type)
    mlx_model, _, config, model_dir = load_base(model)
    check_model_type(config.get("model_type"))
    with staged_dir(out) as tmp:
        report = importer(mlx_model, peft, model, tmp, log=log)
        write_adapter_card(tmp, name=Path(out).name)
    log(f"wrote MLX adapter {out} ({fmt} from {src})")
    if measure_parity:
        adapted, _, _, _ = load_base(model, out)
        report["parity"] = _parity(fmt, model_dir, adapted, src, log)
    return report


def export_adapter(fmt: str, model: str, adapter_path, out, rank=None, measure_parity: bool = True,
                   log=print) -> dict:
    """Write the SMoA adapter `adapter_path` (on base `model`) as a PyTorch adapter `out`."""
    _, _, exporter = _format(fmt)
    kind = read_json(Path(adapter_path) / CONFIG).get("fine_tune_type", "lora")
    if kind != "smoa":
        raise ValueError(f"{adapter_path}: export needs an SMoA adapter, this one is fine_tune_type {kind!r}")
    mlx_model, _, config, model_dir = load_base(model, adapter_path)
    check_model_type(config.get("model_type"))
    if "quantization" in config:
        log("note: the base is quantized; the anchors here are its de-quantized weights, while "
            "PyTorch uses the float checkpoint's, so expect small differences there")
    extra = {"rank": rank} if fmt == "lora" else {}
    with staged_dir(out) as tmp:
        report = exporter(mlx_model, model, tmp, log=log, **extra)
        write_peft_card(tmp, adapter_path, fmt, model, name=Path(out).name)
    log(f"wrote {fmt} adapter {out} (PyTorch layout) from {adapter_path}")
    if measure_parity:
        if fmt == "lora":
            log("note: the lora export is lossy; parity below includes the approximation error")
        report["parity"] = _parity(fmt, model_dir, mlx_model, out, log)
    return report


__all__ = ["FORMATS", "export_adapter", "import_adapter", "load_base", "local_dir"]
