"""The anchor step scale (smoa_mlx/lr_scale.py): its multipliers, the optimizer steps it
makes, and that the adapter it trains is SPEC §2's."""

import json
import random

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import smoa_mlx
from smoa_mlx import files
from smoa_mlx.layer import base_weight
from smoa_mlx.lr_scale import step_scales
from smoa_mlx.patch import apply_smoa, smoa_layers
from smoa_mlx.schedule import build_optimizer
from smoa_mlx.train import train


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    for split, n in (("train", 16), ("valid", 4)):
        rows = [{"text": f"what is {a} plus {b}? The answer is {a + b}."}
                for a, b in ((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n))]
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _patched(model_dir, num_blocks):
    model, _ = smoa_mlx.load(str(model_dir))
    apply_smoa(model, rank=5, num_blocks=num_blocks, alpha=8.0)
    return model


def _anchors_through_the_layer(layer):
    """M_k read back from the layer's own ΔW: with A_k, B_k all ones, block k of ΔW is
    scale * r_k * M_k (SPEC §1), in float64; the blocks from numpy.array_split."""
    layer.smoa_a = [mx.ones_like(a) for a in layer.smoa_a]
    layer.smoa_b = [mx.ones_like(b) for b in layer.smoa_b]
    dw = np.array(layer.delta_weight(), dtype=np.float64)
    rows = np.array_split(np.array(layer.row_order), layer.num_blocks)
    cols = np.array_split(np.array(layer.col_order), layer.num_blocks)
    return [dw[np.ix_(r, c)] / (layer.scale * rk) for r, c, rk in zip(rows, cols, layer.branch_ranks)]


@pytest.mark.parametrize("num_blocks", [1, 2, 3])
def test_the_multiplier_of_b_k_is_one_over_the_rms_of_its_anchor(tiny_model_dir, num_blocks):
    model = _patched(tiny_model_dir, num_blocks)
    scales = dict(tree_flatten(step_scales(model)))
    assert set(scales) == {k for k, _ in tree_flatten(model.trainable_parameters())}
    layers = smoa_layers(model)
    for path, layer in layers.items():
        w0 = np.array(base_weight(layer.linear), dtype=np.float64)
        for k, m in enumerate(_anchors_through_the_layer(layer)):
            assert np.abs(m).max() > 0
            if num_blocks == 1:  # HiRA: the anchor is the whole weight
                np.testing.assert_allclose(np.sort(np.abs(m).ravel()), np.sort(np.abs(w0).ravel()),
                                           rtol=1e-5)
            expected = 1.0 / np.sqrt(np.mean(m ** 2))
            assert scales[f"{path}.smoa_b.{k}"] == pytest.approx(expected, rel=1e-5)
            assert scales[f"{path}.smoa_a.{k}"] == 1.0


def _adam_reference(p, grads, lr, wd, c, eps=1e-8, betas=(0.9, 0.999)):
    """Float64 AdamW with bias correction, each step (decay included) times c."""
    p, m, v = p.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        step = lr * wd * p + lr * (m / (1 - betas[0] ** t)) / (np.sqrt(v / (1 - betas[1] ** t)) + eps)
        p = p - c * step
    return p


@pytest.mark.parametrize("name,wd", [("adamw", 0.1), ("adam", 0.0)])
def test_the_optimizer_multiplies_each_step_by_its_scale(tiny_model_dir, name, wd):
    model = _patched(tiny_model_dir, 2)
    rng = np.random.default_rng(0)
    params = tree_map(lambda p: mx.array(rng.normal(size=p.shape).astype(np.float32)),
                      model.trainable_parameters())
    grads = [tree_map(lambda p: mx.array(rng.normal(scale=1e-3, size=p.shape).astype(np.float32)),
                      params) for _ in range(2)]
    scales = step_scales(model)
    lr = 1e-2
    opt = build_optimizer(name, lr, wd, step_scales=scales)
    assert isinstance(opt, optim.Adam) and type(opt) is not optim.Adam
    plain = build_optimizer(name, lr, wd)
    assert type(plain) in (optim.Adam, optim.AdamW)
    got = params
    for g in grads:
        got = opt.apply_gradients(g, got)
    flat_p, flat_s = dict(tree_flatten(params)), dict(tree_flatten(scales))
    flat_g = [dict(tree_flatten(g)) for g in grads]
    for key, value in tree_flatten(got):
        ref = _adam_reference(np.array(flat_p[key]), [np.array(g[key], dtype=np.float64) for g in flat_g],
                              lr, wd, flat_s[key])
        # float32 steps: the rounding of p + step, times the scale (here up to ~20)
        np.testing.assert_allclose(np.array(value), ref, rtol=1e-5, atol=5e-6, err_msg=key)
    # The state is the plain optimizer's (checkpoints and --resume read it unchanged).
    for g in grads:
        params = plain.apply_gradients(g, params)
    assert sorted(k for k, _ in tree_flatten(opt.state)) == sorted(k for k, _ in tree_flatten(plain.state))


def _run(model_dir, data, out, **kw):
    args = {"model": str(model_dir), "data": str(data), "adapter_path": str(out), "iters": 3,
            "batch_size": 4, "learning_rate": 1e-2, "warmup": 0, "steps_per_eval": 100,
            "val_batches": -1, "rank": 5, **kw}
    train(args)
    return files.load_safetensors(out / "adapters.safetensors")


def test_the_scaled_run_saves_a_spec_adapter(tiny_model_dir, text_data, tmp_path):
    scaled = _run(tiny_model_dir, text_data, tmp_path / "anchor")  # the default for smoa
    plain = _run(tiny_model_dir, text_data, tmp_path / "none", lr_scale="none")
    # Same tensors (names, shapes, dtypes, orders) as without the scale; only B moved further.
    assert {k: (v.shape, v.dtype) for k, v in scaled.items()} == \
        {k: (v.shape, v.dtype) for k, v in plain.items()}
    b_keys = [k for k in scaled if ".smoa_b." in k]
    assert b_keys and all(not np.allclose(np.array(scaled[k]), np.array(plain[k])) for k in b_keys)
    # ΔW of the loaded adapter is scale * (B_k A_k) ⊙ M_k from the file's own tensors (float64).
    model, _ = smoa_mlx.load(str(tiny_model_dir), adapter_path=str(tmp_path / "anchor"))
    for path, layer in smoa_layers(model).items():
        w0 = np.array(base_weight(layer.linear), dtype=np.float64)
        rows = np.array_split(np.array(scaled[f"{path}.row_order"]), layer.num_blocks)
        cols = np.array_split(np.array(scaled[f"{path}.col_order"]), layer.num_blocks)
        ref = np.zeros_like(w0)
        for k, (r, c) in enumerate(zip(rows, cols)):
            a = np.array(scaled[f"{path}.smoa_a.{k}"], dtype=np.float64)
            b = np.array(scaled[f"{path}.smoa_b.{k}"], dtype=np.float64)
            ref[np.ix_(r, c)] = (8.0 / 5) * (b @ a) * w0[np.ix_(r, c)]
        np.testing.assert_allclose(np.array(layer.delta_weight()), ref, rtol=1e-4,
                                   atol=1e-6 * np.abs(ref).max(), err_msg=path)
        assert np.abs(ref).max() > 0


def test_lora_is_not_scaled(tiny_model_dir, text_data, tmp_path):
    a = _run(tiny_model_dir, text_data, tmp_path / "a", method="lora")
    b = _run(tiny_model_dir, text_data, tmp_path / "b", method="lora", lr_scale="none")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)


def test_row_mode_scales_each_row_of_b_k_by_its_anchor_row(tiny_model_dir):
    model = _patched(tiny_model_dir, 2)
    scales = dict(tree_flatten(step_scales(model, "row")))
    for path, layer in smoa_layers(model).items():
        for k, m in enumerate(_anchors_through_the_layer(layer)):
            got = np.array(scales[f"{path}.smoa_b.{k}"])
            assert got.shape == (m.shape[0], 1)
            np.testing.assert_allclose(got[:, 0], 1 / np.sqrt(np.mean(m ** 2, axis=1)), rtol=1e-5)


def test_the_default_rate_follows_the_width(tiny_model_dir, text_data, tmp_path):
    from types import SimpleNamespace

    from smoa_mlx.errors import ConfigError
    from smoa_mlx.lr_scale import default_rate

    assert default_rate(SimpleNamespace(args=SimpleNamespace(hidden_size=64))) == 3e-2
    # 1/sqrt(width) through the two measured points: 3e-2 at 64 (stories260K), 1e-2 at 576
    # (SmolLM2-135M); 2 significant digits, so 576 lands on the measured grid rate exactly.
    assert default_rate(SimpleNamespace(args=SimpleNamespace(hidden_size=576))) == 1e-2
    assert default_rate(SimpleNamespace(args=SimpleNamespace(hidden_size=2048))) == 5.3e-3
    with pytest.raises(ConfigError, match="pass --learning-rate"):
        default_rate(SimpleNamespace())
    # The tiny model is 64 wide: smoa trains at 3e-2 unless told otherwise; lora keeps 2e-4.
    for method, lr in (("smoa", 3e-2), ("lora", 2e-4)):
        out = tmp_path / method
        args = {"model": str(tiny_model_dir), "data": str(text_data), "adapter_path": str(out),
                "iters": 1, "batch_size": 4, "warmup": 0, "method": method}
        train(args)
        assert json.loads((out / "adapter_config.json").read_text())["learning_rate"] == lr


def test_moe_experts_get_one_scale_per_expert_and_train():
    """A switch (MoE expert) layer plans each expert: B_k's multiplier is (E, 1, 1), one
    1/rms per expert's anchor (float64 reference), and the scaled optimizer trains it."""
    from test_archs import tiny, train_losses

    model = tiny("qwen3_moe")
    apply_smoa(model, rank=4, num_blocks=2, progress=False)
    scales = dict(tree_flatten(step_scales(model)))
    rows_scales = dict(tree_flatten(step_scales(model, "row")))
    experts = 0
    for path, layer in smoa_layers(model).items():
        w = np.array(base_weight(layer.linear).astype(mx.float32), dtype=np.float64)
        if w.ndim == 2:
            continue
        experts += 1
        for k in range(layer.num_blocks):
            c, c_row = (np.array(t[f"{path}.smoa_b.{k}"]) for t in (scales, rows_scales))
            assert c.shape == (w.shape[0], 1, 1) and c_row.shape == (w.shape[0], layer.smoa_b[k].shape[1], 1)
            for e in range(w.shape[0]):
                r = np.array_split(np.array(layer.row_order[e]), layer.num_blocks)[k]
                q = np.array_split(np.array(layer.col_order[e]), layer.num_blocks)[k]
                m = w[e][np.ix_(r, q)]
                np.testing.assert_allclose(c[e, 0, 0], 1 / np.sqrt(np.mean(m ** 2)), rtol=1e-6)
                np.testing.assert_allclose(c_row[e, :, 0], 1 / np.sqrt(np.mean(m ** 2, axis=1)), rtol=1e-5)
    assert experts > 0
    losses = train_losses(model, build_optimizer("adamw", 1e-2, step_scales=step_scales(model)))
    assert losses[-1] < losses[0] - 0.05, losses
