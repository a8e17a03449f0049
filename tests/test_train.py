"""The training loop end to end: learning, exact resume, methods, safety, bad input."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import smoa_mlx
from smoa_mlx import checkpoint, files
from smoa_mlx.data import Batcher, load_data
from smoa_mlx.distributed import Distributed
from smoa_mlx.patch import apply_smoa
from smoa_mlx.train import build_parser, evaluate, load_model, loss_fn, main, make_step, train

REPO = Path(__file__).resolve().parents[1]


def _arith(n, rng):
    return [
        {"text": f"Question: what is {a} plus {b}? Answer: The answer is {a + b}."}
        for a, b in ((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n))
    ]


def _write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def arith(tmp_path_factory) -> Path:
    """Short text records the tiny model's tokenizer covers: train 32, valid 8, test 8."""
    d = tmp_path_factory.mktemp("arith")
    rng = random.Random(0)
    for split, n in (("train", 32), ("valid", 8), ("test", 8)):
        _write(d / f"{split}.jsonl", _arith(n, rng))
    return d


def opts(model, data, out, **kw):
    """Small, fast training options for the tiny model."""
    return {"model": str(model), "data": str(data), "adapter_path": str(out), "iters": 6,
            "batch_size": 4, "learning_rate": 5e-2, "warmup": 0, "steps_per_report": 1,
            "steps_per_eval": 100, "val_batches": -1, **kw}


def train_losses(out) -> dict:
    lines = (Path(out) / checkpoint.METRICS).read_text().splitlines()
    return {r["step"]: r["train_loss"] for r in map(json.loads, lines) if r["type"] == "train"}


def adapter_file(out) -> dict:
    return files.load_safetensors(Path(out) / "adapters.safetensors")


def assert_same_tensors(a: dict, b: dict, atol=1e-6):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=atol, rtol=1e-5, err_msg=k)


# ---------------------------------------------------------------- learning


def test_tiny_smoa_learns_saves_and_reloads(tiny_model_dir, arith, tmp_path, capsys):
    out = tmp_path / "run"
    r = train(opts(tiny_model_dir, arith, out, iters=12, save_every=5, test=True))
    assert r["steps"] == 12 and r["val_loss"] < r["initial_val_loss"] - 0.02
    # The trainer prints the effective rank of the learned updates: above r=8 for K=2.
    assert "Effective rank of the learned updates" in capsys.readouterr().out
    assert r["rank_report"]["summary"]["all"]["rank_1pct"]["max"] > 8
    assert r["trainable"] > 0 and r["tokens_per_second"] > 0 and r["peak_memory_gb"] > 0
    names = {p.name for p in out.iterdir()}
    assert {"adapters.safetensors", "adapter_config.json", checkpoint.STATE, checkpoint.METRICS,
            "0000005_adapters.safetensors", "0000010_adapters.safetensors",
            "0000012_adapters.safetensors"} == names
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "smoa" and config["learning_rate"] == 5e-2
    assert config["model"] == str(tiny_model_dir) and config["smoa_parameters"]["num_blocks"] == 2
    records = [json.loads(x) for x in (out / checkpoint.METRICS).read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "val"] == [0, 12]
    assert sorted(train_losses(out)) == list(range(1, 13))
    assert {"learning_rate", "tokens_per_second", "peak_memory_gb"} <= set(records[1])
    # The saved adapter reproduces the final validation loss through smoa_mlx.load.
    model, tok = smoa_mlx.load(str(tiny_model_dir), adapter_path=str(out))
    valid = Batcher(load_data(arith, tok)["valid"], 4, 2048)
    assert evaluate(model, valid.eval_batches()) == pytest.approx(r["val_loss"], abs=1e-5)
    assert r["test_loss"] < r["initial_val_loss"]
    # --test alone (train=False) evaluates the saved adapter on the test split.
    alone = train({**opts(tiny_model_dir, arith, out), "train": False, "test": True})
    assert alone["test_loss"] == pytest.approx(r["test_loss"], abs=1e-5)


def test_only_rank_0_measures_the_effective_rank(tiny_model_dir, arith, tmp_path, monkeypatch, capsys):
    """Every rank holds the same adapter: the others skip the decompositions and print nothing."""
    def fail(model):
        raise AssertionError("a rank other than 0 measured the effective rank")

    monkeypatch.setattr(smoa_mlx.train, "rank_report", fail)
    monkeypatch.setattr(Distributed, "main", property(lambda self: False))
    r = train(opts(tiny_model_dir, arith, tmp_path / "run", iters=2))
    assert r["steps"] == 2 and "rank_report" not in r
    assert capsys.readouterr().out == ""


def test_stories260k_learns_wikisql(stories_dir, datasets_dir, tmp_path):
    data = datasets_dir / "wikisql_mlx"
    r = train({"model": str(stories_dir), "data": str(data), "adapter_path": str(tmp_path / "a"),
               "iters": 20, "batch_size": 8, "learning_rate": 2e-2, "warmup": 2,
               "steps_per_report": 10, "steps_per_eval": 100, "val_batches": 2, "max_seq_length": 128})
    assert r["initial_val_loss"] > 5.0  # TinyStories English knows no SQL
    assert r["val_loss"] < r["initial_val_loss"] - 1.0, r  # measured: 5.30 -> 3.90


@pytest.mark.parametrize("method", ["lora", "hira"])
def test_lora_and_hira_save_loadable_adapters(method, tiny_model_dir, arith, tmp_path):
    out = tmp_path / method
    r = train(opts(tiny_model_dir, arith, out, method=method))
    assert r["val_loss"] < r["initial_val_loss"]
    config = json.loads((out / "adapter_config.json").read_text())
    if method == "lora":
        from mlx_lm import load as mlx_lm_load

        assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["scale"] == 1.0
        model, tok = mlx_lm_load(str(tiny_model_dir), adapter_path=str(out))  # mlx-lm's own loader
    else:
        assert config["smoa_parameters"]["num_blocks"] == 1 and config["method"] == "hira"
        model, tok = smoa_mlx.load(str(tiny_model_dir), adapter_path=str(out))
    model.eval()
    valid = Batcher(load_data(arith, tok)["valid"], 4, 2048)
    assert evaluate(model, valid.eval_batches()) == pytest.approx(r["val_loss"], abs=1e-5)


def test_quantized_base_trains(tiny_model_dir, arith, tmp_path):
    from mlx_lm.utils import load as mlx_lm_load, quantize_model, save

    qdir = tmp_path / "q4"
    model, tok, config = mlx_lm_load(str(tiny_model_dir), return_config=True)
    model, config = quantize_model(model, config, group_size=32, bits=4)
    save(qdir, tiny_model_dir, model, tok, config)
    out = tmp_path / "a"
    r = train(opts(qdir, arith, out, iters=8))
    assert r["val_loss"] < r["initial_val_loss"] - 0.01
    model, _ = smoa_mlx.load(str(qdir), adapter_path=str(out))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, smoa_mlx.SMoALinear) and isinstance(q_proj.linear, nn.QuantizedLinear)


def test_bfloat16_adapter_stays_bfloat16(tiny_model_dir, arith, tmp_path):
    """--dtype sets the adapter's dtype for the whole run (a gradient in another dtype
    would make the optimizer change it after the first update)."""
    out = tmp_path / "bf16"
    r = train(opts(tiny_model_dir, arith, out, iters=4, dtype="bfloat16", learning_rate=1e-1))
    assert math.isfinite(r["val_loss"]) and r["val_loss"] < r["initial_val_loss"]
    saved = adapter_file(out)
    trained = [v for k, v in saved.items() if ".smoa_" in k]
    assert trained and all(v.dtype == mx.bfloat16 for v in trained)


def test_mask_prompt_trains_on_completions_only(tiny_model_dir, tmp_path):
    d = tmp_path / "chat"
    d.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus 1?"},
                          {"role": "assistant", "content": f"The answer is {i + 1}."}]} for i in range(8)]
    _write(d / "train.jsonl", rows)
    _write(d / "valid.jsonl", rows)
    counts = {}
    for mask in (True, False):  # batch 8 = the whole split: 2 updates = 2 epochs
        r = train(opts(tiny_model_dir, d, tmp_path / str(mask), iters=2, batch_size=8, mask_prompt=mask))
        counts[mask] = r["trained_tokens"]
    _, tok = load_model(str(tiny_model_dir))
    examples = load_data(d, tok, mask_prompt=True)["train"]
    assert all(e.prompt_len > 1 for e in examples)
    # Targets are tokens[1:]; with the prompt masked only tokens[prompt_len:] count.
    assert counts[False] == 2 * sum(len(e.tokens) - 1 for e in examples)
    assert counts[True] == 2 * sum(len(e.tokens) - e.prompt_len for e in examples)


# ---------------------------------------------------------------- the step


def _models(tiny_model_dir, n):
    models = []
    for _ in range(n):
        model, _ = load_model(str(tiny_model_dir))
        mx.random.seed(0)
        apply_smoa(model)
        # Non-zero B so that every parameter gets a gradient.
        model.update(tree_map(lambda p: p + 0.01, model.trainable_parameters()))
        models.append(model)
    return models


def test_grad_accumulation_equals_one_big_batch(tiny_model_dir, arith):
    """Two micro-batches with different token counts update like one batch of both."""
    big_model, acc_model, ref_model = _models(tiny_model_dir, 3)
    _, tok = load_model(str(tiny_model_dir))
    inputs, targets, mask = Batcher(load_data(arith, tok)["train"], 4, 2048).batch(0)
    mask = mask * (mx.arange(mask.shape[1]) < mx.array([[30], [20], [12], [5]]))  # unequal counts
    halves = [(inputs[s], targets[s], mask[s]) for s in (slice(0, 2), slice(2, 4))]
    before = dict(tree_flatten(big_model.trainable_parameters()))

    step, state = make_step(big_model, optim.SGD(learning_rate=1e3))
    step(inputs, targets, mask, None, True)
    mx.eval(state)
    step, state = make_step(acc_model, optim.SGD(learning_rate=1e3))
    _, _, acc = step(*halves[0], None, False)
    mx.eval(state, acc)
    step(*halves[1], acc, True)
    mx.eval(state)
    big = {k: np.array(v - before[k]) for k, v in tree_flatten(big_model.trainable_parameters())}
    accumulated = {k: np.array(v - before[k]) for k, v in tree_flatten(acc_model.trainable_parameters())}
    # What a plain average of the two micro-batch means would give instead (mlx-lm's way).
    grads = [dict(tree_flatten(nn.value_and_grad(ref_model, loss_fn)(ref_model, *h)[1])) for h in halves]
    naive = {k: -0.5e3 * np.array(grads[0][k] + grads[1][k]) for k in big}
    for k in big:
        scale = np.abs(big[k]).max()
        assert scale > 0, k
        np.testing.assert_allclose(accumulated[k], big[k], atol=1e-4 * scale, err_msg=k)
        assert np.abs(naive[k] - big[k]).max() > 1e-2 * scale, k


def test_grad_checkpoint_gives_the_same_losses(tiny_model_dir, arith, tmp_path, monkeypatch):
    calls = []
    real = mx.checkpoint
    monkeypatch.setattr(mx, "checkpoint", lambda f: calls.append(f) or real(f))
    plain = train(opts(tiny_model_dir, arith, tmp_path / "plain", iters=3))
    assert not calls
    ckpt = train(opts(tiny_model_dir, arith, tmp_path / "ckpt", iters=3, grad_checkpoint=True))
    assert calls  # the decoder layers did run under mx.checkpoint
    a, b = train_losses(tmp_path / "plain"), train_losses(tmp_path / "ckpt")
    assert a.keys() == b.keys() and np.allclose(list(a.values()), list(b.values()), atol=1e-5)
    assert plain["val_loss"] == pytest.approx(ckpt["val_loss"], abs=1e-5)
    assert_same_tensors(adapter_file(tmp_path / "plain"), adapter_file(tmp_path / "ckpt"), atol=1e-5)


def test_cosine_schedule_warms_up_from_the_first_update():
    from smoa_mlx.schedule import cosine_schedule

    lr = cosine_schedule(1e-2, iters=10, warmup=4)
    values = [lr(mx.array(k)).item() for k in range(10)]
    np.testing.assert_allclose(values[:4], [2.5e-3, 5e-3, 7.5e-3, 1e-2], rtol=1e-6)  # never 0
    expected = [0.5e-2 * (1 + np.cos(np.pi * (k - 4) / 6)) for k in range(4, 10)]
    np.testing.assert_allclose(values[4:], expected, rtol=1e-5)
    assert values[-1] > 0 and cosine_schedule(1e-2, 5)(mx.array(0)).item() == pytest.approx(1e-2)


# ---------------------------------------------------------------- nothing lost


@pytest.fixture(scope="module")
def straight(tiny_model_dir, arith, tmp_path_factory):
    """An uninterrupted 6-update run with dropout (RNG) and gradient accumulation (data position)."""
    out = tmp_path_factory.mktemp("straight") / "a"
    train(opts(tiny_model_dir, arith, out, dropout=0.1, grad_accumulation_steps=2, warmup=2))
    return out


def _interrupt_at(monkeypatch, micro_step):
    real = Batcher.batch

    def batch(self, step):
        if step == micro_step and len(self.examples) == 32:  # the training split
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(Batcher, "batch", batch)


def test_interrupt_then_resume_reproduces_the_straight_run(straight, tiny_model_dir, arith, tmp_path, monkeypatch):
    out = tmp_path / "a"
    args = opts(tiny_model_dir, arith, out, dropout=0.1, grad_accumulation_steps=2, warmup=2)
    _interrupt_at(monkeypatch, 7)  # micro-batch 7 = the second half of update 4
    with pytest.raises(KeyboardInterrupt):
        train(args)
    monkeypatch.undo()
    state = checkpoint.load(out / checkpoint.STATE)
    assert state.meta["step"] == 3 and state.meta["micro_step"] == 6
    assert (out / "0000003_adapters.safetensors").is_file()
    assert max(train_losses(out)) == 3

    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    # --resume takes the run's own arguments from the checkpoint.
    r = train({"adapter_path": str(out), "resume": True})
    assert r["steps"] == 6
    # --resume-adapter-file continues exactly too, when the training state sits beside it.
    train({**args, "adapter_path": str(copy), "resume_adapter_file": str(copy / "adapters.safetensors")})
    expected = train_losses(straight)
    for run in (out, copy):
        got = train_losses(run)
        assert sorted(got) == list(range(1, 7))
        np.testing.assert_allclose([got[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)], atol=1e-6)
        assert_same_tensors(adapter_file(run), adapter_file(straight), atol=1e-6)


def test_resume_refuses_a_different_structure(straight, tmp_path):
    with pytest.raises(ValueError, match="rank=8"):
        train({"adapter_path": str(straight), "resume": True, "rank": 4})


@pytest.mark.parametrize("failing", [checkpoint.STATE, "adapters.safetensors"])
def test_failed_checkpoint_write_keeps_the_previous_one(failing, tiny_model_dir, arith, tmp_path, monkeypatch):
    """The second save fails on one file: the step-2 adapter stays loadable and resuming
    reaches the same adapter as an uninterrupted run."""
    out, args = tmp_path / "a", opts(tiny_model_dir, arith, tmp_path / "a", iters=4, save_every=2)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if calls.count(failing) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        train(args)
    monkeypatch.undo()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # no half-written files
    assert_same_tensors(adapter_file(out), files.load_safetensors(out / "0000002_adapters.safetensors"), atol=0)
    model, _ = smoa_mlx.load(str(tiny_model_dir), adapter_path=str(out))
    assert isinstance(model.model.layers[0].self_attn.q_proj, smoa_mlx.SMoALinear)
    expected_step = 2 if failing == checkpoint.STATE else 4  # the state is written first
    assert checkpoint.load(out / checkpoint.STATE).meta["step"] == expected_step

    assert train({"adapter_path": str(out), "resume": True})["steps"] == 4
    train({**args, "adapter_path": str(tmp_path / "straight")})
    assert_same_tensors(adapter_file(out), adapter_file(tmp_path / "straight"), atol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, arith, tmp_path, monkeypatch):
    out = tmp_path / "a"
    real = Batcher.batch

    def batch(self, step):
        inputs, targets, mask = real(self, step)
        poisoned = step == 2 and len(self.examples) == 32  # the training split
        return inputs, targets, mask * float("nan") if poisoned else mask

    train(opts(tiny_model_dir, arith, out, iters=2, save_every=2))  # the last good checkpoint
    good = adapter_file(out)
    monkeypatch.setattr(Batcher, "batch", batch)
    with pytest.raises(ValueError, match=r"NaN/inf at step 3.*lower --learning-rate") as e:
        train(opts(tiny_model_dir, arith, out, iters=4, save_every=2, resume=True))
    assert "step 2" in str(e.value) and "\n" not in str(e.value)
    assert_same_tensors(adapter_file(out), good, atol=0)
    assert checkpoint.load(out / checkpoint.STATE).meta["step"] == 2


def test_sigint_saves_a_checkpoint_and_exits_130(tiny_model_dir, arith, tmp_path):
    out = tmp_path / "a"
    cmd = [sys.executable, "-m", "smoa_mlx.train", "--model", str(tiny_model_dir), "--data", str(arith),
           "--adapter-path", str(out), "--iters", "100000", "--steps-per-report", "1", "--warmup", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(train_losses(out) if (out / checkpoint.METRICS).exists() else {}) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume --adapter-path" in err
    step = checkpoint.load(out / checkpoint.STATE).meta["step"]
    assert step >= 2 and (out / checkpoint.numbered(step)).is_file()


# ---------------------------------------------------------------- command line and bad input


def test_help_lists_the_mlx_lm_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--iters", "--batch-size", "--learning-rate", "--adapter-path",
                 "--resume-adapter-file", "--grad-checkpoint", "--grad-accumulation-steps", "--mask-prompt",
                 "--num-layers", "--method", "--num-blocks", "--targets", "--dtype", "--upcast-base",
                 "--warmup", "--resume", "--config"):
        assert flag in text


def test_yaml_config_with_flag_override(tiny_model_dir, arith, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {arith}\niters: 50\nlearning_rate: 5e-2\n"
                   f"targets: [q_proj, v_proj]\nwarmup: 0\nval_batches: 1\nadapter_path: {tmp_path / 'a'}\n")
    r = train({"config": str(cfg), "iters": 2})
    assert r["steps"] == 2
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["learning_rate"] == 5e-2 and config["targets"] == ["q_proj", "v_proj"]
    assert all(m.endswith(("q_proj", "v_proj")) for m in config["modules"])


def _bad_cases(tiny, arith, tmp):
    bad_line = tmp / "badline"
    bad_line.mkdir()
    (bad_line / "train.jsonl").write_text((arith / "train.jsonl").read_text() + "{not json\n")
    (bad_line / "valid.jsonl").write_text((arith / "valid.jsonl").read_text())
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("\n")
    (empty / "valid.jsonl").write_text((arith / "valid.jsonl").read_text())
    yaml_bad = tmp / "bad.yaml"
    yaml_bad.write_text("iters: 5\nlearning_rat: 1e-3\n")
    return {
        "malformed line": ({"data": bad_line}, r"train\.jsonl:33: invalid JSON"),
        "empty split": ({"data": empty}, r"train\.jsonl: empty"),
        "unknown target": ({"data": arith, "targets": ["qq_proj"]}, "unknown target module"),
        "missing model": ({"data": arith, "model": str(tmp / "nope")}, "pass --model PATH"),
        "yaml unknown key": ({"data": arith, "config": str(yaml_bad)}, "unknown key 'learning_rat'"),
        "hira blocks": ({"data": arith, "method": "hira", "num_blocks": 2}, "hira has one block"),
        "warmup": ({"data": arith, "warmup": 6}, "--warmup must be in"),
        "nothing to resume": ({"data": arith, "resume": True}, "no training_state.safetensors"),
        "batch too big": ({"data": arith, "batch_size": 64}, "needs at least 64 examples"),
        "too many layers": ({"data": arith, "num_layers": 3}, "exceeds the model's 2 layers"),
    }


def test_bad_input_is_one_line_and_writes_nothing(tiny_model_dir, arith, tmp_path):
    for name, (override, message) in _bad_cases(tiny_model_dir, arith, tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        args = {**opts(tiny_model_dir, arith, out), **{k: str(v) if isinstance(v, Path) else v for k, v in override.items()}}
        with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
            train(args)
        assert "\n" not in str(e.value), name
        assert not out.exists(), name


def test_cli_errors_are_one_line(tiny_model_dir, arith, tmp_path):
    """Offline, the embedded default model is a one-line error naming --model; bad data too."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "a"
    proc = subprocess.run([sys.executable, "-m", "smoa_mlx.train", "--adapter-path", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if not x.startswith("warning:")]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot load model 'mlx-community/Llama-3.2-1B-Instruct-4bit'")
    assert "pass --model PATH" in lines[0] and not out.exists()

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {arith}\nrank: eight\n")
    proc = subprocess.run([sys.executable, "-m", "smoa_mlx.train", "-c", str(cfg), "--adapter-path", str(out)],
                          capture_output=True, text=True, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if not x.startswith("warning:")]
    assert proc.returncode == 1 and lines == [f"error: {cfg}: rank: invalid value 'eight'"], proc.stderr
    assert not out.exists()


def test_parser_mirrors_mlx_lm_lora():
    from mlx_lm.lora import build_parser as mlx_lm_parser

    ours = {s for a in build_parser()._actions for s in a.option_strings}
    theirs = {s for a in mlx_lm_parser()._actions for s in a.option_strings}
    shared = {"--model", "--train", "--data", "--mask-prompt", "--num-layers", "--batch-size", "--iters",
              "--val-batches", "--learning-rate", "--steps-per-report", "--steps-per-eval",
              "--grad-accumulation-steps", "--resume-adapter-file", "--adapter-path", "--save-every",
              "--test", "--test-batches", "--max-seq-length", "-c", "--config", "--grad-checkpoint",
              "--seed", "--optimizer"}
    assert shared <= ours and shared <= theirs
