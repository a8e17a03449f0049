"""A GGUF file's metadata and tensors, as MLX arrays under the file's own tensor names.

Q4_0, Q4_1 and Q8_0 stay quantized, as MLX's affine group-32 formats (the same values:
Q4_0 `w = d (q - 8)` is scale d, bias -8d; Q4_1 `w = d q + m` is scale d, bias m; Q8_0's
signed `w = d q` is the unsigned q + 128 with bias -128d), `<name>.weight` packed as
uint32 with `<name>.scales` / `<name>.biases` in float16 (the file's own d and m, so the
float32 de-quantization is bit for bit the `gguf` package's). F32/F16/BF16 are kept as
they are; every other type (K-quants, IQ...) is de-quantized by the `gguf` package to
float16, with a note.

MLX reads GGUF natively (`mx.load`): fast, and exact for F32, F16, Q4_0, Q4_1 and Q8_0.
A file with any other tensor type (a K-quant output layer is common in Q4_0 files) is read
with the `gguf` package's reader (slower: it parses the vocabulary in Python; once, the
loader caches the result) and the three formats packed here in NumPy, the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from ..errors import ModelError

# The tensor types mx.load reads exactly. It also reads Q2_K/Q4_K/Q6_K (de-quantized to
# float16 by its own code; Q4_K wrongly, errors of 75% of the largest value measured) and BF16 (as float16, losing what float16
# cannot hold), so the types are checked first (`tensor_types`).
NATIVE = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}
BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
GROUP = 32
# GGUF metadata value types of fixed size (bytes); 8 is a string, 9 an array.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class GGUF(NamedTuple):
    path: Path
    metadata: dict          # key -> Python value (str, int, float, bool, list)
    tensors: dict           # GGUF name -> mx.array (".weight", and ".scales"/".biases" if quantized)
    notes: list             # what was not kept as stored (de-quantized types)


def read_gguf(path) -> GGUF:
    """Everything in the GGUF at `path`; a file that is not one (truncated, unknown tensor
    type) is one `ModelError` naming it."""
    path = Path(path)
    types = tensor_types(path)
    if set(types.values()) <= NATIVE:
        try:
            tensors, meta = mx.load(str(path), return_metadata=True)
            return GGUF(path, {k: _python(v) for k, v in meta.items()}, tensors, [])
        except (RuntimeError, ValueError):
            pass  # the gguf reader below says what is wrong
    return _read_with_gguf(path)


def tensor_types(path: Path) -> dict[str, str]:
    """{tensor name: ggml type name} from the GGUF header, skipping the metadata values (the
    `gguf` reader parses them all, seconds for a large vocabulary; this takes milliseconds)."""
    from gguf import GGMLQuantizationType

    with open(path, "rb") as f:
        data = f.read(1 << 20)
        pos, types = 0, {}

        def take(n):
            nonlocal data, pos
            while pos + n > len(data):
                more = f.read(max(n, 1 << 20))
                if not more:
                    raise ModelError(f"{path}: not a readable GGUF file (truncated header)")
                data += more
            pos += n
            return data[pos - n:pos]

        def skip(kind):
            if kind in _FIXED:
                take(_FIXED[kind])
            elif kind == 8:
                take(int.from_bytes(take(8), "little"))
            elif kind == 9:
                item, count = int.from_bytes(take(4), "little"), int.from_bytes(take(8), "little")
                if item in _FIXED:
                    take(_FIXED[item] * count)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                raise ModelError(f"{path}: not a readable GGUF file (metadata value type {kind})")

        if data[:4] != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file (no GGUF magic)")
        head = take(24)
        n_tensors, n_kv = int.from_bytes(head[8:16], "little"), int.from_bytes(head[16:24], "little")
        for _ in range(n_kv):
            skip(8)
            skip(int.from_bytes(take(4), "little"))
        for _ in range(n_tensors):
            name = take(int.from_bytes(take(8), "little")).decode("utf-8", "replace")
            take(8 * int.from_bytes(take(4), "little"))
            kind = int.from_bytes(take(4), "little")
            take(8)
            try:
                types[name] = GGMLQuantizationType(kind).name
            except ValueError:
                raise ModelError(f"{path}: tensor {name} has an unknown tensor type ({kind})") from None
    return types


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
