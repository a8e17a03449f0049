"""The tokenizer a GGUF describes (vocabulary, merges, special tokens, chat template in its
metadata), saved as Hugging Face tokenizer files that mlx-lm loads.

transformers builds it (`convert_gguf_tokenizer`: byte-level BPE "gpt2", SentencePiece
"llama", with each architecture's pre-tokenizer), so the result is what
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` gives. Its own entry point reads the
file with a reader that needs PyTorch, so the metadata is handed over here from our read,
grouped as `get_gguf_tokenizer` groups it: chat and training never need torch.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from .names import PRE_TOKENIZERS

# What get_gguf_tokenizer reads into the special tokens (`tokenizer.ggml.<key>`).
SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
           "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
# Tokens that end a turn besides EOS (llama.cpp's end-of-generation set).
END_IDS = ("eos_token_id", "eot_token_id", "eom_token_id")


def _converter():
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer,
        )
    except ImportError:  # transformers before the integrations.gguf package
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    return GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer


def end_token_ids(metadata: dict) -> list[int]:
    """EOS and the other end-of-turn ids, for config.json's `eos_token_id`."""
    ids = [metadata.get(f"tokenizer.ggml.{key}") for key in END_IDS]
    return list(dict.fromkeys(i for i in ids if i is not None))


def save_tokenizer(metadata: dict, out: Path, source) -> None:
    """Write tokenizer.json, tokenizer_config.json (and the chat template) into `out`."""
    from transformers import PreTrainedTokenizerFast

    kind = metadata.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in metadata:
        raise ModelError(f"{source}: the GGUF has no tokenizer (no tokenizer.ggml.model / tokens "
                         "metadata); this file cannot be used as a chat or training base")
    mapping, convert = _converter()
    grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in metadata}
               for group, renames in mapping.items()}
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if kind == "llama":  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        config.setdefault("add_bos_token", True)
    tokens = tokenizer["tokens"]
    for name, key in SPECIAL.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[name] = tokens[token_id]
    try:
        backend, extra = convert(metadata.get("general.architecture"), tokenizer)
    except (ValueError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{source}: cannot build its tokenizer {kind!r} ({reason})") from None
    if kind == "llama" and metadata.get("tokenizer.ggml.add_space_prefix", True):
        _always_prefix(backend)
    pre = PRE_TOKENIZERS.get(metadata.get("tokenizer.ggml.pre"))
    if kind == "gpt2" and pre is not None:
        backend = _with_pre_tokenizer(backend, pre)
    PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra).save_pretrained(str(out))


def _always_prefix(backend) -> None:
    """SentencePiece's dummy prefix on every text, as llama.cpp (`add_space_prefix`) and
    SentencePiece itself add it: " Tom" is "▁▁Tom". transformers' Metaspace(prepend_scheme=
    "first") skips it when the text starts with a space, so such texts tokenized otherwise."""
    from tokenizers import normalizers

    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                               normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None


def _with_pre_tokenizer(backend, pre: dict):
    """The text splitting llama.cpp applies for the file's `tokenizer.ggml.pre` (names.PRE_TOKENIZERS):
    transformers' converter ignores that key and splits every gpt2 vocabulary as GPT-2 does
    (digit runs whole: Llama 3's "llama-bpe" splits them in threes, so its numbers would merge otherwise)."""
    import json

    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    data["pre_tokenizer"] = pre
    return Tokenizer.from_str(json.dumps(data))
