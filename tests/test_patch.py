"""apply_smoa over real mlx-lm models: target selection, freezing, counts, forward.

The end-to-end reference merges every update into a fresh copy of the model with a
formulation independent of the layer's blocked path: per SPEC §1, with the factors
embedded block-sparsely in original coordinates, ΔW = scale * (B_full A_full) ⊙ W0.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2
from mlx_lm.utils import _get_classes

import smoa_mlx
from smoa_mlx.patch import apply_smoa, smoa_layers, target_paths

DEFAULT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "up_proj": "mlp", "down_proj": "mlp"
}
TOKENS = mx.array([[1, 5, 9, 12, 40, 7, 3, 30], [1, 2, 3, 4, 5, 6, 7, 8]])


def expected_paths(layers, names=DEFAULT):
    return {f"model.layers.{i}.{names[n]}.{n}" for i in layers for n in names}


@pytest.fixture(params=["tiny_model_dir", "stories_dir"])
def model_dir(request):
    return request.getfixturevalue(request.param)


def load(path):
    model, _ = smoa_mlx.load(str(path))
    return model


def count_params(tree):
    return sum(v.size for _, v in tree_flatten(tree))


def independent_count(model, paths, rank, k):
    """Σ over modules Σ_k r_k (in_k + out_k), from the base weight shapes."""
    modules = dict(model.named_modules())
    total = 0
    for p in paths:
        d_out, d_in = modules[p].weight.shape
        ranks = [len(c) for c in np.array_split(np.arange(rank), k)]
        ins = [len(c) for c in np.array_split(np.arange(d_in), k)]
        outs = [len(c) for c in np.array_split(np.arange(d_out), k)]
        total += sum(r * (i + o) for r, i, o in zip(ranks, ins, outs))
    return total


def test_default_targets_counts_and_freezing(model_dir):
    model = load(model_dir)
    n_layers = len(model.layers)
    base_total = count_params(model.parameters())
    logits = model(TOKENS)
    want = expected_paths(range(n_layers))
    want_count = independent_count(model, want, 8, 2)
    others = {p: type(m) for p, m in model.named_modules() if p not in want}

    summary = apply_smoa(model, rank=8, num_blocks=2)
    assert set(smoa_layers(model)) == want == set(summary["modules"])
    assert {p: type(m) for p, m in model.named_modules() if p in others} == others
    assert mx.array_equal(model(TOKENS), logits).item()  # B = 0: exactly the base

    names = [n for n, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(n.rsplit(".", 2)[-2] in ("smoa_a", "smoa_b") for n in names)
    assert {n.rsplit(".", 2)[0] for n in names} == want
    assert summary["trainable"] == want_count
    assert summary["trainable"] == sum(m["trainable"] for m in summary["modules"].values())
    assert summary["trainable"] == count_params(model.trainable_parameters())
    assert summary["total"] == base_total  # mlx-lm convention: adapters not in the total
    assert summary["percent"] == pytest.approx(100 * want_count / base_total)


@pytest.mark.parametrize("num_layers", [1, 2, 99, -1])
def test_num_layers_patches_the_last_layers(model_dir, num_layers):
    model = load(model_dir)
    n = len(model.layers)
    summary = apply_smoa(model, num_layers=num_layers, rank=4, num_blocks=2)
    first = 0 if num_layers in (99, -1) else n - num_layers  # mlx-lm: -1 means all layers
    assert set(smoa_layers(model)) == set(summary["modules"]) == expected_paths(range(first, n))


def test_key_forms(tiny_model_dir):
    model = load(tiny_model_dir)
    full = "model.layers.0.mlp.gate_proj"
    assert target_paths(model, ["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert target_paths(model, ["self_attn.o_proj", full]) == [
        full, "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"
    ]
    assert target_paths(model, [full], num_layers=1) == []
    apply_smoa(model, keys=["mlp.down_proj", "model.layers.1.self_attn.v_proj"], rank=4)
    assert set(smoa_layers(model)) == {
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"
    }


def test_unknown_target_and_double_patching(tiny_model_dir):
    model = load(tiny_model_dir)
    with pytest.raises(ValueError, match="qkv_proj") as e:
        apply_smoa(model, keys=["q_proj", "qkv_proj"])
    msg = str(e.value)
    assert "\n" not in msg
    for name in ("q_proj", "o_proj", "gate_proj", "self_attn.q_proj", "mlp.down_proj"):
        assert name in msg
    assert not smoa_layers(model)
    apply_smoa(model, rank=4)
    with pytest.raises(ValueError, match="already"):
        apply_smoa(model, rank=4)


def test_patched_layers_inherit_the_training_mode(tiny_model_dir):
    """An eval-mode model gets eval-mode SMoA layers (no dropout in evaluation); a model
    in training mode gets training layers."""
    model = load(tiny_model_dir)  # smoa_mlx.load returns an eval-mode model
    apply_smoa(model, rank=4, dropout=0.5)
    layers = smoa_layers(model)
    assert layers and not any(m.training for m in layers.values())
    mx.random.seed(0)
    for layer in layers.values():  # nonzero B: dropout on the adapter input would show
        layer.smoa_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
    first = model(TOKENS)
    assert mx.array_equal(model(TOKENS), first).item()
    model.train()
    assert not mx.allclose(model(TOKENS), first).item()  # dropout is active in training

    training = load(tiny_model_dir).train()
    apply_smoa(training, rank=4, dropout=0.5)
    assert all(m.training for m in smoa_layers(training).values())


def fuse_reference(model, make_fresh, rank, alpha, k):
    """A fresh model whose patched weights are W0 + ΔW, ΔW built in float64 NumPy."""
    fresh = make_fresh()
    weights = dict(tree_flatten(fresh.parameters()))
    for path, layer in smoa_layers(model).items():
        w0 = np.array(layer.linear.weight, np.float64)
        d_out, d_in = w0.shape
        a_full, b_full = np.zeros((rank, d_in)), np.zeros((d_out, rank))
        rows = np.array_split(np.array(layer.row_order), k)
        cols = np.array_split(np.array(layer.col_order), k)
        start = 0
        for r, c, a, b in zip(rows, cols, layer.smoa_a, layer.smoa_b):
            span = slice(start, start + a.shape[0])
            a_full[span, c] = np.array(a)
            b_full[r, span] = np.array(b)
            start = span.stop
        assert start == rank
        merged = w0 + (alpha / rank) * (b_full @ a_full) * w0
        weights[f"{path}.weight"] = mx.array(merged.astype(np.float32))
    fresh.load_weights(list(weights.items()))
    fresh.eval()
    return fresh


def family_models():
    common = dict(
        hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=64,
    )
    mistral_model, mistral_args = _get_classes({"model_type": "mistral"})
    return {
        "llama": lambda: llama.Model(llama.ModelArgs(model_type="llama", **common)),
        "qwen2": lambda: qwen2.Model(qwen2.ModelArgs(model_type="qwen2", **common)),
        "mistral": lambda: mistral_model(mistral_args(model_type="mistral", **common)),
    }


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_model_families_patch_and_forward(family):
    make = family_models()[family]
    mx.random.seed(20)
    model = make()
    model.eval()
    params = tree_flatten(model.parameters())
    mx.eval(params)

    def make_fresh():
        fresh = make()
        fresh.load_weights(params)
        return fresh

    tokens = TOKENS % 64
    logits = model(tokens)
    rank, alpha, k = 6, 12.0, 3
    apply_smoa(model, rank=rank, num_blocks=k, alpha=alpha)
    assert set(smoa_layers(model)) == expected_paths(range(2))
    if family == "qwen2":
        assert "bias" in model.layers[0].self_attn.q_proj.linear
    assert mx.array_equal(model(tokens), logits).item()

    mx.random.seed(21)
    for layer in smoa_layers(model).values():
        layer.smoa_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
    adapted = model(tokens)
    assert not np.allclose(np.array(adapted), np.array(logits), atol=1e-3)
    want = fuse_reference(model, make_fresh, rank, alpha, k)(tokens)
    np.testing.assert_allclose(np.array(adapted), np.array(want), rtol=1e-4, atol=1e-4)


def test_stories_adapted_forward_matches_merged_reference(stories_dir):
    model = load(stories_dir)
    rank, alpha, k = 8, 8.0, 2
    apply_smoa(model, rank=rank, num_blocks=k, alpha=alpha)
    mx.random.seed(22)
    for layer in smoa_layers(model).values():
        layer.smoa_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
    adapted = np.array(model(TOKENS))
    want = np.array(fuse_reference(model, lambda: load(stories_dir), rank, alpha, k)(TOKENS))
    assert not np.allclose(adapted, np.array(load(stories_dir)(TOKENS)), atol=1e-2)
    np.testing.assert_allclose(adapted, want, rtol=1e-4, atol=1e-4)


def test_planning_progress_counts_every_weight(monkeypatch, tiny_model_dir):
    """One tick per planned weight (each MoE expert counts), none when the orders are known
    or progress is off; tqdm shows it on a terminal only (disable=None)."""
    import tqdm

    bars = []

    class Recorder:
        def __init__(self, total, disable, **kw):
            self.total, self.disable, self.n = total, disable, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    model = load(tiny_model_dir)
    apply_smoa(model, rank=4)
    assert [(b.total, b.n, b.disable, b.closed) for b in bars] == [(10, 10, None, True)]
    apply_smoa(load(tiny_model_dir), rank=4, progress=False)
    assert len(bars) == 1

    from test_archs import tiny

    moe = tiny("qwen3_moe")
    apply_smoa(moe, rank=4)  # 2 layers x (3 attention + 2 expert layers x 4 experts)
    assert (bars[-1].total, bars[-1].n) == (2 * (3 + 2 * 4), 2 * (3 + 2 * 4))
