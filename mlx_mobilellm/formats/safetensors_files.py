"""Finding and reading a checkpoint's safetensors files: one file, a folder, or shards."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Tuple

import mlx.core as mx

from ..errors import CheckpointError
from ..input_checks import read_json_object
from .model_folder import INDEX_FILE
from .safetensors_header import check_safetensors_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SUFFIX = ".safetensors"


def _weight_file(path: Path) -> Path:
    """A weight file given by name: pickles are refused (loading them runs code from the
    file), and so is any other suffix, because mx.load picks its reader by the suffix."""
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: PyTorch pickle files are not read (they can run code); "
                              "re-save the state dict with safetensors.torch.save_file")
    if path.suffix != SUFFIX:
        raise CheckpointError(f"{path}: not a {SUFFIX} file; give a {SUFFIX} or .gguf file, "
                              "or the folder holding the checkpoint")
    return path


def _shard_name(name, index: Path) -> str:
    """A shard the index names: a plain *.safetensors file name, never a path that could
    lead out of the folder (or to a file of another format)."""
    if not (isinstance(name, str) and name.endswith(SUFFIX) and Path(name).name == name
            and "\\" not in name):
        raise CheckpointError(f"{index}: shard {name!r:.200} is not the name of a {SUFFIX} file "
                              "beside the index; fix the index's weight_map")
    return name


def _indexed_files(folder: Path, index: Path) -> list:
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map object)")
    names = dict.fromkeys(_shard_name(name, index) for name in weight_map.values())
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{index}: lists shard(s) that are not there: {', '.join(missing)}")
    return [folder / name for name in names]


def safetensors_files(path: Path) -> list:
    """The weight files of a checkpoint folder (sharded via its index, or every
    *.safetensors), or the file itself."""
    if path.is_file():
        return [_weight_file(path)]
    index = path / INDEX_FILE
    if index.exists():
        return _indexed_files(path, index)
    files = sorted(path.glob(f"*{SUFFIX}"))
    if not files:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = (f" (found {', '.join(pickles)}: re-save them with safetensors.torch.save_file)"
                if pickles else "")
        raise CheckpointError(f"{path}: no *.safetensors weight files{hint}")
    return files


def read_tensors(files: list) -> Iterator[Tuple[str, mx.array, Path]]:
    """(name, array, file) for every tensor; arrays are lazy until used. Each file's header
    is checked before MLX reads it, and a tensor may be in one file only."""
    seen = {}
    for file in files:
        for name in check_safetensors_header(file):
            if name in seen:
                raise CheckpointError(f"tensor '{name}' is in both {seen[name]} and {file}; "
                                      "a checkpoint holds each tensor once — download it again")
            seen[name] = file
        try:
            tensors = mx.load(str(file))
        except (RuntimeError, ValueError) as error:  # how MLX reports what it cannot read
            raise CheckpointError(f"{file}: cannot read safetensors ({error}); "
                                  "the file is truncated or corrupt — download or save it again") from None
        for name, array in tensors.items():
            yield name, array, file
