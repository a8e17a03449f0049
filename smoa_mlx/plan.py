"""Spectral plan of SMoA (SPEC §1): row/column orders and the K aligned blocks.

NumPy, no MLX state (MLX's CPU linear algebra is borrowed for the float64 scoring when
it runs on an optimized BLAS, see `spectral_scores`). Block membership is decided
in float64, so a plan made here matches the SVD definition on any backend up to
genuine near-ties, which are reported (`boundary_gap`) rather than silently resolved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

# The reference computes scores in float32 and clamps the row energy at its eps.
EPS = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class Plan:
    row_order: np.ndarray  # (d_out,) int64, ascending score
    col_order: np.ndarray  # (d_in,) int64
    num_blocks: int
    boundary_gap: float  # smallest score gap across a block boundary (inf if K == 1)
    order_gap: float  # smallest gap between neighbours anywhere in either order

    @property
    def row_blocks(self) -> list[np.ndarray]:
        return np.array_split(self.row_order, self.num_blocks)

    @property
    def col_blocks(self) -> list[np.ndarray]:
        return np.array_split(self.col_order, self.num_blocks)


def split_sizes(n: int, k: int) -> list[int]:
    """`numpy.array_split` chunk sizes: the first n % k chunks get one extra."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def split_rank(rank: int, num_blocks: int, branch_ranks=None) -> list[int]:
    """Per-block ranks: `rank // K`, the first `rank % K` blocks one more, or `branch_ranks`."""
    if rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    if num_blocks < 1:
        raise ConfigError(f"num_blocks must be >= 1, got {num_blocks}")
    if branch_ranks is None:
        return split_sizes(rank, num_blocks)
    ranks = [int(r) for r in branch_ranks]
    if len(ranks) != num_blocks or sum(ranks) != rank or min(ranks) < 0:
        raise ConfigError(
            f"branch_ranks {ranks} must have num_blocks={num_blocks} non-negative "
            f"entries summing to rank={rank}"
        )
    return ranks


def _mlx_is_fast() -> bool:
    """MLX's CPU LAPACK/BLAS is an optimized one (Accelerate, or a preloaded OpenBLAS)."""
    from .blas import describe

    return describe() not in ("reference", "unknown")


def _scores(m, xp, eigh):
    """Mean spectral index of the rows of `m` (n_big, q) and of its columns, in float64.

    `xp` is numpy or mlx.core: the same arithmetic runs on either. Eigenpairs come in
    ascending order, so the spectral index of pair i is q - 1 - i.
    """
    evals, vecs = eigh(m.T @ m)
    q = evals.shape[0]
    j = (q - 1) - xp.arange(q, dtype=xp.float64)

    def mean_index(energy):
        return (energy @ j) / xp.maximum(energy.sum(axis=1), EPS)

    return mean_index((m @ vecs) ** 2), mean_index(vecs**2 * xp.maximum(evals, 0.0))


def spectral_scores(weight, use_mlx: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row and column scores of `weight` (d_out, d_in) without a full SVD.

    `s_j U[:, j] = W V[:, j]`, so the eigen-decomposition of the smaller Gram
    matrix gives both sides: the eigenvectors directly, the other side by one
    matmul. Everything is float64 because these scores decide block membership.
    The arithmetic runs in MLX on the CPU when its BLAS is an optimized one
    (`use_mlx=None` decides): on the 2-core Linux benchmark machine that is 2-10x
    faster than NumPy's own OpenBLAS, which degrades badly under load next to a
    second OpenBLAS in the process; on MLX's bundled reference BLAS it is 10x slower.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or 0 in w.shape:
        raise ConfigError(f"expected a non-empty 2-D weight, got shape {w.shape}")
    tall = w.shape[0] >= w.shape[1]
    m = w if tall else w.T  # (n_big, q): Gram over the small side
    if _mlx_is_fast() if use_mlx is None else use_mlx:
        import mlx.core as mx

        with mx.stream(mx.cpu):
            big, small = (np.array(s) for s in _scores(mx.array(m, dtype=mx.float64), mx, mx.linalg.eigh))
    else:
        big, small = _scores(m, np, np.linalg.eigh)
    return (big, small) if tall else (small, big)


def _min_gap(sorted_scores: np.ndarray, cuts) -> float:
    gaps = [sorted_scores[c] - sorted_scores[c - 1] for c in cuts if 0 < c < len(sorted_scores)]
    return float(min(gaps)) if gaps else float("inf")


def check_blocks(shape, num_blocks: int) -> None:
    if num_blocks < 1:
        raise ConfigError(f"num_blocks must be >= 1, got {num_blocks}")
    if num_blocks > min(shape):
        raise ConfigError(
            f"num_blocks={num_blocks} exceeds the smaller dimension of a weight of shape "
            f"{tuple(shape)}"
        )


def make_plan(weight, num_blocks: int) -> Plan:
    check_blocks(np.shape(weight), num_blocks)
    return plan_from_scores(*spectral_scores(weight), num_blocks)


def plan_from_scores(row_score: np.ndarray, col_score: np.ndarray, num_blocks: int) -> Plan:
    """Sort and cut the scores; they do not depend on K, so one scoring serves every K."""
    check_blocks((len(row_score), len(col_score)), num_blocks)
    orders, boundary, order = [], [], []
    for score in (row_score, col_score):
        o = np.argsort(score, kind="stable")
        s = score[o]
        cuts = np.cumsum(split_sizes(len(o), num_blocks))[:-1]
        orders.append(o.astype(np.int64))
        boundary.append(_min_gap(s, cuts))
        order.append(_min_gap(s, range(1, len(s))))
    return Plan(orders[0], orders[1], num_blocks, min(boundary), min(order))
