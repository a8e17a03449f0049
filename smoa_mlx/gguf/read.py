"""A GGUF file's metadata and tensors, as MLX arrays under the file's own tensor names.

Q4_0, Q4_1 and Q8_0 stay quantized, as MLX's affine group-32 formats (the same values:
Q4_0 `w = d (q - 8)` is scale d, bias -8d; Q4_1 `w = d q + m` is scale d, bias m; Q8_0's
signed `w = d q` is the unsigned q + 128 with bias -128d), `<name>.weight` packed as
uint32 with `<name>.scales` / `<name>.biases` in float16 (the file's own d and m, so the
float32 de-quantization is bit for bit the `gguf` package's). F32/F16/BF16 are kept as
they are; every other type (K-quants, IQ...) is de-quantized by the `gguf` package to
float16, with a note.

MLX reads GGUF natively (`mx.load`), fast and exactly so for F32, F16, Q4_0, Q4_1 and
Q8_0, which is what llama.cpp writes for those file types. It refuses the whole file when
any tensor has another type, and reads BF16 as float16 (out of range values lost), so those
files are read with the `gguf` package's reader (slower: it parses the vocabulary in Python)
and the three formats packed here in NumPy, the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from ..errors import ModelError

# general.file_type values whose tensors mx.load reads exactly (ALL_F32, MOSTLY_F16,
# MOSTLY_Q4_0, MOSTLY_Q4_1, MOSTLY_Q8_0; norms are F32 in all of them).
NATIVE_FILE_TYPES = (0, 1, 2, 3, 7)
BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
GROUP = 32


class GGUF(NamedTuple):
    path: Path
    metadata: dict          # key -> Python value (str, int, float, bool, list)
    tensors: dict           # GGUF name -> mx.array (".weight", and ".scales"/".biases" if quantized)
    notes: list             # what was not kept as stored (de-quantized types)


def read_gguf(path) -> GGUF:
    """Everything in the GGUF at `path`; a file that is not one (truncated, unknown tensor
    type) is one `ModelError` naming it."""
    path = Path(path)
    try:
        tensors, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError):
        tensors = meta = None
    if meta is not None and _scalar(meta.get("general.file_type")) in NATIVE_FILE_TYPES:
        return GGUF(path, {k: _python(v) for k, v in meta.items()}, tensors, [])
    return _read_with_gguf(path)


def _scalar(value):
    return value.item() if isinstance(value, mx.array) and value.ndim == 0 else value


def _python(value):
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _read_with_gguf(path: Path) -> GGUF:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on bad bytes
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "GGMLQuantizationType" in reason:
            reason = f"unknown tensor type ({reason})"
        raise ModelError(f"{path}: not a readable GGUF file ({reason})") from None
    metadata = {name: field.contents() for name, field in reader.fields.items()
                if not name.startswith("GGUF.")}
    tensors, dequantized = {}, {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        base = t.name[: -len(".weight")] if t.name.endswith(".weight") else None
        if kind in BITS and base is not None:
            w, scales, biases = pack(np.asarray(t.data), kind)
            tensors.update({t.name: w, f"{base}.scales": scales, f"{base}.biases": biases})
        elif kind in ("F32", "F16"):
            tensors[t.name] = mx.array(np.asarray(t.data))
        elif kind == "BF16":
            shape = tuple(int(n) for n in reversed(t.shape))
            bits = np.asarray(t.data).view(np.uint16).reshape(shape)
            tensors[t.name] = mx.array(bits).view(mx.bfloat16)
        else:
            from gguf.quants import dequantize

            try:
                values = dequantize(np.asarray(t.data), t.tensor_type)
            except NotImplementedError:
                raise ModelError(f"{path}: tensor {t.name} has type {kind}, which the gguf "
                                 "package cannot de-quantize") from None
            tensors[t.name] = mx.array(values.astype(np.float16))
            dequantized[kind] = dequantized.get(kind, 0) + 1
    notes = [f"note: {n} {kind} tensors de-quantized to float16 (MLX keeps Q4_0, Q4_1 and Q8_0 "
             "quantized; other GGUF types are not MLX formats)" for kind, n in dequantized.items()]
    return GGUF(path, metadata, tensors, notes)


def pack(blocks: np.ndarray, kind: str):
    """(weight uint32, scales, biases) in MLX's affine layout for GGUF blocks `blocks`
    (uint8, one row per matrix row) of type Q4_0, Q4_1 or Q8_0."""
    rows = blocks.shape[0]
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    b = blocks.reshape(rows, -1, size)
    d = b[..., :2].copy().view(np.float16)[..., 0]
    if kind == "Q8_0":
        q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        bias = -128 * d
    else:
        qs = b[..., 4:] if kind == "Q4_1" else b[..., 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # GGUF: low nibbles hold 0..15
        q = q[..., 0::2] | (q[..., 1::2] << 4)              # MLX: element 2k in the low nibble
        bias = b[..., 2:4].copy().view(np.float16)[..., 0] if kind == "Q4_1" else -8 * d
    words = np.ascontiguousarray(q).reshape(rows, -1).view(np.uint32)
    return mx.array(words), mx.array(d), mx.array(bias.astype(np.float16))


def quantized_bits(tensors: dict, base: str) -> int | None:
    """The bits of `base`'s packed weight, or None if it is not quantized."""
    scales = tensors.get(f"{base}.scales")
    if scales is None:
        return None
    return tensors[f"{base}.weight"].shape[-1] * 32 // (scales.shape[-1] * GROUP)
