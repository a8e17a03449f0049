"""Converters against real PyTorch: transformers models, the peft library, and an
independent reimplementation of the authors' loader (SPEC §1 with float32 torch SVD).

Every adapter has random nonzero B, and each parity test also checks that the
adapter moves the logits far more than the tolerance, so agreement means something.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

from smoa_mlx import apply_smoa, load, save_adapter  # noqa: E402
from smoa_mlx.adapters import smoa_config  # noqa: E402
from smoa_mlx.cli import run  # noqa: E402
from smoa_mlx.convert import export_adapter, import_adapter  # noqa: E402
from smoa_mlx.convert.__main__ import main  # noqa: E402
from smoa_mlx.patch import smoa_layers  # noqa: E402
import smoa_mlx.plan as plan_module  # noqa: E402
import smoa_mlx.plan_cache as plan_cache  # noqa: E402
from smoa_mlx.convert.smoa import ORDERS  # noqa: E402
from smoa_mlx.plan import make_plan  # noqa: E402
from smoa_mlx.synthetic import make_llama  # noqa: E402
from smoa_mlx.torch import apply_adapter  # noqa: E402

TOL = 1e-4
TOKENS = np.array([[1, 5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2, 77]])
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
MEASURED = {}  # stories260K numbers, printed with -s for the closing note
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module", params=["tiny", "stories"])
def base(request, tiny_model_dir):
    return str(tiny_model_dir if request.param == "tiny" else request.getfixturevalue("stories_dir"))


def rel(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def record(base, name, value):
    if "stories" in base:
        MEASURED[name] = value
        print(f"\nstories260K-hf {name}: {value:.3e}")


def mlx_logits(base, adapter=None) -> np.ndarray:
    model, _ = load(base, adapter_path=None if adapter is None else str(adapter))
    return np.array(model(mx.array(TOKENS)))


def hf_model(base):
    return transformers.AutoModelForCausalLM.from_pretrained(base).float().eval()


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS)).logits.numpy()


def peft_logits(base, adapter_dir) -> np.ndarray:
    return torch_logits(peft.PeftModel.from_pretrained(hf_model(base), str(adapter_dir)).eval())


def assert_parity(base, name, got, want):
    err = rel(got, want)
    record(base, name, err)
    assert err < TOL, f"{name}: relative logit error {err:.3e}"
    assert rel(mlx_logits(base), want) > 100 * TOL, "the adapter barely changes the logits"


def make_smoa(base, out, num_blocks, rank=4, alpha=8.0, keys=TARGETS, num_layers=None, dropout=0.0, seed=0):
    """An MLX SMoA adapter with random A and B (std 1), saved to `out`."""
    model, _ = load(base)
    apply_smoa(model, keys=keys, num_layers=num_layers, rank=rank, num_blocks=num_blocks, alpha=alpha,
               dropout=dropout)
    mx.random.seed(seed)
    for layer in smoa_layers(model).values():
        layer.smoa_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
    save_adapter(model, out, smoa_config(model, base_model=base))
    return out


def tensors(path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


# ---------------------------------------------------------------- smoa (authors' layout)


def test_smoa_export_matches_torch_module_and_round_trips(base, tmp_path):
    adapter = make_smoa(base, tmp_path / "mlx", num_blocks=2, rank=5, dropout=0.05)  # uneven branch ranks
    export_adapter("smoa", base, adapter, tmp_path / "pt", measure_parity=False)
    config = json.loads((tmp_path / "pt" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SMOA" and config["branch_ranks"] == [3, 2] and config["lora_dropout"] == 0.05
    assert config["target_modules"] == sorted(TARGETS)
    model = hf_model(base)
    apply_adapter(model, tmp_path / "pt")
    assert_parity(base, "smoa export, logits vs smoa_mlx.torch", mlx_logits(base, adapter), torch_logits(model))

    import_adapter("smoa", base, tmp_path / "pt", tmp_path / "back", measure_parity=False)
    before, after = tensors(adapter / "adapters.safetensors"), tensors(tmp_path / "back" / "adapters.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        assert np.array_equal(before[key], after[key]), key
    old = json.loads((adapter / "adapter_config.json").read_text())
    new = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert new["smoa_parameters"] == old["smoa_parameters"] and new["modules"] == old["modules"]


def authors_orders(w: torch.Tensor):
    """The authors' loader: float32 torch SVD, energy-weighted mean index, torch.argsort."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)

    def order(vecs):
        j = torch.arange(vecs.shape[1], dtype=vecs.dtype)
        energy = vecs.pow(2) * s.pow(2)[None]
        score = (energy * j).sum(1) / energy.sum(1).clamp_min(torch.finfo(energy.dtype).eps)
        return torch.argsort(score)

    return order(u), order(vh.T)


def authors_adapter(base, src, loaded_in=torch.float32):
    """An authors'-layout adapter in `src`, built here, not by our exporter, with the orders
    their loader computes from the base loaded in dtype `loaded_in` (bfloat16 is their
    default), and the logits it gives (the rest of the model in float32, so only the
    orders differ between dtypes); also how many modules' orders `make_plan` of the
    float32 weight does not reproduce."""
    r, k_blocks, alpha = 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    model = hf_model(base)
    tensors_out, deltas, differ = {}, {}, 0
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        w = mod.weight.detach()
        rows, cols = authors_orders(w.to(loaded_in))
        plan = make_plan(w.numpy(), k_blocks)
        differ += not (np.array_equal(plan.row_order, rows.numpy()) and np.array_equal(plan.col_order, cols.numpy()))
        delta = torch.zeros_like(w)
        for k, (ri, ci) in enumerate(zip(torch.tensor_split(rows, k_blocks), torch.tensor_split(cols, k_blocks))):
            a = (torch.rand(r // k_blocks, len(ci), generator=gen) * 2 - 1) / len(ci) ** 0.5
            b = torch.randn(len(ri), r // k_blocks, generator=gen)
            tensors_out[f"base_model.model.{name}.lora_A.{k}.weight"] = a
            tensors_out[f"base_model.model.{name}.lora_B.{k}.weight"] = b
            delta[ri[:, None], ci[None, :]] = (b @ a) * w[ri][:, ci] * (alpha / r)
        deltas[name] = delta
    src.mkdir()
    safetensors_torch.save_file(tensors_out, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text(json.dumps({
        "peft_type": "SMOA", "r": r, "num_blocks": k_blocks, "branch_ranks": None, "lora_alpha": alpha,
        "lora_dropout": 0.05, "target_modules": TARGETS, "base_model_name_or_path": base,
        "fan_in_fan_out": False, "bias": "none", "task_type": "CAUSAL_LM",
    }))
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, inp, out, d=d: out + torch.nn.functional.linear(inp[0], d)) for n, d in deltas.items()]
    reference = torch_logits(model)
    for h in hooks:
        h.remove()
    return reference, differ, len(deltas)


def test_independent_authors_adapter_imports(base, tmp_path):
    """An authors'-layout adapter built here, not by our exporter, imports and matches."""
    src = tmp_path / "authors"
    reference, differ, n = authors_adapter(base, src)
    report = import_adapter("smoa", base, src, tmp_path / "mlx", measure_parity=False)
    print(f"\n{base}: authors' float32-SVD orders differ from make_plan in {differ}/{n} modules; "
          f"boundary gap {report['boundary_gap']:.3g}, within-order gap {report['order_gap']:.3g}, "
          f"{len(report['at_risk'])} modules flagged as near-ties")
    assert differ == 0, "make_plan disagrees with the authors' float32 SVD on this base"
    assert_parity(base, "authors' layout import, logits vs independent torch reference",
                  mlx_logits(base, tmp_path / "mlx"), reference)


def test_authors_bfloat16_orders_need_plan_dtype(base, tmp_path, capsys):
    """The authors' loader loads the base in bfloat16 by default and plans from the rounded
    weight: such an adapter matches its logits when imported with plan_dtype="bfloat16"
    and not without; exporting it back says which loader dtype would agree."""
    src = tmp_path / "authors"
    reference, differ, n = authors_adapter(base, src, loaded_in=torch.bfloat16)
    assert differ > 0, "bfloat16 rounding changes no order on this base: the test would prove nothing"
    import_adapter("smoa", base, src, tmp_path / "mlx16", measure_parity=False, plan_dtype="bfloat16")
    with capsys.disabled():
        assert_parity(base, "authors' bfloat16-planned adapter, import with plan_dtype=bfloat16",
                      mlx_logits(base, tmp_path / "mlx16"), reference)
    import_adapter("smoa", base, src, tmp_path / "mlx32", measure_parity=False)
    wrong = rel(mlx_logits(base, tmp_path / "mlx32"), reference)
    with capsys.disabled():
        record(base, "authors' bfloat16-planned adapter, import without plan_dtype", wrong)
        print(f"\n{base}: bfloat16 orders differ from float32 make_plan in {differ}/{n} modules; "
              f"logit error without plan_dtype {wrong:.3g}")
    assert wrong > 100 * TOL
    assert json.loads((tmp_path / "mlx16" / "adapter_config.json").read_text())["plan_dtype"] == "bfloat16"

    capsys.readouterr()
    report = export_adapter("smoa", base, tmp_path / "mlx16", tmp_path / "pt", measure_parity=False)
    assert report["bfloat16_orders_differ"] == [] and len(report["recomputed_orders_differ"]) == differ
    assert "loading the base in bfloat16 (torch_dtype=torch.bfloat16) it recomputes the saved orders" in \
        capsys.readouterr().out
    model = hf_model(base)
    apply_adapter(model, tmp_path / "pt")  # reads smoa_orders.safetensors: no recomputation at all
    assert rel(torch_logits(model), reference) < TOL
    model = hf_model(base)
    apply_adapter(model, src, plan_dtype="bfloat16")  # the authors' files: recomputes, as they do
    assert rel(torch_logits(model), reference) < TOL


def test_recomputed_orders_come_from_the_training_plan(tiny_model_dir, tmp_path, monkeypatch):
    """Importing an adapter without orders scores no weight that training already planned,
    and the cached plan is `make_plan`'s bit for bit (orders and reported gaps)."""
    base = str(tiny_model_dir)
    adapter = make_smoa(base, tmp_path / "mlx", num_blocks=3)  # plans through the cache, like training
    export_adapter("smoa", base, adapter, tmp_path / "pt", measure_parity=False)
    (tmp_path / "pt" / ORDERS).unlink()  # as the authors' files: the importer must recompute

    def fail(*args, **kwargs):
        raise AssertionError("scored a weight that training had already planned")

    monkeypatch.setattr(plan_cache, "spectral_scores", fail)
    monkeypatch.setattr(plan_module, "spectral_scores", fail)
    report = import_adapter("smoa", base, tmp_path / "pt", tmp_path / "back", measure_parity=False)
    monkeypatch.undo()

    before, after = tensors(adapter / "adapters.safetensors"), tensors(tmp_path / "back" / "adapters.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        assert np.array_equal(before[key], after[key]), key
    model, _ = load(base, adapter_path=str(tmp_path / "back"))
    plans = {p: make_plan(np.array(m.linear.weight), 3) for p, m in smoa_layers(model).items()}
    for p, m in smoa_layers(model).items():
        assert np.array_equal(np.array(m.row_order), plans[p].row_order), p
        assert np.array_equal(np.array(m.col_order), plans[p].col_order), p
    assert report["boundary_gap"] == min(pl.boundary_gap for pl in plans.values())
    assert report["order_gap"] == min(pl.order_gap for pl in plans.values())


# ---------------------------------------------------------------- hira


def test_hira_export_import(base, tmp_path):
    adapter = make_smoa(base, tmp_path / "mlx", num_blocks=1, rank=4, alpha=8.0)  # scale 2, folded
    export_adapter("hira", base, adapter, tmp_path / "pt", measure_parity=False)
    assert_parity(base, "hira export, logits vs peft", mlx_logits(base, adapter), peft_logits(base, tmp_path / "pt"))

    import_adapter("hira", base, tmp_path / "pt", tmp_path / "back", measure_parity=False)
    before, after = tensors(adapter / "adapters.safetensors"), tensors(tmp_path / "back" / "adapters.safetensors")
    assert before.keys() == after.keys()
    for key in before:  # scale alpha/r = 2 moved into B exactly; A and the orders unchanged
        assert np.array_equal(after[key], 2 * before[key] if ".smoa_b." in key else before[key]), key
    export_adapter("hira", base, tmp_path / "back", tmp_path / "pt2", measure_parity=False)
    first = tensors(tmp_path / "pt" / "adapter_model.safetensors")
    second = tensors(tmp_path / "pt2" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)


def test_real_peft_hira_imports(base, tmp_path):
    torch.manual_seed(0)
    cfg = peft.HiraConfig(r=4, target_modules=["k_proj", "up_proj", "o_proj"], rank_pattern={"up_proj": 2},
                          layers_to_transform=[0, 2], init_weights=False)
    model = peft.get_peft_model(hf_model(base), cfg).eval()
    model.save_pretrained(str(tmp_path / "pt"))
    import_adapter("hira", base, tmp_path / "pt", tmp_path / "mlx", measure_parity=False)
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    peft_modules = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "hira_A")}
    assert set(config["modules"]) == peft_modules and all(".layers.1." not in p for p in peft_modules)
    assert_parity(base, "peft HiraConfig import, logits vs peft",
                  mlx_logits(base, tmp_path / "mlx"), torch_logits(model))


# ---------------------------------------------------------------- lora


def test_lora_export_is_the_truncated_svd(base, tmp_path):
    adapter = make_smoa(base, tmp_path / "mlx", num_blocks=2, keys=["q_proj", "down_proj"], num_layers=1)
    report = export_adapter("lora", base, adapter, tmp_path / "r2", rank=2, measure_parity=False)
    config = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert all(t.startswith("model.layers.") for t in config["target_modules"])  # last layer only
    # Eckart-Young, independently: the error is the tail of ΔW's singular values.
    model, _ = load(base, adapter_path=str(adapter))
    for path, layer in smoa_layers(model).items():
        s = np.linalg.svd(np.array(layer.delta_weight(), np.float64), compute_uv=False)
        want = np.sqrt((s[2:] ** 2).sum() / (s**2).sum())
        assert report["module_errors"][path] == pytest.approx(want, rel=1e-3)
        assert want > 0.05  # an SMoA update is of much higher rank than 2
    # The rank-2 LoRA imports back and runs in MLX exactly as in peft.
    import_adapter("lora", base, tmp_path / "r2", tmp_path / "r2_mlx", measure_parity=False)
    assert_parity(base, "lora import of the rank-2 export, logits vs peft",
                  mlx_logits(base, tmp_path / "r2_mlx"), peft_logits(base, tmp_path / "r2"))
    # At full rank the export is exact.
    report = export_adapter("lora", base, adapter, tmp_path / "full", rank=172, measure_parity=False)
    assert report["relative_error"] < 1e-6
    assert_parity(base, "lora export at full rank, logits vs peft",
                  mlx_logits(base, adapter), peft_logits(base, tmp_path / "full"))


def test_real_peft_lora_imports(base, tmp_path):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"],
                          rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=True,
                          init_lora_weights=False)
    model = peft.get_peft_model(hf_model(base), cfg).eval()
    model.save_pretrained(str(tmp_path / "pt"))
    import_adapter("lora", base, tmp_path / "pt", tmp_path / "mlx", measure_parity=False)
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    peft_modules = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert set(config["lora_parameters"]["keys"]) == peft_modules
    assert_parity(base, "peft LoraConfig import, logits vs peft",
                  mlx_logits(base, tmp_path / "mlx"), torch_logits(model))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_any_float_dtype_is_cast_to_float32_with_a_note(dtype, tiny_model_dir, tmp_path, capsys):
    """PEFT saves adapters in the dtype they trained in; import casts to float32 and says so.
    The values are those of the saved tensors (float64 -> float32 rounds, the rest is exact)."""
    base = str(tiny_model_dir)
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    peft.get_peft_model(hf_model(base), cfg).save_pretrained(str(tmp_path / "pt"))
    weights = tmp_path / "pt" / "adapter_model.safetensors"
    saved = {k: v.to(dtype) for k, v in safetensors_torch.load_file(str(weights)).items()}
    safetensors_torch.save_file(saved, str(weights))
    import_adapter("lora", base, tmp_path / "pt", tmp_path / "mlx", measure_parity=False)
    name = {torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    assert f"holds {name} tensors; cast to float32" in capsys.readouterr().out
    got = tensors(tmp_path / "mlx" / "adapters.safetensors")
    for key, value in saved.items():
        path, leaf = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        mine = got[f"{path}.lora_{leaf[0].lower()}"]
        assert mine.dtype == np.float32
        np.testing.assert_array_equal(mine, value.float().numpy().T)


# ---------------------------------------------------------------- command line and bad input


def cli(argv, capsys):
    """(exit code, captured out/err), err without the once-per-process BLAS warning."""
    with pytest.raises(SystemExit) as e:
        run(main, argv)
    res = capsys.readouterr()
    err = "".join(x for x in res.err.splitlines(keepends=True) if not x.startswith("warning: MLX's CPU backend"))
    return e.value.code, type(res)(res.out, err)


def test_help(capsys):
    for argv in (["--help"], ["import", "--help"], ["export", "--help"], ["gguf", "--help"]):
        code, out = cli(argv, capsys)
        assert code == 0 and "usage:" in out.out


def test_cli_import_and_export_measure_parity(tiny_model_dir, tmp_path, capsys):
    adapter = make_smoa(str(tiny_model_dir), tmp_path / "mlx", num_blocks=2)
    code, out = cli(["export", "--format", "smoa", "--model", str(tiny_model_dir), "--adapter-path",
                     str(adapter), "--out", str(tmp_path / "pt")], capsys)
    assert code == 0 and "smallest within-order gap" in out.out
    line = next(x for x in out.out.splitlines() if x.startswith("parity MLX vs PyTorch"))
    assert float(line.split("logit error ")[1].split()[0]) < TOL
    code, out = cli(["import", "--format", "smoa", "--model", str(tiny_model_dir), "--src",
                     str(tmp_path / "pt"), "--out", str(tmp_path / "back")], capsys)
    assert code == 0 and "orders read from" in out.out and "parity MLX vs PyTorch" in out.out


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """A tiny-model SMoA adapter (K = 2) and its smoa export."""
    root = tmp_path_factory.mktemp("exported")
    adapter = make_smoa(str(tiny_model_dir), root / "mlx", num_blocks=2)
    export_adapter("smoa", str(tiny_model_dir), adapter, root / "pt", measure_parity=False)
    return adapter, root / "pt"


def edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    t = {k: v.numpy() for k, v in safetensors_torch.load_file(str(dst / "adapter_model.safetensors")).items()}
    edit(t)
    safetensors_torch.save_file({k: torch.from_numpy(v) for k, v in t.items()}, str(dst / "adapter_model.safetensors"))
    return dst


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.0.weight"


@pytest.mark.parametrize("case, message", [
    ("missing", f"missing tensor {KEY}"),
    ("extra", "unexpected tensor base_model.model.model.layers.0.self_attn.o_proj.lora_A.0.weight"),
    ("shape", f"tensor {KEY} has shape (2, 31), expected (2, 32)"),
    ("peft_type", "peft_type is 'SMOA', expected 'LORA'"),
    ("pickle", "pickle checkpoints are refused"),
    ("pickle_file", "pickle checkpoints are refused"),
    ("base", "_proj.lora_"),
])
def test_bad_import_input(case, message, exported, tiny_model_dir, tmp_path, capsys):
    src, fmt, model = exported[1], "smoa", str(tiny_model_dir)
    if case == "missing":
        src = edited_copy(src, tmp_path / "src", lambda t: t.pop(KEY))
    elif case == "extra":
        src = edited_copy(src, tmp_path / "src", lambda t: t.update({KEY.replace("q_proj", "o_proj"): t[KEY].copy()}))
    elif case == "shape":
        src = edited_copy(src, tmp_path / "src", lambda t: t.update({KEY: t[KEY][:, :31].copy()}))
    elif case == "peft_type":
        fmt = "lora"
    elif case in ("pickle", "pickle_file"):
        (tmp_path / "src").mkdir()
        shutil.copy(src / "adapter_config.json", tmp_path / "src")
        (tmp_path / "src" / "adapter_model.bin").write_bytes(b"not read")
        src = tmp_path / "src" / ("adapter_model.bin" if case == "pickle_file" else "")
    elif case == "base":  # a Llama like the tiny one but with intermediate_size 128, not 160
        model = str(make_llama(tmp_path / "other", intermediate_size=128))
    out = tmp_path / "out"
    code, res = cli(["import", "--format", fmt, "--model", model, "--src", str(src), "--out", str(out),
                     "--no-parity"], capsys)
    assert code == 1 and message in res.err
    assert res.err.startswith("error: ") and res.err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_bad_export_input(exported, tiny_model_dir, tmp_path, capsys):
    adapter = exported[0]
    other = make_llama(tmp_path / "other", seed=1)  # same shapes, other weights
    cases = [
        (["--format", "hira", "--model", str(tiny_model_dir)], "HiRA is SMoA with one block"),
        (["--format", "smoa", "--model", str(other)], "different base model"),
        (["--format", "smoa", "--model", str(tiny_model_dir), "--rank", "4"], "--rank applies to --format lora only"),
    ]
    for argv, message in cases:
        code, res = cli(["export", *argv, "--adapter-path", str(adapter), "--out", str(tmp_path / "out")], capsys)
        assert code == 1 and message in res.err and res.err.count("\n") == 1
        assert not (tmp_path / "out").exists()


def test_output_directory_is_replaced_whole_or_not_at_all(exported, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["import", "--format", "smoa", "--model", str(tiny_model_dir), "--src", str(exported[1]),
            "--out", str(out), "--no-parity"]
    assert cli(args, capsys)[0] == 0
    assert cli(args, capsys)[0] == 0  # our own previous output is replaced
    (out / "notes.txt").write_text("mine")
    code, res = cli(args, capsys)
    assert code == 1 and "holds notes.txt" in res.err
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapters.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging leftovers


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def config_edit(**changes):
    def edit(src):
        path = src / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def orders_edit(edit):
    def change(src):
        path = src / ORDERS
        t = {k: v.numpy() for k, v in safetensors_torch.load_file(str(path)).items()}
        edit(t)
        safetensors_torch.save_file({k: torch.from_numpy(v) for k, v in t.items()}, str(path))
    return change


ROWS = "base_model.model.model.layers.0.self_attn.q_proj.row_order"
WEIGHTS = "adapter_model.safetensors"
MALFORMED = [
    # adapter_config.json
    (lambda s: (s / "adapter_config.json").write_text("[1, 2]"), "adapter_config.json: expected a JSON object, found a list"),
    (lambda s: (s / "adapter_config.json").write_text('{"r": 4,\n "x": }'), "adapter_config.json:2: invalid JSON"),
    (config_edit(peft_type=None), "adapter_config.json: peft_type is None, expected 'SMOA'"),
    (config_edit(r=None), "adapter_config.json: r is missing"),
    (config_edit(r="4"), "adapter_config.json: r must be an integer >= 1, got '4'"),
    (config_edit(r=0), "adapter_config.json: r must be an integer >= 1, got 0"),
    (config_edit(r=4.5), "adapter_config.json: r must be an integer >= 1, got 4.5"),
    (config_edit(target_modules=5), "adapter_config.json: target_modules must be a list of module names or a regex"),
    (config_edit(target_modules="q_proj(["), "adapter_config.json: target_modules 'q_proj([' is not a valid regex"),
    (config_edit(target_modules=["nothing_here"]), "adapter_config.json: target_modules ['nothing_here'] match no"),
    (config_edit(rank_pattern={"q_proj": "2"}), "adapter_config.json: rank_pattern['q_proj'] must be an integer"),
    (config_edit(rank_pattern="q_proj"), "adapter_config.json: rank_pattern must be an object"),
    (config_edit(alpha_pattern={"(": 2}), "adapter_config.json: alpha_pattern '(' is not a valid regex"),
    (config_edit(lora_alpha="8"), "adapter_config.json: lora_alpha must be a number, got '8'"),
    (config_edit(lora_dropout=-0.1), "adapter_config.json: lora_dropout must be a number >= 0"),
    (config_edit(layers_to_transform="0"), "adapter_config.json: layers_to_transform must be a list of integers"),
    (config_edit(num_blocks=0), "adapter_config.json: num_blocks must be an integer >= 1, got 0"),
    (config_edit(branch_ranks=[3, 3]), "adapter_config.json: branch_ranks [3, 3] must have num_blocks=2"),
    (config_edit(bias="all"), "adapter_config.json: bias='all' is not supported"),
    # adapter_model.safetensors
    (lambda s: (s / WEIGHTS).write_bytes(b"abc"), f"{WEIGHTS}: not a safetensors file (header length"),
    (lambda s: (s / WEIGHTS).write_bytes(b"\x04\0\0\0\0\0\0\0{{{{"), f"{WEIGHTS}: not a safetensors file (header is not JSON"),
    (lambda s: (s / WEIGHTS).write_bytes(safetensors_bytes([1])), f"{WEIGHTS}: not a safetensors file (header is not a JSON object)"),
    (lambda s: (s / WEIGHTS).write_bytes(safetensors_bytes({"t": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0")),
     f"{WEIGHTS}: tensor t has dtype F8_E4M3"),
    (lambda s: (s / WEIGHTS).write_bytes(safetensors_bytes({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)),
     f"{WEIGHTS}: tensor t (F32 [4]) does not fit bytes 0-16 of the 8"),
    (lambda s: (s / WEIGHTS).write_bytes(safetensors_bytes({"t": {"dtype": "F32", "shape": "4"}})),
     f"{WEIGHTS}: tensor t has a malformed header entry"),
    # smoa_orders.safetensors
    (orders_edit(lambda t: t.update({ROWS: t[ROWS].astype(np.float32)})), f"{ORDERS}: {ROWS} is not a permutation"),
    (orders_edit(lambda t: t.update({ROWS: np.zeros_like(t[ROWS])})), f"{ORDERS}: {ROWS} is not a permutation"),
    (orders_edit(lambda t: t.update({ROWS: t[ROWS][:5].copy()})), f"{ORDERS}: tensor {ROWS} has shape (5,), expected (64,)"),
]


@pytest.mark.parametrize("edit, message", MALFORMED, ids=[m[1].split(": ", 1)[-1][:48] for m in MALFORMED])
def test_malformed_peft_files_are_one_line(edit, message, exported, tiny_model_dir, tmp_path, capsys):
    """Every file import reads: a bad one is one line naming it, exit 1, nothing written."""
    src = tmp_path / "src"
    shutil.copytree(exported[1], src)
    edit(src)
    out = tmp_path / "out"
    code, res = cli(["import", "--format", "smoa", "--model", str(tiny_model_dir), "--src", str(src),
                     "--out", str(out), "--no-parity"], capsys)
    assert code == 1 and res.err.count("\n") == 1 and res.err.startswith(f"error: {src}"), res.err
    assert message in res.err
    assert not out.exists()


def test_plan_dtype_is_for_smoa_only(exported, tiny_model_dir, tmp_path, capsys):
    code, res = cli(["import", "--format", "lora", "--model", str(tiny_model_dir), "--src", str(exported[1]),
                     "--out", str(tmp_path / "out"), "--plan-dtype", "bfloat16"], capsys)
    assert code == 1 and "--plan-dtype applies to --format smoa only" in res.err



def test_pickle_refusal_gives_a_command_that_converts_it(exported, tiny_model_dir, tmp_path, capsys):
    """The authors' save_pretrained writes adapter_model.bin: refused, and the command the
    message gives (run by the user, never by us) turns it into an adapter that imports."""
    import subprocess
    import sys

    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(exported[1] / "adapter_config.json", src)
    torch.save(safetensors_torch.load_file(str(exported[1] / "adapter_model.safetensors")), src / "adapter_model.bin")
    args = ["import", "--format", "smoa", "--model", str(tiny_model_dir), "--src", str(src), "--no-parity"]
    code, res = cli(args + ["--out", str(tmp_path / "refused")], capsys)
    assert code == 1 and "pickle checkpoints are refused" in res.err
    command = res.err.split("python -c ", 1)[1].split('" (README')[0].strip('"')
    subprocess.run([sys.executable, "-c", command], cwd=src, check=True)
    assert cli(args + ["--out", str(tmp_path / "mlx")], capsys)[0] == 0
    import_adapter("smoa", str(tiny_model_dir), exported[1], tmp_path / "direct", measure_parity=False)
    got, want = tensors(tmp_path / "mlx" / "adapters.safetensors"), tensors(tmp_path / "direct" / "adapters.safetensors")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
