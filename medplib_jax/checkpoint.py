"""Parameter checkpoints (Orbax): what a stage hands the next and what evaluators restore.

A params directory is an Orbax StandardCheckpointer directory holding one nested dict of arrays, with `<dir>.json`
beside it describing it (config, stage, layer layout, package versions). Restoring takes
a sharding per leaf, so a tree written on a pod restores on one CPU, and each host reads only its shards.
The full train-state manager (optimizer state, data iterator, resume) builds on this.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp

from flax import traverse_util

FINAL_PARAMS = 'final_params'  # a run directory's hand-off: merged (LoRA folded) parameters


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep='/')


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(dict(flat), sep='/')


def versions() -> dict[str, str]:
    out = {}
    for pkg in ('medplib-jax', 'jax', 'flax', 'optax', 'orbax-checkpoint', 'grain'):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = 'unknown'
    return out


def save_params(path: str, params: Mapping[str, Any], metadata: Mapping[str, Any]) -> str:
    """Writes `params` to the Orbax directory `path` (every process writes its shards) and, from process 0, the
    metadata JSON next to it (`path` + '.json'). Returns the absolute path."""
    path = os.path.abspath(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, params, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        with open(path + '.json', 'w') as f:
            json.dump({**metadata, 'versions': versions()}, f, indent=1, default=str)
    return path


def resolve_params_dir(path: str, field: str) -> str:
    """A run directory (its `final_params`) or an Orbax params directory itself -> the params directory."""
    for candidate in (os.path.join(path, FINAL_PARAMS), path):
        if os.path.isfile(os.path.join(candidate, '_CHECKPOINT_METADATA')):
            return os.path.abspath(candidate)
    raise FileNotFoundError(f'{field}: {path}: no parameters here (neither {os.path.join(path, FINAL_PARAMS)} nor an '
                            f'Orbax params directory); train that stage first or point the field elsewhere')


def params_shapes(path: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    """'/'-joined path -> (shape, dtype) of every array in a params directory, without reading the arrays."""
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    return {k: (tuple(m.shape), m.dtype) for k, m in flatten(tree).items()}


def restore_params(path: str, sharding_of: Callable[[str, tuple[int, ...]], jax.sharding.Sharding]
                   ) -> dict[str, jax.Array]:
    """Reads a params directory with `sharding_of(path, shape)` for each leaf -> flat '/'-joined dict."""
    shapes = params_shapes(path)
    target = unflatten({k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_of(k, shape))
                        for k, (shape, dtype) in shapes.items()})
    return flatten(ocp.StandardCheckpointer().restore(path, target))
