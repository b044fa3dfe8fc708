"""A fast BLAS for MLX's CPU backend on Linux, loaded before MLX is.

Linux's `mlx[cpu]` wheel bundles a reference BLAS: float32 matmuls ran at ~6 GFLOP/s here, against
~245 with Debian's OpenBLAS. MLX calls its BLAS through symbols that the dynamic linker resolves
when mlx.core loads, so a BLAS loaded into the process's global namespace first (what LD_PRELOAD
does, here with ctypes' RTLD_GLOBAL) takes their place. mlx_mobilellm's package import calls
preload() before anything imports mlx.core.

The library: OPENBLAS_ENV if set (a path, or "none" to load nothing), else the system's OpenBLAS
(Debian/Ubuntu: `apt-get install libopenblas0-pthread`; Fedora: openblas-threads). Nothing is
loaded on macOS (MLX uses Accelerate there), nor once mlx.core is already imported (too late:
its symbols are bound).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

OPENBLAS_ENV = "MLX_MOBILELLM_BLAS"
INSTALL_HINT = "apt-get install libopenblas0-pthread"

_loaded: Optional[str] = None


def _candidates() -> list:
    chosen = os.environ.get(OPENBLAS_ENV)
    if chosen:
        return [] if chosen.lower() == "none" else [chosen]
    found = ctypes.util.find_library("openblas")  # ldconfig's cache: the distribution's own
    return [found] if found else []


def preload() -> Optional[str]:
    """Load a fast BLAS for MLX if there is one and it is not too late; return its path."""
    global _loaded
    if _loaded or not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return _loaded
    for path in _candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue  # a path that is not a loadable library: MLX keeps its own BLAS
        _loaded = path
        break
    return _loaded


def loaded() -> Optional[str]:
    """The BLAS preload() loaded, if any."""
    return _loaded
