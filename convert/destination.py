"""Where an output may go, and writing it there safely: into a temporary sibling that takes the
destination's place only when complete, --force replacing only what this tool wrote.

What --force may replace (check_destination): an empty folder, or a folder of nothing but
regular files under the names our writers give (OUR_FILES, numbered shards) that is marked as
ours: config.json says model_type "mlx_mobilellm" (every MLX folder, also of earlier versions),
or every safetensors file carries PRODUCER in its metadata (what ShardWriter writes, so also
Hugging Face exports). For a file output (GGUF): a regular file starting with the GGUF magic.
Never the current directory, an input, or a folder holding either, whatever it holds. Paths
are resolved first, so "." or ".." cannot hide the folder they name, and the temporary beside
the destination lies outside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

from mlx_mobilellm.errors import CheckpointError, ParameterError
from mlx_mobilellm.formats.model_folder import (CONFIG_FILE, INDEX_FILE, TOKENIZER_FILES,
                                                is_model_folder)

PRODUCER = "mlx-mobilellm"
"""The "producer" of every safetensors shard we write: what tells --force a folder is ours."""
OUR_FILES = {CONFIG_FILE, INDEX_FILE, "model.safetensors", "README.md", *TOKENIZER_FILES}
_NUMBERED_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
GGUF_MAGIC = b"GGUF"
# The middle of a temporary's name, ".NAME.<middle>.tmp": the writer's pid and a random tag;
# or, from earlier versions, tempfile.mkdtemp's 8 characters or a uuid4 hex (no pid).
_TEMPORARY = re.compile(r"(?P<pid>\d{1,9})\.[0-9a-f]{8}|[a-z0-9_]{8}|[0-9a-f]{32}")
# Temporaries without a pid are removed once untouched this long: a live writer renames a
# shard into its folder (or writes to its file) far more often than that.
LEGACY_TEMPORARY_AGE_S = 24 * 3600


# --- what may be replaced -------------------------------------------------------------------

def _enclosure(outer: Path, inner: Path) -> Optional[str]:
    """"is" when `outer` is the existing path `inner`, "holds" when it is a folder above it.
    Compared as files (device and inode), so that neither a symlink nor a case-insensitive
    file system can hide it."""
    for path in (inner, *inner.parents):
        if os.path.samefile(outer, path):
            return "is" if path == inner else "holds"
    return None


def _protected(target: Path, sources: Iterable) -> Optional[str]:
    """Why `target` may never be replaced: it is, or holds, the current directory or an input.
    (Writing a new folder inside an input is harmless: only replacing one loses it.)"""
    named = [("the current directory", Path.cwd())]
    # An input that is no path (a hub repo id) has nothing here to lose.
    named += [(f"the input {source}", Path(source)) for source in sources
              if source is not None and Path(source).exists()]
    for what, path in named:
        relation = _enclosure(target, path.resolve())
        if relation:
            return f"{relation} {what}"
    return None


def _signed_by_us(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as file:  # reads only the header
            return (file.metadata() or {}).get("producer") == PRODUCER
    except SafetensorError:
        return False  # not a safetensors file: nothing of ours


def _config_is_ours(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        return False  # not JSON (or absurdly nested): not a config we wrote
    return isinstance(config, dict) and is_model_folder(config)


def _not_our_folder(folder: Path) -> Optional[str]:
    """What shows that `folder` is not a model folder this tool wrote; None when it is one."""
    entries = sorted(folder.iterdir())
    foreign = [entry.name + ("/" if entry.is_dir() else "") for entry in entries
               if entry.is_symlink() or not entry.is_file()
               or not (entry.name in OUR_FILES or _NUMBERED_SHARD.fullmatch(entry.name))]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        return f"holds {foreign[0]!r}{more}"
    shards = [entry for entry in entries if entry.suffix == ".safetensors"]
    signed = shards and all(_signed_by_us(shard) for shard in shards)
    if entries and not signed and not _config_is_ours(folder / CONFIG_FILE):
        return (f"is not marked as written by {PRODUCER} (config.json's model_type, the "
                "safetensors metadata)")
    return None


def _not_our_file(path: Path) -> Optional[str]:
    if not path.is_file():
        return "is not a regular file"
    with open(path, "rb") as file:
        if file.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            return "is not a GGUF file"
    return None


def check_destination(destination, force: bool, sources: Iterable = (),
                      folder: bool = True) -> Path:
    """Refuse an output path that may not be written, before any work is done: one that exists
    (unless `force`), and, even with `force`, one that is not ours to replace (see the module
    docstring). `sources` are the command's inputs (paths; a hub repo id names none). `folder`:
    the output is a model folder, else a GGUF file. Returns the destination resolved."""
    path = Path(destination)
    target = path.resolve()
    if not target.exists():
        return target
    protected = _protected(target, sources)
    if protected:
        raise ParameterError(lambda name: f"{path}: {protected}, which {name('force')} never "
                                          "replaces; choose another path")
    if folder and not target.is_dir():
        raise CheckpointError(f"{path}: is a file, not a folder; choose another path")
    if not folder and target.is_dir():
        raise CheckpointError(f"{path}: is a folder; give the path of the .gguf file to write")
    reason = _not_our_folder(target) if folder else _not_our_file(target)
    if reason:
        ours = "model folders this tool wrote" if folder else "GGUF files"
        raise ParameterError(lambda name: f"{path}: {reason}; {name('force')} replaces only "
                                          f"{ours}: remove it yourself or choose another path")
    if not force:
        raise ParameterError(lambda name: f"{path}: already exists; choose another path or pass "
                                          f"{name('force')}")
    return target


# --- temporaries ----------------------------------------------------------------------------

def _temporary_beside(target: Path) -> Path:
    # Our pid in the name lets a later run tell a dead run's leftover from a live run's work.
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _discard(path: Path) -> None:
    """Best effort: it runs while another error is reported, or tidies a dead run's leftover;
    failing at it must neither hide that error nor stop this run."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_stale_temporaries(target: Path) -> None:
    """The temporaries beside `target` whose writer is gone (killed runs): those of a process
    that no longer exists, and pid-less ones of earlier versions untouched for a day. (A pid
    is judged on this machine: a folder shared with a machine running a conversion into it
    at the same moment is outside what this guards.)"""
    prefix, suffix = f".{target.name}.", ".tmp"
    for path in target.parent.iterdir():
        name = path.name
        match = name.startswith(prefix) and name.endswith(suffix) and \
            _TEMPORARY.fullmatch(name[len(prefix):-len(suffix)])
        if not match:
            continue
        if match["pid"]:
            stale = _process_gone(int(match["pid"]))
        else:
            stale = time.time() - path.lstat().st_mtime > LEGACY_TEMPORARY_AGE_S
        if stale:
            _discard(path)


def _naming_destination(error: OSError, temporary: Path, target: Path,
                        destination: Path) -> OSError:
    """`error` naming the user's destination where it names our hidden temporary, or no file
    at all (a failed write says only "No space left on device")."""
    def as_user_sees(name):
        if not isinstance(name, str):
            return name
        path = Path(name)
        if path == target:
            return str(destination)
        if temporary in (path, *path.parents):
            return str(destination / path.relative_to(temporary))
        return name  # another file's (an input's): as it is

    if error.errno is None:
        return error
    if error.filename is None:
        return OSError(error.errno, error.strerror, str(destination))
    return OSError(error.errno, error.strerror, as_user_sees(error.filename), None,
                   as_user_sees(error.filename2))


def _put_in_place(temporary: Path, target: Path) -> None:
    if not target.is_dir():
        os.replace(temporary, target)  # atomic, also over an existing file
        return
    # A folder cannot be renamed over a non-empty one: the old one steps aside (under a
    # temporary's name, so a run killed now leaves it to be cleaned), and back if need be.
    old = _temporary_beside(target)
    os.rename(target, old)
    try:
        os.rename(temporary, target)
    except BaseException:
        os.rename(old, target)
        raise
    _discard(old)


@contextlib.contextmanager
def atomic_output(destination, force: bool = False, sources: Iterable = (),
                  folder: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `destination` (an empty folder when `folder`, else the
    path of the file to create); when the block completes it takes the destination's place,
    and when it fails it is removed: nothing half-written remains and an existing destination
    stays as it was. What may be written: see check_destination."""
    destination = Path(destination)
    sources = list(sources)
    target = check_destination(destination, force, sources, folder)
    # Folders made on the way to the destination go again when it is not written.
    made = [parent for parent in (target.parent, *target.parent.parents) if not parent.exists()]
    temporary = _temporary_beside(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        if folder:
            temporary.mkdir()  # mode 0o777 less the umask (tempfile.mkdtemp's would be 0o700)
        yield temporary
        check_destination(destination, force, sources, folder)  # again: the work took a while
        _put_in_place(temporary, target)
    except BaseException as error:
        _discard(temporary)
        for parent in made:  # the deepest first
            with contextlib.suppress(OSError):
                parent.rmdir()
        if isinstance(error, OSError):
            raise _naming_destination(error, temporary, target, destination) from None
        raise
