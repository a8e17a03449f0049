"""Adapters prepared for inference (`smoa_mlx.inference`): the same outputs as the unfused
layers (a float64 NumPy reference per layer; the unprepared model per model), the base
restored exactly, training untouched, and serve's switching."""

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import dequantize_model

import smoa_mlx
import smoa_mlx.layer as layer_mod
from smoa_mlx.errors import ConfigError
from smoa_mlx.inference import prepare_for_inference
from smoa_mlx.layer import PREPARED_FORMATS, SMoALinear, base_weight
from smoa_mlx.loader import load_model
from smoa_mlx.patch import smoa_layers
from smoa_mlx.plan import make_plan
from smoa_mlx.serve import Adapters


def reference(layer: SMoALinear, x) -> np.ndarray:
    """x (W0 + ΔW)^T + bias in float64, ΔW built block by block from A, B and the orders."""
    w0 = np.array(base_weight(layer.linear).astype(mx.float32), np.float64)
    delta = np.zeros_like(w0)
    rows = np.array_split(np.array(layer.row_order), layer.num_blocks)
    cols = np.array_split(np.array(layer.col_order), layer.num_blocks)
    for a, b, r, c in zip(layer.smoa_a, layer.smoa_b, rows, cols):
        ba = np.array(b, np.float64) @ np.array(a, np.float64)
        delta[np.ix_(r, c)] = layer.scale * ba * w0[np.ix_(r, c)]
    y = np.array(x, np.float64) @ (w0 + delta).T
    return y + np.array(layer.linear.bias, np.float64) if "bias" in layer.linear else y


def quantized_delta_bound(layer: SMoALinear, x) -> np.ndarray:
    """Per output, the most a quantized base's prepared ΔW (8-bit affine groups within each
    block row) can move `x ΔW^T`: a weight is off by at most half its group's step
    (range / 255), and a group's range is at most its row's. Zero for the exact formats,
    which must match to float precision."""
    if layer.prepared_format != "8bit":
        return 0.0
    delta = np.array(layer.delta_weight(), np.float64)
    step = (delta.max(axis=1) - delta.min(axis=1)) / 255
    return np.abs(np.array(x, np.float64)).sum(axis=-1, keepdims=True) * step / 2


def random_layer(base, seed=0, num_blocks=2, dropout=0.0):
    mx.random.seed(seed)
    layer = SMoALinear.from_base(base, rank=4, num_blocks=num_blocks, dropout=dropout, planner=make_plan)
    layer.smoa_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
    layer.eval()
    return layer


@pytest.mark.parametrize("num_blocks", [1, 2, 3])
@pytest.mark.parametrize("quantized,fmt", [(False, None), ("affine", "8bit"), ("affine", "float32"),
                                           ("affine", "folded"), ("mxfp4", "8bit"),
                                           ("mxfp4", "float32")])
def test_prepared_layer_matches_float64_reference(num_blocks, quantized, fmt):
    base = nn.Linear(192, 100, bias=True)  # K = 3: blocks of 34/33/33 rows (padded), 64 columns
    if quantized:  # mxfp4: uint8 scales, which the prepared update must not take as its dtype
        base = nn.QuantizedLinear.from_linear(base, group_size=32, bits=4, mode=quantized)
    layer = random_layer(base, num_blocks=num_blocks)
    w0 = np.array(base_weight(layer.linear).astype(mx.float32))  # bfloat16 in mxfp4: exact
    for rows in (1, 3, 40):  # folded (decoding) and merged (prefill) row counts
        x = mx.random.normal((rows, 192))
        before = np.array(layer(x))
        layer.prepare(fmt)
        assert layer.prepared_format == (fmt or "merged")
        if fmt == "8bit":
            assert len(layer._delta.weights) == 3  # quantized, not a float fallback
        after = np.array(layer(x))
        ref = reference(layer, x)
        assert np.all(np.abs(after - ref) <= 1e-5 * np.abs(ref).max() + quantized_delta_bound(layer, x))
        layer.unprepare()
        assert np.array_equal(np.array(layer(x)), before)  # unprepared: bit for bit as before
    assert np.array_equal(np.array(base_weight(layer.linear).astype(mx.float32)), w0)  # the base untouched
    assert layer._merged is None and layer._delta is None and layer.prepared_format is None


def quantized_layer(seed=0, num_blocks=2, dropout=0.0):
    base = nn.QuantizedLinear.from_linear(nn.Linear(64, 96), group_size=32, bits=4)
    return random_layer(base, seed, num_blocks, dropout)


def test_quantized_layer_takes_the_fastest_format(monkeypatch):
    """Each kind of layer is timed once; a format's cost is its time over the base layer's,
    and one adding memory must save FORMAT_MARGIN of the base's time over the cheaper ones
    (the clock is faked: which format is fastest depends on the device)."""
    clock, calls = [0.0], []
    real_call, real_base = SMoALinear.__call__, nn.QuantizedLinear.__call__

    def timed_call(self, x):
        fmt = ("folded" if not isinstance(self._delta, layer_mod.Prepared)
               else "float32" if len(self._delta.weights) == 1 else "8bit")
        calls.append(fmt)
        clock[0] += times[fmt]
        return real_call(self, x)

    def timed_base(self, x):
        clock[0] += 1.0
        return real_base(self, x)
    monkeypatch.setattr(SMoALinear, "__call__", timed_call)
    monkeypatch.setattr(nn.QuantizedLinear, "__call__", timed_base)
    monkeypatch.setattr(layer_mod, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    built, real_delta_in = [], SMoALinear._delta_in

    def counted_delta_in(self, fmt):
        built.append(fmt)
        return real_delta_in(self, fmt)
    monkeypatch.setattr(SMoALinear, "_delta_in", counted_delta_in)
    for times, expected in (({"folded": 8.0, "8bit": 0.5, "float32": 0.1}, "float32"),
                            ({"folded": 8.0, "8bit": 0.19, "float32": 0.1}, "8bit"),
                            ({"folded": 0.19, "8bit": 0.5, "float32": 0.1}, "folded")):
        monkeypatch.setattr(layer_mod, "_FASTEST", {})
        calls.clear()
        built.clear()
        layer = quantized_layer(0)
        layer.prepare()
        assert layer.prepared_format == expected
        assert built == list(PREPARED_FORMATS)  # each built once: the one timed is kept
        assert calls == [f for f in PREPARED_FORMATS for _ in range(8)] * 6  # warm-up + 5 rounds of 8
        calls.clear()
        other = quantized_layer(1)  # the same kind of layer: not timed again
        other.prepare()
        assert other.prepared_format == expected and calls == []
    # blocks without whole 32-column groups (K = 3 of 64: 22/21/21) cannot take 8 bits
    monkeypatch.setattr(layer_mod, "_FASTEST", {})
    times = {"folded": 8.0, "8bit": 0.0, "float32": 0.1}
    calls.clear()
    narrow = quantized_layer(0, num_blocks=3)
    narrow.prepare()
    assert narrow.prepared_format == "float32" and "8bit" not in calls
    narrow = quantized_layer(0, num_blocks=3)
    narrow.prepare("8bit")  # asked for: the next format up
    assert narrow.prepared_format == "float32"

    def failing(self, x):  # a format that fails while being timed leaves nothing behind
        raise RuntimeError("no kernel")
    monkeypatch.setattr(layer_mod, "_FASTEST", {})
    monkeypatch.setattr(SMoALinear, "__call__", failing)
    layer = quantized_layer(0)
    with pytest.raises(RuntimeError, match="no kernel"):
        layer.prepare()
    assert layer._delta is None and layer.prepared_format is None


def test_prepared_format_is_pinned_and_switched(monkeypatch):
    layer = quantized_layer(0)
    monkeypatch.setenv(layer_mod.FORMAT_ENV, "8bit")
    layer.prepare()
    assert layer.prepared_format == "8bit"
    layer.prepare("float32")  # another format asked for: re-prepared
    assert layer.prepared_format == "float32" and len(layer._delta.weights) == 1
    layer.prepare()  # the pin asked again
    assert layer.prepared_format == "8bit"
    monkeypatch.delenv(layer_mod.FORMAT_ENV)
    layer.prepare()  # nothing asked: kept as it is, not timed
    assert layer.prepared_format == "8bit"
    monkeypatch.setenv(layer_mod.FORMAT_ENV, "int3")
    with pytest.raises(ConfigError, match="unknown prepared format 'int3' .*SMOA_MLX_PREPARED_FORMAT"):
        quantized_layer(0).prepare()


def test_prepared_folded_layer_ignores_dropout():
    """Prepared for inference, dropout (active only in training mode) no longer applies."""
    layer = quantized_layer(0, dropout=0.5)
    x = mx.random.normal((1, 64))
    layer.eval()
    expected = np.array(layer(x))
    layer.train()
    layer.prepare("folded")
    assert np.array_equal(np.array(layer(x)), np.array(layer(x)))
    assert np.allclose(np.array(layer(x)), expected, atol=1e-5)


def test_prepared_arrays_are_not_adapter_parameters():
    layer = random_layer(nn.Linear(32, 32))
    names = dict(layer.parameters())
    layer.prepare()
    assert dict(layer.parameters()).keys() == names.keys()
    assert "_merged" not in str(layer.trainable_parameters())


def _logits(model, tokens):
    return np.array(model(mx.array([tokens])).astype(mx.float32), np.float64)


def _greedy(model, tokens, n):
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in zip((t for t, _ in generate_step(mx.array(tokens), model, max_tokens=n)), range(n))]


def test_float_model_merged_keeps_no_copy_and_matches(tiny_model_dir, make_adapter, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "a")
    tokens = list(range(3, 40))
    reference_model, _ = load_model(tiny_model_dir, adapter)  # training's model: unmerged
    assert smoa_layers(reference_model)
    ref = _logits(reference_model, tokens)
    model, _ = load_model(tiny_model_dir, adapter, inference=True)
    assert not smoa_layers(model)  # float layers fused: W0 is gone, no second copy
    got = _logits(model, tokens)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    bare = _logits(smoa_mlx.load(str(tiny_model_dir))[0], tokens)
    assert np.abs(ref - bare).max() > 1e-2  # the adapter does change the logits
    assert _greedy(model, tokens[:5], 8) == _greedy(reference_model, tokens[:5], 8)


@pytest.mark.parametrize("fmt", PREPARED_FORMATS)
def test_quantized_model_prepared_same_greedy_tokens(tiny_model_dir, make_adapter, tmp_path, fmt,
                                                     monkeypatch):
    monkeypatch.setenv(layer_mod.FORMAT_ENV, fmt)
    adapter = make_adapter(tiny_model_dir, tmp_path / "a", b=0.05)
    model, _ = smoa_mlx.load(str(tiny_model_dir))
    nn.quantize(model, group_size=32, bits=4)
    smoa_mlx.load_adapter(model, adapter)
    model.eval()
    tokens = list(range(3, 12))
    ref_tokens, ref = _greedy(model, tokens, 12), _logits(model, tokens)
    assert prepare_for_inference(model) == len(smoa_layers(model))  # quantized: kept, prepared
    formats = [layer.prepared_format for layer in smoa_layers(model).values()]
    assert fmt in formats and set(formats) <= {fmt, "float32"}  # down_proj's 80-wide blocks: no 8 bits
    assert _greedy(model, tokens, 12) == ref_tokens
    assert np.abs(_logits(model, tokens) - ref).max() <= 1e-4 * np.abs(ref).max()


def _fresh(path, quantized: bool, adapter=None):
    model, _ = smoa_mlx.load(str(path))
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    if adapter is not None:
        smoa_mlx.load_adapter(model, adapter)
    model.eval()
    return model


@pytest.mark.parametrize("quantized", [False, *PREPARED_FORMATS])  # quantized: in each format
def test_serve_switching_restores_the_base_exactly(tiny_model_dir, make_adapter, tmp_path, quantized,
                                                   monkeypatch):
    if quantized:
        monkeypatch.setenv(layer_mod.FORMAT_ENV, quantized)
    root = tmp_path / "dir"
    for name, seed in (("a", 1), ("b", 2)):
        make_adapter(tiny_model_dir, root / name, seed=seed)
    tokens = list(range(3, 30))
    expected = {n: _logits(_fresh(tiny_model_dir, quantized, root / n), tokens) for n in ("a", "b")}
    model = _fresh(tiny_model_dir, quantized)
    bare = _logits(model, tokens)
    adapters = Adapters(model, "base", None, root)
    for name in ("a", "b", "a", "base", "b", "base"):
        adapters.activate(adapters.resolve(name))
        got = _logits(model, tokens)
        if name == "base":
            assert np.array_equal(got, bare)  # restored bit for bit
            assert not any(layer.prepared_format is not None for v in adapters.variants.values()
                           for layer in smoa_layers_of(v))  # nothing prepared left behind
        else:
            error = np.abs(got - expected[name]).max()
            if quantized:  # 8 bits: the adapter's effect kept within 1%; the others exact
                assert error <= 1e-2 * np.abs(expected[name] - bare).max()
            else:
                assert error <= 1e-5 * np.abs(expected[name]).max()
            active = smoa_layers_of(adapters.active)
            formats = {layer.prepared_format for layer in active}
            assert (quantized or "merged") in formats and formats <= {quantized or "merged", "float32"}


def smoa_layers_of(variant):
    return [m for m in variant.modules.values() if isinstance(m, SMoALinear)]


def test_serve_single_adapter_fuses_and_lets_the_base_go(tiny_model_dir, make_adapter, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "a")
    tokens = list(range(3, 30))
    expected = _logits(load_model(tiny_model_dir, adapter)[0], tokens)
    model, _ = smoa_mlx.load(str(tiny_model_dir))
    adapters = Adapters(model, "m", adapter)
    assert not smoa_layers(model)
    assert not set(adapters.default.modules) & set(adapters.base)  # replaced base layers not kept
    got = _logits(model, tokens)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def _smollm2_adapted(path, dequantize: bool):
    model, tokenizer = smoa_mlx.load(str(path))
    if dequantize:
        model = dequantize_model(model)
        model.set_dtype(mx.float32)
    smoa_mlx.apply_smoa(model, rank=8, num_blocks=2, alpha=8.0)
    mx.random.seed(0)
    for layer in smoa_layers(model).values():
        layer.smoa_b = [0.01 * mx.random.normal(b.shape) for b in layer.smoa_b]
    model.eval()
    return model, list(tokenizer.encode("The capital of France is"))


def test_smollm2_q4_prepared_same_greedy_tokens(smollm2_gguf):
    model, tokens = _smollm2_adapted(smollm2_gguf, dequantize=False)
    ref = _greedy(model, tokens, 8)
    prepare_for_inference(model)
    assert _greedy(model, tokens, 8) == ref


def test_smollm2_float_merged_matches_unfused(smollm2_gguf):
    model, tokens = _smollm2_adapted(smollm2_gguf, dequantize=True)
    ref, ref_tokens = _logits(model, tokens), _greedy(model, tokens, 8)
    prepare_for_inference(model)
    got = _logits(model, tokens)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    assert _greedy(model, tokens, 8) == ref_tokens
