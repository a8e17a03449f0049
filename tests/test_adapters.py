"""Adapter directories: exact round trips, base checks, corrupt files, atomic writes,
and mlx-lm LoRA adapters through the same `smoa_mlx.load`."""

import json
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

import smoa_mlx
import smoa_mlx.plan_cache
from smoa_mlx.adapters import load_adapter, save_adapter, smoa_config
from smoa_mlx.patch import apply_smoa, smoa_layers
from smoa_mlx.synthetic import make_llama

TOKENS = mx.array([[1, 5, 9, 12, 40, 7, 3, 30], [1, 2, 3, 4, 5, 6, 7, 8]])
FILES = ["adapter_config.json", "adapters.safetensors"]


def load(path):
    model, _ = smoa_mlx.load(str(path))
    return model


def adapted(path, seed=0, **kwargs):
    """A model patched with SMoA and random nonzero B (so the adapter changes the logits)."""
    model = load(path)
    apply_smoa(model, **{"rank": 6, "num_blocks": 3, "alpha": 12.0, **kwargs})
    mx.random.seed(seed)
    for layer in smoa_layers(model).values():
        layer.smoa_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
    model.eval()
    return model


@pytest.fixture
def saved(tiny_model_dir, tmp_path):
    model = adapted(tiny_model_dir)
    out = tmp_path / "adapter"
    save_adapter(model, out, smoa_config(model, base_model=str(tiny_model_dir)))
    return model, out


@pytest.fixture(params=["tiny_model_dir", "stories_dir"])
def model_dir(request):
    return request.getfixturevalue(request.param)


def test_round_trip_is_exact(model_dir, tmp_path, monkeypatch):
    model = adapted(model_dir, branch_ranks=[2, 0, 4])
    logits = model(TOKENS)
    assert not mx.allclose(logits, load(model_dir)(TOKENS), atol=1e-3).item()
    out = save_adapter(model, tmp_path / "a", smoa_config(model, base_model=str(model_dir), note="x"))
    assert sorted(os.listdir(out)) == FILES

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "smoa" and config["note"] == "x"
    assert config["smoa_parameters"] == {
        "rank": 6, "num_blocks": 3, "branch_ranks": [2, 0, 4], "alpha": 12.0, "dropout": 0.0
    }
    assert config["modules"] == list(smoa_layers(model)) == list(config["fingerprints"])
    assert config["model"] == str(model_dir)
    tensors = mx.load(str(out / "adapters.safetensors"))
    for path, layer in smoa_layers(model).items():
        assert mx.array_equal(tensors[f"{path}.row_order"], layer.row_order).item()
        assert mx.array_equal(tensors[f"{path}.col_order"], layer.col_order).item()
        assert tensors[f"{path}.row_order"].dtype in (mx.int32, mx.int64)
        for k in range(3):
            assert mx.array_equal(tensors[f"{path}.smoa_b.{k}"], layer.smoa_b[k]).item()
    assert len(tensors) == len(config["modules"]) * (2 + 2 * 3)

    def no_plan(*args, **kwargs):
        raise AssertionError("loading an adapter must not compute a spectral plan")

    monkeypatch.setattr(smoa_mlx.plan_cache, "plan_from_scores", no_plan)  # cached or not
    monkeypatch.setattr(smoa_mlx.plan_cache, "spectral_scores", no_plan)
    monkeypatch.setattr(np.linalg, "svd", no_plan)
    monkeypatch.setattr(np.linalg, "eigh", no_plan)
    fresh = load(model_dir)
    assert load_adapter(fresh, out)["modules"] == config["modules"]
    assert mx.array_equal(fresh(TOKENS), logits).item()
    via_load, _ = smoa_mlx.load(str(model_dir), adapter_path=str(out))
    assert mx.array_equal(via_load(TOKENS), logits).item()
    assert not via_load.layers[0].self_attn.q_proj.training  # load() returns an eval model


def test_dropout_is_saved_and_loaded_layers_evaluate_without_it(tiny_model_dir, tmp_path):
    model = adapted(tiny_model_dir, dropout=0.3)  # in eval mode
    config = smoa_config(model)
    assert config["smoa_parameters"]["dropout"] == 0.3
    save_adapter(model, tmp_path / "a", config)
    fresh = load(tiny_model_dir)
    load_adapter(fresh, tmp_path / "a")
    layers = smoa_layers(fresh)
    assert all(m.dropout_p == 0.3 and not m.training for m in layers.values())
    assert mx.array_equal(fresh(TOKENS), model(TOKENS)).item()  # no dropout in eval mode


def test_mismatched_base_is_refused(saved, tmp_path):
    _, out = saved
    other = load(make_llama(tmp_path / "other", seed=1))
    first = json.loads((out / "adapter_config.json").read_text())["modules"][0]
    with pytest.raises(ValueError, match="different base model") as e:
        load_adapter(other, out)
    assert first in str(e.value) and "\n" not in str(e.value)
    assert not smoa_layers(other)


def test_first_mismatching_module_is_named(saved, tiny_model_dir):
    _, out = saved
    model = load(tiny_model_dir)
    v = model.layers[1].self_attn.v_proj
    v.weight = mx.random.normal(v.weight.shape, key=mx.random.key(3)) * 0.1
    with pytest.raises(ValueError, match=r"module model\.layers\.1\.self_attn\.v_proj does not match"):
        load_adapter(model, out)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_quantized_copy_of_the_base_is_accepted(model_dir, tmp_path, bits):
    model = adapted(model_dir)
    out = save_adapter(model, tmp_path / "a", smoa_config(model))
    quantized = load(model_dir)
    nn.quantize(
        quantized, 32, bits,
        class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[1] % 32 == 0,
    )
    load_adapter(quantized, out)
    layers = smoa_layers(quantized)
    assert set(layers) == set(smoa_layers(model))
    assert any(isinstance(m.linear, nn.QuantizedLinear) for m in layers.values())
    logits, want = np.array(quantized(TOKENS)), np.array(model(TOKENS))
    if bits == 8:  # near-lossless: the adapted outputs agree closely
        np.testing.assert_allclose(logits, want, atol=0.05 * np.abs(want).max())


def test_cast_copy_of_the_base_is_accepted(saved, tiny_model_dir):
    _, out = saved
    model = load(tiny_model_dir)
    model.set_dtype(mx.bfloat16)
    load_adapter(model, out)
    assert smoa_layers(model)


def rewrite(out, change):
    path = str(out / "adapters.safetensors")
    tensors = dict(mx.load(path))
    change(tensors)
    mx.save_safetensors(path, tensors)


Q = "model.layers.0.self_attn.q_proj"


def drop(name):
    return lambda tensors: tensors.pop(f"{Q}.{name}")


def put(name, value):
    return lambda tensors: tensors.update({f"{Q}.{name}": value})


@pytest.mark.parametrize(
    "change,match",
    [
        (drop("smoa_b.1"), f"missing tensor {Q}.smoa_b.1"),
        (drop("col_order"), f"missing tensor {Q}.col_order"),
        (put("smoa_c.0", mx.zeros((2, 2))), f"unexpected tensor {Q}.smoa_c.0"),
        (put("smoa_a.2", mx.zeros((2, 5))), rf"tensor {Q}.smoa_a.2 has shape \(2, 5\)"),
        (put("row_order", mx.arange(63)), f"tensor {Q}.row_order must be a permutation"),
        (put("row_order", mx.zeros(64, mx.int32)), f"tensor {Q}.row_order must be a permutation"),
    ],
    ids=["missing B", "missing order", "extra", "shape A", "short order", "not a permutation"],
)
def test_bad_tensors_give_one_line_errors(saved, tiny_model_dir, change, match):
    _, out = saved
    rewrite(out, change)
    model = load(tiny_model_dir)
    before = model(TOKENS)
    with pytest.raises(ValueError, match=match) as e:
        load_adapter(model, out)
    assert "\n" not in str(e.value) and "adapters.safetensors" in str(e.value)
    assert not smoa_layers(model)  # a failed load leaves the model as it was
    assert mx.array_equal(model(TOKENS), before).item()


def test_non_safetensors_and_corrupt_files_are_refused(saved, tiny_model_dir):
    _, out = saved
    (out / "adapters.npz").write_bytes(b"PK\x03\x04 not loaded")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_adapter(load(tiny_model_dir), out, weights_file="adapters.npz")
    (out / "adapters.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ValueError, match="not a readable safetensors file") as e:
        load_adapter(load(tiny_model_dir), out)
    assert "\n" not in str(e.value)
    (out / "adapter_config.json").write_text('{"fine_tune_type": "smoa",\n "modules": [}')
    with pytest.raises(ValueError, match=r"adapter_config.json:2: invalid JSON"):
        load_adapter(load(tiny_model_dir), out)
    (out / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(load(tiny_model_dir), out)


def test_loading_twice_is_refused(saved, tiny_model_dir):
    _, out = saved
    model = load(tiny_model_dir)
    load_adapter(model, out)
    with pytest.raises(ValueError, match="already has SMoA layers"):
        load_adapter(model, out)


def test_interrupted_write_keeps_the_previous_file(saved, monkeypatch):
    model, out = saved
    weights = out / "adapters.safetensors"
    good = weights.read_bytes()
    for layer in smoa_layers(model).values():
        layer.smoa_b = [b + 1 for b in layer.smoa_b]

    def crash(path, arrays, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, out)
    assert weights.read_bytes() == good
    assert sorted(os.listdir(out)) == FILES


def test_mlx_lm_lora_adapter_loads(tiny_model_dir, tmp_path):
    model = load(tiny_model_dir)
    base_logits = model(TOKENS)
    lora = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    model.freeze()
    linear_to_lora_layers(model, 1, lora)
    mx.random.seed(4)
    trainable = tree_flatten(model.trainable_parameters())
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n, _ in trainable)
    model.load_weights([(n, mx.random.normal(v.shape) * 0.1) for n, v in trainable], strict=False)
    model.eval()
    logits = model(TOKENS)
    assert not mx.allclose(logits, base_logits, atol=1e-3).item()
    out = tmp_path / "lora"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (out / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": lora})
    )
    loaded, _ = smoa_mlx.load(str(tiny_model_dir), adapter_path=str(out))
    np.testing.assert_allclose(np.array(loaded(TOKENS)), np.array(logits), rtol=1e-6, atol=1e-6)


def error_line(capsys) -> str:
    """stderr's one line, past the once-per-process BLAS warning."""
    lines = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _edit_config(edit):
    def change(out):
        path = out / "adapter_config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps(edit(config)))
    return change


def _without(*keys):
    return lambda c: {k: v for k, v in c.items() if k not in keys}


def _params(**kw):
    return lambda c: {**c, "smoa_parameters": {**c["smoa_parameters"], **kw}}


def _write(data: bytes):
    return lambda out: (out / "adapter_config.json").write_bytes(data)


@pytest.mark.parametrize("change,message", [
    (_edit_config(lambda c: [c]), "expected a JSON object, found a list"),
    (_edit_config(_without("fine_tune_type")), "fine_tune_type is missing"),
    (_edit_config(lambda c: {**c, "fine_tune_type": "qlora"}), "fine_tune_type 'qlora' is not one of"),
    (_edit_config(_without("smoa_parameters")), "smoa_parameters is missing"),
    (_edit_config(lambda c: {**c, "smoa_parameters": [8, 2]}), "smoa_parameters must be an object"),
    (_edit_config(_params(rank="8")), "smoa_parameters.rank must be an integer >= 1, got '8'"),
    (_edit_config(_params(num_blocks=0)), "smoa_parameters.num_blocks must be an integer >= 1"),
    (_edit_config(_params(alpha=None)), "smoa_parameters.alpha is missing"),
    (_edit_config(_params(branch_ranks=[1, "2"])), "smoa_parameters.branch_ranks must be a list of integers"),
    (_edit_config(_params(branch_ranks=[1, 1, 1])), "branch_ranks [1, 1, 1] must have num_blocks=3"),
    (_edit_config(lambda c: {**c, "modules": "q_proj"}), "modules must be a list of module names"),
    (_edit_config(lambda c: {**c, "fingerprints": {"x": "abc"}}), "fingerprints must map module paths"),
    (_edit_config(lambda c: {"fine_tune_type": "lora", "num_layers": 2}), "lora_parameters is missing"),
    (_edit_config(lambda c: {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4}}),
     "lora_parameters.scale is missing"),
    (_edit_config(lambda c: {"fine_tune_type": "dora", "num_layers": "all", "lora_parameters": {}}),
     "num_layers must be an integer"),
    (_write(b'{"fine_tune_type": "smoa",\n "modules": [}'), "adapter_config.json:2: invalid JSON"),
    (_write(b"\x89PNG\r\n\x1a\n\xff\xfe"), "adapter_config.json: not a text file"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None)
def test_malformed_adapter_config_is_one_line(change, message, saved, tiny_model_dir, tmp_path, capsys):
    """Every command reading an adapter (here fuse) names the config and exits 1, no traceback."""
    from smoa_mlx.cli import run
    from smoa_mlx.fuse import main

    _, out = saved
    change(out)
    with pytest.raises(SystemExit) as e:
        run(main, ["--model", str(tiny_model_dir), "--adapter-path", str(out), "--save-path", str(tmp_path / "f")])
    err = error_line(capsys)
    assert e.value.code == 1 and message in err and str(out) in err
    assert not (tmp_path / "f").exists()


def test_mlx_lm_adapter_with_foreign_tensors_is_one_line(tiny_model_dir, tmp_path, capsys):
    """mlx-lm's own loader reports incompatible tensors over several lines: cut to one."""
    from smoa_mlx.cli import run
    from smoa_mlx.fuse import main

    out = tmp_path / "lora"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), {"model.layers.1.self_attn.q_proj.lora_c": mx.zeros(3)})
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": {"rank": 4, "scale": 1.0, "dropout": 0.0}}))
    with pytest.raises(SystemExit) as e:
        run(main, ["--model", str(tiny_model_dir), "--adapter-path", str(out), "--save-path", str(tmp_path / "f")])
    err = error_line(capsys)
    assert e.value.code == 1
    assert "lora_c: not an adapter parameter in the model" in err and str(out) in err
    (out / "adapters.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(SystemExit):
        run(main, ["--model", str(tiny_model_dir), "--adapter-path", str(out), "--save-path", str(tmp_path / "f")])
    assert "adapters.safetensors: not a readable safetensors file" in error_line(capsys)
    (out / "adapters.safetensors").unlink()
    with pytest.raises(SystemExit):
        run(main, ["--model", str(tiny_model_dir), "--adapter-path", str(out), "--save-path", str(tmp_path / "f")])
    assert "adapters.safetensors: file not found" in error_line(capsys)
