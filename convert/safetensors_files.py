"""Finding and reading a checkpoint's safetensors files: one file, a folder, or shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Tuple

import mlx.core as mx

from mlx_mobilellm.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def safetensors_files(path: Path) -> list:
    """The weight files of a checkpoint folder (sharded via its index, or every
    *.safetensors), or the file itself. Pickled PyTorch weights are refused: loading them
    runs code from the file."""
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: PyTorch pickle files are not read (they can run code); "
                                  "re-save the state dict with safetensors.torch.save_file")
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{index}: not a valid safetensors index ({error})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) that are not there: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = (f" (found {', '.join(pickles)}: re-save them with safetensors.torch.save_file)"
                if pickles else "")
        raise CheckpointError(f"{path}: no *.safetensors weight files{hint}")
    return files


def read_tensors(files: list) -> Iterator[Tuple[str, mx.array, Path]]:
    """(name, array, file) for every tensor; arrays are lazy until used."""
    for file in files:
        try:
            tensors = mx.load(str(file))
        except Exception as error:  # MLX reports malformed files as RuntimeError/ValueError
            raise CheckpointError(f"{file}: cannot read safetensors ({error}); "
                                  "the file is truncated or corrupt — download or save it again") from None
        for name, array in tensors.items():
            yield name, array, file
