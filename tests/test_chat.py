"""chat: a conversation driven through stdin keeps its history, resets, and ends at EOF."""

import mlx_lm

import smoa_mlx
from smoa_mlx.chat import ChatSession
from smoa_mlx.generate import raw_text
from test_generate import run_cli

FIRST, SECOND = "Once upon a time", "what is two plus three?"
MAX_TOKENS = 12


def fresh_reply(model, tok, messages):
    """Independent reference: plain mlx-lm on the whole conversation, no cache reuse."""
    tokens = tok.apply_chat_template(messages, add_generation_prompt=True)
    return mlx_lm.generate(model, tok, tokens, max_tokens=MAX_TOKENS)


def test_chat_through_stdin(tiny_model_dir):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    r1 = fresh_reply(model, tok, [{"role": "user", "content": FIRST}])
    history = [{"role": "user", "content": FIRST}, {"role": "assistant", "content": r1},
               {"role": "user", "content": SECOND}]
    r2 = fresh_reply(model, tok, history)
    assert r2 != fresh_reply(model, tok, history[-1:])  # so the test sees whether history is kept

    stdin = f"{FIRST}\n{SECOND}\n/reset\n{FIRST}\n".encode()  # then EOF
    out = run_cli("smoa_mlx.chat", "--model", tiny_model_dir, "--max-tokens", MAX_TOKENS, stdin=stdin)
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode("utf-8")
    pos = 0
    for piece in (r1 + "\n", r2 + "\n", "[conversation reset]\n", r1 + "\n"):
        found = text.find(piece, pos)
        assert found >= 0, f"{piece!r} missing after position {pos} in {text!r}"
        pos = found + len(piece)


def test_exit_stops_reading(tiny_model_dir):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    r2 = fresh_reply(model, tok, [{"role": "user", "content": SECOND}])
    out = run_cli("smoa_mlx.chat", "--model", tiny_model_dir, "--max-tokens", MAX_TOKENS,
                  stdin=f"/exit\n{SECOND}\n".encode())
    assert out.returncode == 0
    assert r2 not in out.stdout.decode("utf-8")


def test_session_reuses_cache_and_matches_fresh_generation(stories_dir):
    """Three raw-text turns (stories260K has no chat template) with the KV cache kept."""
    model, tok = smoa_mlx.load(str(stories_dir))
    session = ChatSession(model, tok, max_tokens=MAX_TOKENS)
    previous = []
    for turn in ("Once upon a time", "The dog ran", "Then"):
        reply = "".join(session.reply(turn))
        text = raw_text(session.messages[:-1])
        assert reply == mlx_lm.generate(model, tok, tok.encode(text), max_tokens=MAX_TOKENS)
        assert session.messages[-1] == {"role": "assistant", "content": reply}
        # Only what follows the previous turn's prompt was fed through the model.
        prompt = tok.encode(text)
        assert session.last.prompt_tokens <= len(prompt) - len(previous)
        previous = prompt
    session.reset()
    assert session.messages == [] and session.cache.tokens == []
