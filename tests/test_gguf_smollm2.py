"""The real model: SmolLM2-135M-Instruct as llama.cpp ships it (Q4_1, token_embd Q8_0, norms
F32, tied embeddings) loads, answers, matches transformers' de-quantized GGUF load, trains,
and round-trips through an MLX directory with its adapters."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest

import smoa_mlx
from smoa_mlx.gguf.model import convert_gguf

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return smoa_mlx.load(str(smollm2_gguf), return_config=True)


@pytest.fixture(scope="module")
def smol_dir(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "mlx"
    convert_gguf(str(smollm2_gguf), out)
    return out


def logits(model, ids):
    return np.array(model(mx.array([ids])).astype(mx.float32)[0], dtype=np.float64)


def test_loads_quantized_and_answers_paris(smol):
    from mlx_lm import generate

    model, tokenizer, config = smol
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert config["quantization"]["bits"] == 4 and config["quantization"]["model.embed_tokens"]["bits"] == 8
    assert config["tie_word_embeddings"] and type(model.model.embed_tokens).__name__ == "QuantizedEmbedding"
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    answer = generate(model, tokenizer, prompt, max_tokens=16)  # greedy
    assert "Paris" in answer, answer


def test_logits_match_transformers_dequantized_gguf(smol, smollm2_gguf):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, _ = smol
    name, where = smollm2_gguf.name, str(smollm2_gguf.parent)
    hf_tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    for text in ("What is the capital of France?", "  déjà vu 日本語 🤖\n\tdef f(x): return x**2",
                 "<|im_start|>user\nhi<|im_end|>"):
        assert tokenizer.encode(text) == hf_tok.encode(text), text
    hf = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].double().numpy()
    ours = logits(model, ids)
    # measured: 4.3e-6 of the largest logit (float32 sums in another order)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_saved_dir_loads_identically(smol, smol_dir):
    model, _, config = smol
    again, _, saved = smoa_mlx.load(str(smol_dir), return_config=True)
    assert saved == config
    ids = [1, 504, 3458, 282, 4649, 30]
    assert np.array_equal(logits(model, ids), logits(again, ids))


def test_smoa_trains_on_the_gguf_and_adapters_move_between_gguf_and_dir(smollm2_gguf, smol_dir, tmp_path,
                                                                         make_adapter):
    from smoa_mlx.train import train

    data = tmp_path / "data"
    data.mkdir()
    chats = [{"text": f"{a} plus {b} is {a + b}."}  # ~8 tokens: on CPU every token costs
             for a, b in [(1, 2), (3, 4), (2, 5), (6, 1), (4, 4), (7, 2), (3, 3), (5, 1)]]
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    out = tmp_path / "adapter"
    r = train({"model": str(smollm2_gguf), "data": str(data), "adapter_path": str(out), "iters": 2,
               "batch_size": 2, "num_layers": 4, "max_seq_length": 64, "learning_rate": 2e-3,
               "warmup": 0, "steps_per_report": 1, "steps_per_eval": 100, "val_batches": 1})
    assert r["val_loss"] < r["initial_val_loss"], r
    ids = [1, 504, 3458, 282, 4649, 30]
    on_gguf, _ = smoa_mlx.load(str(smollm2_gguf), adapter_path=str(out))
    on_dir, _ = smoa_mlx.load(str(smol_dir), adapter_path=str(out))
    assert np.array_equal(logits(on_gguf, ids), logits(on_dir, ids))
    # and the other way: an adapter made on the MLX directory loads on the GGUF
    other = make_adapter(smol_dir, tmp_path / "on_dir", num_layers=2, b=0.01)
    a, _ = smoa_mlx.load(str(smol_dir), adapter_path=str(other))
    b, _ = smoa_mlx.load(str(smollm2_gguf), adapter_path=str(other))
    base, _ = smoa_mlx.load(str(smollm2_gguf))
    assert np.array_equal(logits(a, ids), logits(b, ids)) and not np.allclose(logits(b, ids), logits(base, ids))


def test_ollama_and_lm_studio_layouts_find_it(smollm2_gguf, tmp_path, monkeypatch):
    root = tmp_path / "ollama"
    digest = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / "smollm2" / "135m"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                "digest": f"sha256:{digest}"}]}))
    (root / "blobs").mkdir()
    os.symlink(smollm2_gguf, root / "blobs" / f"sha256-{digest}")
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    lm = tmp_path / "lmstudio" / "HuggingFaceTB" / "SmolLM2-135M-Instruct-GGUF"
    lm.mkdir(parents=True)
    os.symlink(smollm2_gguf, lm / smollm2_gguf.name)
    ids = [1, 504, 3458]
    a, _ = smoa_mlx.load("ollama:smollm2:135m")
    b, _ = smoa_mlx.load(str(lm))
    assert np.array_equal(logits(a, ids), logits(b, ids))


SAMPLES = ["What is 12345 + 678?", "In 2024, 3.14159 was   π.", "SELECT col FROM t WHERE x = 10",
           "<|im_start|>user\nHi 42<|im_end|>", " leading space, don't stop", "naïve café — ünïcödé"]


def test_tokenizes_as_llama_cpp_does(smol, smollm2_gguf):
    """llama.cpp reading the same file is the reference for the whole tokenizer: vocabulary,
    merges, the "smollm" pre-tokenizer (one digit a token), special tokens matched whole."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _, tokenizer, _ = smol
    ref = llama_cpp.Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
    for text in SAMPLES:
        want = ref.tokenize(text.encode(), add_bos=False, special=True)
        assert tokenizer.encode(text, add_special_tokens=False) == want, text
    assert len(tokenizer.encode("12345", add_special_tokens=False)) == 5
