"""`--report-to wandb`: a real (offline) wandb run of a tiny training holds exactly the values
metrics.jsonl records, and the run's options; bad values and a missing package are one line."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from smoa_mlx import checkpoint
from smoa_mlx.data import BUNDLED_DATA
from smoa_mlx.train import train

BLOCK = 32 * 1024  # wandb's transaction log: LevelDB's log format, 32 KiB blocks
FULL, LAST = 1, 4  # chunk types that end a record


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's `run-*.wandb` file, read independently of
    wandb's writer (which is Go): a 7-byte `:W&B` header, then chunks of (crc32c, length
    u16 LE, type u8, payload) that never straddle a block; a record spans FIRST..LAST."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a header is zero padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_run(out: Path) -> tuple[dict, dict]:
    """(history rows by step, config) of the one offline run under `out`/wandb."""
    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    def items(entries):
        return {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}

    history, config = {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = items(record.history.item)
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            config = items(record.run.config.update)
    return history, config


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (pip install 'smoa-mlx[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


def test_wandb_offline_run_holds_the_metrics_and_options(stories_dir, tmp_path, offline_wandb):
    out = tmp_path / "run"
    result = train({"model": str(stories_dir), "data": str(BUNDLED_DATA), "adapter_path": str(out),
                    "iters": 4, "batch_size": 2, "steps_per_report": 2, "steps_per_eval": 2,
                    "val_batches": 2, "learning_rate": 3e-2, "report_to": "wandb",
                    "project_name": "smoa-test"})
    history, config = offline_run(out)
    records = [json.loads(x) for x in (out / checkpoint.METRICS).read_text().splitlines()]
    train_records = [r for r in records if r["type"] == "train"]
    val_records = [r for r in records if r["type"] == "val"]
    assert [r["step"] for r in train_records] == [2, 4] and [r["step"] for r in val_records] == [0, 2, 4]
    for r in train_records:  # mlx-lm's key names; the very floats metrics.jsonl holds
        row = history[r["step"]]
        assert row["iteration"] == r["step"]
        for ours, theirs in (("train_loss", "train_loss"), ("learning_rate", "learning_rate"),
                             ("tokens_per_second", "tokens_per_second"),
                             ("iterations_per_second", "iterations_per_second"),
                             ("trained_tokens", "trained_tokens"), ("peak_memory_gb", "peak_memory")):
            assert row[theirs] == r[ours], (r["step"], ours)
    for r in val_records:
        assert history[r["step"]]["val_loss"] == r["val_loss"]
    assert history[4]["val_loss"] == result["val_loss"] and history[4]["train_loss"] == result["train_loss"]
    assert config["report_to"] == "wandb" and config["project_name"] == "smoa-test"
    assert config["learning_rate"] == 3e-2 and config["method"] == "smoa" and config["iters"] == 4


def test_report_to_is_checked_in_one_line(stories_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    base = {"model": str(stories_dir), "adapter_path": str(out), "iters": 2}
    with pytest.raises(ValueError, match="--report-to: 'tensorboard' is not one of wandb, swanlab"):
        train({**base, "report_to": "wandb,tensorboard"})
    # A service whose package is absent: what to install, before anything is written.
    monkeypatch.setitem(sys.modules, "swanlab", None)  # find_spec says: not installed
    with pytest.raises(ValueError, match=r"--report-to swanlab needs the swanlab package: "
                                         r"pip install 'smoa-mlx\[swanlab\]'") as e:
        train({**base, "report_to": "swanlab"})
    assert "\n" not in str(e.value) and not out.exists()


def test_yaml_report_to_and_project_name_are_options(tmp_path):
    from smoa_mlx.config_file import load_config

    path = tmp_path / "lora.yaml"
    path.write_text("fine_tune_type: lora\nreport_to: wandb\nproject_name: p\n")
    assert load_config(path) == {"method": "lora", "report_to": "wandb", "project_name": "p"}
