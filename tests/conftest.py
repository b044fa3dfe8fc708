"""Hypothesis profiles for the fuzz tests (tests/test_fuzz_*.py), and their worker process.

  ci         (default) a bounded number of examples per test, so that CI stays fast
  fuzz-long  HYPOTHESIS_PROFILE=fuzz-long python -m pytest tests/test_fuzz_*.py
             --hypothesis-show-statistics: a longer search
Neither keeps a database of failing examples in the tree (a failure prints its example).
"""

import os

# Before anything imports mlx.core: every test process, whichever tests it runs and in whatever
# order, computes with the same BLAS (mlx_mobilellm/blas.py).
import mlx_mobilellm  # noqa: F401
import pytest
from hypothesis import HealthCheck, settings

# Each example runs in the worker process, whose own timeout tells a hang: no Hypothesis deadline.
_COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=30, **_COMMON)
settings.register_profile("fuzz-long", max_examples=1000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def worker():
    from fuzz_support import Worker

    process = Worker()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny byte-level BPE tokenizer trained here, with a ChatML template (generation_helpers);
    a module's own `tokenizer` fixture takes its place."""
    from generation_helpers import write_bpe_folder
    from mlx_mobilellm import load_tokenizer

    return load_tokenizer(write_bpe_folder(tmp_path_factory.mktemp("tok")))
