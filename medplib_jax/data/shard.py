"""Sharding by process: each process reads its block of every global batch, all shards equally long."""
from __future__ import annotations

import sys

import grain

from medplib_jax.data.collate import PADDING


class EvenShard(grain.MapDataset):
    """This process's rows of every global batch: with `block` = rows per process and batch, global batch k holds
    elements k * block * count ..., and shard `index` takes its contiguous `block` of them (`index` = 0 the first).
    Process p's rows then land on process p's devices in the order one process would hold them, so n processes
    train on exactly the global batches of one (same loss groups, same per-row randomness). Every shard has the
    same length (the ends are padding elements), so all processes run the same number of batches."""

    def __init__(self, parent: grain.MapDataset, index: int, count: int, block: int = 1):
        super().__init__(parent)
        if not 0 <= index < count:
            raise ValueError(f'shard index {index} outside 0..{count - 1}')
        self._index, self._count, self._block, self._n = index, count, block, len(parent)
        per_batch = block * count
        self._length = self._n if self._n >= sys.maxsize else -(-self._n // per_batch) * block

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._block)
        g = (batch * self._count + self._index) * self._block + row
        return self._parent[g] if g < self._n else PADDING

    def __str__(self) -> str:
        return f'EvenShard({self._index}/{self._count})'
