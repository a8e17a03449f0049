"""The one GGUF name table, read and written alike: which mlx-lm model types map to which
llama.cpp architecture, which config key is which GGUF key, and each tensor's name.

Tensor names come from the `gguf` package's own `TensorNameMap` (llama.cpp's table), so a
name is never spelled twice; what differs per architecture is in `ARCHS`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Arch(NamedTuple):
    gguf: str                # general.architecture
    permute_qk: bool         # llama.cpp's LlamaModel reorders q/k rows for its RoPE
    norm_offset: float = 0.0  # Gemma: llama.cpp stores RMSNorm weights as 1 + w


# mlx-lm model_type -> llama.cpp architecture (convert_hf_to_gguf writes Mistral as llama).
ARCHS = {
    "llama": Arch("llama", True),
    "mistral": Arch("llama", True),
    "qwen2": Arch("qwen2", False),
    "qwen3": Arch("qwen3", False),
    "gemma": Arch("gemma", False, 1.0),
    "gemma2": Arch("gemma2", False, 1.0),
    "gemma3_text": Arch("gemma3", False, 1.0),
}
# The model_type a GGUF architecture loads as (the first of ARCHS naming it).
MODEL_TYPES = {arch.gguf: t for t, arch in reversed(ARCHS.items())}

# config.json key -> GGUF key ("{arch}" is general.architecture), as transformers' GGUF_CONFIG_MAPPING.
HPARAMS = {
    "max_position_embeddings": "{arch}.context_length",
    "hidden_size": "{arch}.embedding_length",
    "num_hidden_layers": "{arch}.block_count",
    "intermediate_size": "{arch}.feed_forward_length",
    "num_attention_heads": "{arch}.attention.head_count",
    "num_key_value_heads": "{arch}.attention.head_count_kv",
    "rms_norm_eps": "{arch}.attention.layer_norm_rms_epsilon",
    "rope_theta": "{arch}.rope.freq_base",
    "head_dim": "{arch}.attention.key_length",
    "vocab_size": "{arch}.vocab_size",
    # Gemma 2/3 (llama.cpp reads them for those architectures only)
    "attn_logit_softcapping": "{arch}.attn_logit_softcapping",
    "final_logit_softcapping": "{arch}.final_logit_softcapping",
    "sliding_window": "{arch}.attention.sliding_window",
    "sliding_window_pattern": "{arch}.attention.sliding_window_pattern",
    "rope_local_base_freq": "{arch}.rope.freq_base_swa",
}
# The config keys whose GGUF value is a float32 (the rest are uint32).
FLOAT_HPARAMS = ("rms_norm_eps", "rope_theta", "attn_logit_softcapping", "final_logit_softcapping",
                 "rope_local_base_freq")


def tensor_map(model_type: str, n_layer: int):
    """gguf's TensorNameMap for this model type: `.get_name(hf_name, try_suffixes=...)`."""
    import gguf

    arch = ARCHS[model_type].gguf
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(enum, n_layer)


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's Q/K row order (convert_hf_to_gguf LlamaModel.permute) from HF's."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """The inverse of `permute` (for reading a GGUF back)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# tokenizer.ggml.pre (llama.cpp's name for a BPE pre-tokenizer's regexes) -> the tokenizer.json
# `pre_tokenizer` that splits text the same way (complete nodes, loadable as they are; compared
# without `trim_offsets`, which only moves offsets).
_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
_GPT2 = dict(_BYTES, use_regex=True)
_LLAMA3 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
           "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2 = _LLAMA3.replace("\\p{N}{1,3}", "\\p{N}")


def _split(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}, _BYTES]}


PRE_TOKENIZERS = {
    "gpt-2": _GPT2,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _GPT2]},
    "llama-bpe": _split(_LLAMA3),
    "qwen2": _split(_QWEN2),
}
