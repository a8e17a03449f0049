"""evaluate: LLM-Adapters answer extraction, dataset loaders, log-likelihood scoring, perplexity."""

import bz2
import json
import math
import re

import mlx.core as mx
import numpy as np
import pytest

import smoa_mlx
from smoa_mlx.evaluate import candidate_logprobs, main
from smoa_mlx.tasks import (
    CHOICE_TASKS, alpaca_prompt, extract_label, extract_number, load_items, numbers_match,
    parse_options, read_documents,
)
from test_generate import error_lines, run_cli

FILES = {t: f"llm_adapters/{t}/test.json" for t in CHOICE_TASKS if t != "hellaswag"}
FILES["hellaswag"] = "hellaswag/hellaswag_val_full.txt.bz2"
FILES["gsm8k"] = "gsm8k/test.jsonl"


@pytest.mark.parametrize("task, output, expected", [
    ("boolq", "the correct answer is false", "false"),
    ("boolq", "the correct answer is true. false is wrong", "true"),  # first label wins
    ("boolq", "The correct answer is True.", ""),  # case-sensitive, like LLM-Adapters
    ("boolq", "it is untrue", "true"),  # a bare substring counts, like LLM-Adapters
    ("piqa", "the correct answer is solution2.", "solution2"),
    ("piqa", "Solution1: pour it onto a plate", ""),
    ("social_i_qa", "the correct answer is answer3\n\n### Instruction:\nanswer1", "answer3"),
    ("ARC-Challenge", "answer4, not answer1", "answer4"),
    ("ARC-Easy", "the correct answer is answer5", "answer5"),
    ("openbookqa", "  the correct answer is answer2  ", "answer2"),
    ("hellaswag", "the correct answer is ending4.", "ending4"),
    ("hellaswag", "ending5 is not a choice, ending2 is", "ending2"),
    ("winogrande", "the correct answer is option2 option1", "option2"),
    ("winogrande", "Once upon a time, there was a little girl named Lily.", ""),
])
def test_extract_label(task, output, expected):
    assert extract_label(task, output) == expected


@pytest.mark.parametrize("output, expected", [
    ("She makes 9 * 2 = $18 every day. The answer is 18.", 18.0),
    ("The total is $1,234.50.", 1234.5),
    ("He pays 1,000,000 dollars", 1e6),
    ("The temperature dropped to -3 degrees", -3.0),
    ("5 apples and 7 pears, so 12", 12.0),
    ("\nA: 36 * 2/3 = 24 sq ft, 24 * 24 = 576 tiles. The answer is 576.", 576.0),
    ("no numbers here", math.inf),
])
def test_extract_number(output, expected):
    assert extract_number(output) == expected


def test_numbers_match():
    assert numbers_match(576.0, "576.0") and numbers_match(576.0004, "576")
    assert not numbers_match(576.01, "576") and not numbers_match(math.inf, "5")


def test_parse_options_on_real_records(datasets_dir):
    piqa = load_items("piqa", datasets_dir / FILES["piqa"], limit=1)[0]
    assert piqa.labels == ["solution1", "solution2"]
    assert piqa.options[0].startswith("Provide the guinea pig with a cage full of a few inches of bedding")
    assert piqa.options[1].endswith("made of ripped jeans material, you will also need to supply it with "
                                    "a water bottle and a food dish.")
    wino = load_items("winogrande", datasets_dir / FILES["winogrande"], limit=1)[0]
    assert (wino.labels, wino.options, wino.answer) == (["option1", "option2"], ["Sarah", "Maria"], "option2")
    siqa = load_items("social_i_qa", datasets_dir / FILES["social_i_qa"], limit=1)[0]
    assert siqa.options == ["make a new plan", "Go home and see Riley", "Find somewhere to go"]
    boolq = load_items("boolq", datasets_dir / FILES["boolq"], limit=1)[0]
    assert boolq.options == boolq.labels == ["true", "false"]
    for task in ("ARC-Easy", "ARC-Challenge", "openbookqa"):
        for item in load_items(task, datasets_dir / FILES[task]):
            assert len(item.options) == len(item.labels) >= 3 and all(item.options)
    assert parse_options("Q?\n\nAnswer1: a Answer2: b\n\nAnswer format: answer1/answer2") == (
        ["answer1", "answer2"], ["a", "b"])


def test_hellaswag_text_becomes_the_llm_adapters_prompt(datasets_dir):
    items = load_items("hellaswag", datasets_dir / FILES["hellaswag"])
    assert len(items) == 10042
    assert items[0].answer == "ending4"
    assert items[0].prompt == alpaca_prompt(
        "Please choose the correct ending to complete the given sentence: Roof shingle removal: "
        "A man is sitting on a roof. he\n\nEnding1: is using wrap to wrap a pair of skis. "
        "Ending2: is ripping level tiles off. Ending3: is holding a rubik's cube. "
        "Ending4: starts pulling up roofing on a roof.\n\nAnswer format: ending1/ending2/ending3/ending4")
    assert items[0].options[3] == "starts pulling up roofing on a roof."


def test_gsm8k_loads_from_both_formats(datasets_dir):
    openai = load_items("gsm8k", datasets_dir / "gsm8k/test.jsonl", limit=2)
    assert openai[0].answer == "18"
    head = alpaca_prompt("Janet\u2019s ducks lay 16 eggs per day.").split(" per day.")[0]
    assert openai[0].prompt.startswith(head) and openai[0].prompt.endswith("market?\n\n### Response:\n")
    adapters = load_items("gsm8k", datasets_dir / "llm_adapters/gsm8k/test.json", limit=1)
    assert adapters[0].answer == "576.0" and "Mr Boarden" in adapters[0].prompt


def test_alpaca_prompt():
    assert alpaca_prompt("Say hi") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi\n\n### Response:\n")


def direct_logprob(model, tok, prompt, candidate):
    """Independent reference: one unpadded forward pass, float64 log-softmax, summed
    over the candidate's tokens (those after the prompt's own tokens)."""
    context, full = tok.encode(prompt), tok.encode(prompt + candidate)
    start = next(i for i, (a, b) in enumerate(zip(context + [-1], full)) if a != b)
    logits = np.array(model(mx.array(full)[None])[0], dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return sum(logp[t - 1, full[t]] for t in range(start, len(full))), len(full) - start


def test_loglik_matches_direct_log_softmax(stories_dir, datasets_dir):
    """Batched scoring on a shared prompt cache equals each candidate scored on its own."""
    model, tok = smoa_mlx.load(str(stories_dir))
    item = load_items("piqa", datasets_dir / FILES["piqa"], limit=1)[0]
    cases = [(item.prompt, item.options + ["true"]),  # lengths differ, so padding is exercised
             ("", ["Once upon a time", "The cat sat on the mat"])]  # nothing shared: no cache
    for prompt, candidates in cases:
        sums, counts = candidate_logprobs(model, tok, prompt, candidates)
        for cand, got_sum, got_count in zip(candidates, sums, counts):
            expected, n = direct_logprob(model, tok, prompt, cand)
            assert got_count == n > 0
            assert abs(got_sum - expected) < 1e-3 * max(1.0, abs(expected))


@pytest.mark.parametrize("task", list(FILES))
def test_evaluate_real_datasets(task, stories_dir, datasets_dir, tmp_path, capsys):
    modes = ["generate"] if task == "gsm8k" else ["generate", "loglik"]
    for mode in modes:
        out = tmp_path / f"{mode}.json"
        limit = 3 if task == "gsm8k" else 5
        main(["--model", str(stories_dir), "--task", task, "--data", str(datasets_dir / FILES[task]),
              "--limit", str(limit), "--mode", mode, "--output", str(out), "--quiet"])
        result = json.loads(out.read_text())
        assert result["task"] == task and result["n"] == limit == len(result["items"])
        assert 0.0 <= result["accuracy"] <= 1.0
        assert result["correct"] == sum(r["correct"] for r in result["items"])
        assert f"{result['accuracy']:.4f}" in capsys.readouterr().out  # the printed table


def test_perplexity_of_stories260k_on_tinystories(stories_dir, datasets_dir, tmp_path):
    """The data README measured 1.266 nats/token for these 5 stories with llama2.c's tokenizer."""
    path = datasets_dir / "tinystories/tinystories_sample.txt"
    assert len(read_documents(path)) == 5
    out = tmp_path / "ppl.json"
    main(["--model", str(stories_dir), "--task", "perplexity", "--data", str(path), "--output", str(out)])
    result = json.loads(out.read_text())
    assert abs(result["nll"] - 1.266) < 0.01 and result["perplexity"] == pytest.approx(math.exp(result["nll"]))


def test_perplexity_windows_cover_every_token(stories_dir, tmp_path):
    model, tok = smoa_mlx.load(str(stories_dir))
    from smoa_mlx.evaluate import document_nll
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside."
    whole, n = document_nll(model, tok, text, 2048)
    windowed, m = document_nll(model, tok, text, 5)
    assert n == m == len(tok.encode(text)) - 1
    assert windowed > whole  # shorter context, higher loss


@pytest.mark.parametrize("args, words", [
    (["--task", "boolq", "--data", "/nonexistent/boolq.json"], "/nonexistent/boolq.json"),
    (["--task", "mmlu", "--data", "x.json"], "unknown task 'mmlu'"),
])
def test_cli_errors_are_one_line(args, words):
    out = run_cli("smoa_mlx.evaluate", "--model", "unused-model", *args)  # fails before loading
    assert out.returncode != 0
    lines = error_lines(out.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0]


# ---------------------------------------------------------------- bad task files (one line, file:line)

CHOICE = {"instruction": "Is it? Answer format: true/false", "input": "", "output": "", "answer": "true"}
BAD_TASK_FILES = [
    # (task, file name, content, expected message after "<path>:")
    ("boolq", "t.json", "", r" empty, no records$"),
    ("boolq", "t.jsonl", "\n\n", r" empty, no records$"),
    ("boolq", "t.json", '{"instruction": "x"}', r"1: expected a JSON list of records"),
    ("boolq", "t.json", '[\n  ["x"]\n]', r"2: record 0: expected a JSON object, got a list"),
    ("boolq", "t.jsonl", json.dumps(CHOICE) + '\n["x"]\n', r"2: expected a JSON object, got a list"),
    ("boolq", "t.jsonl", json.dumps(CHOICE) + "\n{oops\n", r"2: invalid JSON: "),
    ("boolq", "t.jsonl", json.dumps({**CHOICE, "answer": 1}) + "\n", r"1: 'answer' must be a string, got a number"),
    ("boolq", "t.jsonl", json.dumps({**CHOICE, "input": 3}) + "\n", r"1: 'input' must be a string, got a number"),
    ("boolq", "t.jsonl", json.dumps({**CHOICE, "answer": "maybe"}) + "\n", r"1: answer 'maybe' is not one of true/false"),
    ("boolq", "t.jsonl", json.dumps({**CHOICE, "instruction": "no format"}) + "\n", r"1: no 'Answer format:' line"),
    ("gsm8k", "t.jsonl", '{"question": "q", "answer": "no marker"}\n', r"1: answer has no '#### <number>' line"),
    ("gsm8k", "t.jsonl", '{"question": "q", "answer": "#### many"}\n', r"1: answer 'many' is not a number"),
    ("gsm8k", "t.jsonl", '{"question": 7, "answer": "#### 1"}\n', r"1: 'question' must be a string, got a number"),
    ("hellaswag", "t.txt", "", r" empty, no items$"),
    ("hellaswag", "t.txt", "ctx\n0\na\nb\n", r"4: 4 lines is not a multiple of 6"),
    ("hellaswag", "t.txt", "ctx\n7\na\nb\nc\nd\n", r"2: gold label '7' is not 0-3"),
    ("hellaswag", "t.bz2", "not bz2", r" not a valid bz2 file"),
    ("perplexity", "t.txt", " \n<|endoftext|>\n", r" empty, no text found$"),
    ("perplexity", "t.jsonl", '{"text": "a"}\n{"txt": "b"}\n', r"2: 'text' must be a string, got nothing"),
]


@pytest.mark.parametrize("task, name, content, message", BAD_TASK_FILES)
def test_bad_task_files_name_file_and_line(tmp_path, task, name, content, message):
    from smoa_mlx.errors import DataError

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as e:
        read_documents(path) if task == "perplexity" else load_items(task, path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}:"), str(e.value)
    assert re.match(message, str(e.value)[len(f"{path}:"):]), str(e.value)


@pytest.mark.parametrize("name", ["t.jsonl", "t.txt", "t.bz2"])
def test_task_file_not_utf8_names_the_line(tmp_path, name):
    from smoa_mlx.errors import DataError

    data = b'{"text": "a"}\n{"text": "caf\xe9"}\n'
    path = tmp_path / name
    path.write_bytes(bz2.compress(data) if name.endswith(".bz2") else data)
    with pytest.raises(DataError, match=rf"^{path}:2: not UTF-8 text \(byte 27 of the file\)$"):
        read_documents(path) if name != "t.bz2" else load_items("hellaswag", path)
