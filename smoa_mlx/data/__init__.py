"""Training data, as mlx_lm.lora reads it: `read` (dataset files), `formats` (records -> `Example`s),
`sources` (local dirs, Hub ids, `hf_dataset`; the bundled model and data), `batching` (`Batcher`)."""

from .batching import PAD_MULTIPLE, Batcher
from .formats import ALPACA_PROMPT, ALPACA_PROMPT_INPUT, FEATURES, Example, alpaca_prompt, common_prefix
from .read import decode_text, json_type, read_records, read_text, warn
from .sources import (
    BUNDLED, BUNDLED_DATA, BUNDLED_MODEL, HF_DEFAULT_SPLITS, HF_KEYS, SPLITS, SUFFIXES, load_data,
    load_split, split_path,
)

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_INPUT", "BUNDLED", "BUNDLED_DATA", "BUNDLED_MODEL", "FEATURES",
    "HF_DEFAULT_SPLITS", "HF_KEYS", "PAD_MULTIPLE", "SPLITS", "SUFFIXES", "Batcher", "Example",
    "alpaca_prompt", "common_prefix", "decode_text", "json_type", "load_data", "load_split",
    "read_records", "read_text", "split_path", "warn",
]
