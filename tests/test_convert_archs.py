"""`convert` beyond Llama: tiny random transformers models of each architecture whose
mlx-lm module paths equal the HF/PEFT ones, round-tripped MLX -> PyTorch -> MLX.

The converters' own parity measurement (MLX vs the transformers model with the adapter
applied by PEFT or smoa_mlx.torch) gives the logit error; every adapter has random
nonzero B and moves the logits far more than the tolerance. MoE experts (stacked
SwitchLinear; fused 3-D parameters in transformers 5) have no PEFT form and are refused.
"""

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_archs import ATTN, HF_TYPES, TOKENS, hf_model_dir, randomize_b  # noqa: E402

from smoa_mlx.adapters import save_adapter  # noqa: E402
from smoa_mlx.cli import run  # noqa: E402
from smoa_mlx.convert import export_adapter, import_adapter  # noqa: E402
from smoa_mlx.convert.__main__ import main  # noqa: E402
from smoa_mlx.errors import AdapterError  # noqa: E402
from smoa_mlx.loader import load_base  # noqa: E402
from smoa_mlx.patch import apply_smoa, smoa_layers  # noqa: E402

TOL = 1e-4
QUIET = dict(log=lambda *_: None)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def adapted(base_dir, out, num_blocks, keys=None):
    """An SMoA adapter with random B on `base_dir`; (its MLX logits, the base's, its paths)."""
    model = load_base(str(base_dir))[0]
    tokens = TOKENS % 320
    base = np.array(model(tokens))
    apply_smoa(model, keys=keys, rank=4, num_blocks=num_blocks, progress=False)
    randomize_b(model)
    save_adapter(model, out)
    logits = np.array(model(tokens))
    assert np.abs(logits - base).max() > 1e-3  # the adapter moves the logits
    return logits, list(smoa_layers(model))


def round_trip(fmt, base_dir, adapter, logits, tmp_path, rank=None):
    """Export (parity vs PyTorch measured inside), import back, compare the MLX logits."""
    out = tmp_path / f"{adapter.name}-{fmt}"
    report = export_adapter(fmt, str(base_dir), adapter, out, rank=rank, **QUIET)
    assert report["parity"]["logits"] < TOL, (fmt, report["parity"])
    if fmt == "lora":
        return
    back = tmp_path / f"{adapter.name}-{fmt}-back"
    report = import_adapter(fmt, str(base_dir), out, back, **QUIET)
    assert report["parity"]["logits"] < TOL, (fmt, report["parity"])
    model = load_base(str(base_dir), str(back))[0]
    np.testing.assert_allclose(np.array(model(TOKENS % 320)), logits, rtol=TOL, atol=TOL)


def hf_modules(base_dir) -> set:
    return {n for n, _ in transformers.AutoModelForCausalLM.from_pretrained(base_dir).named_modules()}


@pytest.mark.parametrize("model_type", HF_TYPES)
def test_dense_architecture_converts(model_type, tmp_path):
    base_dir = hf_model_dir(model_type, tmp_path)
    logits, paths = adapted(base_dir, tmp_path / "blocks", num_blocks=2)
    assert set(paths) <= hf_modules(base_dir)  # the default targets under the same names
    round_trip("smoa", base_dir, tmp_path / "blocks", logits, tmp_path)
    # rank 32 >= min(d_out, d_in) of every layer: the lora export is exact here
    round_trip("lora", base_dir, tmp_path / "blocks", logits, tmp_path, rank=32)
    logits, _ = adapted(base_dir, tmp_path / "one", num_blocks=1)
    round_trip("hira", base_dir, tmp_path / "one", logits, tmp_path)


MOE_KEYS = {"qwen2_moe": ATTN + ("mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"),
            "qwen3_moe": ATTN + ("self_attn.o_proj",),
            "mixtral": ATTN, "olmoe": ATTN}


@pytest.mark.parametrize("model_type", sorted(MOE_KEYS))
def test_moe_adapter_without_experts_converts(model_type, tmp_path):
    base_dir = hf_model_dir(model_type, tmp_path)
    logits, paths = adapted(base_dir, tmp_path / "ad", num_blocks=1, keys=list(MOE_KEYS[model_type]))
    assert set(paths) <= hf_modules(base_dir)
    assert len(paths) == 2 * len(MOE_KEYS[model_type])
    round_trip("smoa", base_dir, tmp_path / "ad", logits, tmp_path)
    round_trip("hira", base_dir, tmp_path / "ad", logits, tmp_path)


@pytest.mark.parametrize("model_type,keys", [("qwen3_moe", None), ("mixtral", None),
                                             ("mixtral", ["q_proj", "block_sparse_moe.gate"])])
def test_moe_expert_or_router_adapter_is_refused_in_one_line(model_type, keys, tmp_path, capsys):
    """Experts (the defaults) and routers (TopKRouter modules in transformers 5) have no PEFT form."""
    base_dir = hf_model_dir(model_type, tmp_path)
    adapted(base_dir, tmp_path / "ad", num_blocks=2, keys=keys)
    moe = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    expert = f"model.layers.0.{moe}." + ("gate" if keys else "switch_mlp.down_proj")
    with pytest.raises(AdapterError, match=rf"MoE experts or routers \(e\.g\. {expert}\).*fuse --hf"):
        export_adapter("smoa", str(base_dir), tmp_path / "ad", tmp_path / "out", **QUIET)
    with pytest.raises(SystemExit) as e:
        run(main, ["export", "--format", "hira", "--model", str(base_dir),
                   "--adapter-path", str(tmp_path / "ad"), "--out", str(tmp_path / "out")])
    err = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("warning: MLX's CPU")]
    assert e.value.code == 1 and len(err) == 1 and expert in err[0] and "--targets" in err[0], err
    assert not (tmp_path / "out").exists()


def test_an_unchecked_architecture_is_refused():
    from smoa_mlx.errors import ModelError
    from smoa_mlx.layouts.names import check_model_type

    with pytest.raises(ModelError, match="model type 'gpt2': mlx-lm and Hugging Face module names"):
        check_model_type("gpt2")
