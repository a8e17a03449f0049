"""The commands as users start them: console scripts named as mlx-lm 0.32 names its own, and
the Metal wired-memory limit raised for training as mlx_lm.lora does."""

import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import mlx_lm.utils
import pytest

from smoa_mlx import cli
from smoa_mlx.train import train

from test_train import opts

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_command_is_a_console_script():
    """One per `python -m` command, each running that module's main (mlx-lm's names: smoa_mlx.X)."""
    commands = {p.stem for p in (REPO / "smoa_mlx").glob("*.py") if "if __name__ ==" in p.read_text()}
    commands |= {p.parent.name for p in (REPO / "smoa_mlx").glob("*/__main__.py")}
    assert set(SCRIPTS) == {f"smoa_mlx.{c}" for c in commands}
    for name, target in SCRIPTS.items():
        module, attr = target.split(":")
        assert module == "smoa_mlx.cli" and getattr(cli, attr).__name__ == name.split(".")[1]


def test_installed_console_scripts_run_the_commands():
    """The installed entry points (pip install -e . writes them) run each command's --help."""
    try:
        installed = {e.name: e.value for e in metadata.entry_points(group="console_scripts")
                     if e.name.startswith("smoa_mlx.")}
    except metadata.PackageNotFoundError:  # pragma: no cover
        pytest.skip("smoa-mlx is not installed (pip install -e .)")
    if not installed:
        pytest.skip("smoa-mlx is not installed (pip install -e .): no console scripts")
    assert installed == SCRIPTS
    bin_dir = Path(sys.executable).parent
    for name in SCRIPTS:
        out = subprocess.run([str(bin_dir / name), "--help"], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, (name, out.stderr[-500:])
        assert out.stdout.startswith("usage: python -m " + name), (name, out.stdout[:200])


def test_training_raises_the_wired_limit(tiny_model_dir, arith, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(mlx_lm.utils, "maybe_set_recommended_wired_limit", lambda: calls.append(1))
    train(opts(tiny_model_dir, arith, tmp_path / "run", iters=1))
    assert calls == [1]


def test_wired_limit_is_a_no_op_without_metal():
    """What training calls must not fail on a CPU-only MLX (Linux), where there is no wired memory."""
    import mlx.core as mx

    if mx.metal.is_available():
        pytest.skip("Metal is available: the limit is really set here")
    assert mlx_lm.utils.maybe_set_recommended_wired_limit() is None
