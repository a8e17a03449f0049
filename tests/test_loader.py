"""One loader for every command: each kind of bad --model is one line naming it."""

import json
import shutil
import subprocess
import sys

import pytest

import smoa_mlx
from smoa_mlx import loader
from smoa_mlx.errors import MissingFileError, ModelError


def _copy(tiny_model_dir, tmp_path, name="m"):
    out = tmp_path / name
    shutil.copytree(tiny_model_dir, out)
    return out


def test_local_dir_loads_in_eval_mode(tiny_model_dir):
    model, tokenizer, config, path = loader.load_base(str(tiny_model_dir))
    assert path == tiny_model_dir and config["model_type"] == "llama"
    assert not model.training and tokenizer.encode("hello")


def test_bad_models_are_one_typed_line(tiny_model_dir, tmp_path):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    bad_type = _copy(tiny_model_dir, tmp_path, "bad_type")
    cfg = json.loads((bad_type / "config.json").read_text())
    (bad_type / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_arch"}))
    bad_json = _copy(tiny_model_dir, tmp_path, "bad_json")
    (bad_json / "config.json").write_text("{\n  \"model_type\": llama\n}")
    no_weights = _copy(tiny_model_dir, tmp_path, "no_weights")
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    wrong_shapes = _copy(tiny_model_dir, tmp_path, "wrong_shapes")
    (wrong_shapes / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = {
        str(tmp_path / "missing"): (MissingFileError, "model directory not found"),
        "./missing": (MissingFileError, "model directory not found"),
        str(no_config): (ModelError, "no config.json"),
        str(bad_type): (ModelError, "model_type 'no_such_arch' is not supported"),
        str(bad_json): (ModelError, r"config.json:2: invalid JSON"),
        str(no_weights): (ModelError, "no model.*safetensors"),
        str(wrong_shapes): (ModelError, "cannot load the model"),
        str(a_file): (ModelError, "not a model directory"),
    }
    for name, (kind, message) in cases.items():
        with pytest.raises(kind, match=message) as e:
            smoa_mlx.load(name)
        assert "\n" not in str(e.value) and name.lstrip("./") in str(e.value), name
    with pytest.raises(MissingFileError, match="adapter directory not found"):
        loader.load_base(str(tiny_model_dir), tmp_path / "no_adapter")


def test_repo_ids_go_through_mlx_lm_hub_download(tiny_model_dir, monkeypatch):
    """A repo id is fetched by mlx-lm's own download (replaced here: no network)."""
    import mlx_lm.utils

    calls = []
    monkeypatch.setattr(mlx_lm.utils, "snapshot_download",
                        lambda repo, **kw: calls.append((repo, kw)) or str(tiny_model_dir))
    base = loader.load_base("someone/tiny-llama", revision="main")
    assert base.path == tiny_model_dir and calls[0][0] == "someone/tiny-llama"
    assert calls[0][1]["revision"] == "main"


def test_unreachable_hub_is_one_line_from_every_cli(tmp_path):
    """Offline, a repo id fails the same way in train and generate."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for cmd in (["smoa_mlx.train", "--adapter-path", str(tmp_path / "a")],
                ["smoa_mlx.generate", "--prompt", "hi"]):
        proc = subprocess.run([sys.executable, "-m", *cmd, "--model", "someone/not-here"],
                              capture_output=True, text=True, env=env, timeout=120)
        lines = [x for x in proc.stderr.splitlines() if not x.startswith("warning:")]
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: cannot load model 'someone/not-here'")
        assert "pass --model PATH" in lines[0]


def test_the_adapter_is_applied_by_every_loader(tiny_model_dir, make_adapter, trained_adapter, tmp_path):
    """load_base, smoa_mlx.load and the CLIs' load_model give the same adapted model."""
    import mlx.core as mx
    import numpy as np

    from smoa_mlx.generate import load_model

    tokens = mx.array([[1, 5, 9, 12, 40, 7]])
    base = np.array(loader.load_base(str(tiny_model_dir)).model(tokens))
    for adapter in (make_adapter(tiny_model_dir, tmp_path / "random"), trained_adapter):
        a = np.array(loader.load_base(str(tiny_model_dir), adapter).model(tokens))
        b = np.array(smoa_mlx.load(str(tiny_model_dir), adapter_path=str(adapter))[0](tokens))
        c = np.array(load_model(str(tiny_model_dir), str(adapter))[0](tokens))
        assert np.abs(a - base).max() > 1e-3
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
