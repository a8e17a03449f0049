"""Record an `openai` client session against `python -m smoa_mlx.serve` (the closing note of issue 13).

Starts the server in-process on 127.0.0.1 (a free port) for a model and, with --adapter-dir,
its adapters; sends chat and text completions, streaming and not, with the official client;
writes every HTTP request body and response body to --out.

    python scripts/openai_transcript.py --model ../shared/data/models/stories260K-hf --out transcript.txt
"""

import argparse
import json
import threading

import openai

import smoa_mlx
from smoa_mlx.serve import make_server


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--adapter-dir", default=None)
    p.add_argument("--adapter", default=None, help="an adapter name under --adapter-dir to use")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    model, tok = smoa_mlx.load(args.model)
    srv = make_server(model, tok, "127.0.0.1", 0, model_name="stories", adapter_dir=args.adapter_dir)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    log = []

    def on_request(request):
        log.append(f">>> {request.method} {request.url.path}\n{request.content.decode() or ''}")

    def on_response(response):
        response.read()
        log.append(f"<<< {response.status_code} {response.headers.get('content-type')}\n{response.text}")

    http = openai.DefaultHttpxClient(event_hooks={"request": [on_request], "response": [on_response]})
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", http_client=http, max_retries=0)
    adapter = args.adapter or "stories"
    steps = [
        ("client.models.list()", lambda: [m.id for m in client.models.list()]),
        ("client.chat.completions.create (greedy, logprobs)", lambda: client.chat.completions.create(
            model="stories", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=12,
            temperature=0, logprobs=True, top_logprobs=2, user="me", n=1).model_dump()),
        ("client.chat.completions.create (stream, include_usage, adapter)", lambda: [
            c.model_dump() for c in client.chat.completions.create(
                model=adapter, messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=8,
                stream=True, stream_options={"include_usage": True}, frequency_penalty=0.5, seed=3)]),
        ("client.completions.create", lambda: client.completions.create(
            model="stories", prompt="The dog ran", max_tokens=10, temperature=0.7, top_p=0.9, seed=0,
            extra_body={"top_k": 40, "min_p": 0.05}).model_dump()),
        ("client.completions.create (stream)", lambda: [c.model_dump() for c in client.completions.create(
            model="stories", prompt="The dog ran", max_tokens=6, stream=True)]),
        ("client.chat.completions.create (n=2: refused)", lambda: client.chat.completions.create(
            model="stories", messages=[{"role": "user", "content": "hi"}], n=2)),
        ("client.chat.completions.create (adapter '../x': refused)", lambda: client.chat.completions.create(
            model="../x", messages=[{"role": "user", "content": "hi"}])),
    ]
    with open(args.out, "w") as f:
        f.write(f"openai {openai.__version__} client against smoa_mlx.serve ({args.model}"
                f"{', adapters: ' + args.adapter_dir if args.adapter_dir else ''}) at {srv.url}\n")
        for title, call in steps:
            log.clear()
            try:
                result = call()
            except openai.APIError as e:
                result = f"raised {type(e).__name__}: {e}"
            f.write(f"\n===== {title}\n" + "\n".join(log) + "\n--- client result:\n"
                    + (result if isinstance(result, str) else json.dumps(result, indent=1, default=str)) + "\n")
    srv.shutdown()
    srv.server_close()


if __name__ == "__main__":
    main()
