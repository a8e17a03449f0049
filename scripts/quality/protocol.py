"""What the study runs: the same protocol for every method."""

from __future__ import annotations

from pathlib import Path

from smoa_mlx.lr_scale import REFERENCE_RATE
from smoa_mlx.train import DEFAULT_LR

REPO = Path(__file__).resolve().parents[2]
# ../shared next to the checkout (or next to the directory of worktrees holding it).
SHARED = next((p / "shared" for p in REPO.parents if (p / "shared" / "data").is_dir()),
              REPO.parent / "shared")
DEFAULT_MODEL = SHARED / "data" / "models" / "stories260K-hf"
DEFAULT_DATASETS = SHARED / "data" / "datasets"

# label -> trainer options. "plain Adam" is SMoA without the anchor step scale
# (smoa_mlx/lr_scale.py), the trainer's behaviour before it: it shows what the scale buys.
METHODS = {
    "LoRA r=8": {"method": "lora", "rank": 8},
    "LoRA r=4": {"method": "lora", "rank": 4},
    "SMoA r=8 K=2": {"method": "smoa", "rank": 8, "num_blocks": 2},
    "SMoA r=16 K=4": {"method": "smoa", "rank": 16, "num_blocks": 4},
    "SMoA r=16 K=2": {"method": "smoa", "rank": 16, "num_blocks": 2},  # LoRA r=8's parameter count
    "HiRA r=8": {"method": "hira", "rank": 8, "num_blocks": 1},
    "SMoA r=8 K=2, plain Adam": {"method": "smoa", "rank": 8, "num_blocks": 2, "lr_scale": "none"},
}
# The rate a user gets without --learning-rate (stories260K: SMoA's width rule gives its
# reference rate); the plain-Adam row keeps the trainer's old default.
DEFAULT_RATE = {label: DEFAULT_LR[opts["method"]] or REFERENCE_RATE for label, opts in METHODS.items()}
DEFAULT_RATE["SMoA r=8 K=2, plain Adam"] = 1e-3
# Per method, three rates ~x3 apart centred by a 200-step probe on wikisql; while the best
# rate is at an end of the rates tried, the next LADDER rung beyond it is added (at most
# MAX_EXTEND times). The same rule for every method. The default rate is run too.
GRID = {
    "LoRA r=8": (1e-2, 3e-2, 1e-1),
    "LoRA r=4": (1e-2, 3e-2, 1e-1),
    "SMoA r=8 K=2": (1e-2, 3e-2, 1e-1),
    "SMoA r=16 K=4": (1e-2, 3e-2, 1e-1),
    "SMoA r=16 K=2": (1e-2, 3e-2, 1e-1),
    "HiRA r=8": (1e-2, 3e-2, 1e-1),
    "SMoA r=8 K=2, plain Adam": (3e-2, 1e-1, 3e-1),
}
LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
MAX_EXTEND = 2
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
ALPHA, BATCH, MAX_SEQ, EVAL_EVERY = 8.0, 8, 256, 10
VALID_SIZE, TRAIN_SIZE = 32, 800
SEEDS = (0, 1, 2)
ITERS = (50, 200)
DATASETS = ("wikisql", "gsm8k", "boolq")
RECORD_TAG = "reproduce_quality record"
TOLERANCE = 0.01  # quick vs recorded losses: bitwise equal on one machine, close elsewhere


def nearest_rung(lr: float) -> int:
    return min(range(len(LADDER)), key=lambda i: abs(LADDER[i] / lr - 1))


def extension(grid: list[float], best: float) -> float | None:
    """The next ladder rate beyond the grid end that holds the best rate, if any."""
    i = nearest_rung(best)
    if best == min(grid) and i > 0:
        return LADDER[i - 1]
    if best == max(grid) and i + 1 < len(LADDER):
        return LADDER[i + 1]
    return None


def fmt_lr(lr: float) -> str:
    return f"{lr:g}" if lr >= 1 else f"{lr:.0e}".replace("e-0", "e-")
