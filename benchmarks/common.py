"""What every benchmark script shares: logging to stderr, recording failures in the JSON
instead of crashing, and the machine facts a figure is meaningless without."""

from __future__ import annotations

import os
import platform
import sys
from typing import Callable

import mlx.core as mx


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def attempt(fn: Callable):
    """fn()'s result, or the error as a string (so one failure does not lose the other figures)."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - recorded in the JSON, not hidden
        log(f"  error: {error!r}")
        return {"error": f"{type(error).__name__}: {error}"}


def machine(**extra) -> dict:
    """Platform, CPU, load, MLX version and backend, and which BLAS the figures came from."""
    cpu = platform.processor()
    if not cpu and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {
        "platform": platform.platform(),
        "processor": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],  # other work on the CPUs
        "mlx": mx.__version__,
        "backend": str(mx.default_device()),
        "blas": ("openblas (LD_PRELOAD)" if "openblas" in os.environ.get("LD_PRELOAD", "")
                 else "mlx bundled (reference)"),
        **extra,
    }
