"""serve: a real HTTP client against the OpenAI-compatible server on a free local port.

Replies are compared with plain mlx-lm generation (same samplers and logits processors),
log-probabilities with a float64 log-softmax of the model's logits, adapters with the
model loaded with that adapter alone."""

import http.client
import json
import os
import socket
import threading
import time

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_logits_processors

import smoa_mlx
from smoa_mlx.adapters import smoa_config
from smoa_mlx.patch import smoa_layers
from smoa_mlx.serve import make_server, parse_request, stop_position

USER = [{"role": "user", "content": "Once upon a time"}]


def save_adapter(base, out, seed):
    model, _ = smoa_mlx.load(str(base))
    smoa_mlx.apply_smoa(model, rank=4, num_blocks=2, alpha=8.0)
    mx.random.seed(seed)
    for layer in smoa_layers(model).values():
        layer.smoa_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
    smoa_mlx.save_adapter(model, out, smoa_config(model, base_model=str(base)))
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    save_adapter(tiny_model_dir, root / "served" / "alpha", seed=1)
    save_adapter(tiny_model_dir, root / "served" / "beta", seed=2)
    save_adapter(tiny_model_dir, root / "outside", seed=3)  # beside the served directory
    (root / "served" / "escape").symlink_to(root / "outside")
    (root / "served" / "not_an_adapter").mkdir()
    return root


def start(srv):
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return thread


def stop(srv, thread):
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_dir):
    model, tokenizer = smoa_mlx.load(str(tiny_model_dir))
    srv = make_server(model, tokenizer, "127.0.0.1", 0, model_name="tiny",
                      adapter_dir=adapter_dir / "served", allowed_origins=["http://ok.example"],
                      max_body=1 << 20)
    thread = start(srv)
    yield srv
    stop(srv, thread)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir, adapter_dir):
    """mlx-lm models loaded fresh for each variant: the expected replies."""
    models = {"tiny": mlx_lm.load(str(tiny_model_dir))}
    for name in ("alpha", "beta"):
        models[name] = smoa_mlx.load(str(tiny_model_dir), adapter_path=adapter_dir / "served" / name)
    return models


@pytest.fixture(scope="module")
def reference(loaded):
    def reply(messages, max_tokens, variant="tiny", processors=None):
        model, tok = loaded[variant]
        tokens = tok.apply_chat_template(messages, add_generation_prompt=True)
        text = "".join(r.text for r in stream_generate(model, tok, mx.array(tokens), max_tokens=max_tokens,
                                                        logits_processors=processors))
        return text, len(tokens)
    return reply


def request(srv, method, path, body=None, headers=None):
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, resp.getheader("Content-Type"), resp.read().decode("utf-8")
    out = (*out, dict(resp.getheaders()))
    conn.close()
    return out


def chat(srv, body, path="/v1/chat/completions"):
    status, ctype, text, _ = request(srv, "POST", path, body)
    assert ctype.startswith("application/json")
    return status, json.loads(text)


def sse(text):
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-2])
    return [json.loads(e[len("data: "):]) for e in events[:-2]]


def test_completion_equals_mlx_lm(server, reference):
    status, out = chat(server, {"model": "tiny", "messages": USER, "max_tokens": 10})
    expected, n_prompt = reference(USER, 10)
    assert status == 200
    assert out["object"] == "chat.completion" and out["model"] == "tiny"
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    usage = out["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (n_prompt, 10, n_prompt + 10)
    # max_completion_tokens is the newer name of the same limit.
    _, out = chat(server, {"messages": USER, "max_completion_tokens": 4})
    assert out["choices"][0]["message"]["content"] == reference(USER, 4)[0]


def test_streaming_with_usage(server, reference):
    status, ctype, text, _ = request(server, "POST", "/v1/chat/completions", {
        "messages": USER, "max_tokens": 10, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and ctype.startswith("text/event-stream")
    chunks = sse(text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *body, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 10
    assert all(c["usage"] is None for c in body)
    assert body[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in body[:-1])
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in body)
    assert content == reference(USER, 10)[0]


def test_conversation_resent_by_a_front_end(server, reference):
    """The second request shares its prefix with the first (prompt cache reuse)."""
    first, _ = reference(USER, 8)
    _, out = chat(server, {"messages": USER, "max_tokens": 8})
    assert out["choices"][0]["message"]["content"] == first
    history = USER + [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    _, out = chat(server, {"messages": history, "max_tokens": 8})
    assert out["choices"][0]["message"]["content"] == reference(history, 8)[0]
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_stop_and_seed(server, reference):
    full, _ = reference(USER, 12)
    stop = full[3:5]
    _, out = chat(server, {"messages": USER, "max_tokens": 12, "stop": [stop, "never"]})
    assert out["choices"][0]["message"]["content"] == full[:full.find(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"
    sampled = {"messages": USER, "max_tokens": 12, "temperature": 1.5, "seed": 7}
    a, b = chat(server, sampled)[1]["choices"], chat(server, sampled)[1]["choices"]
    assert a == b and a[0]["message"]["content"] != full
    # top_k = 1 keeps only the most likely token: greedy whatever the temperature.
    _, out = chat(server, {**sampled, "top_k": 1, "min_p": 0.1, "top_p": 0.9})
    assert out["choices"][0]["message"]["content"] == full


def test_penalties_and_logit_bias_are_mlx_lm_processors(server, reference, loaded):
    fields = {"frequency_penalty": 1.5, "presence_penalty": 0.7, "repetition_penalty": 1.3}
    processors = make_logits_processors(None, 1.3, 20, 0.7, 20, 1.5, 20)
    expected = reference(USER, 16, processors=processors)[0]
    assert expected != reference(USER, 16)[0]
    _, out = chat(server, {"messages": USER, "max_tokens": 16, **fields})
    assert out["choices"][0]["message"]["content"] == expected
    tok = loaded["tiny"][1]
    forced = tok.encode("Once", add_special_tokens=False)[0]
    _, out = chat(server, {"messages": USER, "max_tokens": 3, "logit_bias": {str(forced): 100},
                           "logprobs": True})
    ids = [tok.encode(e["token"], add_special_tokens=False) for e in out["choices"][0]["logprobs"]["content"]]
    assert ids == [[forced]] * 3


def test_logprobs_match_float64_log_softmax(server, loaded):
    _, out = chat(server, {"messages": USER, "max_tokens": 5, "logprobs": True, "top_logprobs": 3})
    model, tok = loaded["tiny"]
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    prompt = tok.apply_chat_template(USER, add_generation_prompt=True)
    generated = [tok.encode(e["token"], add_special_tokens=False)[0] for e in content]
    logits = np.array(model(mx.array([prompt + generated]))[0].astype(mx.float32), np.float64)
    for i, e in enumerate(content):
        row = logits[len(prompt) - 1 + i]
        lsm = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert abs(e["logprob"] - lsm[generated[i]]) < 1e-4
        assert generated[i] == int(lsm.argmax())  # greedy
        top = np.argsort(-lsm)[:3]
        assert [t["token"] for t in e["top_logprobs"]] == [tok.decode([int(t)]) for t in top]
        np.testing.assert_allclose([t["logprob"] for t in e["top_logprobs"]], lsm[top], atol=1e-4)
        assert e["bytes"] == list(e["token"].encode())


def test_text_completions(server, loaded):
    model, tok = loaded["tiny"]
    prompt = "Once upon a time"
    expected = mlx_lm.generate(model, tok, tok.encode(prompt), max_tokens=9)
    status, out = chat(server, {"model": "tiny", "prompt": prompt, "max_tokens": 9}, "/v1/completions")
    assert status == 200 and out["object"] == "text_completion"
    assert out["choices"][0]["text"] == expected and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] == len(tok.encode(prompt))
    # Token ids, a list of one prompt, echo, and the OpenAI default of 16 tokens.
    _, out = chat(server, {"prompt": [tok.encode(prompt)], "max_tokens": 9, "echo": True}, "/v1/completions")
    assert out["choices"][0]["text"] == tok.decode(tok.encode(prompt)) + expected
    _, out = chat(server, {"prompt": prompt}, "/v1/completions")
    assert out["usage"]["completion_tokens"] == 16
    _, out = chat(server, {"prompt": prompt, "max_tokens": 4, "logprobs": 2}, "/v1/completions")
    lp = out["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    assert len(lp["token_logprobs"]) == 4 and all(len(t) == 2 for t in lp["top_logprobs"])
    assert lp["text_offset"] == list(np.cumsum([0] + [len(t) for t in lp["tokens"][:-1]]))
    status, _, text, _ = request(server, "POST", "/v1/completions",
                                 {"prompt": prompt, "max_tokens": 9, "stream": True})
    chunks = sse(text)
    assert status == 200 and all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_adapters_selected_by_model_without_reloading(server, reference):
    base_layers = dict(server.model.named_modules())
    for name in ("alpha", "beta", "tiny", "alpha"):
        _, out = chat(server, {"model": name, "messages": USER, "max_tokens": 8})
        assert out["choices"][0]["message"]["content"] == reference(USER, 8, name)[0], name
        assert out["model"] == name
    assert reference(USER, 8, "alpha")[0] != reference(USER, 8, "beta")[0] != reference(USER, 8)[0]
    # mlx-lm's `adapters` field selects too; the base's own weights were never replaced.
    _, out = chat(server, {"model": "tiny", "adapters": "beta", "messages": USER, "max_tokens": 8})
    assert out["choices"][0]["message"]["content"] == reference(USER, 8, "beta")[0]
    assert out["model"] == "beta"  # the response names the adapter that answered
    _, out = chat(server, {"model": "tiny", "messages": USER, "max_tokens": 8})
    assert out["choices"][0]["message"]["content"] == reference(USER, 8)[0]
    now = dict(server.model.named_modules())
    assert all(now[p] is m for p, m in base_layers.items())
    assert server.adapters.switch_seconds < 0.05


def test_models_lists_the_adapters(server):
    status, _, text, _ = request(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(text)["data"]] == ["tiny", "alpha", "beta"]
    status, _, text, _ = request(server, "GET", "/health")
    assert status == 200 and json.loads(text) == {"status": "ok"}


@pytest.mark.parametrize("name, status, words", [
    ("../outside", 400, "not the path"),
    ("served/../../outside", 400, "not the path"),
    ("/etc", 400, "not the path"),
    ("ABSOLUTE", 400, "not the path"),
    ("escape", 400, "outside the adapter directory"),
    ("not_an_adapter", 404, "not found"),
    ("gpt-4o", 404, "not found"),
    ("..", 400, "not the path"),
])
def test_adapter_names_never_leave_the_directory(server, adapter_dir, reference, name, status, words):
    if name == "ABSOLUTE":
        name = str(adapter_dir / "outside")
    for field in ("model", "adapters"):
        code, out = chat(server, {field: name, "messages": USER, "max_tokens": 2})
        assert code == status and words in out["error"]["message"], out
        assert out["error"]["param"] == field
    assert "outside" not in server.adapters.variants
    _, out = chat(server, {"messages": USER, "max_tokens": 3})
    assert out["choices"][0]["message"]["content"] == reference(USER, 3)[0]


def test_a_broken_adapter_is_a_400_and_the_base_is_intact(tiny_model_dir, adapter_dir, tmp_path, reference):
    other = tmp_path / "dir"
    other.mkdir()
    save_adapter(tiny_model_dir, other / "good", seed=1)
    (other / "broken").mkdir()
    (other / "broken" / "adapter_config.json").write_text('{"fine_tune_type": "smoa", "modules": ["nope"],'
                                                          ' "smoa_parameters": {}}')
    model, tok = smoa_mlx.load(str(tiny_model_dir))
    srv = make_server(model, tok, "127.0.0.1", 0, model_name="tiny", adapter_dir=other)
    thread = start(srv)
    try:
        code, out = chat(srv, {"model": "broken", "messages": USER, "max_tokens": 2})
        assert code == 400 and "cannot load adapter 'broken'" in out["error"]["message"]
        _, out = chat(srv, {"messages": USER, "max_tokens": 8})
        assert out["choices"][0]["message"]["content"] == reference(USER, 8)[0]
        _, out = chat(srv, {"model": "good", "messages": USER, "max_tokens": 8})
        good, tok = smoa_mlx.load(str(tiny_model_dir), adapter_path=other / "good")
        expected = mlx_lm.generate(good, tok, tok.apply_chat_template(USER, add_generation_prompt=True),
                                   max_tokens=8)
        assert out["choices"][0]["message"]["content"] == expected != reference(USER, 8)[0]
    finally:
        stop(srv, thread)


def test_cors(server):
    status, _, _, headers = request(server, "OPTIONS", "/v1/chat/completions",
                                    headers={"Origin": "http://ok.example"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://ok.example"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    _, _, _, headers = request(server, "GET", "/v1/models", headers={"Origin": "http://ok.example"})
    assert headers["Access-Control-Allow-Origin"] == "http://ok.example"
    _, _, _, headers = request(server, "OPTIONS", "/v1/models", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in headers


def test_concurrent_clients_are_serialised(server, reference):
    n = 20
    bodies = [{"messages": [{"role": "user", "content": f"story {i}"}], "max_tokens": 3 + i % 4,
               "stream": i % 2 == 1} for i in range(n)]
    results = [None] * n

    def send(i):
        status, _, text, _ = request(server, "POST", "/v1/chat/completions", bodies[i])
        if bodies[i]["stream"]:
            results[i] = "".join(c["choices"][0]["delta"].get("content", "") for c in sse(text))
        else:
            results[i] = json.loads(text)["choices"][0]["message"]["content"]
    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [reference(b["messages"], b["max_tokens"])[0] for b in bodies]


def test_slow_client_does_not_block_others(server, reference):
    host, port = server.server_address[:2]
    slow = socket.create_connection((host, port), timeout=30)
    body = json.dumps({"messages": USER, "max_tokens": 3}).encode()
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:5])
    start_time = time.perf_counter()
    _, out = chat(server, {"messages": USER, "max_tokens": 3})  # served while the slow one dawdles
    assert out["choices"][0]["message"]["content"] == reference(USER, 3)[0]
    assert time.perf_counter() - start_time < 20
    slow.sendall(body[5:])  # the slow client still gets its answer
    slow.shutdown(socket.SHUT_WR)
    reply = b""
    while piece := slow.recv(65536):
        reply += piece
    slow.close()
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(payload)["choices"][0]["message"]["content"] == reference(USER, 3)[0]


def test_huge_body_is_413_and_the_server_lives(server, reference):
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (50 << 20) + b'"}]}'
    status, ctype, text, _ = request(server, "POST", "/v1/chat/completions", big)
    assert status == 413 and ctype == "application/json"
    assert "at most 1048576" in json.loads(text)["error"]["message"]
    _, out = chat(server, {"messages": USER, "max_tokens": 3})
    assert out["choices"][0]["message"]["content"] == reference(USER, 3)[0]


def raw(srv, data: bytes) -> bytes:
    with socket.create_connection(srv.server_address[:2], timeout=30) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while piece := s.recv(65536):
            reply += piece
    return reply


def test_bad_http_framing(server, reference):
    no_length = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n{}")
    assert no_length.startswith(b"HTTP/1.1 411") and b"Content-Length" in no_length
    chunked = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"2\r\n{}\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 411")
    bad_length = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n")
    assert bad_length.startswith(b"HTTP/1.1 400")
    short = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"mess")
    assert short == b""  # the client hung up mid-body: nothing to answer
    for line, code in ((b"garbage", b"400"), (b"GET / HTTP/x", b"400"), (b"BREW /pot HTTP/1.1", b"501")):
        reply = raw(server, line + b"\r\n\r\n")
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.split()[1] == code and json.loads(payload)["error"]["code"] == int(code), reply
    _, out = chat(server, {"messages": USER, "max_tokens": 3})
    assert out["choices"][0]["message"]["content"] == reference(USER, 3)[0]


@pytest.mark.parametrize("body, words", [
    (b"{not json", "malformed JSON"),
    (b"\xff\xfe{}", "malformed JSON"),
    (b"[" * 100000 + b"]" * 100000, "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    ({"messages": USER, "frequency_penalty": 3}, "frequency_penalty"),
    ({"messages": USER, "frequency_penalty": "high"}, "frequency_penalty"),
    ({"messages": USER, "n": 2}, "'n' = 2 (several choices per request) is not supported"),
    ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format.type"),
    ({"messages": USER, "tool_choice": "required"}, "tool_choice"),
    ({"messages": USER, "tools": [{"type": "function"}]}, "tools"),
    ({"messages": USER, "logit_bias": {"x": 1}}, "logit_bias"),
    ({"messages": USER, "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"messages": USER, "top_logprobs": 3}, "needs 'logprobs'"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": USER, "stream_options": {"include_usage": "yes"}}, "include_usage"),
    ({"messages": USER, "audio": {}}, "audio"),
    ({"messages": USER, "max_tokens": "10"}, "max_tokens"),
    ({"messages": USER, "max_tokens": True}, "max_tokens"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "seed": -1}, "seed"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "top_k": -1}, "top_k"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": USER, "stop": 3}, "stop"),
    ({"messages": USER, "user": 5}, "user"),
    ({"messages": USER, "bogus": 1}, "unsupported field 'bogus'"),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user", "content": "hi", "extra": 1}]}, "extra"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]},
     "arguments"),
    ({"max_tokens": 3}, "messages"),
])
def test_bad_requests_are_400_json(server, reference, body, words):
    status, out = chat(server, body)
    assert status == 400
    assert words in out["error"]["message"] and out["error"]["type"] == "invalid_request_error"
    # The server is still alive and answering.
    _, out = chat(server, {"messages": USER, "max_tokens": 3})
    assert out["choices"][0]["message"]["content"] == reference(USER, 3)[0]


@pytest.mark.parametrize("body, words", [
    ({"prompt": ["a", "b"]}, "2 prompts"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [99999]}, "token ids"),
    ({"prompt": "a", "suffix": "b"}, "suffix"),
    ({"prompt": "a", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "a", "logprobs": 6}, "logprobs"),
    ({"prompt": "a", "best_of": 3}, "best_of"),
    ({"prompt": "a", "messages": USER}, "messages"),
    ({}, "'prompt' is required"),
])
def test_bad_completion_requests_are_400_json(server, body, words):
    status, out = chat(server, body, "/v1/completions")
    assert status == 400 and words in out["error"]["message"], out


def test_unknown_path_is_404_json(server):
    for method in ("GET", "POST"):
        status, ctype, text, _ = request(server, method, "/v1/nothing", b"{}")
        assert status == 404 and ctype == "application/json" and "error" in json.loads(text)


def test_parse_request_accepts_every_openai_field():
    req = parse_request(json.dumps({
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                     {"role": "user", "content": "hi", "name": "ann"}],
        "stop": "x", "temperature": 0, "n": 1, "user": "u", "metadata": {"k": "v"}, "store": False,
        "frequency_penalty": 0.1, "presence_penalty": -0.2, "logprobs": False, "parallel_tool_calls": True,
        "stream_options": {"include_usage": True}, "response_format": {"type": "text"}, "modalities": ["text"],
        "tool_choice": "auto", "service_tier": "auto", "max_tokens": None,
    }).encode())
    assert req["messages"] == [{"role": "system", "content": "ab"}, {"role": "user", "content": "hi", "name": "ann"}]
    assert req["stop"] == ["x"] and req["temperature"] == 0.0 and "max_tokens" not in req
    # tool_choice "none" drops the tools; deprecated `functions` become tools.
    assert "tools" not in parse_request(json.dumps({"messages": USER, "tool_choice": "none", "tools": [
        {"type": "function", "function": {"name": "f"}}]}).encode())
    assert parse_request(json.dumps({"messages": USER, "functions": [{"name": "f"}]}).encode())["tools"] == [
        {"type": "function", "function": {"name": "f"}}]


def test_stop_position():
    assert stop_position("hello world", ["o w"]) == (4, True)
    assert stop_position("hello wo", ["world"]) == (6, False)  # "wo" may start "world": held back
    assert stop_position("hello", ["xyz"]) == (5, False)
    assert stop_position("ab", []) == (2, False)
    assert stop_position("a<|e", ["<|end|>", "b"]) == (1, False)


def test_cli_serves_and_refuses_a_missing_adapter_dir(tiny_model_dir, tmp_path):
    from test_generate import error_lines, run_cli

    out = run_cli("smoa_mlx.serve", "--model", tiny_model_dir, "--adapter-dir", tmp_path / "none", "--port", "0")
    assert out.returncode == 1
    assert error_lines(out.stderr) == [f"error: {tmp_path / 'none'}: adapter directory not found"]
    assert os.path.isdir(tiny_model_dir)


# ---- the official openai client ----

@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_chat(client, reference):
    out = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=0,
                                         frequency_penalty=0, presence_penalty=0, n=1, user="me",
                                         seed=1, top_p=1.0, logprobs=True, top_logprobs=2)
    assert out.choices[0].message.content == reference(USER, 10)[0]
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 10
    assert len(out.choices[0].logprobs.content) == 10
    assert all(len(t.top_logprobs) == 2 for t in out.choices[0].logprobs.content)
    stream = client.chat.completions.create(model="alpha", messages=USER, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference(USER, 10, "alpha")[0]
    assert chunks[-1].usage.completion_tokens == 10
    # mlx-lm's extensions go through extra_body.
    out = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=1.0,
                                         extra_body={"top_k": 1, "min_p": 0.05})
    assert out.choices[0].message.content == reference(USER, 10)[0]


def test_openai_client_completions_models_and_errors(client, loaded):
    import openai

    model, tok = loaded["tiny"]
    expected = mlx_lm.generate(model, tok, tok.encode("Once upon"), max_tokens=7)
    out = client.completions.create(model="tiny", prompt="Once upon", max_tokens=7)
    assert out.choices[0].text == expected
    stream = client.completions.create(model="tiny", prompt="Once upon", max_tokens=7, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected
    assert [m.id for m in client.models.list()] == ["tiny", "alpha", "beta"]
    with pytest.raises(openai.BadRequestError, match="several choices"):
        client.chat.completions.create(model="tiny", messages=USER, n=3)
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        client.chat.completions.create(model="gpt-4o", messages=USER)


TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}</s>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m.tool_calls %}{% for tool_call in m.tool_calls %}"
    "<tool_call>{{ tool_call.function | tojson }}</tool_call>{% endfor %}{% else %}{{ m['content'] }}"
    "{% endif %}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    "{# json tools: tool_call.name #}"
)
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tool_server(tiny_model_dir, tmp_path_factory):
    """The tiny model with a chat template that renders tools (mlx-lm infers its json_tools parser)."""
    import shutil

    path = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    model, tok = smoa_mlx.load(str(path))
    assert tok.has_tool_calling and tok.tool_call_start == "<tool_call>"
    srv = make_server(model, tok, "127.0.0.1", 0, model_name="tools")
    thread = start(srv)
    yield srv
    stop(srv, thread)


def scripted(monkeypatch, pieces, seen):
    """Replace only the model's decoding by a scripted reply; everything around it is real."""
    from types import SimpleNamespace

    from smoa_mlx.generate import PromptCache

    def stream(self, tokenizer, tokens, max_tokens, sampler=None, logits_processors=None):
        seen.append(list(tokens))
        for i, text in enumerate(pieces):
            yield SimpleNamespace(text=text, token=5, logprobs=None, prompt_tokens=len(tokens),
                                  generation_tokens=i + 1,
                                  finish_reason="stop" if i == len(pieces) - 1 else None)
    monkeypatch.setattr(PromptCache, "stream", stream)


def test_openai_client_tool_calls(tool_server, monkeypatch):
    import openai

    client = openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0)
    tok = tool_server.tokenizer
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    pieces = ["Let me check.", "<tool_", 'call>{"name": "get_weather", ', '"arguments": {"city": "Paris"}}',
              "</tool_call>", ""]
    seen = []
    scripted(monkeypatch, pieces, seen)
    out = client.chat.completions.create(model="tools", messages=messages, tools=WEATHER)
    assert seen[-1] == list(tok.apply_chat_template(messages, tools=WEATHER, add_generation_prompt=True))
    assert "Tools: get_weather" in tok.decode(seen[-1])
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(model="tools", messages=messages, tools=WEATHER, stream=True))
    calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in calls] == [
        (0, "get_weather", {"city": "Paris"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The call and its result go back through the template on the next turn.
    history = messages + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    scripted(monkeypatch, ["It is sunny.", ""], seen)
    out = client.chat.completions.create(model="tools", messages=history, tools=WEATHER)
    assert out.choices[0].message.content == "It is sunny." and out.choices[0].finish_reason == "stop"
    assert '<tool_call>{"arguments": {"city": "Paris"}, "name": "get_weather"}</tool_call>' in tok.decode(seen[-1])
    assert "<|tool|>\nsunny" in tok.decode(seen[-1])


def test_cli_serves_the_default_adapter_and_the_directory(tiny_model_dir, adapter_dir, reference):
    import re
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "smoa_mlx.serve", "--model", str(tiny_model_dir),
                             "--adapter-path", str(adapter_dir / "served" / "alpha"),
                             "--adapter-dir", str(adapter_dir / "served"), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "[serve]" not in line:
            line = proc.stderr.readline()
            assert line, "the server exited"
        url = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        conn = http.client.HTTPConnection("127.0.0.1", int(url.group(1)), timeout=60)
        conn.request("GET", "/v1/models")
        ids = [m["id"] for m in json.loads(conn.getresponse().read())["data"]]
        assert ids == [str(tiny_model_dir), "alpha", "beta"]
        body = json.dumps({"messages": USER, "max_tokens": 6}).encode()
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        out = json.loads(conn.getresponse().read())
        assert out["choices"][0]["message"]["content"] == reference(USER, 6, "alpha")[0]  # the default
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
