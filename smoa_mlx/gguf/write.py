"""`fuse --export-gguf`: write a fused model as a GGUF file that llama.cpp (and Ollama) run.

Written as llama.cpp's `convert_hf_to_gguf.py` does for each architecture in `names.ARCHS`
(llama and mistral as `llama`, qwen2, qwen3, gemma, gemma2, gemma3): the hyperparameters of
`names.HPARAMS` the model has, every tensor under llama.cpp's name (gguf's `TensorNameMap`),
q_proj/k_proj rows permuted to llama.cpp's RoPE layout where the architecture needs it, Gemma's
RMSNorm weights stored as 1 + w; the tokenizer (`vocab.py`).

Output types (`OUT_TYPES`): f32, f16, bf16, q8_0, q4_0 (gguf's own `quants.quantize`, as
convert_hf_to_gguf uses). Norms and other 1-D tensors stay F32; a tensor whose rows do not
split into whole quantization blocks (32 values) falls back to F16, as convert_hf_to_gguf's
does. q4_0 keeps the output head (the token embedding when tied) in Q8_0: llama-quantize gives
it Q6_K, which gguf cannot write, so the nearest type it can is used rather than 4 bits.
Not written: Llama 3 RoPE frequency factors and other RoPE scalings than linear (refused).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError, ModelError
from ..files import atomic_write
from .names import ARCHS, FLOAT_HPARAMS, HPARAMS, permute, tensor_map
from .vocab import add_tokenizer

# output type -> (general.file_type, tensor type of matrices); mlx-lm/HF dtype spellings alias them
OUT_TYPES = {"f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16"),
             "q8_0": ("MOSTLY_Q8_0", "Q8_0"), "q4_0": ("MOSTLY_Q4_0", "Q4_0")}
ALIASES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
# hparams written only for these architectures: llama.cpp reads them there, and mlx-lm computes
# them there (its gemma3_text has no final softcapping, so llama.cpp is not told of one)
_GEMMA_ONLY = {"attn_logit_softcapping": ("gemma2",), "final_logit_softcapping": ("gemma2",),
               "sliding_window": ("gemma2", "gemma3"), "sliding_window_pattern": ("gemma3",),
               "rope_local_base_freq": ("gemma3",)}
# llama.cpp's Gemma 2/3 scale queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B
# models it recognises by their layer count; query_pre_attn_scalar must say the same.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def out_type(name: str) -> str:
    """The canonical output type for `name` (f16, float16, F16 ... -> f16)."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in OUT_TYPES:
        raise ConfigError(f"--gguf-dtype must be one of {', '.join(OUT_TYPES)} (or float32, float16, bfloat16), "
                          f"got {name!r}")
    return key


def default_file_name(dtype: str) -> str:
    return f"ggml-model-{out_type(dtype)}.gguf"


def _check(config: dict) -> str:
    """The model's llama.cpp architecture, or a one-line refusal of what llama.cpp would not match."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise ModelError(f"GGUF export supports {', '.join(ARCHS)}, not model_type {model_type!r}")
    if config.get("quantization"):
        raise ConfigError("GGUF export needs a float model: fuse with --de-quantize")
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "linear", "default"):
        raise ModelError(f"GGUF export: rope_scaling type {kind!r} is not written (llama.cpp needs "
                         "its frequency factors); only linear scaling is")
    if config.get("rope_traditional"):
        raise ModelError("GGUF export: rope_traditional models have no llama.cpp RoPE layout")
    arch = ARCHS[model_type].gguf
    if arch in _GEMMA_27B_LAYERS and config.get("query_pre_attn_scalar") is not None:
        head_dim = _head_dim(config)
        big = config["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch]
        expected = config["hidden_size"] // config["num_attention_heads"] if big else head_dim
        if config["query_pre_attn_scalar"] != expected:
            raise ModelError(f"GGUF export: llama.cpp's {arch} scales attention by 1/sqrt({expected}), this model "
                             f"by 1/sqrt(query_pre_attn_scalar = {config['query_pre_attn_scalar']})")
    return arch


def model_hparams(config: dict, model) -> dict:
    """config.json completed by the defaults the mlx-lm `model` ran with (e.g. Gemma 3's rope
    bases and sliding-window pattern): what llama.cpp must be told is what MLX computed."""
    return {**config, **vars(getattr(model, "args", None) or {})}


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _add_hparams(w, arch: str, config: dict, ftype) -> None:
    config = dict(config, head_dim=_head_dim(config))
    config.setdefault("max_position_embeddings", 2048)
    for key, gguf_key in HPARAMS.items():
        value = config.get(key)
        if value is None or arch not in _GEMMA_ONLY.get(key, (arch,)):
            continue
        gguf_key = gguf_key.format(arch=arch)
        if key in FLOAT_HPARAMS:
            w.add_float32(gguf_key, float(value))
        else:
            w.add_uint32(gguf_key, int(value))
    w.add_value_length(config["head_dim"])
    w.add_rope_dimension_count(config["head_dim"])
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    w.add_file_type(ftype)


def _float32(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value.astype(np.float32, copy=False)
    import mlx.core as mx

    return np.array(value.astype(mx.float32))


def tensor_type(gguf_name: str, ndim: int, dtype: str, tied: bool):
    """The GGML type a tensor is written in (before the fallback for rows of partial blocks)."""
    import gguf

    if ndim <= 1 or gguf_name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    head = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    if dtype == "q4_0" and head:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType[OUT_TYPES[dtype][1]]


def write_gguf(path, weights: dict, config: dict, model_dir, dtype: str = "f16", log=print,
               name: str | None = None) -> Path:
    """Write `weights` (mlx-lm names, HF layout; numpy or MLX arrays) of a model with `config`
    (config.json, best completed with the mlx-lm model's args) and the tokenizer in `model_dir`
    to the GGUF file `path` (atomically); `name`: general.name (default: the model directory's)."""
    import gguf

    arch = _check(config)
    dtype = out_type(dtype)
    spec = ARCHS[config["model_type"]]
    model_dir = Path(model_dir)
    n_layer, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    names = tensor_map(config["model_type"], n_layer)
    tied = not any(k.endswith("lm_head.weight") for k in weights)
    title = name or model_dir.name

    def write(tmp):
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(title)
        _add_hparams(w, arch, config, gguf.LlamaFileType[OUT_TYPES[dtype][0]])
        add_tokenizer(w, model_dir, config["vocab_size"], log)
        for name, value in weights.items():
            if not name.endswith("rotary_emb.inv_freq"):
                new = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise ModelError(f"GGUF export: no llama.cpp name for tensor {name}")
                data, qtype = _encode(name, new, _float32(value))
                w.add_tensor(new, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    def _encode(name, new, a):
        """(data, GGML type) of one tensor in llama.cpp's layout."""
        if spec.permute_qk and name.endswith("self_attn.q_proj.weight"):
            a = permute(a, n_head, n_head)
        elif spec.permute_qk and name.endswith("self_attn.k_proj.weight"):
            a = permute(a, n_head, n_kv)
        if spec.norm_offset and name.endswith("norm.weight"):
            a = a + np.float32(spec.norm_offset)
        qtype = tensor_type(new, a.ndim, dtype, tied)
        try:
            return gguf.quants.quantize(a, qtype), qtype
        except gguf.QuantError:  # rows of partial blocks: F16, as convert_hf_to_gguf falls back
            return gguf.quants.quantize(a, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16

    return atomic_write(path, write)
