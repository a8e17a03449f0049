"""`fuse --export-gguf`: write a fused Llama as a GGUF file that llama.cpp reads.

Written, as llama.cpp's `convert_hf_to_gguf.py` does for Llama: the llama hparams
(context, embedding and feed-forward lengths, blocks, heads, KV heads, RMS eps, RoPE
base, dimension count and linear scaling, vocab size, file type); every tensor under
llama.cpp's name (gguf's own `TensorNameMap`), in float16 or float32, norms in float32,
with q_proj/k_proj rows permuted to llama.cpp's RoPE layout; the tokenizer from
`tokenizer.json` with gguf's vocab readers: byte-level BPE as `gpt2` (tokens, types,
merges), SentencePiece-style BPE with byte fallback as `llama` (tokens, types, and
scores = -merge rank, so llama.cpp's score-driven merging follows the BPE merges),
plus BOS/EOS/UNK/PAD ids, add_bos/add_eos and the chat template (gguf's SpecialVocab).
Not written: the pre-tokenizer hash (`tokenizer.ggml.pre` is "default"), Llama 3 RoPE
frequency factors (refused), quantized types.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ModelError
from .names import permute, tensor_map

ARCHITECTURES = ("llama",)
DTYPES = ("float16", "float32")


def _vocab(model_dir: Path):
    """gguf's reader for this tokenizer.json: BpeVocab (gpt2) or LlamaHfVocab (llama)."""
    from gguf.vocab import BpeVocab, LlamaHfVocab

    try:
        return BpeVocab(model_dir), None
    except FileNotFoundError:
        pass
    try:
        vocab = LlamaHfVocab(model_dir)
    except (FileNotFoundError, TypeError) as e:
        raise ModelError(f"{model_dir / 'tokenizer.json'}: a tokenizer GGUF export does not handle ({e})") from None
    merges = json.loads((model_dir / "tokenizer.json").read_text())["model"].get("merges", [])
    rank = {}
    for i, m in enumerate(merges):
        pair = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault("".join(pair), i)
    return vocab, rank


def write_gguf(path, weights: dict, config: dict, model_dir, dtype: str = "float16") -> Path:
    """Write `weights` (mlx-lm names, HF layout; numpy or MLX arrays) of a Llama to `path`."""
    import gguf

    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelError(f"GGUF export supports {', '.join(ARCHITECTURES)}, not model_type {model_type!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"--gguf-dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if config.get("quantization"):
        raise ConfigError("GGUF export needs a float model: fuse with --de-quantize")
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "linear", "default"):
        raise ModelError(f"GGUF export: rope_scaling type {kind!r} is not written (llama.cpp needs "
                         "its frequency factors); only linear scaling is")
    model_dir, path = Path(model_dir), Path(path)
    n_layer, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    ftype = gguf.LlamaFileType.MOSTLY_F16 if dtype == "float16" else gguf.LlamaFileType.ALL_F32

    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(config.get("_name_or_path") or model_dir.name)
    w.add_context_length(config.get("max_position_embeddings", 2048))
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(n_layer)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    w.add_rope_freq_base(config.get("rope_theta", 10000.0))
    w.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(ftype)

    vocab, rank = _vocab(model_dir)
    tokens, scores, types = [], [], []
    for i, (text, score, toktype) in enumerate(vocab.all_tokens()):
        tokens.append(text)
        if rank is not None and toktype == gguf.TokenType.NORMAL:
            score = -float(rank.get(text.decode("utf-8"), len(rank)))  # single pieces merge last
        scores.append(score)
        types.append(toktype)
    if len(tokens) > config["vocab_size"]:
        raise ModelError(f"{model_dir}: the tokenizer has {len(tokens)} tokens, the model {config['vocab_size']}")
    while len(tokens) < config["vocab_size"]:  # embedding rows past the tokenizer, as convert_hf_to_gguf pads
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model(vocab.tokenizer_model)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=rank is None, n_vocab=len(tokens)).add_to_gguf(w)

    names = tensor_map(model_type, n_layer)
    for name, value in weights.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        a = np.asarray(value if isinstance(value, np.ndarray) else np.array(value.astype(_mx_float32())),
                       dtype=np.float32)
        if name.endswith("self_attn.q_proj.weight"):
            a = permute(a, n_head, n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            a = permute(a, n_head, n_kv)
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ModelError(f"GGUF export: no llama.cpp name for tensor {name}")
        keep32 = dtype == "float32" or a.ndim == 1  # norms stay float32, as llama.cpp writes them
        w.add_tensor(new, a if keep32 else a.astype(np.float16))
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _mx_float32():
    import mlx.core as mx

    return mx.float32
