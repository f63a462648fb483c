"""Streaming conversion: checkpoint tensors -> an Orbax params directory of the model's tree, one tensor at a time.

`plan_conversion` works from names and shapes only (the shard index and the file headers): for every parameter of
the model's tree it finds the checkpoint keys that fill it through the KeyTable's inverse (one key; one per expert
for a stacked MoE kernel `[{e}]`; one per layer for a scanned `layers/` stack), and reports every missing,
unexpected and mis-shaped key in one error before any tensor is read.

`write_params` then fills one parameter at a time: reads its tensors (files memory-mapped, one open at a time),
lays them out, places the parameter on this host's devices (FSDP over its largest divisible axis, as `medplib-jax
export` does) and hands it to the group writer (writer.py). Host memory at any moment: the group awaiting its
partial save (writer.GROUP_BYTES) + the parameter being assembled (up to twice while it is copied to the devices)
+ one source tensor's mapped pages.
"""
from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from tqdm import tqdm

from medplib_jax import sharding
from medplib_jax.convert.common import ConversionError, KeyTable, Layout
from medplib_jax.convert.sources import CheckpointSource
from medplib_jax.convert.writer import GROUP_BYTES, ParamsWriter

LISTED = 60  # keys listed one by one in an error; beyond that, folded by layer / block index with counts


@dataclasses.dataclass(frozen=True)
class Slot:
    """One source tensor of a parameter: entry `index` of its stacked leading axes (() = the whole parameter)."""
    key: str
    index: tuple[int, ...]
    layout: Layout


@dataclasses.dataclass
class Plan:
    """targets: path -> (shape, dtype) to write; slots: path -> its source tensors; owner: key -> the source it
    is read from (the first that holds it); overlap: key -> a later source that holds it too (compared, not used);
    grow: path -> (axis, source length): the source is shorter along `axis`, the rest is drawn N(0, init_std)."""
    targets: dict[str, tuple[tuple[int, ...], np.dtype]]
    slots: dict[str, list[Slot]]
    owner: dict[str, CheckpointSource]
    overlap: dict[str, CheckpointSource]
    grow: dict[str, tuple[int, int]]

    def order(self) -> list[str]:
        """Parameters in reading order (source, then position in it), so shards are opened about once each."""
        rank: dict[int, int] = {}
        for src in self.owner.values():
            rank.setdefault(id(src), len(rank))

        def first(path: str) -> tuple[int, int]:
            return min((rank[id(self.owner[s.key])], self.owner[s.key].entries[s.key].order) for s in self.slots[path])
        return sorted(self.slots, key=first)


def _expected_slots(table: KeyTable, path: str, shape: tuple[int, ...], index: tuple[int, ...] = ()
                    ) -> list[Slot] | None:
    """The source tensors the table says fill `path` (None: no rule names it)."""
    hit = table.source_key(path)
    if hit is not None:
        return [Slot(hit[0], index, hit[1])]
    if shape and table.source_key(path, (0,)) is not None:  # stacked: one key per entry of the leading axis
        slots = [table.source_key(path, (e,)) for e in range(shape[0])]
        if any(s is None for s in slots):
            return None
        return [Slot(key, index + (e,), layout) for e, (key, layout) in enumerate(slots)]
    m = re.fullmatch(r'(.*/layers)/(.*)', path)
    if m and shape:  # scanned: layer i of the stack is the unscanned `layers_i` parameter
        out = []
        for i in range(shape[0]):
            part = _expected_slots(table, f'{m[1]}_{i}/{m[2]}', shape[1:], index + (i,))
            if part is None:
                return None
            out += part
        return out
    return None


def fold(names: Sequence[str]) -> str:
    """Every name when few; else names with layer / block indices folded, each with its count."""
    names = sorted(names)
    if len(names) <= LISTED:
        return ', '.join(names)
    counts = Counter(re.sub(r'((?:layers|blocks|deepspeed_experts)[._])\d+', r'\1*', n) for n in names)
    return ', '.join(f'{n} (x{c})' if c > 1 else n for n, c in sorted(counts.items()))


def plan_conversion(want: Mapping[str, tuple[tuple[int, ...], Any]], sources: Sequence[CheckpointSource],
                    table: KeyTable, *, label: str, grow_axes: Mapping[str, int] | None = None) -> Plan:
    """want: '/'-joined path -> (shape, dtype) of every parameter to write. sources: in priority order (a key
    is read from the first that holds it). grow_axes: path -> axis along which the source may be shorter (a
    vocabulary the model extends). Raises ConversionError listing every problem, before any tensor is read."""
    grow_axes = dict(grow_axes or {})
    plan = Plan({p: (tuple(s), np.dtype(d)) for p, (s, d) in want.items()}, {}, {}, {}, {})
    missing, wrong, unnamed = [], [], []
    expected: set[str] = set()
    for path, (shape, _) in plan.targets.items():
        slots = _expected_slots(table, path, shape)
        if slots is None:
            unnamed.append(path)
            continue
        plan.slots[path] = slots
        for slot in slots:
            expected.add(slot.key)
            holders = [s for s in sources if slot.key in s]
            if not holders:
                missing.append(slot.key)
                continue
            src = plan.owner[slot.key] = holders[0]
            if len(holders) > 1:
                plan.overlap[slot.key] = holders[1]
            got = slot.layout.shape(src.entries[slot.key].shape)
            need = shape[len(slot.index):]
            axis = grow_axes.get(path)
            if got == need:
                continue
            if (axis is not None and len(got) == len(need) and got[axis] < need[axis]
                    and all(g == n for i, (g, n) in enumerate(zip(got, need)) if i != axis)):
                plan.grow[path] = (axis, got[axis])
                continue
            where = path + ''.join(f'[{i}]' for i in slot.index)
            wrong.append(f'{slot.key} -> {where}: {got}, the model wants {need}')
    unexpected = [k for s in sources for k in s.keys() if k not in expected and not table.ignored(k)]
    if missing or unexpected or wrong or unnamed:
        parts = [f'{label}: does not fit the model (nothing was written)']
        if missing:
            parts.append(f'missing {len(missing)} (checkpoint keys the model needs): {fold(missing)}')
        if unexpected:
            parts.append(f'unexpected {len(unexpected)} (in the checkpoint, not in the model): {fold(unexpected)}')
        if wrong:
            parts.append(f'wrong shape {len(wrong)}: {", ".join(wrong[:LISTED])}'
                         + (f', ... {len(wrong) - LISTED} more' if len(wrong) > LISTED else ''))
        if unnamed:
            parts.append(f'{len(unnamed)} parameters no checkpoint key maps to: {fold(unnamed)}')
        raise ConversionError('; '.join(parts))
    return plan


def host_mesh() -> jax.sharding.Mesh:
    """This host's devices on one `fsdp` axis (the converter runs in one process)."""
    devices = jax.local_devices()
    return jax.make_mesh((len(devices),), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def _grown_rows(path: str, shape: tuple[int, ...], axis: int, start: int, dtype: np.dtype, seed: int,
                std: float) -> np.ndarray:
    """Rows `start:` along `axis`, N(0, std): transformers 4.31's `resize_token_embeddings` initialises new rows with
    `_init_weights` (normal, initializer_range). Seeded per parameter, so independent of order and sharding."""
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    size = list(shape)
    size[axis] = shape[axis] - start
    return rng.normal(0.0, std, size=size).astype(dtype)


def _shard(plan: Plan, path: str, idx: tuple[slice, ...], grown: np.ndarray | None) -> np.ndarray:
    """One device's shard of parameter `path` (`idx`: its slices of the full shape), built from the source tensors
    that overlap it: each is viewed in its mapped file, laid out, sliced, and cast while copied into place."""
    shape, dtype = plan.targets[path]
    ranges = [range(*sl.indices(n)) for sl, n in zip(tuple(idx) + (slice(None),) * (len(shape) - len(idx)), shape)]
    out = np.empty([len(r) for r in ranges], dtype)
    grow = plan.grow.get(path)
    if grow is not None:  # the new vocabulary rows (the checkpoint's rows are the slots' below)
        axis, n = grow
        r = ranges[axis]
        lo = max(r.start, n)
        if lo < r.stop:
            dst = [slice(None)] * len(shape)
            dst[axis] = slice(lo - r.start, r.stop - r.start)
            src = [slice(q.start, q.stop) for q in ranges]
            src[axis] = slice(lo - n, r.stop - n)
            out[tuple(dst)] = grown[tuple(src)]
    for slot in plan.slots[path]:
        k = len(slot.index)
        if any(i not in ranges[d] for d, i in enumerate(slot.index)):
            continue
        value = slot.layout.forward(plan.owner[slot.key].get(slot.key))  # a view: nothing copied yet
        rest = ranges[k:]
        if grow is not None:
            axis = grow[0] - k
            rest = [range(r.start, min(r.stop, value.shape[axis])) if d == axis else r for d, r in enumerate(rest)]
        piece = value[tuple(slice(r.start, r.stop) for r in rest)]
        out[tuple(i - ranges[d].start for d, i in enumerate(slot.index))
            + tuple(slice(0, len(r)) for r in rest)] = piece
        del value, piece
    return out


def write_params(plan: Plan, writer: ParamsWriter, sharding_of: Callable[[str, tuple[int, ...]], Any], *,
                 seed: int = 0, init_std: float = 0.02, progress: bool = True) -> list[tuple[str, str]]:
    """Builds, places and queues every parameter of `plan`, one device shard at a time (host memory: one shard
    and one source tensor; on a CPU host the devices are host memory too). Returns (key, how) for the keys two
    sources hold with different values; the first source's values are used."""
    conflicts = []
    total = sum(len(s) for s in plan.slots.values()) + len(plan.overlap)
    with tqdm(total=total, unit='tensor', desc='convert', disable=not progress, leave=False) as bar:
        for path in plan.order():
            shape, dtype = plan.targets[path]
            grow = plan.grow.get(path)
            grown = _grown_rows(path, shape, grow[0], grow[1], dtype, seed, init_std) if grow else None
            array = jax.make_array_from_callback(shape, sharding_of(path, shape),
                                                 lambda idx, p=path, g=grown: _shard(plan, p, idx, g))
            array.block_until_ready()  # the host shards are released once copied: not two parameters in flight
            writer.add(path, array)
            del array, grown
            bar.update(len(plan.slots[path]))
            for slot in plan.slots[path]:
                other = plan.overlap.get(slot.key)
                if other is None:
                    continue
                ours, theirs = plan.owner[slot.key].get(slot.key), other.get(slot.key)
                if theirs.shape != ours.shape:
                    conflicts.append((slot.key, f'shape {theirs.shape} in {other.label}'))
                else:
                    diff = float(np.max(np.abs(np.asarray(ours, np.float32) - np.asarray(theirs, np.float32)),
                                        initial=0.0))
                    if diff > 0:
                        conflicts.append((slot.key, f'max |diff| {diff:.3g}'))
                del ours, theirs
                bar.update()
    for src in {id(s): s for s in [*plan.owner.values(), *plan.overlap.values()]}.values():
        src.close()
    return conflicts


def convert_to_params_dir(out: str, want: Mapping[str, tuple[tuple[int, ...], Any]],
                          sources: Sequence[CheckpointSource], table: KeyTable, metadata: Mapping[str, Any], *,
                          label: str, grow_axes: Mapping[str, int] | None = None, seed: int = 0,
                          init_std: float = 0.02, group_bytes: int = GROUP_BYTES, progress: bool = True,
                          log: Callable[[str], None] = print) -> str:
    """plan -> stream -> publish `out` (+ `out.json` with `metadata`, the conflicts and the mesh)."""
    plan = plan_conversion(want, sources, table, label=label, grow_axes=grow_axes)
    for src in sources:
        for note in src.notes:
            log(f'note: {note}')
    mesh = host_mesh()
    with ParamsWriter(out, group_bytes) as writer:
        conflicts = write_params(plan, writer, sharding.largest_dim_sharding(mesh), seed=seed, init_std=init_std,
                                 progress=progress)
        if conflicts:
            first, second = plan.owner[conflicts[0][0]].label, plan.overlap[conflicts[0][0]].label
            log(f'note: {len(conflicts)} tensors differ between {first} and {second} (those of {first} are used): '
                + fold([k for k, _ in conflicts]))
        n_params = sum(math.prod(s) for s, _ in plan.targets.values())
        path = writer.commit({
            **metadata, 'converted_from': [s.path for s in sources], 'arrays': len(plan.targets),
            'parameters': n_params, 'grown': {p: {'axis': a, 'from': n, 'init': f'normal(0, {init_std})', 'seed': seed}
                                              for p, (a, n) in plan.grow.items()},
            'conflicts': {k: how for k, how in conflicts}, 'mesh': dict(mesh.shape)})
        log(f'convert: {len(plan.targets)} arrays ({n_params:,} parameters, {writer.bytes / 2**30:.2f} GiB) in '
            f'{writer.groups} groups -> {path}')
    return path
