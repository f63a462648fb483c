"""Host batches from the data pipeline -> global jax.Arrays sharded over the mesh's batch axes (multi-host safe).

Each process's pipeline picks the length bucket from its own rows (data/collate.py `length_bucket`), so with
several processes they first agree on the longest one (one all-gather of an integer per step) and pad to it: every
process must contribute the same per-process shapes to `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from medplib_jax.data.batch import pad_batch
from medplib_jax.data.skips import MESSAGES_KEY
from medplib_jax.sharding import data_sharding


def agreed_length(length: int) -> int:
    """The longest of every process's sequence length (itself with one process)."""
    if jax.process_count() == 1:
        return length
    return int(np.max(multihost_utils.process_allgather(np.asarray(length, np.int32))))


def global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, keys: Sequence[str] | None = None
                 ) -> dict[str, jax.Array]:
    """This process's batch (its rows of the global batch) -> global arrays, first axis over ('data', 'fsdp').
    `keys` selects the arrays to transfer (default: all)."""
    length = agreed_length(batch['input_ids'].shape[1])
    batch = pad_batch({k: v for k, v in batch.items() if k != MESSAGES_KEY and (keys is None or k in keys)}, length)
    return {k: jax.make_array_from_process_local_data(data_sharding(mesh, v.ndim), v) for k, v in batch.items()}
