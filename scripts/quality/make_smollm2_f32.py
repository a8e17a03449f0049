"""Rebuild the SmolLM2 study's float32 model (`smollm2.DEFAULT_MODEL`) byte for byte as
the record knows it: the record keys runs by a hash of config.json, so a copy made any
other way (e.g. `smoa_mlx.convert gguf --dequantize`) starts the study afresh.

    python scripts/quality/make_smollm2_f32.py [GGUF] [OUT]   # needs the test extra (torch, transformers 5.25)
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = Path.home() / ".cache/smoa-fixtures/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
RECORDED = "d5dffeec8103b4e3"  # the config hash in records/smollm2.jsonl


def main(gguf=GGUF, out="/work/cache/smollm2-f32") -> None:
    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise SystemExit(f"{gguf}: no such file; ../shared/tools/smollm2-gguf.sh fetches it (or pass its path)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")  # mlx-lm would take the weights for quantized ones
    config.pop("rope_theta", None)
    config["rope_theta"] = 100000.0  # mlx-lm 0.32 reads it here; transformers 5 writes rope_parameters
    text = json.dumps(config, indent=2)
    (out / "config.json").write_text(text)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    print(f"{out}: config hash {digest}" + ("" if digest == RECORDED else f" (the record's is {RECORDED}: "
                                                                          "the study will start afresh)"))


if __name__ == "__main__":
    main(*sys.argv[1:])
