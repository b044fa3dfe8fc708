"""A fast BLAS on Linux without LD_PRELOAD (mlx_mobilellm/blas.py): importing mlx_mobilellm loads
the system's OpenBLAS before MLX, and when there is none the commands that compute say how to
get it. Each case runs in a fresh process: the BLAS is bound when mlx.core loads."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

from mlx_mobilellm.compute_dtype import FAST_BLAS_GFLOPS

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="MLX uses Accelerate on macOS: nothing to load")

REPORT = """
import json, sys
{before}
import mlx_mobilellm
from mlx_mobilellm.blas import loaded
from mlx_mobilellm.compute_dtype import float32_gflops, slow_blas_note
print(json.dumps({{"loaded": loaded(), "gflops": float32_gflops(), "note": slow_blas_note()}}))
"""


def report(choice=None, before: str = "") -> dict:
    env = dict(os.environ)
    env.pop("MLX_MOBILELLM_BLAS", None)
    if choice is not None:
        env["MLX_MOBILELLM_BLAS"] = choice
    result = subprocess.run([sys.executable, "-c", REPORT.format(before=before)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_system_openblas_is_loaded_when_there_is_one():
    system = ctypes.util.find_library("openblas")
    found = report()
    if system:
        assert found["loaded"] == system
        assert found["gflops"] >= FAST_BLAS_GFLOPS and found["note"] is None
    else:  # this machine has none: the user is told how to get one
        assert found["loaded"] is None
        assert "apt-get install libopenblas0-pthread" in found["note"]


def test_without_it_matmuls_run_on_the_slow_reference_blas_and_a_note_says_so():
    found = report("none")
    assert found["loaded"] is None and found["gflops"] < FAST_BLAS_GFLOPS
    assert found["note"].startswith("note: MLX's CPU backend runs on a slow reference BLAS")


def test_a_path_that_is_no_library_is_passed_over():
    assert report("/nonexistent/libopenblas.so.0")["loaded"] is None


def test_too_late_once_mlx_is_imported():
    """MLX has bound its BLAS by then: loading another would change nothing, so nothing is.
    (libm stands for a BLAS: any loadable library shows whether a load happens.)"""
    assert report("libm.so.6")["loaded"] == "libm.so.6"
    assert report("libm.so.6", before="import mlx.core")["loaded"] is None
