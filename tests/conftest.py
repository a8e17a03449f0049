"""Shared fixtures: generated tiny models (always) and the real ../shared fixtures (CI)."""

import os
from pathlib import Path

import pytest

# ../shared beside the checkout, or wherever SMOA_MLX_SHARED points (git worktrees)
SHARED = Path(os.environ.get("SMOA_MLX_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
STORIES = SHARED / "models" / "stories260K-hf"
DATASETS = SHARED / "datasets"


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (a fresh clone has no ../shared; CI provides it)")
    return path


@pytest.fixture(scope="session", autouse=True)
def plan_cache_dir(tmp_path_factory):
    """Point the plan cache (smoa_mlx/plan_cache.py) at a temporary directory for the whole
    session, in os.environ so the CLIs that tests launch as subprocesses inherit it:
    tests never write to ~/.cache nor read plans another run left there."""
    path = tmp_path_factory.mktemp("plan_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMOA_MLX_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random float32 Llama (2 layers, hidden 64) with a byte-level BPE tokenizer."""
    from smoa_mlx.synthetic import make_llama

    return make_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """The real pretrained stories260K Llama in Hugging Face layout."""
    return need_shared(STORIES)


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    return need_shared(DATASETS)
