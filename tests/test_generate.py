"""generate: adapters load into the shared generation path, which equals mlx-lm's own."""

import os
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import stream_generate

import smoa_mlx
from smoa_mlx.adapters import smoa_config
from smoa_mlx.generate import PromptCache, load_model, make_messages, prompt_tokens
from smoa_mlx.patch import smoa_layers

PROMPT = "Once upon a time"


def run_cli(module, *args, stdin=None):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], input=stdin,
                          capture_output=True, env=env, timeout=120)


def error_lines(stderr: bytes) -> list[str]:
    """stderr without the one-per-process BLAS speed warning."""
    return [l for l in stderr.decode().splitlines() if not l.startswith("warning:")]


def reference_tokens(model, tokenizer, tokens, max_tokens):
    """Plain mlx-lm greedy generation."""
    return [r.token for r in stream_generate(model, tokenizer, mx.array(tokens), max_tokens=max_tokens)]


def save_smoa(model_dir, path, perturb=False):
    model, _ = smoa_mlx.load(str(model_dir))
    smoa_mlx.apply_smoa(model, rank=4, num_blocks=2, alpha=8.0)
    if perturb:  # a non-zero update, so the adapter visibly changes the model
        for layer in smoa_layers(model).values():
            layer.smoa_b = [mx.full(b.shape, 0.5) for b in layer.smoa_b]
    smoa_mlx.save_adapter(model, path, smoa_config(model, str(model_dir)))
    return path


@pytest.fixture(scope="module")
def zero_adapter(tiny_model_dir, tmp_path_factory):
    return save_smoa(tiny_model_dir, tmp_path_factory.mktemp("zero") / "adapter")


def test_zero_adapter_generation_equals_mlx_lm(tiny_model_dir, zero_adapter):
    base, base_tok = mlx_lm.load(str(tiny_model_dir))
    tokens = base_tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    expected = reference_tokens(base, base_tok, tokens, 16)

    model, tokenizer = load_model(str(tiny_model_dir), str(zero_adapter))
    assert len(smoa_layers(model)) > 0  # the adapter really is in the model
    ours = prompt_tokens(tokenizer, make_messages(PROMPT))
    assert ours == list(tokens)
    got = [r.token for r in PromptCache(model).stream(tokenizer, ours, 16)]
    assert got == expected and len(got) == 16


def test_nonzero_adapter_changes_the_model(tiny_model_dir, tmp_path):
    adapter = save_smoa(tiny_model_dir, tmp_path / "adapter", perturb=True)
    base, tokenizer = smoa_mlx.load(str(tiny_model_dir))
    model, _ = load_model(str(tiny_model_dir), str(adapter))
    x = mx.array(tokenizer.encode(PROMPT))[None]
    assert mx.abs(model(x) - base(x)).max().item() > 1e-3


def test_prompt_tokens_raw_and_template(tiny_model_dir, stories_dir):
    _, tok = smoa_mlx.load(str(tiny_model_dir))
    messages = make_messages("hi", system_prompt="be brief")
    assert prompt_tokens(tok, messages) == list(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert prompt_tokens(tok, make_messages("hi"), use_chat_template=False) == tok.encode("hi")
    _, stories_tok = smoa_mlx.load(str(stories_dir))  # no chat template: raw text with BOS
    assert not stories_tok.has_chat_template
    assert prompt_tokens(stories_tok, make_messages(PROMPT))[0] == stories_tok.bos_token_id
    assert prompt_tokens(stories_tok, messages) == stories_tok.encode("be brief\n\nhi")


def test_prompt_cache_feeds_only_new_tokens_and_equals_fresh(stories_dir):
    model, tok = smoa_mlx.load(str(stories_dir))
    cache = PromptCache(model)
    first = tok.encode(PROMPT)
    reply = [r.token for r in cache.stream(tok, first, 12)]
    assert cache.tokens == first + reply  # the cache holds exactly the prompt and the reply
    follow = first + reply + tok.encode(" The dog", add_special_tokens=False)
    responses = list(cache.stream(tok, follow, 12))
    assert responses[0].prompt_tokens == len(follow) - len(first) - len(reply)  # only new tokens fed
    assert [r.token for r in responses] == reference_tokens(model, tok, follow, 12)
    # A prompt that diverges early trims the cache back and still equals a fresh run.
    other = tok.encode("The cat sat")
    assert [r.token for r in cache.stream(tok, other, 8)] == reference_tokens(model, tok, other, 8)


def test_generate_cli_streams_the_reply(tiny_model_dir, zero_adapter):
    base, tok = mlx_lm.load(str(tiny_model_dir))
    tokens = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    expected = mlx_lm.generate(base, tok, tokens, max_tokens=10)
    out = run_cli("smoa_mlx.generate", "--model", tiny_model_dir, "--adapter-path", zero_adapter,
                  "--prompt", PROMPT, "--max-tokens", 10)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode("utf-8") == expected + "\n"


def test_generate_cli_missing_adapter_is_one_line_error(tiny_model_dir, tmp_path):
    out = run_cli("smoa_mlx.generate", "--model", tiny_model_dir, "--adapter-path", tmp_path / "nope",
                  "--prompt", "hi")
    assert out.returncode != 0
    lines = error_lines(out.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0]
