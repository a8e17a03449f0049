"""python -m smoa_mlx.convert import|export|gguf: adapters between MLX and PyTorch layouts;
a GGUF model (llama.cpp, Ollama, LM Studio) as an MLX model directory."""

from __future__ import annotations

import argparse

from ..cli import UsageError, run
from ..hub import add_upload_args, upload_folder
from . import FORMATS, export_adapter, import_adapter

FORMAT_HELP = (
    "smoa: the authors' PyTorch SMoA layout; hira: Hugging Face PEFT HiRA (num_blocks = 1 only); "
    "lora: Hugging Face PEFT LoRA (export is a lossy rank-R approximation; MoE experts as target_parameters)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smoa_mlx.convert",
        description="Convert adapters between MLX adapter directories and PyTorch (PEFT-style) layouts.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="PyTorch adapter -> MLX adapter directory",
                         description="Convert a PyTorch adapter into an MLX adapter directory.")
    exp = sub.add_parser("export", help="MLX SMoA adapter -> PyTorch adapter directory",
                         description="Convert an MLX SMoA adapter into a PyTorch adapter directory.")
    for p in (imp, exp):
        p.add_argument("--format", choices=list(FORMATS), required=True, help=FORMAT_HELP)
        p.add_argument("--model", required=True,
                       help="The base model the adapter belongs to: a local directory or Hugging Face repo.")
    imp.add_argument("--src", required=True,
                     help="PyTorch adapter directory (adapter_config.json + adapter_model.safetensors).")
    imp.add_argument("--out", required=True, help="MLX adapter directory to write.")
    imp.add_argument("--plan-dtype", choices=["bfloat16", "float16"], default=None,
                     help="smoa only: recompute the orders (when the adapter has no smoa_orders.safetensors) "
                          "from the base weight rounded to this dtype, as the authors' loader does when it "
                          "loads the base in it (bfloat16 is its default); default: the weight as stored.")
    exp.add_argument("--adapter-path", required=True, help="MLX SMoA adapter directory.")
    exp.add_argument("--out", required=True, help="PyTorch adapter directory to write.")
    exp.add_argument("--rank", type=int, default=None,
                     help="lora only: rank of the approximation (default: the adapter's rank).")
    gg = sub.add_parser("gguf", help="GGUF model -> MLX model directory",
                        description="Write a GGUF model (llama.cpp, Ollama, LM Studio) as an MLX model "
                                    "directory: Q4_0/Q4_1/Q8_0 stay quantized (lossless), other "
                                    "quantized types are de-quantized.")
    gg.add_argument("--model", required=True,
                    help="A .gguf file, a directory holding one, or ollama:NAME[:TAG].")
    gg.add_argument("--save-path", required=True, help="MLX model directory to write.")
    gg.add_argument("--dequantize", action="store_true",
                    help="Write float16 weights instead of MLX's quantized formats.")
    for p in (imp, exp):
        p.add_argument("--no-parity", action="store_true",
                       help="Skip measuring MLX vs PyTorch logits (which needs the torch extra).")
        add_upload_args(p)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "gguf":
        from ..gguf.model import convert_gguf

        convert_gguf(args.model, args.save_path, args.dequantize)
        return 0
    if args.command == "import":
        import_adapter(args.format, args.model, args.src, args.out, not args.no_parity,
                       plan_dtype=args.plan_dtype)
    else:
        if args.rank is not None and args.format != "lora":
            raise UsageError("--rank applies to --format lora only")
        export_adapter(args.format, args.model, args.adapter_path, args.out, args.rank, not args.no_parity)
    if args.upload_repo:
        upload_folder(args.out, args.upload_repo, private=args.upload_private)
    return 0


if __name__ == "__main__":
    run(main)
