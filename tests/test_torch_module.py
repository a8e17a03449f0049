"""smoa_mlx.torch: the PyTorch SMoA layer against a float64 NumPy reference of SPEC §1, and an
exported adapter applied to a transformers model (unmerged and merged) against MLX."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_convert import hf_model, make_smoa, mlx_logits, rel, torch_logits  # noqa: E402

from smoa_mlx.convert import export_adapter  # noqa: E402
from smoa_mlx.torch import SMoALinear, apply_adapter, merge_and_unload  # noqa: E402


def reference_delta(w, rows, cols, a, b, scale) -> np.ndarray:
    """ΔW[rows_k, cols_k] = scale (B_k A_k) ⊙ W[rows_k, cols_k], float64."""
    delta = np.zeros_like(w)
    k = len(a)
    for ak, bk, ri, ci in zip(a, b, np.array_split(rows, k), np.array_split(cols, k)):
        delta[np.ix_(ri, ci)] = scale * (bk @ ak) * w[np.ix_(ri, ci)]
    return delta


@pytest.mark.parametrize("d_out, d_in, ranks", [(7, 5, [2, 1]), (8, 6, [3, 0]), (6, 11, [1, 1, 2])])
def test_layer_matches_numpy_reference(d_out, d_in, ranks):
    rng = np.random.default_rng(d_out * d_in)

    def f32(*shape):  # float32 values, held in float64 for the reference
        return rng.standard_normal(shape).astype(np.float32).astype(np.float64)

    w, bias, x = f32(d_out, d_in), f32(d_out), f32(3, 4, d_in)
    rows, cols = rng.permutation(d_out), rng.permutation(d_in)
    in_sizes = [len(c) for c in np.array_split(cols, len(ranks))]
    out_sizes = [len(r) for r in np.array_split(rows, len(ranks))]
    a = [f32(r, i) for r, i in zip(ranks, in_sizes)]
    b = [f32(o, r) for r, o in zip(ranks, out_sizes)]
    base = torch.nn.Linear(d_in, d_out)
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(w))
        base.bias.copy_(torch.from_numpy(bias))
    layer = SMoALinear(base, rows, cols, a, b, alpha=6.0, rank=sum(ranks))
    delta = reference_delta(w, rows, cols, a, b, 6.0 / sum(ranks))
    assert np.abs(delta).max() > 0.1
    np.testing.assert_allclose(layer.delta_weight().detach().numpy(), delta, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        got = layer(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(got, x @ (w + delta).T + bias, rtol=1e-5, atol=1e-5)


def test_exported_adapter_matches_mlx_unmerged_and_merged(tiny_model_dir, tmp_path):
    base = str(tiny_model_dir)
    adapter = make_smoa(base, tmp_path / "mlx", num_blocks=3, rank=7, dropout=0.1)  # off in eval()
    export_adapter("smoa", base, adapter, tmp_path / "pt", measure_parity=False)
    want = mlx_logits(base, adapter)
    assert rel(mlx_logits(base), want) > 1e-2

    model = hf_model(base)
    assert apply_adapter(model, tmp_path / "pt") == {"orders": "smoa_orders.safetensors"}
    assert rel(torch_logits(model), want) < 1e-4
    merge_and_unload(model)
    assert not any(isinstance(m, SMoALinear) for m in model.modules())
    assert rel(torch_logits(model), want) < 1e-4

    # Without the orders file (an authors' file) the orders are recomputed, identically here.
    (tmp_path / "pt" / "smoa_orders.safetensors").unlink()
    model = hf_model(base)
    report = apply_adapter(model, tmp_path / "pt")
    assert report["orders"] == "recomputed" and 0 < report["order_gap"] <= report["boundary_gap"]
    assert rel(torch_logits(model), want) < 1e-4


def test_refuses_another_peft_type(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    tmp_path.joinpath("adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="peft_type is 'LORA', expected 'SMOA'"):
        apply_adapter(hf_model(str(tiny_model_dir)), tmp_path)


def test_torch_and_layouts_never_import_convert():
    """layouts/ sits below convert/ (MLX) and torch/ (PyTorch); neither imports the other."""
    code = ("import sys, smoa_mlx.layouts.smoa, smoa_mlx.layouts.peft_io, smoa_mlx.torch; "
            "print(sorted(m for m in sys.modules if m.startswith('smoa_mlx.convert')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"
