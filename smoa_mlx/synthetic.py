"""Generated Llama model directories, for tests and benchmarks that must run offline.

`make_llama(path, ...)` writes what `mlx_lm.load` and `transformers` read:
`config.json`, `model.safetensors` (random weights) and a byte-level BPE
tokenizer trained on a few sentences, with a chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = [
    "Once upon a time there was a little model that learned to answer questions.",
    "table: people columns: name, age Q: how old is Ann? A: SELECT age FROM people",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) ? !",
    "Question: what is two plus three? Answer: The answer is 5.",
]


def make_tokenizer(path, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    path = Path(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096,
    }, indent=2))
    return tok.get_vocab_size()


def make_llama(
    path, hidden_size: int = 64, num_hidden_layers: int = 2, intermediate_size: int = 160,
    num_attention_heads: int = 4, num_key_value_heads: int = 2, vocab_size: int | None = None,
    seed: int = 0, tie_word_embeddings: bool = True, with_tokenizer: bool = True,
):
    """Write a random float32 Llama to `path` and return the path."""
    from mlx_lm.models import llama

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if with_tokenizer:
        vocab_size = vocab_size or make_tokenizer(path)
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
        "intermediate_size": intermediate_size, "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads, "vocab_size": vocab_size or 320,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": tie_word_embeddings, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Embeddings default to N(0, 1); scale them so logits stay in a realistic range.
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * 0.05
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, {"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
