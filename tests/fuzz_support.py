"""What the fuzz tests (tests/test_fuzz_*.py) share: the worker process that runs each input,
the invariant every input must meet, and strategies for hostile values.

The invariant: an input either works or is refused cleanly — a CheckpointError (library) or
exit status 1 with one `error:` line (CLI) — within TIMEOUT seconds; never a traceback, a signal
or a hang, and nothing is left behind beside the output.

Example counts come from Hypothesis profiles (tests/conftest.py): "ci" by default, bounded so the
suite stays fast; HYPOTHESIS_PROFILE=fuzz-long for a longer run.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from hypothesis import event
from hypothesis import strategies as st

from fuzz_worker import REPLY

TIMEOUT = 20.0
"""Seconds one input may take, start-up of the worker's imports included. A clean refusal
takes well under a second on the tiny models used here; this only has to tell a hang."""


class Worker:
    """fuzz_worker.py in a child process, restarted after it dies or hangs."""

    def __init__(self):
        self.process: Optional[subprocess.Popen] = None
        self.replies: queue.Queue = queue.Queue()
        self.log = tempfile.TemporaryFile()

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("fuzz_worker.py"))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            encoding="utf-8", env=env)
        self.replies = queue.Queue()
        threading.Thread(target=self._read, args=(self.process.stdout, self.replies),
                         daemon=True).start()

    @staticmethod
    def _read(stream, replies: queue.Queue) -> None:
        for line in stream:
            if line.startswith(REPLY):
                replies.put(json.loads(line[len(REPLY):]))
        replies.put(None)  # the process ended

    def run(self, **request) -> dict:
        if self.process is None or self.process.poll() is not None:
            self._start()
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        try:
            reply = self.replies.get(timeout=TIMEOUT)
        except queue.Empty:
            self.stop()
            return {"outcome": "hang", "seconds": TIMEOUT}
        if reply is None:
            code = self.process.wait()
            self.process = None
            name = signal.Signals(-code).name if code < 0 else f"exit status {code}"
            return {"outcome": "crash", "how": name, "stderr": self._log_tail()}
        return reply

    def _log_tail(self, size: int = 2000) -> str:
        """The end of what the worker wrote on stderr (faulthandler's report of a crash)."""
        self.log.seek(0, os.SEEK_END)
        self.log.seek(max(self.log.tell() - size, 0))
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def assert_clean(reply: dict, family: str) -> None:
    """The library's side of the invariant: success or one CheckpointError line."""
    outcome = reply["outcome"]
    if outcome == "error":
        message = reply["message"]
        assert message.strip() and "\n" not in message, f"not one line: {message!r}"
        event(f"{family}: refused")
        return
    assert outcome == "ok", _describe(reply)
    event(f"{family}: accepted")


def assert_clean_exit(reply: dict, family: str) -> None:
    """The CLI's side: exit 0, or exit 1 with one `error:` line (notes and warnings may come
    before it)."""
    assert reply["outcome"] == "exit", _describe(reply)
    code, err = reply["code"], reply["stderr"]
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if code == 0:
        assert not errors, err
        event(f"{family}: exit 0")
        return
    assert code == 1, f"exit status {code}: {err}"
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    event(f"{family}: exit 1")


def _describe(reply: dict) -> str:
    if reply["outcome"] == "unexpected":
        return "a traceback:\n" + reply["traceback"]
    return f"{reply['outcome']}: {reply}"


# --- folders -------------------------------------------------------------------------------

@contextmanager
def scratch_copy(*sources: Path) -> Iterator[Path]:
    """A fresh folder holding copies of `sources`, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        for source in sources:
            if source.is_dir():
                shutil.copytree(source, root / source.name)
            else:
                shutil.copyfile(source, root / source.name)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def listing(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_nothing_left(before: set, after: set, allowed: set = frozenset()) -> None:
    """Nothing new beside the inputs but the outputs named in `allowed` ("" for the folder
    listed itself): what they hold, and the folders above one that was written."""
    def expected(path: str) -> bool:
        return any(a == "" or path == a or path.startswith(a + "/")
                   or (a.startswith(path + "/") and a in after) for a in allowed)

    new = {p for p in after - before if not expected(p)}
    assert not new, f"left behind: {sorted(new)}"


# --- hostile values ------------------------------------------------------------------------

# Sizes and counts at the edges: zero, negative, one off, powers of two around the integer
# widths files and C++ use, and huge.
EDGE_INTS = [0, 1, 2, 3, -1, -2**31, 7, 255, 256, 2**16, 10**6, 10**9, 2**31 - 1, 2**31, 2**32,
             2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30]
edge_ints = st.sampled_from(EDGE_INTS) | st.integers()
edge_floats = st.sampled_from([0.0, -0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"),
                               float("-inf")]) | st.floats()
short_text = st.text(max_size=12)
json_scalars = st.none() | st.booleans() | edge_ints | edge_floats | short_text
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(short_text, inner, max_size=4), max_leaves=12)


def deeply_nested(depth: int = 100_000) -> str:
    """JSON text nested beyond Python's recursion limit."""
    return "[" * depth + "]" * depth


def dump(value) -> str:
    """JSON text of a generated value (NaN and infinities as Python's json writes them)."""
    return json.dumps(value)


# A file's content replaced wholesale: not JSON, not an object, not UTF-8, nested too deep, empty.
hostile_json_bytes = st.one_of(
    json_values.map(lambda value: dump(value).encode()),
    st.sampled_from([b"", b"{", b"null", b"[]", b"42", b'"text"', b"{}", b'{"a": 1, "a": 2}',
                     b'{"a": "\xff\xfe"}', b"\xef\xbb\xbf{}"]),
    st.binary(max_size=40),
    st.just(None).map(lambda _: deeply_nested().encode()),
)


# --- damaged files ------------------------------------------------------------------------

def split_safetensors(data: bytes):
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + length]), data[8 + length:]


def join_safetensors(header_text: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header_text)) + header_text + body


@st.composite
def damaged_safetensors(draw, data: bytes) -> bytes:
    header, body = split_safetensors(data)
    names = sorted(k for k in header if k != "__metadata__")
    kind = draw(st.sampled_from(["entry", "duplicate", "copy", "remove", "metadata", "length",
                                 "bytes", "truncate"]))
    if kind == "entry":
        name = draw(st.sampled_from(names))
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        entry = header[name]
        near = {"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3",
                                          "F64", "X9", ""]),
                "shape": st.lists(edge_ints, max_size=3),
                "data_offsets": st.tuples(edge_ints, edge_ints).map(list)}[key]
        entry[key] = draw(near | json_values)
    elif kind == "duplicate":  # the same name twice: JSON keeps the last one silently
        name = draw(st.sampled_from(names))
        text = json.dumps(header)
        twin = json.dumps({name: header[draw(st.sampled_from(names))]})[1:-1]
        return join_safetensors((text[:-1] + ", " + twin + "}").encode(), body)
    elif kind == "copy":  # a second name over the same (or a shifted) byte range
        source = header[draw(st.sampled_from(names))]
        shift = draw(st.sampled_from([0, 4, -4, 1]))
        start, end = source["data_offsets"]
        twin = draw(st.sampled_from(["extra.weight", names[0] + ".copy"]))
        header[twin] = dict(source, data_offsets=[start + shift, end + shift])
    elif kind == "remove":
        del header[draw(st.sampled_from(names))]
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values)
    elif kind == "length":
        length = draw(st.sampled_from(EDGE_INTS).filter(lambda n: 0 <= n < 2**64))
        return struct.pack("<Q", length) + data[8:]
    elif kind == "bytes":
        at = draw(st.integers(0, min(len(data), 8 + 4096) - 1))
        chunk = draw(st.binary(min_size=1, max_size=8))
        return data[:at] + chunk + data[at + len(chunk):]
    else:
        return data[:draw(st.integers(0, len(data) - 1))]
    return join_safetensors(json.dumps(header).encode(), body)
