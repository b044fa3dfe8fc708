"""Checks on what users and files hand over, before it reaches a tokenizer or MLX: text that
UTF-8 can encode, JSON that holds an object, whole and finite numbers (JSON's numbers may be
booleans or huge ints)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import CheckpointError


def check_text(text: str, where: str) -> str:
    """`text` if it can be encoded as UTF-8. Python turns bytes that are not UTF-8 in argv (and
    in stdin under a C locale) into lone surrogates, which tokenizers refuse with errors that
    say neither where nor what; JSON's \\ud800 escapes give them too."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        what = (f"the byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF  # surrogateescape
                else f"a lone surrogate U+{code:04X}")
        raise CheckpointError(f"{where} is not UTF-8 text: {what} at character {error.start}; "
                              "re-encode it as UTF-8") from None
    return text


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def json_object(text, where: str) -> dict:
    """The object that JSON text (str or bytes) holds, or a CheckpointError naming `where`."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as error:  # UnicodeDecodeError too
        raise CheckpointError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: holds a JSON {_JSON_KINDS[type(value)]}, not an object")
    return value


def read_json_object(path: Path) -> dict:
    """The object a JSON file holds, or a CheckpointError naming the file."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except OSError as error:  # permissions, a folder of that name, a failing disk
        raise CheckpointError(f"{path}: cannot read it ({error.strerror})") from None
    return json_object(text, str(path))


def is_whole_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False
