"""The tokenizer of a GGUF export, from the model directory's `tokenizer.json`, with gguf's
vocab readers: byte-level BPE as `gpt2` (tokens, types, merges, and the pre-tokenizer llama.cpp
must split text with), SentencePiece-style BPE with byte fallback as `llama` (tokens, types, and
scores = -merge rank, so llama.cpp's score-driven merging follows the BPE merges); special token
ids, whether BOS/EOS are added (as the tokenizer really does) and the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError
from .names import PRE_TOKENIZERS


def _vocab(model_dir: Path):
    """gguf's reader for this tokenizer.json: BpeVocab (gpt2) or LlamaHfVocab (llama), and the
    merge ranks a `llama` vocabulary's scores come from."""
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


def _without_offsets(node):
    if isinstance(node, dict):
        return {k: _without_offsets(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_without_offsets(v) for v in node]
    return node


def pre_tokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` for this tokenizer's pre-tokenizer (None: none known)."""
    pre = _without_offsets(tokenizer_json.get("pre_tokenizer"))
    return next((name for name, known in PRE_TOKENIZERS.items() if pre == _without_offsets(known)), None)


def _adds_bos_eos(model_dir: Path, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """Whether encoding text adds BOS / EOS (the tokenizer's post-processor, as HF applies it)."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos, bool(ids) and ids[-1] == eos


def add_tokenizer(w, model_dir: Path, n_vocab: int, log=print) -> None:
    """Write the tokenizer of `model_dir` into GGUFWriter `w`, padded to the model's `n_vocab` rows."""
    import gguf

    vocab, rank = _vocab(model_dir)
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    # Added tokens are matched whole in text (special: CONTROL, else USER_DEFINED), also those the
    # BPE vocabulary holds too, which gguf's BpeVocab reads as NORMAL (convert_hf_to_gguf re-types them).
    added = {t["id"]: gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
             for t in tokenizer_json.get("added_tokens", [])}
    tokens, scores, types = [], [], []
    for i, (text, score, toktype) in enumerate(vocab.all_tokens()):
        tokens.append(text)
        if rank is not None and toktype == gguf.TokenType.NORMAL:
            score = -float(rank.get(text.decode("utf-8"), len(rank)))  # single pieces merge last
        scores.append(score)
        types.append(added.get(i, toktype))
    if len(tokens) > n_vocab:
        surplus = range(n_vocab, len(tokens))
        if not all(i in added for i in surplus):
            raise ModelError(f"GGUF export: the tokenizer has {len(tokens)} tokens, the model's embedding {n_vocab}")
        # e.g. transformers' Qwen2Tokenizer adds <|endoftext|> to any vocabulary: no row embeds it
        log(f"note: added tokens {', '.join(t.decode() for t in tokens[n_vocab:])} have no embedding row "
            "(ids past the model's vocabulary); left out of the GGUF")
        del tokens[n_vocab:], scores[n_vocab:], types[n_vocab:]
    while len(tokens) < n_vocab:  # embedding rows past the tokenizer, as convert_hf_to_gguf pads
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model(vocab.tokenizer_model)
    pre = "default"
    if vocab.tokenizer_model == "gpt2":
        pre = pre_tokenizer(tokenizer_json)
        if pre is None:
            log("note: the tokenizer's pre-tokenizer has no llama.cpp name (gguf/names.py PRE_TOKENIZERS); "
                "written as 'default', so llama.cpp may split some text differently")
            pre = "default"
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=rank is None, n_vocab=len(tokens))
    adds = _adds_bos_eos(model_dir, special.special_token_ids.get("bos"), special.special_token_ids.get("eos"))
    special.add_special_token.update(bos=adds[0], eos=adds[1])
    special.add_to_gguf(w, quiet=True)
