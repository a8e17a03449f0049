"""The training loop end to end: learning, exact resume, methods, safety, bad input."""

import json
import math
import os
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


def _write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


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
            "0000012_adapters.safetensors", "README.md"} == names
    card = (out / "README.md").read_text()  # the model card carries the final metrics
    assert f"val_loss: {r['val_loss']}" in card and f"trainable: {r['trainable']}" in card
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


def test_dora_trains_saves_loads_and_fuses(tiny_model_dir, arith, tmp_path):
    """--method dora is mlx-lm's DoRALinear under our loop: the loss drops, the magnitudes
    train, and the saved directory gives the in-memory validation loss back through our
    loader, mlx_lm.load and a fused checkpoint alike."""
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.tuner.dora import DoRALinear

    from smoa_mlx.fuse import main as fuse_main

    out = tmp_path / "dora"
    r = train(opts(tiny_model_dir, arith, out, method="dora", iters=10))
    assert r["val_loss"] < r["initial_val_loss"] - 0.05, r
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "dora" and config["lora_parameters"]["scale"] == 1.0
    ours, tok = smoa_mlx.load(str(tiny_model_dir), adapter_path=str(out))
    theirs, _ = mlx_lm_load(str(tiny_model_dir), adapter_path=str(out))
    dora = {p: m for p, m in ours.named_modules() if isinstance(m, DoRALinear)}
    assert len(dora) == 5 * len(ours.layers)  # q k v up down in every layer
    m = next(iter(dora.values()))
    assert not np.allclose(np.array(m.m), np.array(mx.linalg.norm(m.linear.weight, axis=1)))
    valid = Batcher(load_data(arith, tok)["valid"], 4, 2048)
    for model in (ours, theirs):
        model.eval()
        assert evaluate(model, valid.eval_batches()) == pytest.approx(r["val_loss"], abs=1e-5)
    tokens = mx.array([[1, 5, 17, 42, 99, 3, 25, 7]])
    want = np.array(ours(tokens))
    np.testing.assert_allclose(np.array(theirs(tokens)), want, atol=1e-5, rtol=1e-5)
    assert fuse_main(["--model", str(tiny_model_dir), "--adapter-path", str(out),
                      "--save-path", str(tmp_path / "fused")]) == 0
    fused, _ = mlx_lm_load(str(tmp_path / "fused"))
    np.testing.assert_allclose(np.array(fused(tokens)), want, atol=1e-4, rtol=1e-4)
    base, _ = mlx_lm_load(str(tiny_model_dir))
    assert np.abs(np.array(base(tokens)) - want).max() > 1e-2  # the adapter does something


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
    _, _, _, acc = step(*halves[0], None, False)
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
    """Offline, a hub model is a one-line error naming --model; bad data too."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "a"
    proc = subprocess.run([sys.executable, "-m", "smoa_mlx.train", "--adapter-path", str(out),
                           "--model", "mlx-community/Llama-3.2-1B-Instruct-4bit"],
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


# ---------------------------------------------------------------- mlx-lm config files

MLX_LM_CONFIG = REPO / "tests" / "data" / "mlx_lm_lora_config.yaml"


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    """The tiny Llama with 16 layers: mlx-lm's example config adapts the last 16."""
    from smoa_mlx.synthetic import make_llama

    return make_llama(tmp_path_factory.mktemp("tiny16") / "model", num_hidden_layers=16)


def _mlx_lm_config(tmp_path, model, data, **changes) -> Path:
    """The mlx-lm example config with only model and data changed (plus `changes`)."""
    import yaml

    config = yaml.safe_load(MLX_LM_CONFIG.read_text())
    assert {"fine_tune_type", "lora_parameters", "lr_schedule", "optimizer_config"} <= set(config)
    config.update(model=str(model), data=str(data), adapter_path=str(tmp_path / "adapters"), **changes)
    path = tmp_path / "lora_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_config_covers_mlx_lm_config_defaults():
    """Every CONFIG_DEFAULTS key of mlx_lm.lora is in the fixture, and means something here."""
    import yaml
    from mlx_lm.lora import CONFIG_DEFAULTS

    from smoa_mlx.config_file import load_config

    keys = set(yaml.safe_load(MLX_LM_CONFIG.read_text()))
    assert set(CONFIG_DEFAULTS) - {"config"} <= keys
    read = load_config(MLX_LM_CONFIG)
    assert read["method"] == "lora" and read["targets"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert read["rank"] == 8 and read["alpha"] == 160.0 and read["learning_rate"] == 1e-5
    assert read["optimizer_config"]["adamw"]["eps"] == 1e-6  # 1e-6 is a float, as in mlx-lm


@pytest.mark.parametrize("method", ["lora", "dora", "smoa"])
def test_an_mlx_lm_lora_config_trains(method, tiny16, arith, tmp_path):
    """`python -m smoa_mlx.train -c lora_config.yaml` (mlx-lm's example; --method smoa
    picks SMoA), shortened to 20 updates with --iters, trains and saves a loadable adapter."""
    cfg = _mlx_lm_config(tmp_path, tiny16, arith, **({"fine_tune_type": "dora"} if method == "dora" else {}))
    out = tmp_path / "adapters"
    flags = ["-c", str(cfg), "--iters", "20"] + (["--method", "smoa"] if method == "smoa" else [])
    proc = subprocess.run([sys.executable, "-m", "smoa_mlx.train", *flags], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["optimizer"] == "adamw" and config["lr_schedule"]["name"] == "cosine_decay"
    assert config["num_layers"] == 16 and config["rank"] == 8 and config["alpha"] == 160.0
    records = [json.loads(x) for x in (out / checkpoint.METRICS).read_text().splitlines()]
    lrs = [r["learning_rate"] for r in records if r["type"] == "train"]
    # mlx-lm's own schedule: warmup from 1e-7 over 100 updates; update k (reported
    # every 10) used the rate of optimizer step k - 1
    from mlx_lm.tuner.utils import build_schedule

    expected = build_schedule(config["lr_schedule"])
    np.testing.assert_allclose(lrs, [expected(mx.array(s)).item() for s in (9, 19)], rtol=1e-5)
    if method in ("lora", "dora"):
        from mlx_lm import load as mlx_lm_load

        assert config["fine_tune_type"] == method
        assert config["lora_parameters"] == {"rank": 8, "scale": 20.0, "dropout": 0.0,
                                             "keys": ["self_attn.q_proj", "self_attn.v_proj"]}
        model, _ = mlx_lm_load(str(tiny16), adapter_path=str(out))
        b = [v for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]
    else:
        model, _ = smoa_mlx.load(str(tiny16), adapter_path=str(out))
        b = [v for k, v in tree_flatten(model.parameters()) if ".smoa_b." in k]
        assert {m.split(".")[-1] for m in config["modules"]} == {"q_proj", "v_proj"}
    blocks = 2 if method == "smoa" else 1
    assert len(b) == 2 * 16 * blocks and all(float(mx.abs(x).max()) > 0 for x in b)  # trained


def test_mlx_lm_schedules_and_optimizers():
    from mlx_lm.tuner.utils import build_schedule

    from smoa_mlx.schedule import OPTIMIZERS, build_optimizer, mlx_lm_schedule, warmup_schedule

    for config in ({"name": "cosine_decay", "warmup": 5, "warmup_init": 1e-7, "arguments": [1e-3, 20, 1e-6]},
                   {"name": "linear_schedule", "arguments": [1e-3, 0.0, 10]},
                   {"name": "exponential_decay", "warmup": 2, "arguments": [1e-3, 0.9]},
                   {"name": "step_decay", "arguments": [1e-3, 0.5, 4]}):
        ours, theirs = mlx_lm_schedule(config), build_schedule(config)
        for s in range(30):
            assert ours(mx.array(s)).item() == pytest.approx(theirs(mx.array(s)).item(), rel=1e-6)
    constant = [warmup_schedule(1e-2, 10, 4, "constant")(mx.array(k)).item() for k in range(10)]
    np.testing.assert_allclose(constant, [2.5e-3, 5e-3, 7.5e-3] + [1e-2] * 7, rtol=1e-6)
    linear = [warmup_schedule(1e-2, 10, 0, "linear")(mx.array(k)).item() for k in range(10)]
    np.testing.assert_allclose(linear, [1e-2 * (1 - k / 10) for k in range(10)], rtol=1e-5)
    assert set(OPTIMIZERS) == {"adam", "adamw", "sgd", "adafactor", "muon"}
    opt = build_optimizer("adamw", 1e-3, 0.0, {"betas": [0.9, 0.98], "eps": 1e-6})
    assert opt.betas == [0.9, 0.98] and opt.eps == 1e-6 and opt.weight_decay == 0.0
    assert opt.bias_correction  # as in PyTorch, unless the config says otherwise


@pytest.mark.parametrize("optimizer", ["sgd", "adafactor", "muon", "adam"])
def test_every_optimizer_trains_and_resumes_exactly(optimizer, tiny_model_dir, arith, tmp_path):
    """2 updates, then --resume to 4 = 4 straight: the optimizer's state, whatever it
    holds, round-trips through the checkpoint (a constant rate does not depend on --iters)."""
    extra = {"optimizer": optimizer, "learning_rate": 1e-2, "iters": 4, "lr_schedule": "constant"}
    if optimizer == "sgd":
        extra["optimizer_config"] = {"sgd": {"momentum": 0.9}}
    straight = train(opts(tiny_model_dir, arith, tmp_path / "straight", **extra))
    assert straight["val_loss"] < straight["initial_val_loss"]
    assert train(opts(tiny_model_dir, arith, tmp_path / "half", **{**extra, "iters": 2}))["steps"] == 2
    assert train({"adapter_path": str(tmp_path / "half"), "resume": True, "iters": 4})["steps"] == 4
    assert_same_tensors(adapter_file(tmp_path / "half"), adapter_file(tmp_path / "straight"), atol=1e-6)
    expected = train_losses(tmp_path / "straight")
    got = train_losses(tmp_path / "half")
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [expected[s] for s in range(1, 5)], atol=1e-6)


def _yaml_case(tmp_path, name, text):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def test_config_keys_that_mean_nothing_here_are_one_line(tiny_model_dir, arith, tmp_path):
    cases = {
        "full": ("fine_tune_type: full\n", r"fine_tune_type: 'full' is not supported"),
        "lora alpha": ("lora_parameters: {rank: 8, alpha: 16}\n", r"lora_parameters\.alpha: means nothing"),
        "tracker": ("report_to: tensorboard\n", "--report-to: 'tensorboard' is not one of wandb, swanlab"),
        "dpo": ("training_mode: dpo\n", "training_mode: 'dpo' is not supported"),
        "schedule name": ("lr_schedule: {name: warp, arguments: [1]}\n", r"lr_schedule\.name: 'warp'"),
        "schedule args": ("lr_schedule: {name: cosine_decay, arguments: [1e-3]}\n", r"cosine_decay\(0\.001,\) fails"),
        "schedule key": ("lr_schedule: {name: cosine_decay, arguments: [1e-3, 9], decay: 1}\n", r"lr_schedule\.decay: unknown key"),
        "optimizer kwarg": ("optimizer_config: {adamw: {momentum: 0.9}}\n", r"optimizer_config\.adamw\.momentum: not an argument"),
        "optimizer name": ("optimizer: lion\n", "optimizer: 'lion' is not one of"),
        "list": ("- iters: 5\n", "expected a mapping of option names to values, got a list"),
        "scalar": ("5\n", "expected a mapping of option names to values, got a int"),
        "bad yaml": ("iters: [1\n", "invalid YAML"),
        "hf_dataset scalar": ("hf_dataset: billsum\n", "hf_dataset: expected a mapping"),
        "contradiction": ("fine_tune_type: lora\nmethod: smoa\n", "contradicts method"),
        "lr contradiction": ("learning_rate: 1e-4\nlr_schedule: {name: cosine_decay, arguments: [1e-3, 9]}\n",
                             r"--learning-rate 0\.0001 contradicts lr_schedule"),
    }
    for name, (text, message) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        args = {**opts(tiny_model_dir, arith, out), "config": _yaml_case(tmp_path, name.replace(" ", "-"), text)}
        args.pop("learning_rate")
        with pytest.raises(ValueError, match=message) as e:
            train(args)
        assert "\n" not in str(e.value) and not out.exists(), name


def test_yaml_hf_dataset_and_features_train(tiny_model_dir, tmp_path):
    """mlx-lm's `hf_dataset` (through the real `datasets.load_dataset`, on a local parquet
    dataset) and its top-level `*_feature` keys reach the data layer and train."""
    datasets = pytest.importorskip("datasets")
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(6) for b in range(6)]
    d = tmp_path / "hub_like"
    d.mkdir()
    datasets.Dataset.from_list(rows[:28]).to_parquet(str(d / "train.parquet"))
    datasets.Dataset.from_list(rows[28:]).to_parquet(str(d / "valid.parquet"))
    yaml = __import__("yaml")
    # mlx-lm's default splits (train[:80%], train[-10%:]) for train, the file for valid
    spec = {"path": str(d), "prompt_feature": "question", "completion_feature": "answer",
            "valid_split": "validation"}
    cfg = _yaml_case(tmp_path, "hf", yaml.safe_dump({"hf_dataset": spec}))
    run = {**opts(tiny_model_dir, d, tmp_path / "a", iters=2, batch_size=2), "config": cfg}
    run.pop("data")
    result = train(run)
    assert result["steps"] == 2 and result["val_loss"] is not None
    # top-level features on a local directory of the same records
    local = tmp_path / "local"
    local.mkdir()
    for split, part in (("train", rows[:28]), ("valid", rows[28:])):
        (local / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    cfg = _yaml_case(tmp_path, "feat", yaml.safe_dump(
        {"prompt_feature": "question", "completion_feature": "answer"}))
    result = train({**opts(tiny_model_dir, local, tmp_path / "b", iters=2), "config": cfg})
    assert result["steps"] == 2


# ---------------------------------------------------------------- crash safety


def test_kill_9_while_training_and_saving_loses_nothing(tiny_model_dir, arith, tmp_path):
    """kill -9 at random moments (a save after every update, so many land mid-save), four
    times: each time the adapter loads and the checkpoint resumes, and the finished run's
    loss log and tensors equal those of an uninterrupted run."""
    args = opts(tiny_model_dir, arith, tmp_path / "straight", iters=40, save_every=1,
                dropout=0.1, val_batches=1, lr_schedule="constant")
    train(args)
    out = tmp_path / "killed"
    flags = ["--model", str(tiny_model_dir), "--data", str(arith), "--adapter-path", str(out),
             "--iters", "40", "--save-every", "1", "--dropout", "0.1", "--val-batches", "1",
             "--lr-schedule", "constant", "--learning-rate", "5e-2", "--warmup", "0",
             "--steps-per-report", "1", "--steps-per-eval", "100", "--batch-size", "4"]
    rng = np.random.default_rng(0)
    kills = 0
    while kills < 4:
        resume = ["--resume"] if (out / checkpoint.STATE).is_file() else []
        proc = subprocess.Popen([sys.executable, "-m", "smoa_mlx.train", *flags, *resume],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
        start = checkpoint.load(out / checkpoint.STATE).state.step if resume else 0
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:  # until it is past its start
            if (out / checkpoint.STATE).is_file() and \
                    checkpoint.load(out / checkpoint.STATE).state.step > start:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        state = checkpoint.load(out / checkpoint.STATE)  # always resumable
        model, _ = smoa_mlx.load(str(tiny_model_dir), adapter_path=str(out))  # always loadable
        assert 0 < state.state.step < 40
    r = train({"adapter_path": str(out), "resume": True})
    assert r["steps"] == 40
    expected, got = train_losses(tmp_path / "straight"), train_losses(out)
    assert sorted(got) == list(range(1, 41))
    np.testing.assert_allclose([got[s] for s in range(1, 41)], [expected[s] for s in range(1, 41)], atol=1e-6)
    assert_same_tensors(adapter_file(out), adapter_file(tmp_path / "straight"), atol=1e-6)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # the killed saves' temps are gone


# ---------------------------------------------------------------- damaged files


def test_damaged_checkpoints_and_configs_are_one_line(trained_adapter, tiny_model_dir, arith, tmp_path):
    import shutil

    def copy(name):
        d = tmp_path / name
        shutil.copytree(trained_adapter, d)
        return d

    truncated = copy("truncated")
    data = (truncated / checkpoint.STATE).read_bytes()
    (truncated / checkpoint.STATE).write_bytes(data[: len(data) // 2])
    no_step = copy("no_step")
    state = checkpoint.load(no_step / checkpoint.STATE)
    meta = state.meta
    del meta["step"]
    tensors = {f"adapter.{k}": v for k, v in state.adapter.items()}
    tensors.update({f"optimizer.{k}": v for k, v in state.optimizer.items()})
    mx.save_safetensors(str(no_step / checkpoint.STATE), tensors, {"smoa_mlx_training_state": json.dumps(meta)})
    bad_json = copy("bad_json")
    mx.save_safetensors(str(bad_json / checkpoint.STATE), tensors, {"smoa_mlx_training_state": "{not json"})
    foreign = copy("foreign")
    mx.save_safetensors(str(foreign / checkpoint.STATE), tensors)
    short_adapter = copy("short_adapter")
    data = (short_adapter / "adapters.safetensors").read_bytes()
    (short_adapter / "adapters.safetensors").write_bytes(data[:100])
    cases = {
        truncated: {"resume": True}, no_step: {"resume": True}, bad_json: {"resume": True},
        foreign: {"resume": True},
        short_adapter: {"resume_adapter_file": str(short_adapter / "adapters.safetensors")},
    }
    messages = {truncated: "not a readable safetensors file", no_step: "metadata has no 'step'",
                bad_json: "damaged training state metadata", foreign: "not a smoa_mlx training state",
                short_adapter: "not a readable safetensors file"}
    for d, flags in cases.items():
        with pytest.raises(ValueError, match=messages[d]) as e:
            train({**opts(tiny_model_dir, arith, d), **flags})
        assert "\n" not in str(e.value) and str(d) in str(e.value), d
    # and through the command line: one line, exit 1
    proc = subprocess.run([sys.executable, "-m", "smoa_mlx.train", "--adapter-path", str(no_step), "--resume"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = [x for x in proc.stderr.splitlines() if not x.startswith("warning:")]
    assert proc.returncode == 1 and len(lines) == 1 and "metadata has no 'step'" in lines[0], proc.stderr
    # a half-written metrics line (a kill mid-append) does not stop a resume
    partial = copy("partial_metrics")
    with open(partial / checkpoint.METRICS, "a") as f:
        f.write('{"type": "train", "st')
    assert train({"adapter_path": str(partial), "resume": True, "iters": 5})["steps"] == 5


# ---------------------------------------------------------------- progress and the default model


def test_validation_and_test_show_progress_on_rank_0_only(tiny_model_dir, arith, tmp_path, monkeypatch, capsys):
    import smoa_mlx.reporting as reporting

    monkeypatch.setattr(reporting, "PROGRESS_SECONDS", 0.0)  # a log line after every batch
    train(opts(tiny_model_dir, arith, tmp_path / "a", iters=1, batch_size=2, test=True))
    out = capsys.readouterr().out
    assert "Validating: 1/4 batches" in out and "Validating: 4/4 batches" in out
    assert "Testing: 4/4 batches" in out
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # a terminal: tqdm
    train({**opts(tiny_model_dir, arith, tmp_path / "b", batch_size=2), "train": False, "test": True,
           "adapter_path": str(tmp_path / "a")})
    captured = capsys.readouterr()
    assert "Testing:" in captured.err and "/4 [" in captured.err and "Testing:" not in captured.out
    monkeypatch.setattr(Distributed, "main", property(lambda self: False))
    train(opts(tiny_model_dir, arith, tmp_path / "c", iters=1, batch_size=2))
    assert capsys.readouterr() == ("", "")


def test_default_model_run_says_how_to_train_a_real_one(tiny_model_dir, arith, tmp_path, monkeypatch, capsys):
    import smoa_mlx.train as train_module
    from smoa_mlx.options import BUNDLED_MODEL, REAL_MODEL, TrainOptions

    assert TrainOptions().model == str(BUNDLED_MODEL) and BUNDLED_MODEL.name == "stories260K"
    assert f"arealone:{REAL_MODEL})" in "".join(build_parser().format_help().split())  # wrapped
    monkeypatch.setattr(train_module, "BUNDLED_MODEL", tiny_model_dir)  # stands in for it
    train(opts(tiny_model_dir, arith, tmp_path / "a", iters=1))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f"Adapter saved in {tmp_path / 'a'}. That was the tiny bundled model (a smoke "
                    f"test); to fine-tune a real one: python -m smoa_mlx.train --model {REAL_MODEL}")
