"""A GGUF file as an mlx-lm model directory: config.json from the metadata (`names.HPARAMS`),
weights under mlx-lm's names (`names.tensor_map`) with llama.cpp's changes undone (Q/K
rows permuted for its RoPE on llama-arch files, Gemma's RMSNorm weights stored as 1 + w),
the tokenizer files (`tokenizer.py`).

Q4_0/Q4_1/Q8_0 stay quantized (`read.py`); their scales and biases are widened to float32
(exactly), because MLX's quantized matmul computes in the scales' dtype and float16 would
round every weight. config.json's `quantization` gives the default bits and a per-layer
entry for the others (SmolLM2: token_embd Q8_0 under Q4_1 layers). `dequantize` writes
plain float16 weights instead.

`mlx_dir(gguf)` is what the loader uses: the converted directory cached under the cache
root (`plan_cache.cache_dir()`, `gguf/<name>-<key>`), keyed by the file's resolved path,
size and modification time, written atomically, so the second run starts at once.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import ModelError
from ..files import staged_dir, write_json
from .names import ARCHS, HPARAMS, MODEL_TYPES, tensor_map, unpermute
from .read import GROUP, GGUF, quantized_bits, read_gguf
from .tokenizer import end_token_ids, save_tokenizer

VERSION = 2  # part of the cache key: bump when the conversion changes
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# llama.cpp scales Gemma 2/3 queries by 1/sqrt(n_embd / n_head) for the 27B (46 / 62 layers),
# by 1/sqrt(head_dim) otherwise; transformers calls it query_pre_attn_scalar.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def mlx_config(g: GGUF) -> dict:
    """config.json for the GGUF's model, from its metadata and tensor names."""
    meta = g.metadata
    arch = meta.get("general.architecture")
    model_type = MODEL_TYPES.get(arch)
    if model_type is None:
        raise ModelError(f"{g.path}: GGUF architecture {arch!r} is not supported "
                         f"(reads {', '.join(sorted(MODEL_TYPES))})")
    config = {"model_type": model_type}
    for key, gguf_key in HPARAMS.items():
        value = meta.get(gguf_key.format(arch=arch))
        if isinstance(value, float):  # GGUF floats are float32: their shortest spelling (1e-05)
            value = float(str(np.float32(value)))
        if value is not None:
            config[key] = value
    missing = [HPARAMS[k].format(arch=arch) for k in REQUIRED if k not in config]
    if missing or "token_embd.weight" not in g.tensors:
        raise ModelError(f"{g.path}: incomplete GGUF ({', '.join(missing or ['no token_embd.weight'])})")
    heads = config["num_attention_heads"]
    config.setdefault("num_key_value_heads", heads)
    config.setdefault("head_dim", config["hidden_size"] // heads)
    config["vocab_size"] = g.tensors["token_embd.weight"].shape[0]
    config["tie_word_embeddings"] = "output.weight" not in g.tensors
    config["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
    scaling = _rope_scaling(meta, arch, g.path)
    if "rope_freqs.weight" in g.tensors:
        scaling = llama3_rope_scaling(np.array(g.tensors["rope_freqs.weight"].astype(mx.float32)),
                                      meta.get(f"{arch}.rope.dimension_count", config["head_dim"]),
                                      config.get("rope_theta", 10000.0))
        if scaling is None:
            raise ModelError(f"{g.path}: rope_freqs.weight is not Llama 3's RoPE scaling "
                             "(no llama3 rope_scaling reproduces it)")
    if scaling:
        config["rope_scaling"] = scaling
    if model_type in GEMMA_27B_LAYERS:
        big = config["num_hidden_layers"] == GEMMA_27B_LAYERS[model_type]
        config["query_pre_attn_scalar"] = config["hidden_size"] // heads if big else config["head_dim"]
    if model_type == "gemma3_text":  # llama.cpp: local layers use base 10000, every 6th is global
        config.update(rope_local_base_freq=10000.0, sliding_window_pattern=6)
    for key in ("bos_token_id", "padding_token_id"):
        if f"tokenizer.ggml.{key}" in meta:
            config[key.replace("padding", "pad")] = meta[f"tokenizer.ggml.{key}"]
    ends = end_token_ids(meta)
    if ends:
        config["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    return config


def _rope_scaling(meta: dict, arch: str, path) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings":
                meta.get(f"{arch}.rope.scaling.original_context_length")}
    raise ModelError(f"{path}: RoPE scaling {kind!r} is not supported (linear and yarn are)")


def llama3_rope_scaling(factors: np.ndarray, dims: int, base: float, context: int = 8192) -> dict | None:
    """mlx-lm's "llama3" rope_scaling from llama.cpp's per-frequency factors (`rope_freqs`,
    how convert_hf_to_gguf stores Llama 3.1+ scaling), or None when no such scaling yields
    them. Only context/low and context/high are determined, so the context is fixed (8192,
    Llama 3's) and the low/high factors fitted to the smoothly scaled band."""
    factors = np.asarray(factors, np.float64)
    wavelen = 2 * np.pi * base ** (np.arange(0, dims, 2) / dims)
    factor = float(factors.max())
    medium = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if factor <= 1 or medium.sum() < 2 or factors.shape != wavelen.shape:
        return None
    smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)  # = context/(wl (hi-lo)) - lo/(hi-lo)
    slope, intercept = np.polyfit(1 / wavelen[medium], smooth, 1)
    span = context / slope
    low = -intercept * span
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
               "high_freq_factor": float(low + span), "original_max_position_embeddings": context}
    low_wl, high_wl = context / low, context / (low + span)
    s = (context / wavelen - low) / span
    again = np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, factor, 1 / ((1 - s) / factor + s)))
    return scaling if np.allclose(again, factors, rtol=1e-5) else None


def _model_names(config: dict) -> list[str]:
    """The parameter names of mlx-lm's model for `config` (built lazily: nothing allocated)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return [k for k, _ in tree_flatten(model_class(args_class.from_dict(config)).parameters())]


def mlx_weights(g: GGUF, config: dict, dequantize: bool = False) -> tuple[dict, dict | None]:
    """(weights under mlx-lm's names, the `quantization` config entry or None)."""
    model_type, n_layer = config["model_type"], config["num_hidden_layers"]
    names = _model_names(config)
    to_gguf = tensor_map(model_type, n_layer)
    stem = {}  # GGUF tensor stem ("blk.0.attn_q") -> mlx-lm module path
    for name in names:
        module, _, leaf = name.rpartition(".")
        found = to_gguf.get_name(name, try_suffixes=(".weight", ".bias"))
        if found is not None:
            stem[found.rpartition(".")[0]] = module
    arch = ARCHS[model_type]
    weights, bits = {}, {}
    for gname, value in g.tensors.items():
        gstem, _, leaf = gname.rpartition(".")
        if gstem == "rope_freqs":  # in config.json's rope_scaling (mlx_config)
            continue
        if gstem not in stem:
            raise ModelError(f"{g.path}: tensor {gname} has no place in mlx-lm's {model_type} model")
        module = stem[gstem]
        if arch.permute_qk and module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            kv = config["num_key_value_heads"] if module.endswith("k_proj") else None
            value = unpermute(value, config["num_attention_heads"], kv)
        if arch.norm_offset and leaf == "weight" and module.endswith("norm"):
            value = (value.astype(mx.float32) - arch.norm_offset).astype(value.dtype)
        if leaf in ("scales", "biases"):
            value = value.astype(mx.float32)
        weights[f"{module}.{leaf}"] = value
    for module in {k.rpartition(".")[0] for k in weights if k.endswith(".scales")}:
        b = quantized_bits(weights, module)
        if dequantize:
            w, s, z = (weights.pop(f"{module}.{k}") for k in ("weight", "scales", "biases"))
            weights[f"{module}.weight"] = mx.dequantize(w, s, z, group_size=GROUP, bits=b).astype(mx.float16)
        else:
            bits[module] = b
    missing = sorted(set(names) - set(weights))
    if missing:
        raise ModelError(f"{g.path}: no tensor for {missing[0]} "
                         f"({to_gguf.get_name(missing[0], try_suffixes=('.weight', '.bias'))})")
    if not bits:
        return weights, None
    default = Counter(bits.values()).most_common(1)[0][0]
    quant = {"group_size": GROUP, "bits": default, "mode": "affine"}
    quant.update({m: {"group_size": GROUP, "bits": b} for m, b in sorted(bits.items()) if b != default})
    return weights, quant


def save_mlx_dir(gguf_path, out, dequantize: bool = False, log=print) -> Path:
    """Convert the GGUF at `gguf_path` into the mlx-lm model directory `out` (atomically)."""
    g = read_gguf(gguf_path)
    for note in g.notes:
        log(note)
    config = mlx_config(g)
    weights, quant = mlx_weights(g, config, dequantize)
    if quant:
        config["quantization"] = config["quantization_config"] = quant
    with staged_dir(out) as tmp:
        save_tokenizer(g.metadata, tmp, g.path)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, {"format": "mlx"})
        write_json(tmp / "config.json", config)
    return Path(out)


def convert_gguf(model: str, save_path, dequantize: bool = False, log=print) -> Path:
    """`convert gguf`: the GGUF `model` names (`locate.gguf_path`) as the MLX directory `save_path`."""
    from .locate import gguf_path

    path = gguf_path(str(model))
    if path is None:
        raise ModelError(f"{model}: not a GGUF model (a .gguf file, a directory holding one, "
                         "or ollama:NAME[:TAG])")
    save_mlx_dir(path, save_path, dequantize, log=log)
    log(f"wrote the MLX model directory {save_path} from {path}"
        + (" (de-quantized, float16)" if dequantize else ""))
    return Path(save_path)


def cache_key(path: Path) -> str:
    st = path.stat()
    ident = f"smoa-gguf-v{VERSION} {path.resolve()} {st.st_size} {st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def mlx_dir(gguf_path, log=None) -> Path:
    """The converted directory of `gguf_path`, from the cache when it is there (converted and
    cached otherwise; with the cache disabled, a temporary directory for this process)."""
    from ..plan_cache import cache_dir

    log = log or (lambda m: print(m, file=sys.stderr))
    path = Path(gguf_path)
    root = cache_dir()
    if root is None:
        tmp = tempfile.mkdtemp(prefix="smoa-gguf-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        out = Path(tmp) / "model"
    else:
        out = root / "gguf" / f"{path.stem[:40]}-{cache_key(path)}"
        if (out / "config.json").is_file():
            return out
    save_mlx_dir(path, out, log=log)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    if root is not None:
        log(f"converted {path} to an MLX model directory, cached at {out} ({size:.0f} MB)")
    return out


