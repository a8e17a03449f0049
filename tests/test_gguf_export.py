"""fuse --export-gguf checked by llama.cpp itself (llama-cpp-python, the `llamacpp` extra): for a
tiny random model of every exported architecture with an SMoA adapter that moves its logits,
llama.cpp's logits on the GGUF match the MLX fused model's, per output type; its tokenizer
splits text as the Hugging Face tokenizer does; the Ollama Modelfile renders chats as the
model's own chat template does."""

import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
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
