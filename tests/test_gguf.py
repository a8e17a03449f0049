"""GGUF in: tiny GGUFs written here as llama.cpp's convert_hf_to_gguf writes them (gguf's own
GGUFWriter, hparam setters and tensor names; mlx-lm's Q/K permutation; Gemma norms as 1 + w),
loaded through `--model`, checked against the model they were written from, against
transformers' own GGUF loading (an independent reader), and bit for bit against the `gguf`
package's de-quantization."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import smoa_mlx
from smoa_mlx.errors import MissingFileError, ModelError
from smoa_mlx.gguf import locate, read
from smoa_mlx.gguf.model import convert_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512,
            tie_word_embeddings=True)
ARCH_CONFIGS = {
    "llama": dict(tie_word_embeddings=False),
    "qwen2": {},
    "qwen3": dict(head_dim=128),  # transformers reads no head_dim for qwen3: its default
    "gemma": dict(head_dim=16),
    # transformers' Gemma 2/3 configs keep query_pre_attn_scalar 256, llama.cpp uses head_dim
    "gemma2": dict(head_dim=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   query_pre_attn_scalar=256, sliding_window=256),
    # six layers: the sixth is Gemma 3's global-attention layer
    "gemma3_text": dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=256, rope_theta=1e6,
                        num_hidden_layers=6),
}
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
             "gemma3_text": "gemma3"}
TEXTS = ["Once upon a time there was a little model.", "  spaces, ünïcödé 日本語 🤖\n\tQ: 2+3? A: 5",
         "<s>Question: what is two plus three?</s>"]


def tiny_model(model_type, vocab_size, seed=0, **overrides):
    """mlx-lm's model of this type with every parameter random (norms too, so a missed
    Gemma offset shows), float32."""
    from mlx_lm.utils import _get_classes

    config = {"model_type": model_type, "vocab_size": vocab_size, **BASE, **ARCH_CONFIGS[model_type],
              **overrides}
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.random.seed(seed)
    params = {k: (1.0 if k.endswith("norm.weight") and not model_type.startswith("gemma") else 0.0)
              + 0.3 * mx.random.normal(v.shape) for k, v in tree_flatten(model.parameters())}
    model.load_weights(list(params.items()))
    return model, config


def write_gguf(path, model, config, tokenizer_dir, types=None, file_type=None):
    """`model` as llama.cpp writes it. `types`: GGUF tensor name -> ggml type (default F32)."""
    from mlx_lm.gguf import permute_weights

    model_type = config["model_type"]
    arch = GGUF_ARCH[model_type]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    if "head_dim" in config:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    if model_type == "gemma2":
        w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
    if "sliding_window" in config:
        w.add_sliding_window(config["sliding_window"])
    if file_type is not None:
        w.add_file_type(file_type)
    vocab = gguf.vocab.BpeVocab(tokenizer_dir)
    tokens, _, toktypes = zip(*vocab.all_tokens())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(list(tokens))
    w.add_token_types(list(toktypes))
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     config["num_hidden_layers"])
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    for name, value in tree_flatten(model.parameters()):
        a = np.array(value, dtype=np.float32)
        if model_type == "llama" and name.endswith("q_proj.weight"):
            a = np.array(permute_weights(a, heads, heads))
        elif model_type == "llama" and name.endswith("k_proj.weight"):
            a = np.array(permute_weights(a, heads, kv))
        if model_type.startswith("gemma") and name.endswith("norm.weight"):
            a = a + 1
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        kind = (types or {}).get(gname, Q.F32)
        if kind == Q.F16:
            w.add_tensor(gname, a.astype(np.float16))
        elif kind == Q.F32:
            w.add_tensor(gname, a)
        elif kind in (Q.Q6_K, Q.Q4_K):  # gguf cannot quantize K types: random blocks, sane scales
            w.add_tensor(gname, k_blocks(a.shape, kind), raw_dtype=kind)
        else:
            w.add_tensor(gname, gguf.quants.quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def k_blocks(shape, kind, seed=0):
    """Random K-quant blocks with small float16 super-block scales."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    d = np.full(raw.shape[:2] + (1,), 0.01, np.float16).view(np.uint8)
    if kind == Q.Q6_K:
        raw[..., 208:210] = d
    else:  # Q4_K: d, dmin at the front
        raw[..., 0:2] = d
        raw[..., 2:4] = d
    return raw.reshape(shape[0], -1)


def logits(model, ids):
    return np.array(model(mx.array([ids])).astype(mx.float32)[0], dtype=np.float64)


def transformers_logits(gguf_file, ids):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                              dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].double().numpy()


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tok_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.mark.parametrize("model_type", list(ARCH_CONFIGS))
def test_architectures_load_as_written_and_as_transformers_reads_them(model_type, tok_dir, tmp_path):
    from transformers import AutoTokenizer

    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    model, config = tiny_model(model_type, vocab)
    path = write_gguf(tmp_path / f"{model_type}.gguf", model, config, tok_dir)
    ours, tokenizer, cfg = smoa_mlx.load(str(path), return_config=True)
    assert cfg["model_type"] == model_type and "quantization" not in cfg
    original = AutoTokenizer.from_pretrained(str(tok_dir))
    for text in TEXTS:
        assert tokenizer.encode(text) == original.encode(text), text
    ids = tokenizer.encode(TEXTS[0])
    assert rel_err(logits(ours, ids), logits(model, ids)) < 1e-5
    if model_type != "gemma":  # transformers does not read gemma (1) GGUFs
        assert rel_err(logits(ours, ids), transformers_logits(path, ids)) < 1e-5


@pytest.mark.parametrize("native", [True, False], ids=["mx.load", "gguf-reader"])
def test_quantized_types_are_lossless_and_mixed_types_load(native, tok_dir, tmp_path):
    """Q4_0/Q4_1/Q8_0 kept quantized, bit for bit the gguf package's values (float32); a
    Q6_K tensor de-quantized with a note (then MLX's loader refuses the file, so every
    tensor goes through our NumPy packing: both paths are checked)."""
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    model, config = tiny_model("llama", vocab, seed=1, intermediate_size=256)  # a K-quant row is 256 wide
    types = {"token_embd.weight": Q.Q8_0, "output.weight": Q.F16, "blk.0.attn_q.weight": Q.Q4_0,
             "blk.0.attn_k.weight": Q.Q4_1, "blk.1.attn_q.weight": Q.Q4_1, "blk.1.ffn_up.weight": Q.Q8_0,
             "blk.0.ffn_down.weight": Q.Q4_0}
    if not native:  # types MLX's loader would get wrong: read with gguf's reader
        types.update({"blk.1.ffn_down.weight": Q.Q6_K, "blk.1.attn_k.weight": Q.BF16})
    path = write_gguf(tmp_path / "q.gguf", model, config, tok_dir, types,
                      file_type=gguf.LlamaFileType.MOSTLY_Q4_1)
    g = read.read_gguf(path)
    assert (g.notes != []) == (not native)
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        expected = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        base = t.name[:-len(".weight")]
        bits = read.quantized_bits(g.tensors, base)
        assert (bits is not None) == (t.tensor_type.name in read.BITS), t.name
        if bits is None:
            got = np.array(g.tensors[t.name].astype(mx.float32))
            tol = 1e-3 if t.tensor_type == Q.Q6_K else 0  # de-quantized to float16
        else:
            got = np.array(mx.dequantize(g.tensors[t.name], g.tensors[f"{base}.scales"].astype(mx.float32),
                                         g.tensors[f"{base}.biases"].astype(mx.float32),
                                         group_size=32, bits=bits))
            tol = 0
        np.testing.assert_allclose(got, expected.reshape(got.shape), rtol=tol, atol=0, err_msg=t.name)

    ours, tokenizer, cfg = smoa_mlx.load(str(path), return_config=True)
    q = cfg["quantization"]
    assert q["bits"] == 4 and q["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert q["model.layers.1.mlp.up_proj"]["bits"] == 8
    assert type(ours.model.embed_tokens).__name__ == "QuantizedEmbedding"
    assert ours.model.layers[1].mlp.down_proj.weight.dtype == (mx.float32 if native else mx.float16)
    assert ours.model.layers[1].self_attn.k_proj.weight.dtype == (mx.float32 if native else mx.bfloat16)
    ids = tokenizer.encode(TEXTS[0])
    # transformers de-quantizes to float32; we keep the Q6_K tensor as float16 (rounded once)
    assert rel_err(logits(ours, ids), transformers_logits(path, ids)) < (1e-5 if native else 1e-3)


def test_convert_gguf_saves_a_dir_that_loads_identically(tok_dir, tmp_path, make_adapter):
    from smoa_mlx.convert.__main__ import main

    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    model, config = tiny_model("llama", vocab, seed=2)
    path = write_gguf(tmp_path / "m.gguf", model, config, tok_dir, {"blk.0.attn_q.weight": Q.Q4_0},
                      file_type=gguf.LlamaFileType.MOSTLY_Q4_0)
    assert main(["gguf", "--model", str(path), "--save-path", str(tmp_path / "mlx")]) == 0
    assert main(["gguf", "--model", str(path), "--save-path", str(tmp_path / "f16"), "--dequantize"]) == 0
    ids = [1, 5, 9, 33, 100]
    a, _ = smoa_mlx.load(str(path))
    b, _ = smoa_mlx.load(str(tmp_path / "mlx"))
    c, _, cfg = smoa_mlx.load(str(tmp_path / "f16"), return_config=True)
    assert np.array_equal(logits(a, ids), logits(b, ids))
    assert "quantization" not in cfg and c.model.layers[0].self_attn.q_proj.weight.dtype == mx.float16
    assert rel_err(logits(c, ids), logits(a, ids)) < 1e-2
    # the fingerprints of the GGUF's quantized weights match the de-quantized copy's
    adapter = make_adapter(path, tmp_path / "adapter", b=0.05)
    on_gguf, _ = smoa_mlx.load(str(path), adapter_path=str(adapter))
    on_f16, _ = smoa_mlx.load(str(tmp_path / "f16"), adapter_path=str(adapter))
    assert rel_err(logits(on_f16, ids), logits(on_gguf, ids)) < 1e-2


def test_the_converted_directory_is_cached_by_file_identity(tok_dir, tmp_path, plan_cache_dir, capsys,
                                                           monkeypatch):
    from smoa_mlx.loader import model_dir

    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    model, config = tiny_model("qwen2", vocab)
    path = write_gguf(tmp_path / "c.gguf", model, config, tok_dir)
    first = model_dir(str(path))
    assert first.parent == plan_cache_dir / "gguf" and "cached at" in capsys.readouterr().err
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert model_dir(str(path)) == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert "cached at" not in capsys.readouterr().err
    write_gguf(path, *tiny_model("qwen2", vocab, seed=3), tok_dir)  # a new file: a new entry
    assert model_dir(str(path)) != first
    monkeypatch.setenv("SMOA_MLX_CACHE", "0")  # cache off: a temporary directory for this process
    off = model_dir(str(path))
    assert plan_cache_dir not in off.parents and (off / "config.json").is_file()


def test_lm_studio_dirs_and_ollama_names_resolve(tmp_path, monkeypatch):
    lm = tmp_path / "lmstudio" / "org" / "model"
    lm.mkdir(parents=True)
    (lm / "model-Q4_0.gguf").write_bytes(b"GGUF")
    assert locate.gguf_path(str(lm)) == lm / "model-Q4_0.gguf"
    (lm / "model-Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="holds 2 GGUF files .*model-Q4_0.gguf, model-Q8_0.gguf.*pass one"):
        locate.gguf_path(str(lm))

    root = tmp_path / "ollama"
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    for repo, tag, digest in (("library/smol", "latest", "ab12"), ("me/tuned", "v2", "cd34")):
        manifest = root / "manifests" / "registry.ollama.ai" / repo / tag
        manifest.parent.mkdir(parents=True)
        manifest.write_text(json.dumps({"layers": [
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:0000"},
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"}]}))
        (root / "blobs").mkdir(exist_ok=True)
        (root / "blobs" / f"sha256-{digest}").write_bytes(b"GGUF")
    assert locate.gguf_path("ollama:smol") == root / "blobs" / "sha256-ab12"
    assert locate.gguf_path("ollama:smol:latest") == root / "blobs" / "sha256-ab12"
    assert locate.gguf_path("ollama:me/tuned:v2") == root / "blobs" / "sha256-cd34"
    with pytest.raises(MissingFileError, match=r"ollama:smol:7b: not pulled .*ollama pull smol:7b"):
        smoa_mlx.load("ollama:smol:7b")


def test_bad_ggufs_are_one_line_naming_the_file_and_write_nothing(tok_dir, tmp_path, plan_cache_dir):
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    model, config = tiny_model("llama", vocab)
    good = write_gguf(tmp_path / "good.gguf", model, config, tok_dir).read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good[: len(good) // 2])
    unknown_arch = tmp_path / "unknown_arch.gguf"
    unknown_arch.write_bytes(good.replace(b"llama", b"zzzzz"))
    bad_type = tmp_path / "bad_type.gguf"
    w = gguf.GGUFWriter(str(bad_type), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    data = bytearray(bad_type.read_bytes())
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4 + 2 * 8
    data[at:at + 4] = (99).to_bytes(4, "little")  # ggml type 99
    bad_type.write_bytes(bytes(data))
    cases = {truncated: "not a readable GGUF file", bad_type: "unknown tensor type",
             unknown_arch: "architecture 'zzzzz' is not supported"}
    cached = set((plan_cache_dir / "gguf").glob("*"))
    for path, message in cases.items():
        with pytest.raises(ModelError, match=message) as e:
            smoa_mlx.load(str(path))
        assert "\n" not in str(e.value) and str(path) in str(e.value), str(e.value)
        with pytest.raises(ModelError):
            convert_gguf(str(path), tmp_path / "out")
        assert not (tmp_path / "out").exists()
    assert set((plan_cache_dir / "gguf").glob("*")) == cached


def test_a_gguf_without_tokenizer_is_one_line(tok_dir, tmp_path):
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    model, config = tiny_model("qwen2", vocab)
    path = write_gguf(tmp_path / "t.gguf", model, config, tok_dir)
    g = read.read_gguf(path)
    w = gguf.GGUFWriter(str(tmp_path / "no_tok.gguf"), "qwen2")
    for key, value in g.metadata.items():
        if not key.startswith(("tokenizer.", "general.architecture")) and isinstance(value, int):
            w.add_uint32(key, value)
        elif not key.startswith(("tokenizer.", "general.architecture")) and isinstance(value, float):
            w.add_float32(key, value)
    for name, value in g.tensors.items():
        w.add_tensor(name, np.array(value))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelError, match=r"no_tok.gguf: the GGUF has no tokenizer"):
        smoa_mlx.load(str(tmp_path / "no_tok.gguf"))


def test_sentencepiece_llama_vocabulary_round_trips(stories_dir, tmp_path):
    """A SentencePiece ("llama") vocabulary, written by the project's own GGUF writer from the
    real stories260K Llama: same tokens and logits as the original directory."""
    from mlx.utils import tree_flatten as flat
    from transformers import AutoTokenizer

    from smoa_mlx.gguf import write_gguf as project_writer

    model, tokenizer, config = smoa_mlx.load(str(stories_dir), return_config=True)
    path = project_writer(tmp_path / "stories.gguf", dict(flat(model.parameters())), config, stories_dir,
                          "float32")
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.model"].contents() == "llama"
    ours, our_tok = smoa_mlx.load(str(path))
    original = AutoTokenizer.from_pretrained(str(stories_dir))
    for text in ["Once upon a time, there was a little girl named Lily.", "  Tom said: \"Hi!\"\n\nThe end",
                 "ünïcödé 日本語"]:
        assert our_tok.encode(text) == original.encode(text), text
        assert our_tok.decode(our_tok.encode(text)) == original.decode(original.encode(text))
    ids = original.encode("Once upon a time, there was a little girl")
    assert rel_err(logits(ours, ids), logits(model, ids)) < 1e-5


def test_llama3_rope_frequency_factors_become_mlx_lm_rope_scaling(tok_dir, tmp_path):
    """Llama 3.1+ GGUFs carry RoPE scaling as per-frequency factors (rope_freqs, computed as
    convert_hf_to_gguf does below); loaded, the model is mlx-lm's with that rope_scaling."""
    import math

    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    model, config = tiny_model("llama", vocab, rope_scaling=scaling, rope_theta=500000.0,
                               num_attention_heads=1, num_key_value_heads=1)  # head_dim 64, as Llama 3.2
    dims = config["hidden_size"]
    factors = []
    for freq in 1.0 / (500000.0 ** (np.arange(0, dims, 2, dtype=np.float32) / dims)):
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4.0:
            factors.append(1.0)
        elif wavelen > 8192 / 1.0:
            factors.append(32.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 32.0 + smooth))
    path = write_gguf(tmp_path / "l3.gguf", model, config, tok_dir)
    data = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "l3r.gguf"), "llama")  # the same file plus rope_freqs
    for key, field in data.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            kind = field.types[0]
            value = field.contents()
            if kind == gguf.GGUFValueType.ARRAY:
                w.add_array(key, value)
            else:
                w.add_key_value(key, value, kind)
    for t in data.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.add_tensor("rope_freqs.weight", np.array(factors, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ours, _, cfg = smoa_mlx.load(str(tmp_path / "l3r.gguf"), return_config=True)
    got = cfg["rope_scaling"]
    assert got["rope_type"] == "llama3" and got["factor"] == 32.0
    assert got["low_freq_factor"] == pytest.approx(1.0, rel=1e-4)
    assert got["high_freq_factor"] == pytest.approx(4.0, rel=1e-4)
    ids = list(range(1, 40))
    assert rel_err(logits(ours, ids), logits(model, ids)) < 1e-5


def test_fuse_and_adapters_on_a_gguf_base(tok_dir, tmp_path, make_adapter):
    """An adapter made on the GGUF fuses through `fuse` (the base's files come from the
    converted directory) into the model the adapter gives, quantized layers included."""
    from smoa_mlx.fuse import fuse

    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    model, config = tiny_model("llama", vocab, seed=4)
    path = write_gguf(tmp_path / "f.gguf", model, config, tok_dir, {"blk.1.attn_q.weight": Q.Q8_0},
                      file_type=gguf.LlamaFileType.MOSTLY_Q8_0)
    adapter = make_adapter(path, tmp_path / "adapter", b=0.05)
    fuse(str(path), adapter, tmp_path / "fused", dequantize=True, log=lambda *_: None)
    ids = [1, 5, 9, 33, 100]
    adapted, _ = smoa_mlx.load(str(path), adapter_path=str(adapter))
    fused, fused_tok = smoa_mlx.load(str(tmp_path / "fused"))
    base, _ = smoa_mlx.load(str(path))
    assert rel_err(logits(fused, ids), logits(adapted, ids)) < 1e-4
    assert rel_err(logits(base, ids), logits(adapted, ids)) > 1e-3
    assert fused_tok.encode(TEXTS[0]) == smoa_mlx.load(str(path))[1].encode(TEXTS[0])
