"""python -m smoa_mlx.fuse: merge an adapter into its base model (SPEC §2.4).

Writes an MLX model directory that `mlx_lm.load` loads or, with --hf, a Hugging
Face checkpoint that `transformers` loads with no custom code. Every adapter
layer with a `.fuse()` is merged, so SMoA and mlx-lm LoRA/DoRA adapters (e.g. an
imported PEFT LoRA) both work. A quantized base is de-quantized, merged and
re-quantized like the base, unless --dequantize; a Hugging Face checkpoint is
always float. The output directory is staged and renamed into place.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from mlx.utils import tree_flatten, tree_unflatten

from .archs import check_hf_fuse, kept_tensors, rewrite_hf_shards
from .card import write_fused_card
from .cli import run
from .errors import AdapterError
from .files import read_config, staged_dir, write_json
from .fuse_check import FuseCheck, describe
from .gguf import default_file_name, model_hparams, out_type, write_gguf, write_modelfile
from .hub import add_upload_args, upload_folder
from .layer import adapter_layers
from .loader import load_base

QUANTIZATION_KEYS = ("quantization", "quantization_config")
# Base files a deployment reads beside the weights (image processing for multimodal bases).
COPIED = ("generation_config.json", "preprocessor_config.json", "processor_config.json")


def fuse_layers(model, dequantize: bool = False) -> int:
    """Replace every adapter layer of `model` by its merged plain layer; returns how many."""
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in adapter_layers(model).items()]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def fuse(model: str, adapter_path, save_path, hf: bool = False, dequantize: bool = False, log=print,
         gguf_path=None, gguf_dtype: str = "f16"):
    """Merge the adapter at `adapter_path` into `model` and save the result to `save_path`
    (with a model card, and a GGUF file `save_path/gguf_path` and its Ollama Modelfile if given)."""
    from mlx_lm.utils import dequantize_model, save_config, save_model

    gguf_dtype = out_type(gguf_dtype)
    mlx_model, tokenizer, config, model_dir = load_base(model, adapter_path)
    kept = {}
    if hf:
        check_hf_fuse(config.get("model_type"))
        kept = kept_tensors(config["model_type"], model_dir)
    dequantize = dequantize or hf
    quantized = any(k in config for k in QUANTIZATION_KEYS)
    check = FuseCheck(mlx_model, tokenizer)
    count = fuse_layers(mlx_model, dequantize)
    if count == 0:
        raise AdapterError(f"{adapter_path}: the adapter has no layers to fuse")
    if dequantize:
        mlx_model = dequantize_model(mlx_model)
    parity = check.measure(mlx_model)
    log(describe(parity, quantized and not dequantize)[0])
    with staged_dir(save_path) as tmp:
        save_model(tmp, mlx_model)
        if hf:
            rewrite_hf_shards(tmp, config["model_type"], kept)
            # The base's own config (not mlx-lm's view of it), minus MLX quantization.
            hf_config = read_config(model_dir / "config.json")
            for key in QUANTIZATION_KEYS:
                hf_config.pop(key, None)
            write_json(tmp / "config.json", hf_config)
        else:
            if dequantize:
                for key in QUANTIZATION_KEYS:
                    config.pop(key, None)
            save_config(dict(config), tmp / "config.json")
        tokenizer.save_pretrained(str(tmp))
        for name in COPIED:
            if (model_dir / name).is_file():
                shutil.copy(model_dir / name, tmp)
        write_fused_card(tmp, model, adapter_path, hf, parity, name=Path(save_path).name)
        if gguf_path is not None:
            write_gguf(tmp / gguf_path, dict(tree_flatten(mlx_model.parameters())), model_hparams(config, mlx_model),
                       tmp, gguf_dtype, log, name=Path(save_path).name)
            write_modelfile(tmp, Path(gguf_path).as_posix(), tokenizer)
    kind = "Hugging Face checkpoint" if hf else "MLX model"
    log(f"fused {count} adapter layers of {adapter_path} into {model}; wrote the {kind} {save_path}")
    return save_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smoa_mlx.fuse",
        description="Fuse an adapter (SMoA, or mlx-lm LoRA/DoRA) into its base model.",
    )
    parser.add_argument("--model", default="mlx_model",
                        help="The base model: a local directory or Hugging Face repo.")
    parser.add_argument("--adapter-path", default="adapters", help="The adapter directory.")
    parser.add_argument("--save-path", default="fused_model", help="Where to write the fused model.")
    parser.add_argument("--hf", action="store_true",
                        help="Write a float Hugging Face checkpoint that transformers loads, not an MLX model.")
    parser.add_argument("--dequantize", "--de-quantize", dest="dequantize", action="store_true",
                        help="Keep a quantized base de-quantized after merging.")
    parser.add_argument("--export-gguf", action="store_true",
                        help="Also write the fused model as GGUF for llama.cpp and an Ollama Modelfile "
                             "(llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text).")
    parser.add_argument("--gguf-path", default=None,
                        help="GGUF file name inside --save-path (default: ggml-model-<type>.gguf).")
    parser.add_argument("--gguf-dtype", default="f16", metavar="TYPE",
                        help="GGUF tensor type: f32, f16, bf16, q8_0, q4_0 (float32/float16/bfloat16 also "
                             "accepted; norms stay f32; q4_0 keeps the output head in q8_0).")
    add_upload_args(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    gguf_path = None
    if args.export_gguf:
        gguf_path = args.gguf_path or default_file_name(args.gguf_dtype)
    fuse(args.model, args.adapter_path, args.save_path, hf=args.hf, dequantize=args.dequantize,
         gguf_path=gguf_path, gguf_dtype=args.gguf_dtype)
    if args.upload_repo:
        upload_folder(args.save_path, args.upload_repo, private=args.upload_private)
    return 0


if __name__ == "__main__":
    run(main)
