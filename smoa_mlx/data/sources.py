"""Where training data comes from, as mlx_lm.lora's `load_dataset` reads it:
  - a local directory (it wins over a Hub id of the same name): `<split>.jsonl` (one
    JSON object a line) or `<split>.json` (a JSON list of objects), or a DatasetDict
    that `datasets` wrote with `save_to_disk`;
  - otherwise a Hugging Face Hub dataset id, through `datasets.load_dataset` (splits
    named train / valid / test, as mlx-lm; a "validation" split serves as valid);
  - an `hf_dataset` config, one mapping or a list of them (concatenated): `path`,
    `train_split` / `valid_split` / `test_split`, `config` (keyword arguments of
    `load_dataset`) and the `*_feature` keys.
`datasets` is imported only for the last two (the `datasets` extra). Splits: train is
required; a missing valid split is a warning (training runs without validation).
The bundled stories260K model and its story cards are the offline default source.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError, DataError, MissingFileError
from .formats import FEATURES, Example, to_examples
from .preference import to_pairs
from .read import json_type, read_records, warn

BUNDLED = Path(__file__).parent.parent / "bundled"
BUNDLED_DATA = BUNDLED  # train/valid/test.jsonl: story cards (scripts/make_example_data.py)
BUNDLED_MODEL = BUNDLED / "stories260K"  # a real pretrained tiny Llama (see its README.md)
SPLITS = ("train", "valid", "test")
SUFFIXES = (".jsonl", ".json")
# hf_dataset keys (mlx-lm's `load_custom_hf_dataset`); mlx-lm overwrites `mask_prompt`
# with the run's own, and so does this loader.
HF_KEYS = {"path", "train_split", "valid_split", "test_split", "config", "mask_prompt",
           *FEATURES}
# What a record becomes: an SFT `Example`, or a preference `Pair` (DPO, ORPO).
CONVERTERS = {"sft": to_examples, "preference": to_pairs}
HF_DEFAULT_SPLITS = {"train": "train[:80%]", "valid": "train[-10%:]"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_split(path, tokenizer, mask_prompt: bool = False, convert=to_examples,
               **features) -> list[Example]:
    """Parse, validate and tokenize one file; any bad record is a DataError at `file:line`."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: expected a .jsonl or .json file")
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    return convert(str(path), read_records(path), tokenizer, mask_prompt, features)


def split_path(data_dir, split: str) -> Path | None:
    """`<split>.jsonl` or `<split>.json` in `data_dir`, or None when it has neither."""
    data_dir = Path(data_dir)
    found = [data_dir / f"{split}{s}" for s in SUFFIXES if (data_dir / f"{split}{s}").is_file()]
    if len(found) > 1:
        raise DataError(f"{data_dir}: both {found[0].name} and {found[1].name} exist; keep one")
    return found[0] if found else None


def _rows(dataset, name: str):
    """(location, record) of the rows of a `datasets.Dataset`."""
    return ((f"{name}: row {i}", row) for i, row in enumerate(dataset))


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need the datasets library: "
                        "pip install 'smoa-mlx[datasets]'") from None
    return datasets


def _load_local(data_dir: Path, tokenizer, mask_prompt, splits, features, convert) -> dict:
    if (data_dir / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
        dd = _datasets().load_from_disk(str(data_dir))
        return _load_dict(dd, str(data_dir), tokenizer, mask_prompt, splits, features, convert)
    if (data_dir / "state.json").is_file():  # Dataset.save_to_disk: one split, but which?
        raise DataError(f"{data_dir}: a single saved Dataset; save a DatasetDict with "
                        "'train' (and 'valid', 'test') splits instead")
    out = {}
    for split in splits:
        path = split_path(data_dir, split)
        if path is None:
            tried = " or ".join(f"{split}{s}" for s in SUFFIXES)
            out[split] = _absent(split, f"{data_dir}: the {split} split is missing "
                                        f"(looked for {tried})")
        else:
            out[split] = load_split(path, tokenizer, mask_prompt, convert, **features)
    return out


def _absent(split: str, message: str) -> list:
    """A missing split: valid is optional (as in mlx-lm), train and test are not."""
    if split != "valid":
        raise MissingFileError(message)
    warn(f"{message}; training without validation")
    return []


def _load_dict(dd, name: str, tokenizer, mask_prompt, splits, features, convert) -> dict:
    """The train / valid / test splits of a DatasetDict (mlx-lm's `load_hf_dataset`)."""
    out = {}
    for split in splits:
        # `datasets` names a valid.* file's split "validation"; mlx-lm would skip it.
        found = "validation" if split == "valid" and "valid" not in dd else split
        if found in dd:
            out[split] = convert(f"{name} [{found}]", _rows(dd[found], f"{name} [{found}]"),
                                   tokenizer, mask_prompt, features)
        else:
            out[split] = _absent(split, f"{name}: the {split} split is missing (the dataset "
                                        f"has {', '.join(dd) or 'no splits'})")
    return out


def _load_hub(data_id: str, tokenizer, mask_prompt, splits, features, convert) -> dict:
    datasets = _datasets()
    try:
        dd = datasets.load_dataset(data_id)
    except Exception as e:  # not found, offline, gated: the reason is in the message
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{data_id}: no such local directory, and loading it as a Hugging "
                        f"Face dataset failed: {reason}") from None
    return _load_dict(dd, data_id, tokenizer, mask_prompt, splits, features, convert)


def _check_hf_entry(entry, where: str) -> dict:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with 'path', got {json_type(entry)}")
    if not isinstance(entry.get("path"), str) or not entry["path"]:
        raise ConfigError(f"{where}: 'path' (a dataset id or directory) is required")
    for key in ("train_split", "valid_split", "test_split", *FEATURES):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {json_type(entry[key])}")
    if entry.get("config") is not None and not isinstance(entry["config"], dict):
        raise ConfigError(f"{where}: 'config' must be a mapping of load_dataset arguments, "
                          f"got {json_type(entry['config'])}")
    if unknown := sorted(set(entry) - HF_KEYS):
        warn(f"{where}: ignoring key(s) {unknown} (known: {', '.join(sorted(HF_KEYS))})")
    return entry


def _load_hf_config(config, tokenizer, mask_prompt, splits, convert) -> dict:
    """mlx-lm's `load_custom_hf_dataset`: one entry or a list, each split concatenated."""
    entries = [config] if isinstance(config, dict) else config
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"hf_dataset: expected a mapping or a non-empty list of them, "
                          f"got {json_type(config)}")
    wheres = ["hf_dataset"] if isinstance(config, dict) else [
        f"hf_dataset[{i}]" for i in range(len(entries))]
    entries = [_check_hf_entry(e, where) for e, where in zip(entries, wheres)]  # all, first
    out = {split: [] for split in splits}
    for entry, where in zip(entries, wheres):
        features = {k: entry.get(k) for k in FEATURES}
        kwargs = entry.get("config") or {}
        for split in splits:
            chosen = entry.get(f"{split}_split") or HF_DEFAULT_SPLITS.get(split)
            if chosen is None:
                raise ConfigError(f"{where} ({entry['path']}): no {split}_split given")
            name = f"{entry['path']} [{chosen}]"
            try:
                ds = _datasets().load_dataset(entry["path"], split=chosen, **kwargs)
            except Exception as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DataError(f"{name}: loading the Hugging Face dataset failed: "
                                f"{reason}") from None
            out[split] += convert(name, _rows(ds, name), tokenizer, mask_prompt, features)
    return out


def load_data(spec, tokenizer, mask_prompt: bool = False, splits=("train", "valid"),
              kind: str = "sft", **features) -> dict[str, list[Example]]:
    """Every requested split, fully validated, so bad input stops before training starts.

    `spec`: a local directory, a Hugging Face Hub dataset id, or an `hf_dataset` config
    (a mapping or a list of them). `features`: mlx-lm's `prompt_feature`,
    `completion_feature`, `chat_feature`, `text_feature` for a directory or a Hub id.
    A missing valid split gives [] and a warning; a missing train or test split is an error.
    `kind`: "sft" records become `Example`s, "preference" records `Pair`s.
    """
    convert = CONVERTERS[kind]
    if unknown := sorted(set(features) - set(FEATURES)):
        raise ConfigError(f"unknown data option(s) {unknown} (known: {', '.join(FEATURES)})")
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ConfigError(f"unknown split(s) {bad} (known: {', '.join(SPLITS)})")
    if isinstance(spec, (dict, list)):
        return _load_hf_config(spec, tokenizer, mask_prompt, splits, convert)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"{path}: --data is a directory holding train.jsonl / valid.jsonl "
                            "(/ test.jsonl), not a file")
        return _load_local(path, tokenizer, mask_prompt, splits, features, convert)
    if not _HUB_ID.fullmatch(str(spec)):
        raise MissingFileError(f"{path}: data directory not found")
    return _load_hub(str(spec), tokenizer, mask_prompt, splits, features, convert)
