"""Which BLAS MLX's CPU backend runs on: the `mlx[cpu]` wheel bundles the reference
(netlib) BLAS, ~30x slower for float32 matmul than OpenBLAS, which distorts every timing."""

from __future__ import annotations

import os
import sys
from functools import cache

REMEDY = (
    "preload a system OpenBLAS: `apt-get install libopenblas0-pthread` then "
    "`export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0`"
)


def loaded_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if ".so" in line})
    except OSError:
        return []


def describe() -> str:
    """'reference', 'openblas (<path>)' or 'platform' (macOS Accelerate / non-Linux)."""
    if sys.platform != "linux":
        return "platform"
    libs = loaded_libraries()
    fast = [p for p in libs if os.path.basename(p).startswith(("libopenblas", "libmkl_rt", "libblis"))]
    if fast:
        return f"{os.path.basename(fast[0]).split('.so')[0]} ({fast[0]})"
    if any("mlx_cpu.libs" in p and os.path.basename(p).startswith("libblas") for p in libs):
        return "reference"
    return "unknown"


@cache
def warn_if_reference() -> bool:
    """Print one warning per process when MLX computes on the CPU with the reference BLAS."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu or describe() != "reference":
        return False
    print(
        "warning: MLX's CPU backend is using the reference BLAS bundled with mlx[cpu] "
        f"(float32 matmul ~30x slower); {REMEDY}",
        file=sys.stderr,
    )
    return True
