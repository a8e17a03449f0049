"""Training data, as mlx_lm.lora reads it: `read` (dataset files), `formats` (records -> `Example`s),
`preference` (chosen/rejected records -> `Pair`s), `sources` (local dirs, Hub ids, `hf_dataset`;
the bundled model and data), `batching` (`Batcher`, `PairBatcher`)."""

from .batching import PAD_MULTIPLE, Batcher, PairBatcher
from .formats import ALPACA_PROMPT, ALPACA_PROMPT_INPUT, FEATURES, Example, alpaca_prompt, common_prefix
from .preference import Pair, to_pairs
from .read import decode_text, json_type, read_records, read_text, warn
from .sources import (
    BUNDLED, BUNDLED_DATA, BUNDLED_MODEL, HF_DEFAULT_SPLITS, HF_KEYS, SPLITS, SUFFIXES, load_data,
    load_split, split_path,
)

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_INPUT", "BUNDLED", "BUNDLED_DATA", "BUNDLED_MODEL", "FEATURES",
    "HF_DEFAULT_SPLITS", "HF_KEYS", "PAD_MULTIPLE", "SPLITS", "SUFFIXES", "Batcher", "Example", "Pair",
    "PairBatcher", "to_pairs",
    "alpaca_prompt", "common_prefix", "decode_text", "json_type", "load_data", "load_split",
    "read_records", "read_text", "split_path", "warn",
]
