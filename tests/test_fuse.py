"""python -m smoa_mlx.fuse: a merged checkpoint gives the unfused adapter's logits, loaded by
mlx_lm.load (MLX directory) and by transformers (--hf), for SMoA and mlx-lm LoRA adapters,
on float and quantized bases."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load as mlx_lm_load

from smoa_mlx import apply_smoa, load, save_adapter
from smoa_mlx.adapters import smoa_config
from smoa_mlx.cli import run
from smoa_mlx.fuse import main
from smoa_mlx.patch import smoa_layers

TOL = 1e-4
TOKENS = np.array([[1, 5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300]])


@pytest.fixture(params=["tiny", "stories"])
def base(request, tiny_model_dir):
    return str(tiny_model_dir if request.param == "tiny" else request.getfixturevalue("stories_dir"))


@pytest.fixture(scope="module")
def quantized_base(tiny_model_dir, tmp_path_factory):
    from mlx_lm import convert

    path = tmp_path_factory.mktemp("q") / "model"
    convert(str(tiny_model_dir), str(path), quantize=True, q_group_size=32, q_bits=4)
    return str(path)


def rel(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


def smoa_adapter(base, out, seed=0):
    """An SMoA adapter (K = 2) with random nonzero B."""
    model, _ = load(base)
    apply_smoa(model, rank=4, num_blocks=2, alpha=8.0)
    mx.random.seed(seed)
    for layer in smoa_layers(model).values():
        layer.smoa_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
    save_adapter(model, out, smoa_config(model, base_model=base))
    return str(out)


def fuse(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        run(main, [str(a) for a in argv])
    return e.value.code, capsys.readouterr()


def test_help(capsys):
    code, out = fuse(capsys, "--help")
    assert code == 0 and "--dequantize" in out.out and "--hf" in out.out


def test_fused_mlx_and_hf_match_the_adapter(base, tmp_path, capsys):
    adapter = smoa_adapter(base, tmp_path / "adapter")
    want = logits(load(base, adapter_path=adapter)[0])
    assert rel(logits(load(base)[0]), want) > 1e-2
    assert fuse(capsys, "--model", base, "--adapter-path", adapter, "--save-path", tmp_path / "mlx")[0] == 0
    fused, _ = mlx_lm_load(str(tmp_path / "mlx"))
    assert not any("smoa" in k for k, _ in tree_flatten(fused.parameters()))
    assert rel(logits(fused), want) < TOL

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    assert fuse(capsys, "--model", base, "--adapter-path", adapter, "--save-path", tmp_path / "hf", "--hf")[0] == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        got = hf(torch.from_numpy(TOKENS)).logits.float().numpy()
    assert rel(got, want) < TOL
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")).encode("Once upon a time")


def test_fused_mlx_lm_lora_matches_the_adapter(tiny_model_dir, tmp_path, capsys):
    base = str(tiny_model_dir)
    model, _ = load(base)
    params = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    linear_to_lora_layers(model, 1, params)
    mx.random.seed(0)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape)
    adapter = tmp_path / "lora"
    adapter.mkdir()
    mx.save_safetensors(str(adapter / "adapters.safetensors"),
                        {k: v for k, v in tree_flatten(model.parameters()) if ".lora_" in k})
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": params}))
    want = logits(load(base, adapter_path=str(adapter))[0])
    assert rel(logits(load(base)[0]), want) > 1e-2
    assert fuse(capsys, "--model", base, "--adapter-path", adapter, "--save-path", tmp_path / "out")[0] == 0
    assert rel(logits(mlx_lm_load(str(tmp_path / "out"))[0]), want) < TOL


def test_quantized_base(quantized_base, tmp_path, capsys):
    adapter = smoa_adapter(quantized_base, tmp_path / "adapter")
    want = logits(load(quantized_base, adapter_path=adapter)[0])
    effect = rel(logits(load(quantized_base)[0]), want)
    assert effect > 1e-2

    assert fuse(capsys, "--model", quantized_base, "--adapter-path", adapter, "--save-path",
                tmp_path / "deq", "--de-quantize")[0] == 0
    config = json.loads((tmp_path / "deq" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    fused, _ = mlx_lm_load(str(tmp_path / "deq"))
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in fused.named_modules())
    assert rel(logits(fused), want) < TOL

    # Re-quantized like the base: exactly quantize(W0 + ΔW) for every merged layer.
    merged = dict(fused.named_modules())
    assert fuse(capsys, "--model", quantized_base, "--adapter-path", adapter, "--save-path", tmp_path / "q")[0] == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["bits"] == 4
    fused, _ = mlx_lm_load(str(tmp_path / "q"))
    adapted = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules"]
    for path, m in fused.named_modules():
        if path in adapted:
            assert isinstance(m, nn.QuantizedLinear)
            wq, scales, biases = mx.quantize(merged[path].weight, group_size=32, bits=4)
            assert all(mx.array_equal(x, y) for x, y in ((m.weight, wq), (m.scales, scales), (m.biases, biases))), path
    # 4-bit rounding of the merged weights moves the logits, but far less than the update does.
    assert rel(logits(fused), want) < 0.5 * effect

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    assert fuse(capsys, "--model", quantized_base, "--adapter-path", adapter, "--save-path",
                tmp_path / "hf", "--hf")[0] == 0
    assert "quantization" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).float().eval()
    with torch.no_grad():
        assert rel(hf(torch.from_numpy(TOKENS)).logits.numpy(), want) < TOL


def test_bad_input_leaves_no_output(tiny_model_dir, tmp_path, capsys):
    base = str(tiny_model_dir)
    code, res = fuse(capsys, "--model", base, "--adapter-path", tmp_path / "nope", "--save-path", tmp_path / "out")
    assert code == 1 and res.err.startswith("error: ") and "nope" in res.err and res.err.count("\n") == 1
    assert not (tmp_path / "out").exists()

    adapter = smoa_adapter(base, tmp_path / "adapter")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, res = fuse(capsys, "--model", base, "--adapter-path", adapter, "--save-path", tmp_path / "out")
    assert code == 1 and "holds keep.txt" in res.err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]


TOKENS2 = np.array([[1, 5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 9, 2, 77, 18, 40, 6, 30, 8, 12, 15, 21, 33]])


def cached_logits(model, prefill: int) -> np.ndarray:
    """Logits of TOKENS2 through a KV cache: `prefill` tokens at once (many rows: the
    training-path matmul), then one token per call (one row: the folded decoding path)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache, tokens = make_prompt_cache(model), mx.array(TOKENS2)
    out = [model(tokens[:, :prefill], cache=cache)]
    out += [model(tokens[:, i : i + 1], cache=cache) for i in range(prefill, tokens.shape[1])]
    return np.array(mx.concatenate(out, axis=1).astype(mx.float32))


@pytest.mark.parametrize("kind", ["float", "quantized"])
def test_prefill_then_decode_matches_the_fused_model(kind, tiny_model_dir, quantized_base, tmp_path, capsys):
    base = str(tiny_model_dir) if kind == "float" else quantized_base
    adapter = smoa_adapter(base, tmp_path / "adapter", seed=3)
    unfused, _ = load(base, adapter_path=adapter)
    got = cached_logits(unfused, prefill=20)
    assert fuse(capsys, "--model", base, "--adapter-path", adapter, "--save-path", tmp_path / "f",
                "--de-quantize")[0] == 0
    want = cached_logits(mlx_lm_load(str(tmp_path / "f"))[0], prefill=20)
    assert rel(got, want) < TOL
    assert rel(cached_logits(load(base)[0], prefill=20), want) > 1e-2
