"""serve: a real HTTP client against the OpenAI-compatible server on a free local port."""

import http.client
import json
import threading

import mlx_lm
import pytest

import smoa_mlx
from smoa_mlx.serve import make_server, parse_request, stop_position

USER = [{"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    model, tokenizer = smoa_mlx.load(str(tiny_model_dir))
    srv = make_server(model, tokenizer, "127.0.0.1", 0, model_name="tiny")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Plain mlx-lm greedy generation on the chat template: the expected replies."""
    model, tok = mlx_lm.load(str(tiny_model_dir))

    def reply(messages, max_tokens):
        tokens = tok.apply_chat_template(messages, add_generation_prompt=True)
        return mlx_lm.generate(model, tok, tokens, max_tokens=max_tokens), len(tokens)
    return reply


def request(srv, method, path, body=None):
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, resp.getheader("Content-Type"), resp.read().decode("utf-8")
    conn.close()
    return out


def chat(srv, body):
    status, ctype, text = request(srv, "POST", "/v1/chat/completions", body)
    assert ctype.startswith("application/json")
    return status, json.loads(text)


def test_completion_equals_mlx_lm(server, reference):
    status, out = chat(server, {"model": "tiny", "messages": USER, "max_tokens": 10})
    expected, n_prompt = reference(USER, 10)
    assert status == 200
    assert out["object"] == "chat.completion" and out["model"] == "tiny"
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 10, "total_tokens": n_prompt + 10}
    # max_completion_tokens is the newer name of the same limit.
    _, out = chat(server, {"messages": USER, "max_completion_tokens": 4})
    assert out["choices"][0]["message"]["content"] == reference(USER, 4)[0]


def test_streaming(server, reference):
    status, ctype, text = request(server, "POST", "/v1/chat/completions",
                                  {"messages": USER, "max_tokens": 10, "stream": True})
    assert status == 200 and ctype.startswith("text/event-stream")
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == reference(USER, 10)[0]


def test_conversation_resent_by_a_front_end(server, reference):
    """The second request shares its prefix with the first (prompt cache reuse)."""
    first, _ = reference(USER, 8)
    _, out = chat(server, {"messages": USER, "max_tokens": 8})
    assert out["choices"][0]["message"]["content"] == first
    history = USER + [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    _, out = chat(server, {"messages": history, "max_tokens": 8})
    assert out["choices"][0]["message"]["content"] == reference(history, 8)[0]


def test_stop_and_seed(server, reference):
    full, _ = reference(USER, 12)
    stop = full[3:5]
    _, out = chat(server, {"messages": USER, "max_tokens": 12, "stop": [stop, "never"]})
    assert out["choices"][0]["message"]["content"] == full[:full.find(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"
    sampled = {"messages": USER, "max_tokens": 12, "temperature": 1.5, "seed": 7}
    assert chat(server, sampled)[1]["choices"] == chat(server, sampled)[1]["choices"]


def test_concurrent_requests_are_serialised(server, reference):
    bodies = [{"messages": [{"role": "user", "content": f"story {i}"}], "max_tokens": 6 + i} for i in range(3)]
    results = [None] * 3

    def send(i):
        results[i] = chat(server, bodies[i])[1]["choices"][0]["message"]["content"]
    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [reference(b["messages"], b["max_tokens"])[0] for b in bodies]


def test_models(server):
    status, _, text = request(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(text)["data"]] == ["tiny"]


@pytest.mark.parametrize("body, words", [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    ({"messages": USER, "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": USER, "max_tokens": "10"}, "max_tokens"),
    ({"messages": USER, "max_tokens": True}, "max_tokens"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": USER, "stop": 3}, "stop"),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user", "content": "hi", "extra": 1}]}, "extra"),
    ({"max_tokens": 3}, "messages"),
])
def test_bad_requests_are_400_json(server, reference, body, words):
    status, out = chat(server, body)
    assert status == 400
    assert words in out["error"]["message"] and out["error"]["type"] == "invalid_request_error"
    # The server is still alive and answering.
    _, out = chat(server, {"messages": USER, "max_tokens": 3})
    assert out["choices"][0]["message"]["content"] == reference(USER, 3)[0]


def test_unknown_path_is_404_json(server):
    for method in ("GET", "POST"):
        status, ctype, text = request(server, method, "/v1/nothing", b"{}")
        assert status == 404 and ctype == "application/json" and "error" in json.loads(text)


def test_parse_request_accepts_text_parts():
    req = parse_request(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "stop": "x", "temperature": 0}).encode())
    assert req == {"messages": [{"role": "user", "content": "ab"}], "stop": ["x"], "temperature": 0.0}


def test_stop_position():
    assert stop_position("hello world", ["o w"]) == (4, True)
    assert stop_position("hello wo", ["world"]) == (6, False)  # "wo" may start "world": held back
    assert stop_position("hello", ["xyz"]) == (5, False)
    assert stop_position("ab", []) == (2, False)
    assert stop_position("a<|e", ["<|end|>", "b"]) == (1, False)
