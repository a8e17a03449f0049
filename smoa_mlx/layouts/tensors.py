"""Tensor files as NumPy arrays, and the one check that a set of tensors is the expected one.

PyTorch adapters arrive in any float dtype (float64 from a float64 run, bfloat16
from the authors' default): MLX's safetensors reader refuses float64, so they are
read here with NumPy from the documented format (an 8-byte header length, a JSON
header, raw little-endian bytes), every field checked so a damaged file gives one
line naming it. Writing goes through MLX (`files.save_safetensors`, atomic).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import AdapterError, MissingFileError
from ..files import save_safetensors

# safetensors dtype -> NumPy dtype (little-endian); BF16 is widened through its bits.
DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}
FLOATS = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100_000_000  # the safetensors reference limit


def _header(path: Path, size: int) -> tuple[dict, int]:
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8).ljust(8, b"\xff"), "little")
        if length > min(size - 8, MAX_HEADER):
            raise AdapterError(f"{path}: not a safetensors file (header length {length} in {size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + length


def _entry(path: Path, name: str, info, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, or a one-line error naming it."""
    try:
        dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        ok = all(isinstance(v, int) and v >= 0 for v in (*shape, start, end))
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise AdapterError(f"{path}: tensor {name} has a malformed header entry {info!r}")
    if dtype not in DTYPES:
        raise AdapterError(f"{path}: tensor {name} has dtype {dtype}, not one of {', '.join(DTYPES)}")
    if end - start != int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize or end > data_size:
        raise AdapterError(f"{path}: tensor {name} ({dtype} {list(shape)}) does not fit bytes {start}-{end} "
                           f"of the {data_size} the file holds")
    return dtype, shape, start, end


def read_tensors(path) -> tuple[dict[str, np.ndarray], set[str]]:
    """A safetensors file as NumPy arrays (floats as float32, integers as int64), and the
    set of float dtypes it held, so a caller can say what was cast."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    size = path.stat().st_size
    header, offset = _header(path, size)
    data = path.read_bytes()[offset:]
    out, floats = {}, set()
    for name, info in header.items():
        dtype, shape, start, end = _entry(path, name, info, len(data))
        x = np.frombuffer(data[start:end], DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            x = (x.astype(np.uint32) << 16).view(np.float32)
        if dtype in FLOATS:
            floats.add(dtype)
            out[name] = x.astype(np.float32)
        else:
            out[name] = x.astype(np.int64)
    return out, floats


def check_tensors(tensors: dict, expected: dict, where, why: dict | None = None, unexpected: str = "") -> None:
    """`expected` maps name -> shape (`why`: name -> what that shape comes from). One-line
    error for the first extra, misshaped or missing tensor, in that order: a different
    base model shows as a shape, not a missing tensor. `unexpected` explains an extra one."""
    for name in tensors:
        if name not in expected:
            raise AdapterError(f"{where}: unexpected tensor {name}{unexpected}")
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != tuple(shape):
            reason = f" ({why[name]})" if why and name in why else ""
            raise AdapterError(
                f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}{reason}"
            )
    for name in expected:
        if name not in tensors:
            raise AdapterError(f"{where}: missing tensor {name}")


def pad_rank(x: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """Zero-pad the rank axis of a low-rank factor (or a stack of them) to `rank` (the product
    is unchanged)."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, rank - x.shape[axis])
    return np.pad(x, widths)


def write_tensors(path, tensors: dict[str, np.ndarray]) -> Path:
    """Safetensors that torch's loader reads (`format: pt`)."""
    return save_safetensors(path, {k: mx.array(v) for k, v in tensors.items()}, {"format": "pt"})
