"""Sharing a result: model cards, --upload-repo (network call replaced), fuse --export-gguf read
back with the gguf package, and the fuse check that catches an adapter lost to re-quantization."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.gguf import permute_weights
from mlx_lm.utils import load as mlx_lm_load

from smoa_mlx import apply_smoa, load, save_adapter
from smoa_mlx.adapters import smoa_config
from smoa_mlx.card import read_metadata, write_adapter_card
from smoa_mlx.cli import run
from smoa_mlx.gguf import permute, unpermute
from smoa_mlx.hub import adapter_files, staged_operations, upload_folder
from smoa_mlx.patch import smoa_layers


def smoa_adapter(base, out, seed=0, scale=1.0):
    model, _ = load(str(base))
    apply_smoa(model, rank=4, num_blocks=2, alpha=8.0)
    mx.random.seed(seed)
    for layer in smoa_layers(model).values():
        layer.smoa_b = [scale * mx.random.normal(b.shape) for b in layer.smoa_b]
    save_adapter(model, out, smoa_config(model, base_model=str(base)))
    return out


def cli(capsys, module_main, *argv):
    with pytest.raises(SystemExit) as e:
        run(module_main, [str(a) for a in argv])
    return e.value.code, capsys.readouterr()


def fuse(capsys, *argv):
    from smoa_mlx.fuse import main

    return cli(capsys, main, *argv)


@pytest.fixture
def base_with_card(tiny_model_dir, tmp_path):
    """The tiny model with a card naming its license and Hub origin."""
    path = tmp_path / "base"
    shutil.copytree(tiny_model_dir, path)
    (path / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: someone/tiny-llama\n---\n# tiny\n")
    return path


def trainable_count(adapter):
    return sum(v.size for k, v in mx.load(str(adapter / "adapters.safetensors")).items()
               if not k.endswith(("row_order", "col_order")))


def test_adapter_card_from_config_and_metrics(base_with_card, tmp_path):
    adapter = smoa_adapter(base_with_card, tmp_path / "run1")
    report = {"summary": {"all": {"count": 14, "shape": "mixed", "max_rank": 64,
                                  "rank_1pct": {"mean": 40.5, "min": 30, "max": 64},
                                  "entropy_rank": {"mean": 20.25, "min": 10.5, "max": 30.0}}}}
    write_adapter_card(adapter, {"train_loss": 1.2345, "val_loss": 1.5, "data": "data/sql", "steps": 100,
                                 "rank_report": report, "peak_memory_gb": 3.0})
    text = (adapter / "README.md").read_text()
    meta = read_metadata(adapter)
    assert meta["base_model"] == "someone/tiny-llama" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "mlx" and {"smoa", "mlx", "adapter"} <= set(meta["tags"])
    for fact in ("| rank r (per block) | 4 |", "| blocks K | 2 |", f"| trainable parameters | {trainable_count(adapter):,} |",
                 "| final train loss | 1.2345 |", "| final validation loss | 1.5000 |", "| data | `data/sql` |",
                 "40.5 / 30 / 64 of at most 64", "`self_attn.q_proj`", "in 2 layers",
                 f"smoa_mlx.load({str(base_with_card)!r}, adapter_path='run1')",
                 "convert export --format smoa", "fuse --model", "AutoModelForCausalLM.from_pretrained('run1-fused')"):
        assert fact in text, fact
    assert "peak_memory" not in text
    # Rewritten without metrics (e.g. after another save), the card keeps them.
    write_adapter_card(adapter)
    assert (adapter / "README.md").read_text() == text


def test_card_of_a_local_base_without_card(tiny_model_dir, tmp_path):
    adapter = smoa_adapter(tiny_model_dir, tmp_path / "a")
    write_adapter_card(adapter)
    meta = read_metadata(adapter)
    assert "base_model" not in meta and "license" not in meta  # a local path is no Hub id
    assert "License: that of the base model" in (adapter / "README.md").read_text()


class FakeHub:
    """HfApi with only its network methods replaced: records what would be sent."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi

        self.repos, self.commits = [], []
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: self.repos.append((repo_id, kw))
                            or f"https://huggingface.co/{repo_id}")
        monkeypatch.setattr(HfApi, "create_commit", lambda api, repo_id, operations, **kw:
                            self.commits.append((repo_id, {op.path_in_repo: _read(op) for op in operations})))


def _read(op):
    with open(op.path_or_fileobj, "rb") as f:
        return f.read()


def test_fuse_writes_card_gguf_and_uploads_exactly_the_folder(base_with_card, tmp_path, capsys, monkeypatch):
    hub = FakeHub(monkeypatch)
    adapter = smoa_adapter(base_with_card, tmp_path / "adapter")
    write_adapter_card(adapter, {"train_loss": 0.5, "val_loss": 0.75})
    out = tmp_path / "fused"
    code, printed = fuse(capsys, "--model", base_with_card, "--adapter-path", adapter, "--save-path", out,
                         "--export-gguf", "--upload-repo", "me/fused", "--upload-private")
    assert code == 0, printed.err
    assert "fuse check on" in printed.out and "100% of its effect kept" in printed.out
    files = sorted(p.name for p in out.iterdir())
    assert "README.md" in files and "ggml-model-f16.gguf" in files and "model.safetensors" in files
    assert hub.repos == [("me/fused", {"repo_type": "model", "private": True, "exist_ok": True})]
    (repo, sent), = hub.commits
    assert repo == "me/fused" and sorted(sent) == files
    assert all(sent[f] == (out / f).read_bytes() for f in files)
    meta = read_metadata(out)
    assert meta["library_name"] == "mlx" and meta["base_model"] == "someone/tiny-llama"
    assert meta["training_metrics"]["val_loss"] == 0.75 and meta["fuse_check"]["kept"] > 0.99
    assert "mlx_lm.load('fused')" in (out / "README.md").read_text()


def test_upload_of_an_adapter_sends_only_the_adapter(tiny_model_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    adapter = smoa_adapter(tiny_model_dir, tmp_path / "run")
    write_adapter_card(adapter)
    for extra in ("0000100_adapters.safetensors", "training_state.json", "metrics.jsonl"):
        (adapter / extra).write_text("x")
    (adapter / ".hidden").write_text("x")
    assert upload_folder(adapter, "me/run", files=adapter_files(adapter), log=lambda *_: None) == \
        "https://huggingface.co/me/run"
    (_, sent), = hub.commits
    assert sorted(sent) == ["README.md", "adapter_config.json", "adapters.safetensors"]
    assert [op.path_in_repo for op in staged_operations(adapter)] == [
        "0000100_adapters.safetensors", "README.md", "adapter_config.json", "adapters.safetensors",
        "metrics.jsonl", "training_state.json"]  # a whole folder never sends hidden files


def test_upload_failure_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    def offline(*a, **k):
        raise ConnectionError("no network\nsecond line")
    monkeypatch.setattr(HfApi, "create_repo", offline)
    adapter = smoa_adapter(tiny_model_dir, tmp_path / "run")
    with pytest.raises(ValueError, match=r"upload of .* to me/x failed: no network$"):
        upload_folder(adapter, "me/x")
    with pytest.raises(FileNotFoundError, match="nope"):
        upload_folder(tmp_path / "nope", "me/x")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gguf_reads_back_as_the_fused_weights(tiny_model_dir, tmp_path, capsys, dtype):
    gguf = pytest.importorskip("gguf")
    adapter = smoa_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "fused"
    assert fuse(capsys, "--model", tiny_model_dir, "--adapter-path", adapter, "--save-path", out,
                "--export-gguf", "--gguf-dtype", dtype, "--gguf-path", "m.gguf")[0] == 0
    model, tok, config = mlx_lm_load(str(out), return_config=True)
    fused = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    reader = gguf.GGUFReader(str(out / "m.gguf"))
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length"),
            field("llama.attention.head_count"), field("llama.attention.head_count_kv"),
            field("llama.rope.dimension_count"), field("llama.vocab_size")) == (2, 64, 160, 4, 2, 16, 320)
    assert field("general.file_type") == (1 if dtype == "float16" else 0)
    assert field("tokenizer.ggml.model") == "gpt2"
    vocab = tok._tokenizer.get_vocab()
    assert field("tokenizer.ggml.tokens") == [t for t, _ in sorted(vocab.items(), key=lambda x: x[1])]
    assert field("tokenizer.ggml.bos_token_id") == 1 and field("tokenizer.ggml.eos_token_id") == 2
    assert len(field("tokenizer.ggml.merges")) > 0
    names = {t.name: t for t in reader.tensors}
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    expected = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    for i in range(2):
        for g, h in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                     ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                     ("ffn_down", "mlp.down_proj"), ("attn_norm", "input_layernorm"),
                     ("ffn_norm", "post_attention_layernorm")):
            expected[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    assert set(names) == set(expected)  # tied embeddings: no output.weight
    tol = 0 if dtype == "float32" else 1e-3
    for g, h in expected.items():
        t = names[g]
        got = np.array(t.data, np.float32).reshape(fused[h].shape)  # numpy order = HF order
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if dtype == "float32" or got.ndim == 1
                                 else gguf.GGMLQuantizationType.F16), g
        if "attn_q" in g:
            got = unpermute(got, n_head, n_head)
        elif "attn_k" in g:
            got = unpermute(got, n_head, n_kv)
        np.testing.assert_allclose(got, fused[h], atol=tol * np.abs(fused[h]).max(), rtol=0, err_msg=g)


def test_qk_permutation_is_llama_cpps():
    """Our permute equals mlx-lm's independent copy of convert_hf_to_gguf's; unpermute inverts it;
    within a head, llama.cpp's rows pair (x_i, x_{i+d/2}) as neighbours."""
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    for heads, kv in ((8, 8), (8, 4)):
        rows = w[: 32 if heads == kv else 16]
        p = permute(rows, heads, kv)
        np.testing.assert_array_equal(p, np.array(permute_weights(mx.array(rows), heads, kv)))
        np.testing.assert_array_equal(unpermute(p, heads, kv), rows)
    head = w[:4]  # one head of dimension 4, HF order [x0, x1 | x2, x3]
    np.testing.assert_array_equal(permute(head, 1, 1), head[[0, 2, 1, 3]])


def test_gguf_spm_tokenizer_scores_follow_the_merges(stories_dir, tmp_path):
    gguf = pytest.importorskip("gguf")
    from smoa_mlx.gguf import write_gguf

    model, tok, config = mlx_lm_load(str(stories_dir), return_config=True)
    path = write_gguf(tmp_path / "s.gguf", dict(tree_flatten(model.parameters())), config, stories_dir, "float32")
    reader = gguf.GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama" and len(tokens) == config["vocab_size"]
    merges = json.loads((stories_dir / "tokenizer.json").read_text())["model"]["merges"]
    first = "".join(merges[0].split(" ") if isinstance(merges[0], str) else merges[0])
    assert scores[tokens.index(first)] == 0.0 and max(scores) == 0.0


def test_gguf_refuses_what_it_cannot_write(tiny_model_dir, tmp_path, capsys):
    from smoa_mlx.gguf import write_gguf

    with pytest.raises(ValueError, match="model_type 'gemma3'"):  # the multimodal wrapper
        write_gguf(tmp_path / "x.gguf", {}, {"model_type": "gemma3"}, tiny_model_dir)
    with pytest.raises(ValueError, match="rope_scaling type 'llama3'"):
        write_gguf(tmp_path / "x.gguf", {}, {"model_type": "llama", "rope_scaling": {"rope_type": "llama3"}},
                   tiny_model_dir)
    with pytest.raises(ValueError, match="--de-quantize"):
        write_gguf(tmp_path / "x.gguf", {}, {"model_type": "llama", "quantization": {"bits": 4}}, tiny_model_dir)


def test_fuse_warns_when_requantization_loses_the_adapter(tiny_model_dir, tmp_path, capsys):
    from mlx_lm import convert

    qbase = tmp_path / "q"
    convert(str(tiny_model_dir), str(qbase), quantize=True, q_group_size=32, q_bits=4)
    faint = smoa_adapter(qbase, tmp_path / "faint", scale=1e-3)  # far below the 4-bit step
    code, out = fuse(capsys, "--model", qbase, "--adapter-path", faint, "--save-path", tmp_path / "f1")
    assert code == 0
    line = next(l for l in out.out.splitlines() if "fuse check" in l)
    assert line.startswith("warning:") and "--de-quantize" in line
    kept = read_metadata(tmp_path / "f1")["fuse_check"]["kept"]
    assert kept < 0.5 and f"{kept:.0%} of its effect kept" in line
    code, out = fuse(capsys, "--model", qbase, "--adapter-path", faint, "--save-path", tmp_path / "f2",
                     "--de-quantize")
    assert code == 0 and "warning" not in out.out and read_metadata(tmp_path / "f2")["fuse_check"]["kept"] > 0.99


def test_convert_export_writes_a_card(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from smoa_mlx.convert.__main__ import main

    hub = FakeHub(monkeypatch)
    adapter = smoa_adapter(tiny_model_dir, tmp_path / "a")
    code, out = cli(capsys, main, "export", "--format", "smoa", "--model", tiny_model_dir, "--adapter-path",
                    adapter, "--out", tmp_path / "pt", "--no-parity", "--upload-repo", "me/pt")
    assert code == 0, out.err
    text = (tmp_path / "pt" / "README.md").read_text()
    assert "# pt" in text and "the SMoA authors' PyTorch layout" in text
    assert "README.md" in hub.commits[0][1]
    # Exporting again into the same directory works (the card is one of the files it writes).
    assert cli(capsys, main, "export", "--format", "smoa", "--model", tiny_model_dir, "--adapter-path",
               adapter, "--out", tmp_path / "pt", "--no-parity")[0] == 0


def test_train_upload_repo_sends_the_finished_adapter_and_its_card(tiny_model_dir, arith, tmp_path,
                                                                   monkeypatch):
    from smoa_mlx.train import train

    hub = FakeHub(monkeypatch)
    out = tmp_path / "run"
    result = train({"model": str(tiny_model_dir), "data": str(arith), "adapter_path": str(out),
                    "iters": 2, "batch_size": 4, "learning_rate": 5e-2, "warmup": 0,
                    "upload_repo": "me/run", "upload_private": True})
    assert hub.repos == [("me/run", {"repo_type": "model", "private": True, "exist_ok": True})]
    (repo, sent), = hub.commits
    assert sorted(sent) == ["README.md", "adapter_config.json", "adapters.safetensors"]
    assert all(sent[f] == (out / f).read_bytes() for f in sent)
    assert read_metadata(out)["training_metrics"]["val_loss"] == result["val_loss"]
