"""Writing a model folder: tensors shard by shard, so that at most one shard is in memory, with
its config, tokenizer files and model card, into the place convert.destination gives it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Optional, Tuple

import mlx.core as mx

from mlx_mobilellm.errors import CheckpointError
from mlx_mobilellm.formats.model_folder import CONFIG_FILE, INDEX_FILE, TOKENIZER_FILES, write_json

from .destination import PRODUCER, atomic_output

MAX_SHARD_BYTES = 5 * 10**9


class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever the next tensor would push it
    past max_shard_bytes, so at most one shard is in memory. close() names the shards
    model-0000i-of-0000N.safetensors with an index, or model.safetensors when there is one."""

    def __init__(self, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES,
                 metadata: Optional[dict] = None, destination: Optional[Path] = None):
        self.folder = Path(folder)
        self.destination = Path(destination or folder)  # named in errors; folder may be temporary
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {**(metadata or {"format": "mlx"}), "producer": PRODUCER}
        self.pending: dict = {}
        self.pending_bytes = 0
        self.shards: list = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, array: mx.array) -> None:
        """Queue a tensor, computing it now: reading and transforming a lazily loaded source
        one tensor at a time is what keeps memory to about one shard."""
        if self.pending and self.pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        mx.eval(array)
        self.pending[name] = array
        self.pending_bytes += array.nbytes

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self.shards)}.safetensors"
        try:
            mx.save_safetensors(str(path), self.pending, metadata=self.metadata)
        except Exception as error:
            raise CheckpointError(f"{self.destination}: writing shard {len(self.shards) + 1} failed "
                                  f"({error}); check free disk space") from None
        self.shards.append((path.name, list(self.pending)))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list:
        """Write what is pending, give the shards their final names; return the file names."""
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for (temporary, tensors), name in zip(self.shards, names):
            (self.folder / temporary).rename(self.folder / name)
            weight_map.update({tensor: name for tensor in tensors})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names


def copy_tokenizer_files(checkpoint, folder: Path) -> None:
    """The tokenizer files of a checkpoint's folder, or those rebuilt from its GGUF metadata."""
    if checkpoint.folder is not None:
        for name in TOKENIZER_FILES:
            if (checkpoint.folder / name).exists():
                shutil.copyfile(checkpoint.folder / name, folder / name)
    elif checkpoint.gguf_metadata is not None:
        from mlx_mobilellm.formats.gguf_tokenizer import write_tokenizer_files

        write_tokenizer_files(checkpoint.gguf_metadata, folder)


def write_model_folder(mlx_path, tensors: Iterable[Tuple[str, mx.array]], config: dict,
                       tokenizer_source, readme: str, *, force: bool = False,
                       sources: Iterable = (), max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """An MLX model folder (see mlx_mobilellm.formats.model_folder) at `mlx_path`: the (name, array)
    pairs in shards, `config` as config.json, the tokenizer files of `tokenizer_source` (a
    mlx_mobilellm.formats.sources.Checkpoint, or None) and `readme` as README.md; written atomically, an
    existing folder replaced only as check_destination allows (`sources`: the inputs)."""
    mlx_path = Path(mlx_path)
    with atomic_output(mlx_path, force, sources) as folder:
        writer = ShardWriter(folder, max_shard_bytes, destination=mlx_path)
        for name, array in tensors:
            writer.add(name, array)
        writer.close()
        write_json(folder / CONFIG_FILE, config)
        if tokenizer_source is not None:
            copy_tokenizer_files(tokenizer_source, folder)
        (folder / "README.md").write_text(readme)
    return mlx_path
