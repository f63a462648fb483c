"""A params directory written group by group and published whole.

Orbax 0.12.8's partial saving (`orbax.checkpoint.experimental.v1.partial`: `save` once per group of arrays, then
`finalize`) lets a converter hand over a group, drop it and read the next, so it never holds the whole tree. The
finalised checkpoint keeps the tree as its `state/` item: the same pytree directory `StandardCheckpointer` writes
(`_METADATA`, `_sharding`, the OCDBT manifest and data). That item, with the step metadata file a
StandardCheckpointer writes beside it (`_CHECKPOINT_METADATA`), is published as the params directory, which
`checkpoint.resolve_params_dir` / `restore_params` read like any other (tests/test_convert_release.py).

Atomic: everything is written inside a temporary sibling of `out` and renamed at the end; on any error the sibling
is removed, so `out` either is complete or does not exist.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from medplib_jax import checkpoint
from medplib_jax.tree import unflatten

GROUP_BYTES = 256 * 2**20  # arrays handed to one partial save: the writer's share of the converter's memory
_STEP_METADATA = '_CHECKPOINT_METADATA'


class ParamsWriter:
    """`with ParamsWriter(out) as w: w.add(path, array) ...; w.commit(metadata)`."""

    def __init__(self, out: str, group_bytes: int = GROUP_BYTES):
        self.out = os.path.abspath(out)
        if os.path.lexists(self.out):
            raise FileExistsError(f'--out {self.out}: already exists; remove it or choose another directory')
        parent = os.path.dirname(self.out)
        os.makedirs(parent, exist_ok=True)
        self._tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(self.out)}.converting-', dir=parent)
        self._partial = os.path.join(self._tmp, 'params')
        self._group: dict[str, jax.Array] = {}
        self._group_bytes = 0
        self.group_limit = group_bytes
        self.groups = 0
        self.arrays = 0
        self.bytes = 0

    def __enter__(self) -> 'ParamsWriter':
        return self

    def __exit__(self, *exc: Any) -> None:
        self._group.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def add(self, path: str, array: jax.Array) -> None:
        """Queues one array ('/'-joined path); a full group is written before this returns."""
        self._group[path] = array
        self._group_bytes += array.nbytes
        self.arrays += 1
        self.bytes += array.nbytes
        if self._group_bytes >= self.group_limit:
            self.flush()

    def flush(self) -> None:
        if not self._group:
            return
        from orbax.checkpoint.experimental.v1 import partial
        partial.save(self._partial, unflatten(self._group))
        self._group.clear()
        self._group_bytes = 0
        self.groups += 1

    def commit(self, metadata: Mapping[str, Any]) -> str:
        """Writes the last group, finalises, publishes `out` with its metadata and tokenizer inside
        (`checkpoint.describe_params_dir`)."""
        from orbax.checkpoint.experimental.v1 import partial
        self.flush()
        if not self.groups:
            raise ValueError(f'--out {self.out}: nothing to write')
        partial.finalize(self._partial)
        item = os.path.join(self._partial, 'state')
        with open(os.path.join(self._partial, _STEP_METADATA)) as f:
            step = json.load(f)
        # The published directory is read by StandardCheckpointer: its step metadata names that handler.
        step['item_handlers'] = ocp.StandardCheckpointHandler().typestr()
        with open(os.path.join(item, _STEP_METADATA), 'w') as f:
            json.dump(step, f)
        checkpoint.describe_params_dir(item, {**metadata, 'groups': self.groups})
        os.rename(item, self.out)  # last: the directory appears complete or not at all
        return self.out
