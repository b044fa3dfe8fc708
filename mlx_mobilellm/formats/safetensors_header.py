"""Checking a safetensors file's header before MLX reads the file.

The format: 8 bytes holding the little-endian length N of a JSON header; N bytes of JSON, an
object mapping each tensor's name to {"dtype", "shape", "data_offsets": [begin, end]} (byte
offsets into the data that follows the header), plus an optional "__metadata__" object of
strings; then the data, which the tensors must cover exactly: no overlap, no hole. MLX
accepts duplicate names (JSON keeps the last), overlapping tensors and stray bytes without
a word, so all of it is checked here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import CheckpointError

# The safetensors library's own bound on the header; real headers are a few hundred KB.
MAX_HEADER_BYTES = 100_000_000
# Bytes per element of the dtypes MLX reads.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "U16": 2, "I16": 2, "F16": 2,
               "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "C64": 8}
# MLX shapes are 32-bit: a larger dimension cannot be read, even of an empty tensor.
MAX_DIMENSION = 2**31 - 1
ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


class _Corrupt(Exception):
    """A header defect; check_safetensors_header adds the file name and the advice."""


def _unique_keys(pairs: list) -> dict:
    """json.loads would keep the last of two equal keys: a tensor listed twice is refused."""
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = next(key for key in keys if keys.count(key) > 1)
        raise _Corrupt(f"the header lists '{twice:.80}' twice")
    return dict(pairs)


def _parse(text: bytes) -> dict:
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError:
        raise _Corrupt("the header is JSON nested too deeply") from None
    except ValueError as error:  # also bytes that are not UTF-8
        raise _Corrupt(f"the header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise _Corrupt("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)  # some writers store null for none
    if not (metadata is None or isinstance(metadata, dict)
            and all(isinstance(v, str) for v in metadata.values())):
        raise _Corrupt("__metadata__ must map names to strings")
    return header


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value


def _byte_range(name: str, entry) -> tuple:
    """(begin, end) of one tensor's data, checked against its dtype and shape."""
    if not (isinstance(entry, dict) and set(entry) == ENTRY_KEYS):
        raise _Corrupt(f"tensor '{name:.100}' must have exactly {', '.join(sorted(ENTRY_KEYS))}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise _Corrupt(f"tensor '{name:.100}' has dtype {dtype!r:.20}; readable: {', '.join(DTYPE_BYTES)}")
    if not (isinstance(shape, list) and all(_is_size(d) and d <= MAX_DIMENSION for d in shape)):
        raise _Corrupt(f"tensor '{name:.100}' has shape {shape!r:.60}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_size, offsets))
            and offsets[0] <= offsets[1]):
        raise _Corrupt(f"tensor '{name:.100}' has data_offsets {offsets!r:.60}, not [begin, end]")
    begin, end = offsets
    if end - begin != DTYPE_BYTES[dtype] * math.prod(shape):
        raise _Corrupt(f"tensor '{name:.100}' spans {end - begin} bytes, but {dtype} {tuple(shape)} "
                       f"takes {DTYPE_BYTES[dtype] * math.prod(shape)}")
    return begin, end


def _check_coverage(ranges: dict, data_bytes: int) -> None:
    """The tensors tile the data: each starts where the one before it ends."""
    covered, previous = 0, None
    for name, (begin, end) in sorted(ranges.items(), key=lambda item: item[1]):
        if end > data_bytes:
            raise _Corrupt(f"tensor '{name:.100}' ends at byte {end} of the data, past its end "
                           f"({data_bytes} bytes)")
        if begin < covered:
            raise _Corrupt(f"tensor '{name:.100}' overlaps tensor '{previous:.100}' "
                           f"(bytes {begin}..{covered})")
        if begin > covered:
            raise _Corrupt(f"bytes {covered}..{begin} of the data belong to no tensor")
        covered, previous = end, name
    if covered != data_bytes:
        raise _Corrupt(f"bytes {covered}..{data_bytes} of the data belong to no tensor")


def _read_header(file, file_bytes: int) -> tuple:
    """(header bytes, data size) of an open file."""
    prefix = file.read(8)
    if len(prefix) < 8:
        raise _Corrupt(f"the file has only {len(prefix)} bytes")
    length = int.from_bytes(prefix, "little")
    if length > MAX_HEADER_BYTES:
        raise _Corrupt(f"the header claims {length} bytes, more than the {MAX_HEADER_BYTES} allowed")
    if 8 + length > file_bytes:
        raise _Corrupt(f"the header claims {length} bytes but the file has {file_bytes}")
    return file.read(length), file_bytes - 8 - length


def check_safetensors_header(path: Path) -> list:
    """The tensor names of a safetensors file whose header is whole and consistent; any
    defect is a CheckpointError naming the file (and the tensor)."""
    try:
        with path.open("rb") as file:
            text, data_bytes = _read_header(file, path.stat().st_size)
        header = _parse(text)
        _check_coverage({name: _byte_range(name, entry) for name, entry in header.items()}, data_bytes)
    except OSError as error:  # permissions, a folder of that name, a failing disk
        raise CheckpointError(f"{path}: cannot read it ({error.strerror})") from None
    except _Corrupt as defect:
        raise CheckpointError(f"{path}: {defect}: the safetensors file is truncated or corrupt "
                              "— download or save it again") from None
    return list(header)
