"""Pretraining text → one memory-mapped token file, tokenized once and reused by later runs.

The data folder holds *.txt files (each file one document) and *.jsonl files of {"text": ...}
lines (each line one document), found recursively and read in sorted path order; hidden files
and folders (a name starting with ".") are skipped. Each document is the tokenizer's encode()
of its text (with the BOS token when the tokenizer adds one) followed by the EOS id, and the
documents are written back to back into tokens.bin: uint16 ids when the vocabulary fits, else
uint32. tokens.json beside it records what the file was made from (the tokenizer's identity,
each source file's path, size and mtime); a later run whose inputs still match reads the file
instead of tokenizing again, any other rebuilds it. Both are written to temporary siblings and
renamed, tokens.json last: a file without a matching tokens.json is never read.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError
from ..input_checks import check_text
from . import distributed

TOKENS_FILE = "tokens.bin"
INDEX_FILE = "tokens.json"
SUFFIXES = (".txt", ".jsonl")
# Bumped when the way documents become tokens changes: older files are then rebuilt.
FORMAT = 1


def tokenizer_identity(files: dict) -> str:
    """A hash of a tokenizer's files ({name: text or bytes}, as tokenizer.read_tokenizer_files
    or a GGUF's formats.gguf_tokenizer.tokenizer_files give them): the same files encode alike."""
    digest = hashlib.sha256()
    for name in sorted(files):
        content = files[name]
        data = content.encode("utf-8") if isinstance(content, str) else content
        digest.update(f"{name}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def text_sources(data_dir: Path) -> list:
    """The *.txt and *.jsonl files under data_dir, in sorted path order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CheckpointError(f"{data_dir}: not a folder; the data is a folder of .txt files "
                              'and/or .jsonl files of {"text": ...} lines')
    found = [path for path in data_dir.rglob("*")
             if path.suffix in SUFFIXES and path.is_file()
             and not any(part.startswith(".") for part in path.relative_to(data_dir).parts)]
    if not found:
        raise CheckpointError(f"{data_dir}: no .txt or .jsonl files; add text files (each one "
                              'document) or .jsonl files of {"text": ...} lines')
    return sorted(found, key=lambda path: path.relative_to(data_dir).as_posix())


def token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tokenizer.max_token_id < 2**16 else np.uint32)


def _eos_id(tokenizer) -> int:
    if not tokenizer.eos_token_ids:
        raise CheckpointError(f"{tokenizer.source}: the tokenizer has no EOS token, which "
                              "separates the documents; use a tokenizer that has one")
    return tokenizer.eos_token_ids[0]


def _index(data_dir: Path, sources: list, tokenizer, tokenizer_id: str) -> dict:
    """What a token file is made from: the same index, the same tokens."""
    files = []
    for path in sources:
        stat = path.stat()
        files.append({"path": path.relative_to(data_dir).as_posix(), "size": stat.st_size,
                      "mtime_ns": stat.st_mtime_ns})
    return {"format": FORMAT, "data": str(data_dir.resolve()), "tokenizer": tokenizer_id,
            "eos_token_id": _eos_id(tokenizer), "dtype": token_dtype(tokenizer).name,
            "sources": files}


def _documents(data_dir: Path, sources: list) -> Iterator:
    """(where, text, bytes read) for every document, in order."""
    for path in sources:
        name = path.relative_to(data_dir).as_posix()
        if path.suffix == ".txt":
            data = path.read_bytes()
            yield str(path), _decoded(data, str(path)), len(data)
            continue
        with path.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                where = f"{path}:{number}"
                if not line.strip():
                    yield where, None, len(line)
                    continue
                try:
                    record = json.loads(_decoded(line, where))
                except (ValueError, RecursionError):
                    raise CheckpointError(f'{where}: not a JSON line; each line of {name} is '
                                          'one document, {"text": "..."}') from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise CheckpointError(f'{where}: expected {{"text": "..."}}, a JSON object '
                                          'with a string "text"')
                yield where, check_text(record["text"], f"{where}: 'text'"), len(line)


def _decoded(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{where}: not UTF-8 text (byte {data[error.start]:#04x} at "
                              f"offset {error.start}); save it as UTF-8 or remove it") from None


def _tokenize(data_dir: Path, sources: list, tokenizer, out, quiet: bool) -> int:
    """Write every document's tokens and its EOS to the binary file `out`; return the count."""
    from tqdm import tqdm

    dtype, eos = token_dtype(tokenizer), _eos_id(tokenizer)
    bos = tokenizer.bos_token_id
    count = 0
    total = sum(path.stat().st_size for path in sources)
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=quiet) as bar:
        for where, text, size in _documents(data_dir, sources):
            bar.update(size)
            if text is None:  # a blank JSONL line
                continue
            tokens = tokenizer.encode(text)
            if len(tokens) == (1 if tokens[:1] == [bos] else 0):
                raise CheckpointError(f"{where}: a document with no text (no tokens); remove "
                                      "it or write something in it")
            out.write(np.asarray(tokens + [eos], dtype=dtype).tobytes())
            count += len(tokens) + 1
    if not count:
        raise CheckpointError(f"{data_dir}: its .jsonl files hold no documents; add "
                              '{"text": ...} lines')
    return count


def _matching(folder: Path, index: dict) -> Optional[np.ndarray]:
    """The token file in `folder` if it was made from `index`'s inputs, memory-mapped."""
    try:
        saved = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        size = (folder / TOKENS_FILE).stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or {k: v for k, v in saved.items() if k != "tokens"} != index:
        return None
    count = saved.get("tokens")
    if type(count) is not int or count <= 0 or size != count * np.dtype(index["dtype"]).itemsize:
        return None
    return np.memmap(folder / TOKENS_FILE, dtype=index["dtype"], mode="r", shape=(count,))


def token_file(data_dir, folder, tokenizer, tokenizer_id: str, quiet: bool = False,
               check: Callable[[int], None] = lambda count: None) -> np.ndarray:
    """The tokens of the text in data_dir, memory-mapped from `folder`/tokens.bin: the file
    there if it was made from the same files and tokenizer, else made now (with a progress bar
    by bytes read, unless quiet). check(count) may refuse the count (raise) before a new file
    takes the place of the old; on any error, folders made here are removed again."""
    data_dir, folder = Path(data_dir), Path(folder)
    sources = text_sources(data_dir)
    index = _index(data_dir, sources, tokenizer, tokenizer_id)
    tokens = _matching(folder, index)
    if tokens is not None:
        check(len(tokens))
        if not quiet:
            print(f"reusing {folder / TOKENS_FILE} ({len(tokens):,} tokens)", file=sys.stderr)
        return tokens
    made = [p for p in (folder.parent, folder) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{TOKENS_FILE}.tmp"
    temporary_index = folder / f".{INDEX_FILE}.tmp"
    try:
        with temporary.open("wb") as out:
            count = _tokenize(data_dir, sources, tokenizer, out, quiet)
        check(count)
        temporary_index.write_text(json.dumps({**index, "tokens": count}, indent=1) + "\n")
        (folder / INDEX_FILE).unlink(missing_ok=True)  # no index ever describes another file
        temporary.replace(folder / TOKENS_FILE)
        temporary_index.replace(folder / INDEX_FILE)
    except BaseException:
        temporary.unlink(missing_ok=True)
        temporary_index.unlink(missing_ok=True)
        for path in reversed(made):
            if path.exists() and not any(path.iterdir()):
                path.rmdir()
        raise
    return _matching(folder, index)


def tokens_in_memory(data_dir, tokenizer, check: Callable[[int], None] = lambda count: None):
    """The same tokens as token_file, made in memory and written nowhere."""
    data_dir = Path(data_dir)
    sources = text_sources(data_dir)
    out = io.BytesIO()
    count = _tokenize(data_dir, sources, tokenizer, out, quiet=True)
    check(count)
    return np.frombuffer(out.getbuffer(), dtype=token_dtype(tokenizer))


def shared_tokens(data_dir, folder, tokenizer, tokenizer_id: str, quiet: bool = False,
                  check: Callable[[int], None] = lambda count: None, group=None) -> np.ndarray:
    """token_file's tokens on every launched rank, rank 0 alone writing: the others wait for
    it, then read its file where they share its disk (one machine) and tokenize in memory
    where they do not. A rank-0 failure stops every rank."""
    group = group or distributed.world()
    main = distributed.is_main(group)
    failure, tokens = None, None
    if main:
        try:
            tokens = token_file(data_dir, folder, tokenizer, tokenizer_id, quiet, check)
        except BaseException as error:  # re-raised below, once the other ranks know
            failure = error
    if group.size() > 1:
        done = mx.distributed.all_sum(mx.array(0 if failure else 1), group=group).item()
        if failure is None and done != group.size():
            raise CheckpointError("rank 0 could not make the token file: see its error")
    if failure is not None:
        raise failure
    if main:
        return tokens
    index = _index(Path(data_dir), text_sources(Path(data_dir)), tokenizer, tokenizer_id)
    tokens = _matching(Path(folder), index)
    return tokens if tokens is not None else tokens_in_memory(data_dir, tokenizer, check)
