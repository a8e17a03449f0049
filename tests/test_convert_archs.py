"""`convert` beyond Llama: tiny random transformers models of each architecture whose
mlx-lm module paths equal the HF/PEFT ones, round-tripped MLX -> PyTorch -> MLX.

The converters' own parity measurement (MLX vs the transformers model with the adapter
applied by PEFT or smoa_mlx.torch) gives the logit error; every adapter has random
nonzero B and moves the logits far more than the tolerance. MoE experts (stacked
SwitchLinear; fused 3-D parameters in transformers 5) cross as PEFT LoRA `target_parameters`
only; routers (TopKRouter modules) not at all.
"""

import json

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
from smoa_mlx.errors import AdapterError, ConfigError  # noqa: E402
from smoa_mlx.layouts.names import hf_path  # noqa: E402
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
    assert {hf_path(p, model_type) for p in paths} <= hf_modules(base_dir)  # the default targets there
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
    round_trip("lora", base_dir, tmp_path / "ad", logits, tmp_path, rank=32)  # exact at full rank
    # PEFT >= 0.22 reads a bare up_proj / down_proj on qwen2_moe as the fused experts too
    config = json.loads((tmp_path / "ad-lora" / "adapter_config.json").read_text())
    assert not {"up_proj", "down_proj"} & set(config["target_modules"]) and config["target_parameters"] is None


@pytest.mark.parametrize("model_type,keys", [("qwen3_moe", None), ("mixtral", None),
                                             ("mixtral", ["q_proj", "block_sparse_moe.gate"])])
def test_moe_expert_or_router_adapter_is_refused_in_one_line(model_type, keys, tmp_path, capsys):
    """Experts (the defaults) have no PEFT smoa/hira form (lora has: below), routers (TopKRouter
    modules in transformers 5) none at all."""
    base_dir = hf_model_dir(model_type, tmp_path)
    adapted(base_dir, tmp_path / "ad", num_blocks=2, keys=keys)
    moe = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    expert = f"model.layers.0.{moe}." + ("gate" if keys else "switch_mlp.down_proj")
    what = "routers" if keys else "experts"
    capsys.readouterr()  # the checkpoint's progress bars
    with pytest.raises(AdapterError, match=rf"MoE {what} \(e\.g\. {expert}\).*fuse --hf"):
        export_adapter("smoa", str(base_dir), tmp_path / "ad", tmp_path / "out", **QUIET)
    for fmt in ("hira", "lora") if keys else ("hira",):
        with pytest.raises(SystemExit) as e:
            run(main, ["export", "--format", fmt, "--model", str(base_dir),
                       "--adapter-path", str(tmp_path / "ad"), "--out", str(tmp_path / "out")])
        err = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("warning: MLX's CPU")]
        assert e.value.code == 1 and len(err) == 1 and expert in err[0] and "--targets" in err[0], err
        assert ("--format lora" in err[0]) == (not keys), err
    assert not (tmp_path / "out").exists()


EXPERTS = ("switch_mlp.gate_proj", "switch_mlp.up_proj", "switch_mlp.down_proj")


@pytest.mark.parametrize("model_type", sorted(MOE_KEYS))
def test_moe_expert_adapter_exports_as_peft_lora_target_parameters(model_type, tmp_path):
    """Exact at full rank against PEFT's ParamWrapper (gate and up fused in transformers' order);
    a lossy rank's export imports back exactly onto what PEFT runs."""
    base_dir = hf_model_dir(model_type, tmp_path)
    logits, paths = adapted(base_dir, tmp_path / "ad", num_blocks=2, keys=list(MOE_KEYS[model_type] + EXPERTS))
    assert len(paths) == 2 * len(MOE_KEYS[model_type] + EXPERTS)
    config = tmp_path / "ad" / "adapter_config.json"  # trained with dropout, which ParamWrapper refuses
    raw = json.loads(config.read_text())
    raw["smoa_parameters"]["dropout"] = 0.1
    config.write_text(json.dumps(raw))
    # rank 32 >= min(d_out, d_in) of every layer and fused expert parameter: exact
    round_trip("lora", base_dir, tmp_path / "ad", logits, tmp_path, rank=32)
    config = json.loads((tmp_path / "ad-lora" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["down_proj", "gate_up_proj"] and config["lora_dropout"] == 0
    assert not {"gate_proj", "switch_mlp"} & set(config["target_modules"])
    back = tmp_path / "back"
    report = import_adapter("lora", str(base_dir), tmp_path / "ad-lora", back, **QUIET)
    assert report["parity"]["logits"] < TOL, report["parity"]
    np.testing.assert_allclose(np.array(load_base(str(base_dir), str(back))[0](TOKENS % 320)), logits,
                               rtol=TOL, atol=TOL)
    lossy = export_adapter("lora", str(base_dir), tmp_path / "ad", tmp_path / "lossy", rank=2, **QUIET)
    assert lossy["relative_error"] > 0.1 and lossy["parity"]["logits"] > 10 * TOL  # the error is measured
    report = import_adapter("lora", str(base_dir), tmp_path / "lossy", tmp_path / "lossy-back", **QUIET)
    assert report["parity"]["logits"] < TOL and max(report["parity"]["layers"].values()) < TOL, report


@pytest.mark.parametrize("model_type", sorted(MOE_KEYS))
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")  # peft checks modules only, yet applies it
def test_peft_lora_on_expert_parameters_imports(model_type, tmp_path):
    """A LoRA PEFT itself built on transformers' 3-D expert parameters (random B, one layer's
    down_proj alone, a rank_pattern) runs in mlx-lm with PEFT's logits."""
    base_dir = hf_model_dir(model_type, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                          target_parameters=["model.layers.0.mlp.experts.gate_up_proj", "experts.down_proj"],
                          rank_pattern={"model.layers.1.mlp.experts.down_proj": 2})
    peft.get_peft_model(hf, cfg).save_pretrained(tmp_path / "peft")
    report = import_adapter("lora", str(base_dir), tmp_path / "peft", tmp_path / "mlx", **QUIET)
    assert report["parity"]["logits"] < TOL and max(report["parity"]["layers"].values()) < TOL, report
    moe = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    keys = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["lora_parameters"]["keys"]
    assert sorted(k for k in keys if "switch_mlp" in k) == sorted(
        [f"model.layers.0.{moe}.{e}" for e in EXPERTS] + [f"model.layers.1.{moe}.switch_mlp.down_proj"])
    import mlx_lm

    ours = np.array(load_base(str(base_dir), str(tmp_path / "mlx"))[0](TOKENS % 320))
    np.testing.assert_array_equal(np.array(mlx_lm.load(str(base_dir), adapter_path=str(tmp_path / "mlx"))[0](
        TOKENS % 320)), ours)  # mlx-lm's own loader runs it as is
    assert np.abs(ours - np.array(load_base(str(base_dir))[0](TOKENS % 320))).max() > 1e-3
    config = tmp_path / "peft" / "adapter_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), target_parameters=["experts.w9"])))
    with pytest.raises(ConfigError, match=r"adapter_config.json: target_parameters \['experts.w9'\] match no MoE"):
        import_adapter("lora", str(base_dir), tmp_path / "peft", tmp_path / "bad", **QUIET)


def test_moe_lora_export_on_quantized_experts_round_trips(tmp_path):
    """4-bit experts: the update is taken on the de-quantized anchors and comes back exactly."""
    from mlx_lm.convert import convert
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    quantized = tmp_path / "q4"
    convert(str(hf_model_dir("qwen3_moe", tmp_path)), str(quantized), quantize=True, q_group_size=32, q_bits=4,
            quant_predicate=lambda path, _: not path.endswith("mlp.gate"))  # the router: 4 x 32
    logits, _ = adapted(quantized, tmp_path / "ad", num_blocks=2, keys=list(EXPERTS))
    export_adapter("lora", str(quantized), tmp_path / "ad", tmp_path / "lora", rank=32, **QUIET)
    import_adapter("lora", str(quantized), tmp_path / "lora", tmp_path / "back", **QUIET)
    model = load_base(str(quantized), str(tmp_path / "back"))[0]
    assert isinstance(model.layers[0].mlp.switch_mlp.up_proj.linear, QuantizedSwitchLinear)
    np.testing.assert_allclose(np.array(model(TOKENS % 320)), logits, rtol=TOL, atol=TOL)


def test_an_unchecked_architecture_is_refused():
    from smoa_mlx.errors import ModelError
    from smoa_mlx.layouts.names import check_model_type

    with pytest.raises(ModelError, match="model type 'gpt2': mlx-lm and Hugging Face module names"):
        check_model_type("gpt2")


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma3"])
def test_exported_keys_are_the_ones_peft_saves_on_the_transformers_model(model_type, tmp_path):
    """gemma3: PEFT on Gemma3ForConditionalGeneration keys `base_model.model.model.language_model.*`,
    and the exported target_modules must not reach the vision tower's q/k/v_proj."""
    from safetensors import safe_open

    base_dir = hf_model_dir(model_type, tmp_path)
    adapted(base_dir, tmp_path / "ad", num_blocks=2)
    export_adapter("lora", str(base_dir), tmp_path / "ad", tmp_path / "lora", measure_parity=False, **QUIET)
    config = peft.LoraConfig.from_pretrained(tmp_path / "lora")
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir), config)
    model.save_pretrained(tmp_path / "peft")
    keys = []
    for d in ("lora", "peft"):
        with safe_open(str(tmp_path / d / "adapter_model.safetensors"), "np") as f:
            keys.append(set(f.keys()))
    assert keys[0] == keys[1] and len(keys[0]) == 2 * 2 * 5
    layers = "model.language_model.layers." if model_type == "gemma3" else "model.layers."
    assert all(k.startswith("base_model.model." + layers) for k in keys[0])


def test_a_peft_lora_trained_on_gemma3_imports_without_its_vision_tower_tensors(tmp_path):
    """Short target names reach the SigLIP tower too; mlx-lm has no tower, text logits match."""
    base_dir = hf_model_dir("gemma3", tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    model.save_pretrained(tmp_path / "peft")
    lines = []
    report = import_adapter("lora", str(base_dir), tmp_path / "peft", tmp_path / "mlx", log=lines.append)
    assert report["parity"]["logits"] < TOL, report["parity"]
    assert sum("left out 4 tensors" in line for line in lines) == 1, lines  # 1 layer x (q, v) x (A, B)
    tokens = TOKENS % 320
    with_adapter = np.array(load_base(str(base_dir), str(tmp_path / "mlx"))[0](tokens))
    assert np.abs(with_adapter - np.array(load_base(str(base_dir))[0](tokens))).max() > 1e-3  # its text part is there
