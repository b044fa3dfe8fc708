"""Writing a model folder safely: shard by shard, into a temporary sibling renamed at the end."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx

from mlx_mobilellm.errors import CheckpointError
from mlx_mobilellm.model_folder import INDEX_FILE

MAX_SHARD_BYTES = 5 * 10**9


@contextlib.contextmanager
def atomic_folder(destination: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `destination`; when the block completes it
    replaces `destination`, and when it fails it is removed: no half-written output remains."""
    destination = Path(destination)
    if destination.exists() and not force:
        raise CheckpointError(f"{destination}: already exists; choose another path or pass --force")
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp",
                                      dir=destination.parent))
    try:
        yield temporary
        if destination.exists():
            shutil.rmtree(destination) if destination.is_dir() else destination.unlink()
        temporary.rename(destination)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever the next tensor would push it
    past max_shard_bytes, so at most one shard is in memory. close() names the shards
    model-0000i-of-0000N.safetensors with an index, or model.safetensors when there is one."""

    def __init__(self, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES,
                 metadata: Optional[dict] = None, destination: Optional[Path] = None):
        self.folder = Path(folder)
        self.destination = Path(destination or folder)  # named in errors; folder may be temporary
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata or {"format": "mlx"}
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
