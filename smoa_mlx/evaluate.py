"""Evaluate a model plus an optional adapter: the LLM-Adapters protocol, log-likelihood
multiple choice, and perplexity.

- `--mode generate` (LLM-Adapters): alpaca prompt, greedy reply, the answer read
  out of the reply with their rules (`tasks.extract_label` / `extract_number`).
- `--mode loglik`: every candidate answer is scored by the mean log-probability of
  its tokens after the prompt (all candidates of an item in one batch); the best
  one is the prediction. No parsing of free text, so it separates small models
  that rarely write a label word. `--choices text` scores each option's own text,
  `--choices label` the reply the LLM-Adapters training data teaches
  ("the correct answer is answer2").
- `--task perplexity`: token-level NLL and perplexity of documents (BOS + text).

    python -m smoa_mlx.evaluate --model M --adapter-path A --task boolq --data boolq/test.json --limit 200
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import generate
from mlx_lm.models.cache import KVCache, make_prompt_cache

from .cli import run
from .data import common_prefix
from .errors import ConfigError
from .files import write_json
from .generate import add_model_args, load_model
from .tasks import (
    TASKS, check_task, extract_label, extract_number, load_items, numbers_match,
    read_documents,
)

MAX_TOKENS = {"gsm8k": 256}  # LLM-Adapters: 32 new tokens for commonsense, 256 for math
DEFAULT_CHOICE_TOKENS = 32
LABEL_REPLY = "the correct answer is {label}"


def candidate_logprobs(model, tokenizer, prompt: str, candidates: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log-probabilities, token count) of each candidate continuing `prompt`
    (`continuation_tokens`, then `continuation_logprobs`)."""
    sums, counts, _ = continuation_logprobs(model, *continuation_tokens(tokenizer, prompt, candidates))
    return sums, counts


def continuation_tokens(tokenizer, context: str, continuations: list[str], add_special_tokens: bool = True,
                        prefix_token: int | None = None) -> tuple[list[list[int]], list[int]]:
    """(token sequences, where each continuation's tokens start).

    Each continuation is tokenised together with the context and scored from the first
    token where it departs from the context's own tokens, so word pieces that merge
    across the boundary are scored once, wherever the text was cut (a trailing space of
    the context belongs to the continuation's first token either way). With
    `prefix_token` (lm-eval's: BOS, else EOS), a continuation that would start at the
    very first token (an empty context, no BOS) is scored after that token instead.
    """
    context_ids = tokenizer.encode(context, add_special_tokens=add_special_tokens)
    seqs, starts = [], []
    for c in continuations:
        full = tokenizer.encode(context + c, add_special_tokens=add_special_tokens)
        start = min(common_prefix(context_ids, full), len(full) - 1)
        if start < 1 and prefix_token is not None and c:
            full, start = [prefix_token] + full, 1
        if start < 1 or not c:
            raise ConfigError(f"candidate {c!r} adds no tokens to the prompt")
        seqs.append(full)
        starts.append(start)
    return seqs, starts


def continuation_logprobs(model, seqs: list[list[int]], starts: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sum of log-probabilities, token count, greedy) of the tokens `seqs[i][starts[i]:]`;
    greedy: each of them is the model's argmax. The leading tokens all sequences share
    run once into a KV cache; the rest run as one right-padded batch on copies of it."""
    shared = min(starts) - 1  # leading tokens whose own logits are not needed
    cache = make_prompt_cache(model)
    if shared > 0 and all(type(c) is KVCache for c in cache):
        model(mx.array(seqs[0][:shared])[None], cache=cache)
        for c in cache:
            c.keys = mx.repeat(c.keys[..., :c.offset, :], len(seqs), axis=0)
            c.values = mx.repeat(c.values[..., :c.offset, :], len(seqs), axis=0)
    else:
        shared, cache = 0, None
    length = max(len(s) for s in seqs) - shared
    batch = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        batch[i, :len(s) - shared] = s[shared:]
    inputs, targets = mx.array(batch[:, :-1]), mx.array(batch[:, 1:])
    logprobs = nn.log_softmax(model(inputs, cache=cache).astype(mx.float32), axis=-1)
    picked = np.array(mx.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0])
    hits = np.array(mx.argmax(logprobs, axis=-1) == targets)
    # Column j predicts token shared + j + 1; score the candidate's tokens [start, len).
    pos = np.arange(length - 1)[None] + shared + 1
    mask = (pos >= np.array(starts)[:, None]) & (pos < np.array([len(s) for s in seqs])[:, None])
    return (picked * mask).sum(axis=1), mask.sum(axis=1), (hits | ~mask).all(axis=1)


def document_nll(model, tokenizer, text: str, max_length: int) -> tuple[float, int]:
    """(total NLL in nats, predicted tokens) of BOS + text, in windows of `max_length`."""
    tokens = tokenizer.encode(text)
    total, count = 0.0, 0
    for i in range(0, max(len(tokens) - 1, 0), max_length):
        window = mx.array(tokens[i:i + max_length + 1])[None]
        logprobs = nn.log_softmax(model(window[:, :-1]).astype(mx.float32), axis=-1)
        picked = mx.take_along_axis(logprobs, window[:, 1:, None], axis=-1)
        total -= picked.sum().item()
        count += window.shape[1] - 1
    return total, count


def judge(model, tokenizer, task: str, item, mode: str, choices: str, max_tokens: int) -> dict:
    """One item's prediction, whether it is right, and the evidence (reply or scores)."""
    if mode == "loglik":
        texts = item.options if choices == "text" else [LABEL_REPLY.format(label=x) for x in item.labels]
        sums, counts = candidate_logprobs(model, tokenizer, item.prompt, texts)
        scores = sums / counts
        pred = item.labels[int(np.argmax(scores))]
        return {"prediction": pred, "correct": pred == item.answer,
                "scores": [round(float(x), 6) for x in scores]}
    output = generate(model, tokenizer, tokenizer.encode(item.prompt), max_tokens=max_tokens)
    if task == "gsm8k":
        number = extract_number(output)
        ok, pred = numbers_match(number, item.answer), None if math.isinf(number) else number
    else:
        pred = extract_label(task, output)
        ok = pred == item.answer
    return {"prediction": pred, "correct": ok, "output": output}


def evaluate_items(model, tokenizer, task, items, mode="generate", choices="text", max_tokens=32, log=None):
    records, correct = [], 0
    for i, item in enumerate(items):
        record = {"index": i, "answer": item.answer, **judge(model, tokenizer, task, item, mode, choices, max_tokens)}
        correct += record["correct"]
        records.append(record)
        if log:
            log(i + 1, len(items), correct)
    return {"n": len(items), "correct": correct, "accuracy": correct / max(len(items), 1)}, records


def evaluate_perplexity(model, tokenizer, docs, max_length):
    total, count, records = 0.0, 0, []
    for i, doc in enumerate(docs):
        nll, n = document_nll(model, tokenizer, doc, max_length)
        total, count = total + nll, count + n
        records.append({"index": i, "tokens": n, "nll": nll / max(n, 1)})
    nll = total / max(count, 1)
    return {"n": len(docs), "tokens": count, "nll": nll, "perplexity": math.exp(nll)}, records


def format_table(result: dict) -> str:
    if result["task"] == "perplexity":
        head = ("task", "docs", "tokens", "nll/token", "perplexity")
        row = ("perplexity", result["n"], result["tokens"], f"{result['nll']:.4f}", f"{result['perplexity']:.3f}")
    else:
        head = ("task", "mode", "n", "correct", "accuracy")
        row = (result["task"], result["mode"], result["n"], result["correct"], f"{result['accuracy']:.4f}")
    cells = [[str(c) for c in head], [str(c) for c in row]]
    widths = [max(len(r[k]) for r in cells) for k in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), lines[1]])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smoa_mlx.evaluate",
        description="Evaluate a model and an optional SMoA / LoRA adapter on the LLM-Adapters "
                    "commonsense tasks, GSM8K, or perplexity.",
    )
    add_model_args(parser)
    parser.add_argument("--task", required=True, help=f"One of: {', '.join(TASKS)}")
    parser.add_argument("--data", required=True,
                        help="Dataset file: LLM-Adapters JSON, GSM8K jsonl, HellaSwag .txt(.bz2), "
                             "or text/jsonl for perplexity")
    parser.add_argument("--limit", type=int, default=None, help="Evaluate only the first N items")
    parser.add_argument("--mode", choices=("generate", "loglik"), default="generate",
                        help="generate: LLM-Adapters protocol; loglik: score the candidates (default: generate)")
    parser.add_argument("--choices", choices=("text", "label"), default="text",
                        help="loglik candidates: the options' texts or 'the correct answer is <label>'")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help=f"Generated tokens per item (default: {DEFAULT_CHOICE_TOKENS}, gsm8k 256)")
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="Perplexity window length (default: the model's context length, else 2048)")
    parser.add_argument("--output", default=None, help="Write the results (and every item) to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="No progress on stderr")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    task = check_task(args.task)
    for flag in ("limit", "max_tokens", "max_seq_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if task == "gsm8k" and args.mode == "loglik":
        raise ConfigError("gsm8k has no answer choices to score: use --mode generate")
    if task == "perplexity":
        data = read_documents(args.data, args.limit)
    else:
        data = load_items(task, args.data, args.limit)
    max_tokens = args.max_tokens or MAX_TOKENS.get(task, DEFAULT_CHOICE_TOKENS)
    model, tokenizer = load_model(args.model, args.adapter_path)

    def log(done, total, correct):
        if not args.quiet:
            print(f"\r{task}: {done}/{total} accuracy {correct / done:.4f}", end="", file=sys.stderr, flush=True)

    tic = time.perf_counter()
    if task == "perplexity":
        context = getattr(getattr(model, "args", None), "max_position_embeddings", None)
        summary, records = evaluate_perplexity(model, tokenizer, data, args.max_seq_length or context or 2048)
        mode = "loglik"
    else:
        summary, records = evaluate_items(model, tokenizer, task, data, args.mode, args.choices, max_tokens, log)
        mode = args.mode if args.mode == "generate" else f"loglik-{args.choices}"
    if not args.quiet and task != "perplexity":
        print(file=sys.stderr)
    result = {"task": task, "mode": mode, **summary, "model": args.model, "adapter_path": args.adapter_path,
              "data": str(args.data), "limit": args.limit, "seconds": round(time.perf_counter() - tic, 2)}
    print(format_table(result))
    if args.output:
        write_json(args.output, {**result, "items": records})
    return 0


if __name__ == "__main__":
    run(main)
