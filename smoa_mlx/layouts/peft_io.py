"""PEFT-style adapter directories on disk (`adapter_config.json` + `adapter_model.safetensors`).

Only JSON and safetensors are read; a pickle checkpoint (`adapter_model.bin`,
what older PEFT versions and the authors' `save_pretrained` write) is refused
with the one-line command that converts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..files import load_safetensors, read_json, save_safetensors, write_json

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass
class PeftDir:
    path: Path
    config: dict
    tensors: dict[str, np.ndarray]

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS


def _refuse_pickle(path: Path):
    raise ValueError(
        f"{path}: pickle checkpoints are refused (safetensors only); convert it where you trust it: "
        f"python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('{path.name}', "
        f"weights_only=True), '{WEIGHTS}')\""
    )


def read_tensors(path) -> dict[str, np.ndarray]:
    """A safetensors file as NumPy arrays: floats as float32, integers as int64."""
    out = {}
    for name, value in load_safetensors(path).items():
        floating = mx.issubdtype(value.dtype, mx.floating)
        out[name] = np.array(value.astype(mx.float32 if floating else mx.int64))
    return out


def read_peft_dir(src, peft_type: str) -> PeftDir:
    """The config and tensors of a PEFT adapter directory whose peft_type must be `peft_type`."""
    src = Path(src)
    if src.is_file():
        if src.suffix in PICKLES:
            _refuse_pickle(src)
        raise ValueError(f"{src}: expected an adapter directory holding {CONFIG} and {WEIGHTS}")
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: directory not found")
    if not (src / WEIGHTS).is_file():
        for p in sorted(src.iterdir()):
            if p.suffix in PICKLES:
                _refuse_pickle(p)
        raise FileNotFoundError(f"{src / WEIGHTS}: file not found")
    config = read_json(src / CONFIG)
    found = config.get("peft_type")
    if str(found).upper() != peft_type:
        raise ValueError(f"{src / CONFIG}: peft_type is {found!r}, expected {peft_type!r}")
    for key in ("r", "target_modules"):
        if not config.get(key):
            raise ValueError(f"{src / CONFIG}: {key} is missing")
    return PeftDir(src, config, read_tensors(src / WEIGHTS))


def refuse_options(config: dict, where, allowed: dict) -> None:
    """Refuse options this converter cannot represent: `allowed` maps key -> accepted values.

    An absent or empty value (None, False, [], {}) counts as None.
    """
    for key, ok in allowed.items():
        value = config.get(key) or None
        if value not in ok:
            raise ValueError(f"{where}: {key}={value!r} is not supported (supported: {ok})")


def check_tensors(tensors: dict, expected: dict, where) -> None:
    """`expected` maps key -> (shape, reason). One-line error for the first extra, misshaped or
    missing key, in that order: a different base model shows as a shape, not a missing key."""
    for key in tensors:
        if key not in expected:
            raise ValueError(f"{where}: unexpected key {key} (no targeted module or block of the base model)")
    for key, (shape, why) in expected.items():
        if key in tensors and tuple(tensors[key].shape) != tuple(shape):
            raise ValueError(
                f"{where}: key {key} has shape {tuple(tensors[key].shape)}, expected {tuple(shape)} ({why})"
            )
    for key in expected:
        if key not in tensors:
            raise ValueError(f"{where}: missing key {key}")


def pad_rank(x: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """Zero-pad the rank axis of a low-rank factor to `rank` (the product is unchanged)."""
    widths = [(0, 0), (0, 0)]
    widths[axis] = (0, rank - x.shape[axis])
    return np.pad(x, widths)


def write_tensors(path, tensors: dict[str, np.ndarray]) -> Path:
    """Safetensors that torch's loader reads (`format: pt`)."""
    return save_safetensors(path, {k: mx.array(v) for k, v in tensors.items()}, {"format": "pt"})


def write_peft_dir(out_dir: Path, config: dict, tensors: dict, extra: dict | None = None) -> None:
    """Write a PEFT adapter (and `extra`: file name -> tensors) into a staged directory."""
    write_tensors(out_dir / WEIGHTS, tensors)
    for name, more in (extra or {}).items():
        write_tensors(out_dir / name, more)
    write_json(out_dir / CONFIG, config)
