"""Adapters across frameworks (SPEC §2): PyTorch PEFT-style directories <-> MLX adapters.

One module per PyTorch layout: `smoa` (the authors' SMoA layout), `hira` and
`lora` (Hugging Face PEFT). Import writes an MLX adapter directory that
`smoa_mlx.load`, chat and generate use; export writes a PEFT-style directory.
Input is validated before anything is written, outputs are staged and renamed
into place, and MLX-vs-PyTorch parity is measured when PyTorch is installed.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters import read_adapter_config
from ..card import write_adapter_card, write_peft_card
from ..errors import AdapterError, ConfigError
from ..files import staged_dir
from ..layer import adapter_layers
from ..layouts.names import check_model_type, check_peft_targets
from ..layouts.peft_io import read_peft_dir
from ..loader import load_base
from ..loader import model_dir as local_dir
from ..switch import SMoASwitchLinear
from . import hira, lora, parity, smoa

# format -> (peft_type, import function, export function)
FORMATS = {
    "smoa": (smoa.PEFT_TYPE, smoa.import_smoa, smoa.export_smoa),
    "hira": (hira.PEFT_TYPE, hira.import_hira, hira.export_hira),
    "lora": (lora.PEFT_TYPE, lora.import_lora, lora.export_lora),
}


def _format(fmt: str):
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _parity(fmt, model_dir, mlx_model, torch_adapter, log, plan_dtype=None):
    reason = parity.skip_reason(fmt, model_dir)
    if reason:
        log(f"parity: skipped ({reason})")
        return None
    result = parity.measure(fmt, model_dir, mlx_model, torch_adapter, plan_dtype)
    log(parity.describe(result))
    return result


def import_adapter(fmt: str, model: str, src, out, measure_parity: bool = True, log=print,
                   plan_dtype: str | None = None) -> dict:
    """Convert the PyTorch adapter in `src` (trained on `model`) into the MLX adapter `out`.

    `plan_dtype` (smoa only): recompute missing orders from the base weight rounded to
    "bfloat16" or "float16", as the authors' loader does with the base in that dtype.
    """
    peft_type, importer, _ = _format(fmt)
    if plan_dtype is not None and fmt != "smoa":
        raise ConfigError("--plan-dtype applies to --format smoa only")
    mlx_model, _, config, model_dir = load_base(model)
    check_model_type(config.get("model_type"))
    peft = read_peft_dir(src, peft_type, config["model_type"])
    note = peft.cast_note()
    if note:
        log(note)
    dropped = peft.drop_unseen()
    if dropped:
        log(f"note: left out {dropped} tensors of {peft.weights_file} on modules mlx-lm's "
            f"{config['model_type']} model does not have (vision tower); text logits are unaffected")
    extra = {"plan_dtype": plan_dtype} if plan_dtype else {}
    with staged_dir(out) as tmp:
        report = importer(mlx_model, peft, model, tmp, log=log, **extra)
        write_adapter_card(tmp, name=Path(out).name)
    log(f"wrote MLX adapter {out} ({fmt} from {src})")
    if measure_parity:
        adapted, _, _, _ = load_base(model, out)
        report["parity"] = _parity(fmt, model_dir, adapted, src, log, plan_dtype)
    return report


def export_adapter(fmt: str, model: str, adapter_path, out, rank=None, measure_parity: bool = True,
                   log=print) -> dict:
    """Write the SMoA adapter `adapter_path` (on base `model`) as a PyTorch adapter `out`."""
    _, _, exporter = _format(fmt)
    kind = read_adapter_config(adapter_path).get("fine_tune_type", "lora")
    if kind != "smoa":
        raise AdapterError(f"{adapter_path}: export needs an SMoA adapter, this one is fine_tune_type {kind!r}")
    mlx_model, _, config, model_dir = load_base(model, adapter_path)
    check_model_type(config.get("model_type"))
    check_peft_targets(adapter_path, adapter_layers(mlx_model), adapter_layers(mlx_model, SMoASwitchLinear),
                       fmt)
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
