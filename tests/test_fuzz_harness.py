"""The fuzz tests' worker tells each ending of an input apart: a crash, a hang, a traceback and
a clean refusal, and it comes back after the first two."""

import pytest

import fuzz_support
from fuzz_support import Worker, assert_clean


@pytest.fixture
def worker(monkeypatch):
    monkeypatch.setattr(fuzz_support, "TIMEOUT", 3.0)
    process = Worker()
    yield process
    process.stop()


def test_each_ending_is_told_apart(worker):
    crash = worker.run(op="probe", behaviour="crash")
    assert crash["outcome"] == "crash" and crash["how"] == "SIGSEGV"
    assert "Fatal Python error" in crash["stderr"]  # faulthandler's report
    assert worker.run(op="probe", behaviour="hang") == {"outcome": "hang", "seconds": 3.0}
    assert worker.run(op="probe", behaviour="refuse") == {"outcome": "error", "message": "refused"}
    traceback = worker.run(op="probe", behaviour="traceback")
    assert traceback["outcome"] == "unexpected" and "KeyError: 'a bug'" in traceback["traceback"]
    assert worker.run(op="probe", behaviour="fine") == {"outcome": "ok"}


@pytest.mark.parametrize("behaviour", ["crash", "traceback"])
def test_the_invariant_fails_on_a_defect(worker, behaviour):
    with pytest.raises(AssertionError):
        assert_clean(worker.run(op="probe", behaviour=behaviour), "probe")
