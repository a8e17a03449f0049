"""fuse --export-gguf checked by llama.cpp itself (llama-cpp-python, the `llamacpp` extra): for a
tiny random model of every exported architecture with an SMoA adapter that moves its logits,
llama.cpp's logits on the GGUF match the MLX fused model's, per output type; its tokenizer
splits text as the Hugging Face tokenizer does; the Ollama Modelfile renders chats as the
model's own chat template does."""

import json
import re
import shutil
from unittest import mock

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import load as mlx_lm_load

from smoa_mlx import apply_smoa, save_adapter
from smoa_mlx.errors import ConfigError, ModelError
from smoa_mlx.gguf import default_file_name, model_hparams, out_type, unpermute, write_gguf
from smoa_mlx.gguf.modelfile import modelfile_text, ollama_template
from smoa_mlx.gguf.names import ARCHS, PRE_TOKENIZERS, tensor_map
from smoa_mlx.synthetic import CHAT_TEMPLATE, make_llama

ARCH_TYPES = list(ARCHS)  # llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text
OUT_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0"]
TOKENS = [1, 5, 9, 12, 40, 7, 3, 30, 2, 8, 13, 21, 34, 55, 6, 11] * 3


def max_rel(a, b) -> float:
    """max |a - b| / max |b|: the largest logit error against the logits' own scale."""
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- output type names and refusals (no llama.cpp needed) -------------------------------------

def test_output_type_names_and_file_names():
    assert [out_type(n) for n in ("float32", "float16", "bfloat16", "F16", "q8_0", "Q4_0", "bf16")] == \
        ["f32", "f16", "bf16", "f16", "q8_0", "q4_0", "bf16"]
    assert default_file_name("float16") == "ggml-model-f16.gguf"
    assert default_file_name("Q8_0") == "ggml-model-q8_0.gguf"
    with pytest.raises(ConfigError, match="--gguf-dtype must be one of f32, f16, bf16, q8_0, q4_0.*'q4_k'"):
        out_type("q4_k")


def test_gemma_attention_scale_llama_cpp_cannot_match_is_refused(tiny_model_dir, tmp_path):
    config = {"model_type": "gemma2", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16,
              "num_hidden_layers": 2, "query_pre_attn_scalar": 256}
    with pytest.raises(ModelError, match=r"llama.cpp's gemma2 scales attention by 1/sqrt\(16\)"):
        write_gguf(tmp_path / "x.gguf", {}, config, tiny_model_dir)
    assert not list(tmp_path.iterdir())


# --- the Ollama Modelfile ---------------------------------------------------------------------

def ollama_render(template: str, messages: list[dict], default_system: str | None) -> str:
    """What Ollama sends the model for `messages` with a per-turn TEMPLATE (no .Messages):
    server/routes.go prepends the Modelfile SYSTEM when the chat has no system message, and
    template/template.go's legacy Execute runs the template once per (system, prompt,
    response) turn, the last one cut at {{ .Response }}."""
    if default_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}] + messages

    def execute(tmpl, system, prompt, response):
        tmpl = re.sub(r"\{\{ if \.System \}\}(.*?)\{\{ end \}\}", lambda m: m.group(1) if system else "", tmpl,
                      flags=re.S)
        return tmpl.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt).replace(
            "{{ .Response }}", response)

    out, system, prompt, response = [], "", "", ""
    for m in messages:
        if m["role"] == "system":
            if prompt or response:
                out.append(execute(template, system, prompt, response))
                system, prompt, response = "", "", ""
            system = m["content"]
        elif m["role"] == "user":
            if response:
                out.append(execute(template, system, prompt, response))
                system, prompt, response = "", "", ""
            prompt = m["content"]
        else:
            response = m["content"]
    out.append(execute(template.split("{{ .Response }}")[0], system, prompt, response))
    return "".join(out)


CHATML_DEFAULT_SYSTEM = (  # SmolLM2-Instruct's: a default system prompt when the chat has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = (  # no system role: it raises on one
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' + message['content'] "
    "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three"}],
]


def jinja_render(template: str, bos: str = "<s>"):
    from jinja2 import Environment

    def raise_exception(msg):
        raise ValueError(msg)

    t = Environment().from_string(template)
    return lambda messages: t.render(messages=messages, add_generation_prompt=True, bos_token=bos,
                                     raise_exception=raise_exception)


@pytest.mark.parametrize("name,template,bos", [("synthetic", CHAT_TEMPLATE, None),
                                               ("chatml+default system", CHATML_DEFAULT_SYSTEM, None),
                                               ("llama3", LLAMA3, "<s>")])
def test_ollama_template_renders_chats_as_the_chat_template(name, template, bos):
    render = jinja_render(template)
    found = ollama_template(render, bos)
    assert found is not None
    tmpl, system = found
    assert (system == "You are a helpful AI assistant") == (name == "chatml+default system")
    for chat in CHATS:
        want = render(chat).removeprefix(bos or "")
        assert ollama_render(tmpl, chat, system) == want, chat


def test_a_template_without_turn_pieces_is_left_to_ollama():
    assert ollama_template(jinja_render(GEMMA), "<s>") is None


def test_modelfile_of_the_synthetic_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    text = modelfile_text("ggml-model-f16.gguf", AutoTokenizer.from_pretrained(tiny_model_dir))
    assert text == ('FROM ./ggml-model-f16.gguf\n'
                    'TEMPLATE """{{ if .System }}<|system|>\n{{ .System }}</s>\n{{ end }}<|user|>\n{{ .Prompt }}</s>\n'
                    '<|assistant|>\n{{ .Response }}</s>\n"""\n'
                    'PARAMETER stop "</s>"\nPARAMETER stop "<|user|>"\n')


# --- llama.cpp on the exported files ------------------------------------------------------------

def hf_base(model_type, root):
    """A tiny random transformers checkpoint of `model_type` (tests/test_archs.py's), float32."""
    pytest.importorskip("torch")
    from test_archs import hf_model_dir

    path = hf_model_dir(model_type, root)
    if model_type in ("gemma2", "gemma3_text"):  # attention scaled as llama.cpp's Gemma does: 1/sqrt(head_dim)
        config = json.loads((path / "config.json").read_text())
        config["query_pre_attn_scalar"] = config["head_dim"]
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """model_type -> (fused MLX dir, base logits, fused logits): a tiny random model of that type
    with an SMoA adapter (random B, std 2: it moves the logits by 5-60%) fused by `fuse` with the
    f32 GGUF export and Modelfile."""
    from smoa_mlx.fuse import fuse
    from smoa_mlx.patch import smoa_layers
    from smoa_mlx.loader import load_base

    made = {}

    def get(model_type):
        if model_type not in made:
            root = tmp_path_factory.mktemp(model_type)
            base_dir = hf_base(model_type, root)
            model = load_base(str(base_dir))[0]
            base = np.array(model(mx.array([TOKENS])))
            mx.random.seed(1)  # A's initialisation and B: the same adapter whatever ran before
            apply_smoa(model, rank=4, num_blocks=2, progress=False)
            for layer in smoa_layers(model).values():
                layer.smoa_b = [2.0 * mx.random.normal(b.shape) for b in layer.smoa_b]
            save_adapter(model, root / "adapter")
            fuse(str(base_dir), root / "adapter", root / "fused", log=lambda *_: None,
                 gguf_path=default_file_name("f32"), gguf_dtype="f32")
            fused_model = mlx_lm_load(str(root / "fused"))[0]
            made[model_type] = root / "fused", base, np.array(fused_model(mx.array([TOKENS])))
        return made[model_type]
    return get


def export(fused_dir, dtype) -> str:
    """The fused model as a GGUF of `dtype` (fuse wrote the f32 one)."""
    path = fused_dir / default_file_name(dtype)
    if not path.exists():
        model, config = mlx_lm_load(str(fused_dir), return_config=True)[::2]
        write_gguf(path, dict(tree_flatten(model.parameters())), model_hparams(config, model), fused_dir, dtype)
    return str(path)


def llama_cpp(path, **kw):
    """llama.cpp on `path`, its KV cache in F32 (its default F16 would round K and V to 2^-11,
    hiding errors of the file smaller than that), the weights in its plain CPU buffers
    (`use_extra_bufts` off): its AMX kernels segfault on Sapphire Rapids CPUs, the official
    SmolLM2 Q4_1 file included (ggml-org/llama.cpp#20824), and llama-cpp-python has no flag."""
    llama_cpp = pytest.importorskip("llama_cpp")
    f32, default = llama_cpp.GGML_TYPE_F32, llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", params):
        return llama_cpp.Llama(model_path=path, n_threads=2, verbose=False,
                               **{"n_ctx": 64, "type_k": f32, "type_v": f32, **kw})


def llama_cpp_logits(path, tokens=TOKENS) -> np.ndarray:
    llm = llama_cpp(path, logits_all=True)
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)])


def written_logits(path, fused_dir, tokens=TOKENS) -> np.ndarray:
    """MLX logits with the weights as the GGUF holds them (de-quantized by gguf, llama.cpp's
    layout undone): what llama.cpp should compute, up to its own arithmetic."""
    import gguf

    model, config = mlx_lm_load(str(fused_dir), return_config=True)[::2]
    spec = ARCHS[config["model_type"]]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    names = tensor_map(config["model_type"], config["num_hidden_layers"])
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    weights = []
    for name, value in tree_flatten(model.parameters()):
        t = tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))]
        a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(value.shape).astype(np.float32)
        if spec.permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            a = unpermute(a, n_head, n_head if "q_proj" in name else n_kv)
        if name.endswith("norm.weight"):
            a = a - spec.norm_offset
        weights.append((name, mx.array(a)))
    model.load_weights(weights)
    return np.array(model(mx.array([tokens])))[0]


def same_as_llama_quantize(path, f32_path, dtype) -> list[str]:
    """The tensors of `path` that differ (type or bytes) from llama.cpp's own quantizer
    (llama-quantize) run on the f32 export `f32_path`: none, when ours quantizes as llama.cpp."""
    import ctypes

    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{dtype.upper()}"), 1
    theirs_path = str(path) + ".llama-quantize"
    assert llama_cpp.llama_model_quantize(str(f32_path).encode(), theirs_path.encode(), ctypes.byref(params)) == 0
    ours = {t.name: t for t in gguf.GGUFReader(path).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(theirs_path).tensors}
    assert ours.keys() == theirs.keys()
    return [k for k in ours if ours[k].tensor_type != theirs[k].tensor_type
            or not np.array_equal(np.asarray(ours[k].data), np.asarray(theirs[k].data))]


# max_rel bounds, llama.cpp against (the weights as written, the float32 fused model), about twice
# the largest measured over the 7 architectures (in brackets). llama.cpp's CPU matmuls round the
# activations to the weights' dot type: f32 not at all (4e-6); f16 to 2^-11 (6.5e-4); bf16 to 2^-8
# (4.8e-3); q8_0 and q4_0 quantize them to 8 bits per 32 values (1.1e-2, 1.0e-2). Against the fused
# model the weights' own rounding adds: f16 (8.5e-4), bf16 (7.2e-3), q8_0 (1.9e-2), q4_0's 4 bits
# per value (0.29).
TOLERANCE = {"f32": (1e-5, 1e-5), "f16": (2e-3, 2e-3), "bf16": (1.5e-2, 2.5e-2), "q8_0": (2.5e-2, 5e-2),
             "q4_0": (2.5e-2, 0.5)}
# llama.cpp's own Gemma 2 / Gemma 3 arithmetic: on the same float32 weights it differs from
# transformers by 2.3e-4 / 1.8e-4 (tiny models), where transformers and MLX agree to 4e-7 / 1.7e-5.
GEMMA_F32 = {"gemma2": 5e-4, "gemma3_text": 5e-4}


@pytest.mark.parametrize("dtype", OUT_TYPES)
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_llama_cpp_logits_match_the_fused_model(model_type, dtype, fused):
    import gguf

    pytest.importorskip("llama_cpp")
    fused_dir, base, want = fused(model_type)
    want, base = want[0], base[0]
    path = export(fused_dir, dtype)
    got = llama_cpp_logits(path)
    written = written_logits(path, fused_dir)
    tight, loose = TOLERANCE[dtype]
    extra = GEMMA_F32.get(model_type, 0.0)
    assert max_rel(got, written) < tight + extra
    assert max_rel(got, want) < loose + extra
    if dtype != "q4_0":  # the adapter's effect is in the file (4-bit rounding of these random
        assert max_rel(got, want) < 0.25 * max_rel(base, want)  # weights is of its own size)
    if dtype in ("q8_0", "q4_0"):  # byte for byte what llama-quantize makes of the f32 export
        assert same_as_llama_quantize(path, fused_dir / default_file_name("f32"), dtype) == []
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    Q = gguf.GGMLQuantizationType
    assert types["blk.0.ffn_down.weight"] == (Q.F32 if dtype == "f32" else Q.F16 if dtype in ("q8_0", "q4_0")
                                              else Q[dtype.upper()])  # rows of 48: no whole blocks of 32
    assert types["blk.0.attn_norm.weight"] == Q.F32
    head = "token_embd.weight" if model_type.startswith("gemma") else "output.weight"
    assert types[head] == (Q.Q8_0 if dtype == "q4_0" else Q[dtype.upper()])
    assert types["blk.0.attn_q.weight"] == Q[dtype.upper()]


def greedy_mlx(model, prompt, n):
    """mlx-lm's own decoding loop (argmax, KV cache), as llama.cpp decodes (`greedy_llama_cpp`)."""
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def greedy_llama_cpp(llm, prompt, n):
    llm.reset()
    llm.eval(prompt)
    ids = []
    for _ in range(n):
        ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(ids[-1:])
    return ids


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_llama_cpp_greedy_text_is_the_fused_models(model_type, dtype, fused):
    from transformers import AutoTokenizer

    pytest.importorskip("llama_cpp")
    fused_dir = fused(model_type)[0]
    llm = llama_cpp(export(fused_dir, dtype), logits_all=True)
    tok = AutoTokenizer.from_pretrained(fused_dir)
    prompt = tok.encode("Once upon a time there was", add_special_tokens=False)
    want = greedy_mlx(mlx_lm_load(str(fused_dir))[0], prompt, 12)
    got = greedy_llama_cpp(llm, prompt, 12)
    assert got == want
    assert llm.detokenize(got, special=True).decode("utf-8", "replace") == tok.decode(want)


def test_fuse_cli_names_the_file_by_type_and_writes_the_modelfile(tiny_model_dir, make_adapter, tmp_path, capsys):
    from smoa_mlx.cli import run
    from smoa_mlx.fuse import main

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    with pytest.raises(SystemExit) as e:
        run(main, ["--model", str(tiny_model_dir), "--adapter-path", str(adapter), "--save-path",
                   str(tmp_path / "out"), "--export-gguf", "--gguf-dtype", "Q8_0"])
    assert e.value.code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "ggml-model-q8_0.gguf").is_file()
    assert (tmp_path / "out" / "Modelfile").read_text().startswith("FROM ./ggml-model-q8_0.gguf\nTEMPLATE ")
    with pytest.raises(SystemExit) as e:
        run(main, ["--model", str(tiny_model_dir), "--adapter-path", str(adapter), "--save-path",
                   str(tmp_path / "bad"), "--export-gguf", "--gguf-dtype", "q3_k"])
    assert e.value.code == 1 and not (tmp_path / "bad").exists()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "--gguf-dtype must be one of" in err[0]


# --- the vocabulary: llama.cpp tokenizes as the Hugging Face tokenizer --------------------------

SAMPLES = ["Hello world", "The answer is 12345 + 678 = 13023.", "I'm sure you'll see they've GONE",
           "  two  spaces\n\nnew\tlines \n", "café naïve 日本語 🙂", "<|user|>\nhi</s>\n<|assistant|>\n",
           "SELECT age FROM people WHERE name='Ann';"]


def check_tokenization(model_dir, tmp_path, spm=False):
    from transformers import AutoTokenizer

    model, config = mlx_lm_load(str(model_dir), return_config=True)[::2]
    path = write_gguf(tmp_path / "v.gguf", dict(tree_flatten(model.parameters())), config, model_dir, "f32")
    llm = llama_cpp(str(path), vocab_only=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    for text in SAMPLES:
        want = tok.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text), text
        text_back = llm.detokenize(want, special=True).decode()
        if spm:  # SentencePiece's prefix space: llama.cpp drops it only after a BOS it removes
            text_back = text_back.removeprefix(" ")
        assert text_back == tok.decode(want), text


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_llama_cpp_tokenizes_as_the_hf_tokenizer(pre, tmp_path):
    pytest.importorskip("llama_cpp")
    model_dir = make_llama(tmp_path / "m")
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = json.loads(json.dumps(PRE_TOKENIZERS[pre]).replace(
        '"type": "ByteLevel"', '"type": "ByteLevel", "trim_offsets": true'))  # a field tokenizers requires
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    check_tokenization(model_dir, tmp_path)


def test_a_pre_tokenizer_llama_cpp_has_no_name_for_is_written_default_with_a_note(tmp_path):
    import gguf

    model_dir = make_llama(tmp_path / "m")
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    model, config = mlx_lm_load(str(model_dir), return_config=True)[::2]
    notes = []
    path = write_gguf(tmp_path / "v.gguf", dict(tree_flatten(model.parameters())), config, model_dir, "f32",
                      log=notes.append)
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "default"
    assert len(notes) == 1 and "pre-tokenizer has no llama.cpp name" in notes[0]


def test_llama_cpp_tokenizes_a_sentencepiece_vocabulary_as_hf(stories_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    model_dir = tmp_path / "stories"
    shutil.copytree(stories_dir, model_dir)
    check_tokenization(model_dir, tmp_path, spm=True)


# --- the real model: SmolLM2-135M-Instruct --------------------------------------------------------

def real_model_check(model, data, root, dtypes=("f16", "q8_0", "q4_0"), n_new=16) -> dict:
    """A few SMoA updates on `model`, fused (--de-quantize) with the f16 GGUF export, the other
    types written from the fused model; per type: llama.cpp's max_rel logit error on a chat
    prompt against the MLX fused model and against the weights as written, the adapter's own
    effect, and whether greedy text (`n_new` tokens) is the MLX fused model's."""
    from transformers import AutoTokenizer

    from smoa_mlx.fuse import fuse
    from smoa_mlx.loader import load_base
    from smoa_mlx.train import train

    adapter, fused_dir = root / "adapter", root / "fused"
    train({"model": str(model), "data": str(data), "adapter_path": str(adapter), "iters": 3, "batch_size": 2,
           "learning_rate": 5e-3, "warmup": 0, "steps_per_report": 1, "val_batches": 1})
    fuse(str(model), adapter, fused_dir, dequantize=True, log=lambda *_: None,
         gguf_path=default_file_name(dtypes[0]), gguf_dtype=dtypes[0])
    tok = AutoTokenizer.from_pretrained(fused_dir)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    base = np.array(load_base(str(model))[0](mx.array([prompt])))[0]
    fused_model = mlx_lm_load(str(fused_dir))[0]
    want = np.array(fused_model(mx.array([prompt])))[0]
    greedy = greedy_mlx(fused_model, prompt, n_new)
    vocab = llama_cpp(export(fused_dir, dtypes[0]), vocab_only=True)
    results = {"adapter effect": max_rel(base, want), "mlx text": tok.decode(greedy),
               "tokenized as HF": [vocab.tokenize(t.encode(), add_bos=True, special=True) == tok.encode(t)
                                   for t in SAMPLES]}
    for dtype in dtypes:
        path = export(fused_dir, dtype)
        if dtype in ("q8_0", "q4_0"):
            results[f"{dtype} differs from llama-quantize in"] = same_as_llama_quantize(
                path, export(fused_dir, "f32"), dtype)
        llm = llama_cpp(path, logits_all=True, n_ctx=256)
        llm.eval(prompt)
        got = np.array(llm.scores[:len(prompt)])
        ids = greedy_llama_cpp(llm, prompt, n_new)
        results[dtype] = {"vs fused": max_rel(got, want), "vs written": max_rel(got, written_logits(path, fused_dir,
                                                                                                       prompt)),
                          "greedy equal": ids == greedy, "text": tok.decode(ids)}
    return results


@pytest.fixture(scope="module")
def smollm2_results(request, arith, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    try:
        model = request.getfixturevalue("smollm2_gguf")
    except pytest.FixtureLookupError:
        pytest.skip("no smollm2_gguf fixture (the SmolLM2-135M-Instruct GGUF)")
    from smoa_mlx.errors import SMoAError
    from smoa_mlx.loader import load_base

    try:
        load_base(str(model))
    except SMoAError as e:
        pytest.skip(f"the loader does not read a .gguf --model: {e}")
    return real_model_check(model, arith, tmp_path_factory.mktemp("smollm2"))


# max_rel bounds on SmolLM2 (30 layers, the chat prompt), about twice the measured (in brackets),
# against (the weights as written, the fused model): f16 (1.4e-3, 1.8e-3); q8_0 (4.8e-2, 6.7e-2),
# llama.cpp's 8-bit activations through 30 layers (llama-quantize's own q8_0 of the f16 export:
# 5.8e-2 against the fused model); q4_0 (0.11, 0.57: 4-bit weights, bounded only as written).
# What makes q8_0/q4_0 right is that their bytes are llama-quantize's. Greedy text must match for
# f16; q8_0's first token is a near-tie its rounding may flip (llama-quantize's q8_0 flips it too).
REAL_TOLERANCE = {"f16": (5e-3, 5e-3), "q8_0": (0.1, 0.15), "q4_0": (0.25, None)}


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
def test_smollm2_export_runs_in_llama_cpp_as_in_mlx(smollm2_results, dtype):
    got = smollm2_results[dtype]
    tight, loose = REAL_TOLERANCE[dtype]
    assert got["vs written"] < tight, got
    if loose is not None:
        assert got["vs fused"] < loose, got
    if dtype == "f16":
        assert all(smollm2_results["tokenized as HF"])
        assert got["greedy equal"], (got["text"], smollm2_results["mlx text"])
        assert got["vs fused"] < 0.25 * smollm2_results["adapter effect"]  # the fine-tune is in the file
    else:
        assert smollm2_results[f"{dtype} differs from llama-quantize in"] == []
