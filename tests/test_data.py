"""smoa_mlx.data: every format tokenizes as mlx-lm / LLM-Adapters would, the prompt mask is
exact, batches are a pure function of (seed, step), and bad input names file and line."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smoa_mlx.data import BUNDLED_DATA, Batcher, Example, load_data, load_split

ROOT = Path(__file__).resolve().parents[1]

# LLM-Adapters' templates, typed out independently of smoa_mlx.data.
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n{}\n\n### Response:\n")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
              "further context. Write a response that appropriately completes the request.\n\n"
              "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from mlx_lm import load

    return load(str(tiny_model_dir))[1]


@pytest.fixture(scope="module")
def stories_tok(stories_dir):
    from mlx_lm import load

    return load(str(stories_dir))[1]


class Proxy:
    """The tiny tokenizer with its chat template replaced (None: a base model's tokenizer)."""

    def __init__(self, tok, template=None, apply=None):
        self._tok, self.chat_template, self._apply = tok, template, apply

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def apply_chat_template(self, *args, **kwargs):
        return self._apply(*args, **kwargs)


def write(path: Path, *records) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return path


def masked_targets(example: Example, max_seq_length=4096):
    """The target tokens the loss sees for one example, via the Batcher."""
    _, targets, mask = Batcher([example], 1, max_seq_length).batch(0)
    targets, mask = np.array(targets[0]), np.array(mask[0])
    assert set(np.unique(mask)) <= {0.0, 1.0}
    return targets[mask == 1].tolist()


# ---------------------------------------------------------------- formats


def test_text_format(tok, tmp_path):
    text = "Once upon a time there was a little model."
    [ex] = load_split(write(tmp_path / "train.jsonl", {"text": text}), tok)
    assert ex.tokens == tok.encode(text) + [tok.eos_token_id]
    assert ex.tokens[0] == tok.bos_token_id and ex.prompt_len == 0
    assert masked_targets(ex) == ex.tokens[1:]  # every token but the first is a target


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_prompt_completion_uses_chat_template(tok, tmp_path, mask_prompt):
    prompt, completion = "how old is Ann?", "SELECT age FROM people"
    [ex] = load_split(write(tmp_path / "t.jsonl", {"prompt": prompt, "completion": completion}),
                      tok, mask_prompt=mask_prompt)
    assert tok.decode(ex.tokens) == f"<|user|>\n{prompt}</s>\n<|assistant|>\n{completion}</s>\n"
    if not mask_prompt:
        assert ex.prompt_len == 0 and masked_targets(ex) == ex.tokens[1:]
        return
    assert tok.decode(ex.tokens[:ex.prompt_len]) == f"<|user|>\n{prompt}</s>\n<|assistant|>\n"
    completion_tokens = ex.tokens[ex.prompt_len:]
    assert tok.decode(completion_tokens) == f"{completion}</s>\n"
    # The loss sees exactly the completion tokens: count and identity.
    assert masked_targets(ex) == completion_tokens
    assert len(masked_targets(ex)) == len(ex.tokens) - ex.prompt_len


def test_prompt_completion_without_chat_template(tok, tmp_path):
    plain = Proxy(tok)
    path = write(tmp_path / "t.jsonl", {"prompt": "Q: what is two plus three?\nA:", "completion": " 5"})
    [ex] = load_split(path, plain, mask_prompt=True)
    assert ex.tokens == tok.encode("Q: what is two plus three?\nA: 5") + [tok.eos_token_id]
    assert ex.tokens[:ex.prompt_len] == tok.encode("Q: what is two plus three?\nA:")
    assert tok.decode(masked_targets(ex)) == " 5</s>"


def test_chat_messages_multi_turn(tok, tmp_path):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "two plus three?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "and times three?"},
        {"role": "assistant", "content": "The answer is 15."},
    ]
    [ex] = load_split(write(tmp_path / "t.jsonl", {"messages": messages}), tok, mask_prompt=True)
    assert ex.tokens == tok.apply_chat_template(messages, return_dict=False)
    # The prompt is every message but the last; earlier assistant turns are not trained on.
    assert tok.decode(masked_targets(ex)) == "The answer is 15.</s>\n"
    [full] = load_split(tmp_path / "t.jsonl", tok)
    assert full.tokens == ex.tokens and full.prompt_len == 0


def test_alpaca_json_list(tok, tmp_path):
    records = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The answer is 5."},
        {"instruction": "Say hi.", "input": "", "output": "hi", "answer": "hi"},
        {"instruction": "Say yes.", "output": "yes"},  # alpaca without "input"
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records, indent=4))
    a, b, c = load_split(path, tok, mask_prompt=True)
    prompt = WITH_INPUT.format("Add the numbers.", "2 and 3")
    assert a.tokens == tok.encode(prompt + "The answer is 5.") + [tok.eos_token_id]
    assert tok.decode(a.tokens[:a.prompt_len]) == "<s>" + prompt
    assert tok.decode(masked_targets(a)) == "The answer is 5.</s>"
    assert b.tokens == tok.encode(NO_INPUT.format("Say hi.") + "hi") + [tok.eos_token_id]
    assert tok.decode(masked_targets(b)) == "hi</s>"
    assert c.tokens == tok.encode(NO_INPUT.format("Say yes.") + "yes") + [tok.eos_token_id]
    unmasked = load_split(path, tok)
    assert [e.tokens for e in unmasked] == [a.tokens, b.tokens, c.tokens]
    assert all(e.prompt_len == 0 for e in unmasked)


def test_alpaca_records_in_jsonl(tok, tmp_path):
    path = write(tmp_path / "t.jsonl", {"instruction": "Say hi.", "input": "", "output": "hi"})
    [ex] = load_split(path, tok)
    assert ex.tokens == tok.encode(NO_INPUT.format("Say hi.") + "hi") + [tok.eos_token_id]


def test_real_llm_adapters_json(stories_tok, datasets_dir):
    path = datasets_dir / "llm_adapters" / "openbookqa" / "test.json"
    records = json.loads(path.read_text())
    examples = load_split(path, stories_tok, mask_prompt=True)
    assert len(examples) == len(records) == 500
    for record, ex in zip(records[:20], examples):
        prompt = NO_INPUT.format(record["instruction"])
        assert ex.tokens == stories_tok.encode(prompt + record["output"]) + [2]
        assert stories_tok.decode(masked_targets(ex)).strip() == record["output"] + "</s>"


def test_real_llm_adapters_math_with_empty_outputs(stories_tok, datasets_dir):
    # math_data.json has 3 records with an empty "output" (LLM-Adapters trains on them: EOS only).
    path = datasets_dir / "llm_adapters" / "ft-training_set" / "math_data.json"
    examples = load_split(path, stories_tok, mask_prompt=True)
    assert len(examples) == 3260
    assert examples[175].tokens[examples[175].prompt_len:] == [2]


def test_real_wikisql_jsonl(stories_tok, datasets_dir):
    data_dir = datasets_dir / "wikisql_mlx"
    data = load_data(data_dir, stories_tok, splits=("train", "valid", "test"))
    assert {k: len(v) for k, v in data.items()} == {"train": 1000, "valid": 100, "test": 100}
    first = json.loads((data_dir / "valid.jsonl").read_text().split("\n")[0])["text"]
    assert data["valid"][0].tokens == stories_tok.encode(first) + [2]
    with pytest.raises(ValueError, match=r"train\.jsonl:1: the text format has no prompt to mask"):
        load_data(data_dir, stories_tok, mask_prompt=True)


# ---------------------------------------------------------------- bundled dataset


def test_bundled_dataset_loads_and_teaches_one_line_json(tok):
    data = load_data(BUNDLED_DATA, tok, mask_prompt=True, splits=("train", "valid", "test"))
    assert {k: len(v) for k, v in data.items()} == {"train": 300, "valid": 40, "test": 40}
    assert sum(p.stat().st_size for p in BUNDLED_DATA.glob("*.jsonl")) < 200_000
    sentences = {}
    for split in data:
        for line in (BUNDLED_DATA / f"{split}.jsonl").read_text().splitlines():
            user, assistant = json.loads(line)["messages"]
            assert user["content"].startswith("Extract the event as JSON: ")
            assert list(json.loads(assistant["content"])) == ["person", "event", "city", "date"]
            sentences.setdefault(user["content"], split)
    assert len(sentences) == 380  # no sentence repeats within or across splits
    for ex in data["train"][:5]:
        assert tok.decode(ex.tokens[ex.prompt_len:]).startswith('{"person": ')


def test_bundled_dataset_is_the_generators_output(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_example_data.py"),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    for split in ("train", "valid", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (BUNDLED_DATA / f"{split}.jsonl").read_bytes()


def test_bundled_data_is_package_data():
    assert BUNDLED_DATA == ROOT / "smoa_mlx" / "bundled"
    assert 'smoa_mlx = ["bundled/*.jsonl"]' in (ROOT / "pyproject.toml").read_text()


# ---------------------------------------------------------------- bad input


BAD = [
    # (file name, content, expected message after "<path>:")
    ("t.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n', r"3: invalid JSON: "),
    ("t.jsonl", '{"text": "a"}\n["text", "b"]\n', r"2: expected a JSON object, got a list"),
    ("t.jsonl", '{"txt": "a"}\n', r"1: unknown keys \['txt'\]; expected text, prompt/completion"),
    ("t.jsonl", '{"text": "a", "prompt": "b"}\n', r"1: keys \['prompt', 'text'\] mix the text and completions formats"),
    ("t.jsonl", '{"prompt": "a"}\n', r"1: missing key \['completion'\] of the completions format"),
    ("t.jsonl", '{"text": "a", "id": 3}\n', r"1: unknown key \['id'\] in the text format"),
    ("t.jsonl", '{"text": 5}\n', r"1: 'text' must be a string, got a number"),
    ("t.jsonl", '{"text": "a"}\n{"text": "  "}\n', r"2: 'text' is empty"),
    ("t.jsonl", '{"prompt": "a", "completion": null}\n', r"1: 'completion' must be a string, got null"),
    ("t.jsonl", '{"messages": []}\n', r"1: 'messages' must be a non-empty list, got a list"),
    ("t.jsonl", '{"messages": "hi"}\n', r"1: 'messages' must be a non-empty list, got a string"),
    ("t.jsonl", '{"messages": ["hi"]}\n', r"1: messages\[0\] must be an object, got a string"),
    ("t.jsonl", '{"messages": [{"content": "hi"}]}\n', r"1: messages\[0\] has no 'role'"),
    ("t.jsonl", '{"messages": [{"role": "", "content": "hi"}]}\n', r"1: messages\[0\]: 'role' is empty"),
    ("t.jsonl", '{"messages": [{"role": "user", "content": 1}]}\n', r"1: messages\[0\]: 'content' must be a string"),
    ("t.jsonl", '{"instruction": "a", "output": 1}\n', r"1: 'output' must be a string, got a number"),
    ("t.jsonl", '{"instruction": "", "output": "b"}\n', r"1: 'instruction' is empty"),
    ("t.jsonl", '{"text": "a"}\n\n{"prompt": "a", "completion": "b"}\n',
     r"3: this record is in the completions format, but the first one \(.*t\.jsonl:1\) is in the text"),
    ("t.jsonl", "", r" empty, no records in this split"),
    ("t.jsonl", "\n  \n", r" empty, no records in this split"),
    ("train.json", "", r" empty, no records in this split"),
    ("train.json", "[\n]\n", r" empty, no records in this split"),
    ("train.json", '\n{"text": "a"}', r"2: expected a JSON list of records"),
    ("train.json", '[\n  {"text": "a"},\n  {"text": "b"},\n]', r"4: invalid JSON: Expecting value"),
    ("train.json", '[\n  {"text": "a"},\n  {"text": "b"\n  }\n  {"text": "c"}]',
     r"5: invalid JSON: expected ',' or ']' after record 1"),
    ("train.json", '[{"text": "a"}]\n]', r"2: invalid JSON: extra data after the list"),
    ("train.json", '[\n  {"instruction": "a", "output": "b"},\n  {\n    "instruction": "x",\n    "output": 3\n  }\n]',
     r"3: record 1: 'output' must be a string, got a number"),
    ("train.json", '[\n  {"text": "a"},\n  7\n]', r"3: record 1: expected a JSON object, got a number"),
    ("t.txt", '{"text": "a"}\n', r" expected a .jsonl or .json file"),
]


@pytest.mark.parametrize("name,content,message", BAD)
def test_bad_input_names_file_and_line(tok, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        load_split(path, tok)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"{path}:"), str(e.value)
    assert re.match(message, str(e.value)[len(f"{path}:"):]), str(e.value)


def test_not_utf8(tok, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl: not UTF-8 text \(byte 13\)"):
        load_split(path, tok)


def test_mask_prompt_needs_an_assistant_reply_last(tok, tmp_path):
    path = write(tmp_path / "t.jsonl", {"messages": [{"role": "user", "content": "hi"}]})
    assert load_split(path, tok)[0].prompt_len == 0  # fine without masking, as in mlx-lm
    with pytest.raises(ValueError, match=rf"^{path}:1: the last message is from 'user'"):
        load_split(path, tok, mask_prompt=True)


def test_messages_need_a_chat_template(tok, tmp_path):
    path = write(tmp_path / "t.jsonl", {"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(ValueError, match=rf"^{path}:1: the messages format needs a tokenizer with a chat template"):
        load_split(path, Proxy(tok))


def test_chat_template_rejection_is_located(tok, tmp_path):
    def reject(*args, **kwargs):
        raise RuntimeError("Conversation roles must alternate user/assistant")

    path = write(tmp_path / "t.jsonl", {"prompt": "a", "completion": "b"})
    with pytest.raises(ValueError, match=rf"^{path}:1: the tokenizer's chat template rejects it: "
                                         "Conversation roles must alternate"):
        load_split(path, Proxy(tok, template="x", apply=reject))


def test_record_with_no_target_is_refused(tok, tmp_path):
    # A template that renders nothing after the prompt leaves no token to learn.
    path = write(tmp_path / "t.jsonl", {"prompt": "a", "completion": ""})
    with pytest.raises(ValueError, match=rf"^{path}:1: nothing to train on: 2 tokens, 2 of them prompt"):
        load_split(path, Proxy(tok, template="x", apply=lambda *a, **k: [3, 4]), mask_prompt=True)


def test_missing_file(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: file not found"):
        load_split(tmp_path / "nope.jsonl", tok)


def test_missing_split_is_named(tok, tmp_path):
    write(tmp_path / "train.jsonl", {"text": "a b c"})
    with pytest.raises(FileNotFoundError) as e:
        load_data(tmp_path, tok)
    assert str(e.value) == (f"{tmp_path}: the valid split is missing "
                            "(looked for valid.jsonl or valid.json)")
    assert list(load_data(tmp_path, tok, splits=("train",))) == ["train"]
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        load_data(tmp_path / "absent", tok)


def test_empty_split_is_named(tok, tmp_path):
    write(tmp_path / "train.jsonl", {"text": "a b c"})
    (tmp_path / "valid.json").write_text("[]")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'valid.json'}: empty, no records"):
        load_data(tmp_path, tok)


def test_split_in_two_files_is_refused(tok, tmp_path):
    write(tmp_path / "train.jsonl", {"text": "a"})
    (tmp_path / "train.json").write_text('[{"text": "a"}]')
    with pytest.raises(ValueError, match="both train.jsonl and train.json exist"):
        load_data(tmp_path, tok, splits=("train",))


def test_bad_validation_split_stops_before_training(tok, tmp_path):
    write(tmp_path / "train.jsonl", {"text": "fine"})
    write(tmp_path / "valid.jsonl", {"text": "fine"}, "{oops\n")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'valid.jsonl'}:2: invalid JSON"):
        load_data(tmp_path, tok)


# ---------------------------------------------------------------- batching


def make_examples(lengths, prompt_lens=None):
    """Example i starts with token 1000 + i, so any batch row says which example it holds."""
    prompt_lens = prompt_lens or [0] * len(lengths)
    return [Example([1000 + i] + list(range(1, n)), p)
            for i, (n, p) in enumerate(zip(lengths, prompt_lens))]


LENGTHS = [int(n) for n in np.random.default_rng(0).integers(2, 40, size=23)]


def rows(batch):
    """Example ids of the non-empty rows of a batch."""
    inputs, _, mask = (np.array(a) for a in batch)
    return [int(inputs[r, 0]) - 1000 for r in range(len(inputs)) if mask[r].sum() > 0]


def test_batches_are_a_function_of_seed_and_step():
    ex = make_examples(LENGTHS)
    a, b = Batcher(ex, 4, 64, seed=3), Batcher(ex, 4, 64, seed=3)
    steps = list(range(3 * a.num_batches))
    # `b` visits the steps in another order (a resumed run jumps straight to its step).
    for step in steps[::-1] + steps:
        for x, y in zip(a.batch(step), b.batch(step)):
            assert np.array_equal(np.array(x), np.array(y))
    orders = [[rows(a.batch(e * a.num_batches + i)) for i in range(a.num_batches)] for e in range(3)]
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    other = Batcher(ex, 4, 64, seed=4)
    assert [rows(other.batch(i)) for i in range(a.num_batches)] != orders[0]


def test_each_epoch_covers_every_example_once():
    ex = make_examples(LENGTHS)
    batcher = Batcher(ex, 4, 64, seed=1)
    assert batcher.num_batches == 6  # 23 examples: five full batches and one of 3 + an empty row
    for epoch in range(2):
        seen, empty = [], 0
        for i in range(batcher.num_batches):
            inputs, targets, mask = batcher.batch(epoch * batcher.num_batches + i)
            assert inputs.shape[0] == targets.shape[0] == mask.shape[0] == 4
            seen += rows((inputs, targets, mask))
            empty += int((np.array(mask).sum(axis=1) == 0).sum())
        assert sorted(seen) == list(range(23)) and empty == 1


def test_batches_group_similar_lengths_and_pad_to_multiple_of_8():
    ex = make_examples(LENGTHS)
    batcher = Batcher(ex, 4, 64)
    groups = []
    for step in range(batcher.num_batches):
        inputs, targets, mask = (np.array(a) for a in batcher.batch(step))
        assert inputs.dtype == targets.dtype == np.int32 and mask.dtype == np.float32
        ids = rows((inputs, targets, mask))
        longest = max(LENGTHS[i] for i in ids) - 1
        assert inputs.shape[1] == -(-longest // 8) * 8  # padded up to a multiple of 8
        for r, i in enumerate(ids):
            n = LENGTHS[i] - 1
            assert inputs[r, :n].tolist() == ex[i].tokens[:-1]
            assert targets[r, :n].tolist() == ex[i].tokens[1:]
            assert mask[r, :n].all() and not mask[r, n:].any()  # padding is out of the loss
            assert not inputs[r, n:].any() and not targets[r, n:].any()  # pad id 0
        groups.append(sorted(LENGTHS[i] for i in ids))
    groups.sort()
    assert all(g[-1] <= h[0] for g, h in zip(groups, groups[1:]))  # sorted-length groups


def test_truncation_is_counted_and_applied():
    lengths = [5, 9, 10, 11, 12, 30]
    ex = make_examples(lengths, prompt_lens=[0, 0, 0, 0, 3, 11])
    batcher = Batcher(ex, 2, 9)  # at most 9 positions: examples of more than 10 tokens lose targets
    assert batcher.truncated == 3
    assert batcher.fully_masked == 1  # example 5: its prompt alone fills the 9 positions
    by_id = {}
    for step in range(batcher.num_batches):
        inputs, targets, mask = (np.array(a) for a in batcher.batch(step))
        assert inputs.shape[1] <= 9
        for r in range(len(inputs)):
            by_id[int(inputs[r, 0]) - 1000] = (inputs[r], targets[r], mask[r])
    inputs, targets, mask = by_id[4]  # 12 tokens, prompt 3: cut to 10 tokens
    assert inputs.tolist() == ex[4].tokens[:9] and targets.tolist() == ex[4].tokens[1:10]
    assert mask.tolist() == [0, 0] + [1] * 7  # targets 2.. are tokens 3..: the completion
    assert not by_id[5][2].any()
    assert by_id[2][2].sum() == 9 and by_id[1][2].sum() == 8  # 10 and 9 tokens: not cut


def test_rank_slices_partition_the_global_batch():
    ex = make_examples(LENGTHS)
    whole = Batcher(ex, 6, 64, seed=7)
    parts = [Batcher(ex, 3, 64, seed=7, rank=r, world_size=2) for r in range(2)]
    assert whole.num_batches == parts[0].num_batches == parts[1].num_batches == 4
    for step in range(2 * whole.num_batches):
        full = [np.array(a) for a in whole.batch(step)]
        for rank, part in enumerate(parts):
            for x, y in zip(full, part.batch(step)):
                assert np.array_equal(x[rank::2], np.array(y))
        ids = rows(parts[0].batch(step)) + rows(parts[1].batch(step))
        assert sorted(ids) == sorted(rows(full))


def test_batcher_refuses_bad_sizes():
    ex = make_examples([5, 6, 7])
    with pytest.raises(ValueError, match="batch size 4 needs at least 4 examples, but the dataset has only 3"):
        Batcher(ex, 4, 64)
    with pytest.raises(ValueError, match=r"batch size 2 x 2 workers needs at least 4 examples"):
        Batcher(ex, 2, 64, world_size=2)
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        Batcher(ex, 1, 64, rank=2, world_size=2)


def test_eval_batches_are_fixed_and_complete():
    ex = make_examples(LENGTHS)
    batcher = Batcher(ex, 4, 64, seed=5)
    batcher.batch(10 * batcher.num_batches)  # training elsewhere in the schedule changes nothing
    all_batches = [rows(b) for b in batcher.eval_batches()]
    assert sorted(sum(all_batches, [])) == list(range(23))
    assert [rows(b) for b in Batcher(ex, 4, 64, seed=5).eval_batches(2)] == all_batches[:2]
