"""smoa_mlx.data: every format tokenizes as mlx-lm / LLM-Adapters would, the prompt mask is
exact, batches are a pure function of (seed, step), and bad input names file and line."""

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from smoa_mlx.data import BUNDLED_DATA, BUNDLED_MODEL, Batcher, Example, load_data, load_split
from smoa_mlx.errors import ConfigError, DataError, MissingFileError

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
def stories_tok():
    """The bundled stories260K's tokenizer: a real base model's, with no chat template."""
    from mlx_lm import load

    return load(str(BUNDLED_MODEL))[1]


TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>\nTools: {{ tools | tojson }}</s>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is defined %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %}<call>"
    "{{ c['function']['name'] }}({{ c['function']['arguments'] }})</call>{% endfor %}{% endif %}"
    "</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tools_tok(tmp_path_factory):
    """The tiny tokenizer with a chat template that renders `tools` and `tool_calls`."""
    from mlx_lm.utils import load_tokenizer

    from smoa_mlx.synthetic import make_tokenizer

    path = tmp_path_factory.mktemp("tools_tok")
    make_tokenizer(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    return load_tokenizer(path)


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
        assert ex.tokens == stories_tok.encode(prompt + record["output"]) + [1]
        assert stories_tok.decode(masked_targets(ex)).strip() == record["output"] + "<s>"


def test_real_llm_adapters_math_with_empty_outputs(stories_tok, datasets_dir):
    # math_data.json has 3 records with an empty "output" (LLM-Adapters trains on them: EOS only).
    path = datasets_dir / "llm_adapters" / "ft-training_set" / "math_data.json"
    examples = load_split(path, stories_tok, mask_prompt=True)
    assert len(examples) == 3260
    assert examples[175].tokens[examples[175].prompt_len:] == [1]


def test_real_wikisql_jsonl(stories_tok, datasets_dir):
    data_dir = datasets_dir / "wikisql_mlx"
    data = load_data(data_dir, stories_tok, splits=("train", "valid", "test"))
    assert {k: len(v) for k, v in data.items()} == {"train": 1000, "valid": 100, "test": 100}
    first = json.loads((data_dir / "valid.jsonl").read_text().split("\n")[0])["text"]
    assert data["valid"][0].tokens == stories_tok.encode(first) + [1]
    with pytest.raises(ValueError, match=r"train\.jsonl:1: the text format has no prompt to mask"):
        load_data(data_dir, stories_tok, mask_prompt=True)


# ---------------------------------------------------------------- bundled model and dataset

CARD = re.compile(r"Who: (\w+)\. What: (an? [\w ]+)\. Where: the (\w+)\.")


def test_bundled_dataset_is_story_cards_the_story_determines(stories_tok, tok):
    data = load_data(BUNDLED_DATA, stories_tok, mask_prompt=True, splits=("train", "valid", "test"))
    assert {k: len(v) for k, v in data.items()} == {"train": 300, "valid": 40, "test": 40}
    assert sum(p.stat().st_size for p in BUNDLED_DATA.glob("*.jsonl")) < 100_000
    stories = {}
    for split in data:
        records = [json.loads(line) for line in (BUNDLED_DATA / f"{split}.jsonl").read_text().splitlines()]
        for record, ex in zip(records, data[split]):
            assert list(record) == ["prompt", "completion"]
            story = record["prompt"].removeprefix("Story: ")
            assert story != record["prompt"] and story.endswith("\n")
            fields = CARD.fullmatch(record["completion"]).groups()
            assert all(field in story for field in fields)  # the card copies the story
            stories.setdefault(story, split)
            # No chat template: the prompt then the completion, the loss on the card + EOS
            # (stories260K's is <s>, id 1: see its README.md).
            assert ex.tokens == stories_tok.encode(record["prompt"] + record["completion"]) + [1]
            assert stories_tok.decode(masked_targets(ex)) == record["completion"] + "<s>"
    assert len(stories) == 380  # no story repeats within or across splits
    # A chat model sees one user turn and one assistant turn.
    ex = load_data(BUNDLED_DATA, tok, mask_prompt=True, splits=("train",))["train"][0]
    first = json.loads((BUNDLED_DATA / "train.jsonl").read_text().splitlines()[0])
    assert tok.decode(masked_targets(ex)) == first["completion"] + "</s>\n"


def test_bundled_dataset_is_the_generators_output(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_example_data.py"),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    for split in ("train", "valid", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (BUNDLED_DATA / f"{split}.jsonl").read_bytes()


def test_bundled_model_is_the_real_stories260k():
    """The copy in the package is the pretrained model: greedy decoding gives the sample
    printed in llama2.c's doc/stories260K.md (the provenance in its README.md)."""
    from mlx_lm import generate, load

    model, tok = load(str(BUNDLED_MODEL))
    assert tok.chat_template is None  # a base model: the bundled data must not need a template
    assert tok.eos_token_ids == {1} and tok.eos_token_id == 1  # llama2.c ends a story with BOS
    text = generate(model, tok, "Once upon a time", max_tokens=30, verbose=False)
    assert text.startswith(", there was a little girl named Lily. She loved to play outside in the park.")
    readme = (BUNDLED_MODEL / "README.md").read_text()
    assert "MIT License" in readme and "karpathy/tinyllamas" in readme
    import hashlib
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert hashlib.sha256((BUNDLED_MODEL / name).read_bytes()).hexdigest() in readme


def test_bundled_model_learns_the_bundled_data(tmp_path):
    """The main job's model and data: a short run must clearly lower the validation loss
    (3.3 before training; the full default run reaches about 0.03)."""
    from smoa_mlx.train import train

    result = train({"model": str(BUNDLED_MODEL), "iters": 30, "warmup": 3, "learning_rate": 1e-2,
                    "val_batches": -1, "steps_per_eval": 30, "adapter_path": str(tmp_path / "a")})
    assert result["initial_val_loss"] > 3.0  # the pretrained model does not know the cards
    assert result["val_loss"] < result["initial_val_loss"] / 2
    assert (tmp_path / "a" / "adapters.safetensors").is_file()


def test_wheel_ships_the_bundled_model_and_data(tmp_path):
    """`pip install .` (not editable) must carry the main job's model and data."""
    import shutil

    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "smoa_mlx", src / "smoa_mlx", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    [wheel] = tmp_path.glob("smoa_mlx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for split in ("train", "valid", "test"):
        assert f"smoa_mlx/bundled/{split}.jsonl" in names
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "README.md"):
        assert f"smoa_mlx/bundled/stories260K/{name}" in names


# ---------------------------------------------------------------- bad input


BAD = [
    # (file name, content, expected message after "<path>:")
    ("t.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n', r"3: invalid JSON: "),
    ("t.jsonl", '["text", "b"]\n', r"1: expected a JSON object, got a list"),
    ("t.jsonl", '{"text": "a"}\n["text", "b"]\n', r"2: expected a JSON object, got a list"),
    ("t.jsonl", '{"text": "a"}\n"text"\n', r"2: expected a JSON object, got a string"),
    ("t.jsonl", '{"txt": "a"}\n', r"1: keys \['txt'\] name no format; expected completion/prompt, messages, text"),
    ("t.jsonl", '{"prompt": "a"}\n', r"1: missing key \['completion'\] of the completions format"),
    ("t.jsonl", '{"text": 5}\n', r"1: 'text' must be a string, got a number"),
    ("t.jsonl", '{"text": "a"}\n{"text": "  "}\n', r"2: 'text' is empty"),
    ("t.jsonl", '{"prompt": "a", "completion": null}\n', r"1: 'completion' must be a string, got null"),
    ("t.jsonl", '{"prompt": "a", "completion": "b", "tools": {"x": 1}}\n', r"1: 'tools' must be a list of objects, got an object"),
    ("t.jsonl", '{"messages": []}\n', r"1: 'messages' must be a non-empty list, got a list"),
    ("t.jsonl", '{"messages": "hi"}\n', r"1: 'messages' must be a non-empty list, got a string"),
    ("t.jsonl", '{"messages": ["hi"]}\n', r"1: messages\[0\] must be an object, got a string"),
    ("t.jsonl", '{"messages": [{"content": "hi"}]}\n', r"1: messages\[0\] has no 'role'"),
    ("t.jsonl", '{"messages": [{"role": "user"}]}\n', r"1: messages\[0\] has no 'content' \(nor 'tool_calls'\)"),
    ("t.jsonl", '{"messages": [{"role": "", "content": "hi"}]}\n', r"1: messages\[0\]: 'role' is empty"),
    ("t.jsonl", '{"messages": [{"role": "user", "content": 1}]}\n', r"1: messages\[0\]: 'content' must be a string"),
    ("t.jsonl", '{"messages": [{"role": "assistant", "tool_calls": "f()"}]}\n', r"1: messages\[0\]: 'tool_calls' must be a list, got a string"),
    ("t.jsonl", '{"instruction": "a", "output": 1}\n', r"1: 'output' must be a string, got a number"),
    ("t.jsonl", '{"instruction": "", "output": "b"}\n', r"1: 'instruction' is empty"),
    ("t.jsonl", '{"text": "a"}\n\n{"prompt": "a", "completion": "b"}\n',
     r"3: this record is in the completions format, but the first one \(.*t\.jsonl:1\) is in the text"),
    ("t.jsonl", '{"text": "a"}\n{"id": 1}\n', r"2: keys \['id'\] name no format"),
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
    ("train.json", '[\n  [{"text": "a"}]\n]', r"2: record 0: expected a JSON object, got a list"),
    ("t.txt", '{"text": "a"}\n', r" expected a .jsonl or .json file"),
]


@pytest.mark.parametrize("name,content,message", BAD)
def test_bad_input_names_file_and_line(tok, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_split(path, tok)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"{path}:"), str(e.value)
    assert re.match(message, str(e.value)[len(f"{path}:"):]), str(e.value)


def test_not_utf8_names_the_line(tok, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not UTF-8 text \(byte 27 of the file\)$"):
        load_split(path, tok)


def test_keys_no_format_uses_are_ignored_with_one_warning(tok, tmp_path, capsys):
    """As mlx-lm: the format is the first record's; other keys are dropped (and named once)."""
    path = write(tmp_path / "t.jsonl", {"text": "one two", "id": 1, "source": "a"},
                 {"text": "three", "id": 2}, {"text": "four", "prompt": "x"})
    examples = load_split(path, tok)
    assert [e.tokens for e in examples] == [tok.encode(t) + [tok.eos_token_id]
                                            for t in ("one two", "three", "four")]
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"warning: {path}: ignoring key(s) ['id', 'prompt', 'source'], "
                     "which the text format does not use"]
    # prompt + completion win over text, as in mlx-lm's create_dataset.
    both = write(tmp_path / "b.jsonl", {"text": "ignored", "prompt": "a", "completion": "b"})
    [ex] = load_split(both, tok)
    assert tok.decode(ex.tokens) == "<|user|>\na</s>\n<|assistant|>\nb</s>\n"
    assert "ignoring key(s) ['text'], which the completions format" in capsys.readouterr().err


def test_mask_prompt_needs_an_assistant_reply_last(tok, tmp_path):
    path = write(tmp_path / "t.jsonl", {"messages": [{"role": "user", "content": "hi"}]})
    assert load_split(path, tok)[0].prompt_len == 0  # fine without masking, as in mlx-lm
    with pytest.raises(DataError, match=rf"^{path}:1: the last message is from 'user'"):
        load_split(path, tok, mask_prompt=True)


def test_messages_need_a_chat_template(tok, tmp_path):
    path = write(tmp_path / "t.jsonl", {"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(DataError, match=rf"^{path}:1: the 'messages' format needs a tokenizer with a chat template"):
        load_split(path, Proxy(tok))
    tools = write(tmp_path / "u.jsonl", {"prompt": "a", "completion": "b", "tools": []})
    with pytest.raises(DataError, match=rf"^{tools}:1: 'tools' need a tokenizer with a chat template"):
        load_split(tools, Proxy(tok))


def test_chat_template_rejection_is_located(tok, tmp_path):
    def reject(*args, **kwargs):
        raise RuntimeError("Conversation roles must alternate user/assistant")

    path = write(tmp_path / "t.jsonl", {"prompt": "a", "completion": "b"})
    with pytest.raises(DataError, match=rf"^{path}:1: the tokenizer's chat template rejects it: "
                                        "Conversation roles must alternate"):
        load_split(path, Proxy(tok, template="x", apply=reject))


def test_record_with_no_target_is_refused(tok, tmp_path):
    # A template that renders nothing after the prompt leaves no token to learn.
    path = write(tmp_path / "t.jsonl", {"prompt": "a", "completion": ""})
    with pytest.raises(DataError, match=rf"^{path}:1: nothing to train on: 2 tokens, 2 of them prompt"):
        load_split(path, Proxy(tok, template="x", apply=lambda *a, **k: [3, 4]), mask_prompt=True)


def test_missing_file(tok, tmp_path):
    with pytest.raises(MissingFileError, match=r"nope\.jsonl: file not found"):
        load_split(tmp_path / "nope.jsonl", tok)


def test_missing_valid_split_warns_and_trains_without_validation(tok, tmp_path, capsys):
    write(tmp_path / "train.jsonl", *[{"text": f"a b c {i}"} for i in range(4)])
    data = load_data(tmp_path, tok)
    assert len(data["train"]) == 4 and data["valid"] == []
    assert capsys.readouterr().err == (f"warning: {tmp_path}: the valid split is missing (looked "
                                       "for valid.jsonl or valid.json); training without validation\n")
    from smoa_mlx.train import train

    result = train({"model": str(BUNDLED_MODEL), "data": str(tmp_path), "iters": 2, "warmup": 0,
                    "batch_size": 2, "adapter_path": str(tmp_path / "a")})
    assert result["steps"] == 2 and result["val_loss"] is None and result["train_loss"] is not None
    out = capsys.readouterr().out
    assert "val loss" not in out and "saved" in out
    assert (tmp_path / "a" / "adapters.safetensors").is_file()


def test_missing_train_and_test_splits_are_named(tok, tmp_path):
    write(tmp_path / "valid.jsonl", {"text": "a b c"})
    with pytest.raises(MissingFileError) as e:
        load_data(tmp_path, tok)
    assert str(e.value) == (f"{tmp_path}: the train split is missing "
                            "(looked for train.jsonl or train.json)")
    with pytest.raises(MissingFileError, match="the test split is missing"):
        load_data(tmp_path, tok, splits=("test",))
    with pytest.raises(MissingFileError, match="data directory not found"):
        load_data(tmp_path / "absent", tok)
    with pytest.raises(DataError, match=r"train\.jsonl: --data is a directory holding train\.jsonl"):
        load_data(write(tmp_path / "train.jsonl", {"text": "a"}), tok)


def test_empty_split_is_named(tok, tmp_path):
    write(tmp_path / "train.jsonl", {"text": "a b c"})
    (tmp_path / "valid.json").write_text("[]")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'valid.json'}: empty, no records"):
        load_data(tmp_path, tok)


def test_split_in_two_files_is_refused(tok, tmp_path):
    write(tmp_path / "train.jsonl", {"text": "a"})
    (tmp_path / "train.json").write_text('[{"text": "a"}]')
    with pytest.raises(DataError, match="both train.jsonl and train.json exist"):
        load_data(tmp_path, tok, splits=("train",))


def test_bad_validation_split_stops_before_training(tok, tmp_path):
    write(tmp_path / "train.jsonl", {"text": "fine"})
    write(tmp_path / "valid.jsonl", {"text": "fine"}, "{oops\n")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'valid.jsonl'}:2: invalid JSON"):
        load_data(tmp_path, tok)


# ---------------------------------------------------------------- mlx-lm's formats, exactly


def mlx_lm_example(record, tokenizer, **config):
    """What mlx_lm.tuner.datasets makes of one record: (tokens, prompt length)."""
    from mlx_lm.tuner.datasets import create_dataset

    dataset = create_dataset([record], tokenizer, SimpleNamespace(**config))
    return dataset.process(dataset[0])


WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_RECORD = {
    "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "-3 C, snow"},
        {"role": "assistant", "content": "It is -3 C and snowing."},
    ],
    "tools": WEATHER_TOOLS,
}


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_tools_format_trains_as_in_mlx_lm(tools_tok, tmp_path, mask_prompt):
    """{"messages": [... tool_calls ...], "tools": [...]}: the template renders the tools and
    the tool calls (an assistant turn with no content), and the tokens and the prompt mask
    are mlx-lm's."""
    call_only = {"messages": TOOL_RECORD["messages"][:2], "tools": WEATHER_TOOLS}
    path = write(tmp_path / "train.jsonl", TOOL_RECORD, call_only)
    full, call = load_split(path, tools_tok, mask_prompt=mask_prompt)
    text = tools_tok.decode(full.tokens)
    assert text.startswith('<|system|>\nTools: [{"type": "function", "function": {"name": "get_weather", '
                           '"description": "Current weather"')
    assert '<|assistant|>\n<call>get_weather({"city": "Oslo"})</call></s>\n<|tool|>\n-3 C, snow</s>\n' in text
    for record, ex in ((TOOL_RECORD, full), (call_only, call)):
        tokens, offset = mlx_lm_example(record, tools_tok, mask_prompt=mask_prompt)
        assert (ex.tokens, ex.prompt_len) == (tokens, offset if mask_prompt else 0)
    if mask_prompt:  # the loss covers the last assistant turn: here the tool call itself
        assert tools_tok.decode(masked_targets(call)) == '<call>get_weather({"city": "Oslo"})</call></s>\n'
        assert tools_tok.decode(masked_targets(full)) == "It is -3 C and snowing.</s>\n"
    # Without "tools" the template renders no tool list: the key really reaches it.
    [plain] = load_split(write(tmp_path / "p.jsonl", {"messages": TOOL_RECORD["messages"]}), tools_tok)
    assert "Tools:" not in tools_tok.decode(plain.tokens)


@pytest.mark.parametrize("record", [
    {"text": "Once upon a time there was a little model."},
    {"prompt": "how old is Ann?", "completion": "SELECT age FROM people"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}]},
    {"prompt": "what is two plus three?", "completion": "5", "tools": WEATHER_TOOLS},
])
@pytest.mark.parametrize("mask_prompt", [False, True])
def test_every_mlx_lm_format_matches_mlx_lm(tools_tok, tmp_path, record, mask_prompt):
    if mask_prompt and "text" in record:
        pytest.skip("mlx-lm refuses to mask a text record, and so does this loader (tested above)")
    [ex] = load_split(write(tmp_path / "t.jsonl", record), tools_tok, mask_prompt=mask_prompt)
    tokens, offset = mlx_lm_example(record, tools_tok, mask_prompt=mask_prompt)
    assert ex.tokens == tokens and ex.prompt_len == offset


def test_feature_names_rename_the_keys(tok, tmp_path):
    path = write(tmp_path / "t.jsonl", {"question": "how old is Ann?", "response": "SELECT age", "id": 1})
    [ex] = load_split(path, tok, mask_prompt=True, prompt_feature="question",
                      completion_feature="response")
    assert (ex.tokens, ex.prompt_len) == mlx_lm_example(
        {"question": "how old is Ann?", "response": "SELECT age"}, tok, mask_prompt=True,
        prompt_feature="question", completion_feature="response")
    chat = write(tmp_path / "c.jsonl", {"chosen": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "yo"}]})
    [c] = load_split(chat, tok, chat_feature="chosen")
    assert tok.decode(c.tokens) == "<|user|>\nhi</s>\n<|assistant|>\nyo</s>\n"
    with pytest.raises(ConfigError, match=r"unknown data option\(s\) \['prompt_key'\]"):
        load_data(tmp_path, tok, prompt_key="question")


# ---------------------------------------------------------------- Hugging Face datasets


CARDS = [{"question": f"Story {i}: Tom saw a cat.", "answer": f"Who: Tom {i}.", "id": i} for i in range(10)]


def card_examples(tok, records, mask_prompt=True):
    """The reference: the same records through the JSONL loader."""
    return [mlx_lm_example({"prompt": r["question"], "completion": r["answer"]}, tok,
                           mask_prompt=mask_prompt) for r in records]


def as_pairs(examples):
    return [(e.tokens, e.prompt_len) for e in examples]


@pytest.fixture
def parquet_dir(tmp_path):
    """A dataset directory as the Hub serves one: a parquet file per split."""
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "cards"
    d.mkdir()
    datasets.Dataset.from_list(CARDS[:8]).to_parquet(str(d / "train.parquet"))
    datasets.Dataset.from_list(CARDS[8:]).to_parquet(str(d / "valid.parquet"))
    return d


def test_hf_dataset_config_reads_a_local_dataset(tok, parquet_dir, capsys):
    """The hf_dataset path (mlx-lm's load_custom_hf_dataset) calls the real
    datasets.load_dataset, here on a local directory: no network."""
    config = {"path": str(parquet_dir), "prompt_feature": "question", "completion_feature": "answer",
              "train_split": "train[:75%]", "valid_split": "train[-25%:]", "test_split": "validation",
              "revision_typo": "main"}
    data = load_data(config, tok, mask_prompt=True, splits=("train", "valid", "test"))
    assert as_pairs(data["train"]) == card_examples(tok, CARDS[:6])
    assert as_pairs(data["valid"]) == card_examples(tok, CARDS[6:8])
    assert as_pairs(data["test"]) == card_examples(tok, CARDS[8:])
    err = capsys.readouterr().err
    assert "warning: hf_dataset: ignoring key(s) ['revision_typo']" in err
    assert "ignoring key(s) ['id'], which the completions format does not use" in err
    # mlx-lm's default splits: train[:80%] and train[-10%:]; a list concatenates.
    both = load_data([{"path": str(parquet_dir), "prompt_feature": "question", "completion_feature": "answer"},
                      {"path": str(parquet_dir), "text_feature": "answer"}], tok)
    texts = [mlx_lm_example({"text": r["answer"]}, tok)[0] for r in CARDS[:8]]
    assert as_pairs(both["train"]) == card_examples(tok, CARDS[:6], mask_prompt=False) + [(t, 0) for t in texts[:6]]
    assert as_pairs(both["valid"]) == card_examples(tok, CARDS[7:8], mask_prompt=False) + [(texts[7], 0)]


def test_hf_dataset_config_errors_are_one_line(tok, parquet_dir):
    with pytest.raises(ConfigError, match=r"^hf_dataset \(.*cards\): no test_split given$"):
        load_data({"path": str(parquet_dir)}, tok, splits=("test",))
    with pytest.raises(ConfigError, match=r"^hf_dataset\[1\]: 'path' \(a dataset id or directory\) is required"):
        load_data([{"path": str(parquet_dir)}, {"train_split": "train"}], tok)
    with pytest.raises(ConfigError, match=r"^hf_dataset: 'config' must be a mapping of load_dataset arguments"):
        load_data({"path": str(parquet_dir), "config": "default"}, tok)
    with pytest.raises(DataError, match=r"^.*cards \[train\[:80%\]\]: row 0: missing key \['completion'\]"):
        load_data({"path": str(parquet_dir), "prompt_feature": "question"}, tok)
    with pytest.raises(DataError, match=r"^.*cards \[nope\]: loading the Hugging Face dataset failed: "):
        load_data({"path": str(parquet_dir), "train_split": "nope"}, tok)


def test_hub_id_loads_through_load_dataset(tok, parquet_dir, monkeypatch, tmp_path, capsys):
    """--data <hub id> takes mlx-lm's load_hf_dataset path: the real datasets.load_dataset,
    with only the download replaced by the same files on disk."""
    import datasets

    real, calls = datasets.load_dataset, []

    def offline(path, *args, **kwargs):
        calls.append(path)
        return real(str(parquet_dir) if path == "someone/cards" else path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    data = load_data("someone/cards", tok, mask_prompt=True, prompt_feature="question",
                     completion_feature="answer")
    assert calls == ["someone/cards"]
    assert as_pairs(data["train"]) == card_examples(tok, CARDS[:8])
    assert as_pairs(data["valid"]) == card_examples(tok, CARDS[8:])
    with pytest.raises(MissingFileError, match=r"^someone/cards: the test split is missing \(the dataset has train, validation\)"):
        load_data("someone/cards", tok, splits=("test",), text_feature="answer")
    # A local directory of that name wins, as in mlx-lm.
    local = tmp_path / "someone" / "cards"
    local.mkdir(parents=True)
    write(local / "train.jsonl", {"text": "local data"})
    write(local / "valid.jsonl", {"text": "local data"})
    calls.clear()
    assert load_data("someone/cards", tok)["train"][0].tokens == tok.encode("local data") + [2]
    assert calls == []


def test_hub_failures_are_one_line(tok, monkeypatch):
    import datasets

    def offline(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        load_data("someone/cards", tok)
    assert str(e.value) == ("someone/cards: no such local directory, and loading it as a Hugging Face "
                            "dataset failed: Couldn't reach 'someone/cards' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setitem(sys.modules, "datasets", None)  # the optional extra is not installed
    with pytest.raises(DataError, match=r"need the datasets library: pip install 'smoa-mlx\[datasets\]'"):
        load_data("someone/cards", tok)


def test_saved_dataset_dict_is_a_local_directory(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [{"messages": [{"role": "user", "content": f"hi {i}"},
                             {"role": "assistant", "content": f"yo {i}"}]} for i in range(5)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:4]),
                          "test": datasets.Dataset.from_list(records[4:])}).save_to_disk(str(tmp_path / "dd"))
    data = load_data(tmp_path / "dd", tok, mask_prompt=True, splits=("train", "valid", "test"))
    assert as_pairs(data["train"]) == [mlx_lm_example(r, tok, mask_prompt=True) for r in records[:4]]
    assert as_pairs(data["test"]) == [mlx_lm_example(records[4], tok, mask_prompt=True)]
    assert data["valid"] == []
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DataError, match="a single saved Dataset; save a DatasetDict"):
        load_data(tmp_path / "one", tok)


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
