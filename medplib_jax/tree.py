"""Parameter paths: one format everywhere. A path is the '/'-joined keys of a leaf
('model/layers_0/mlp/gate/wg/kernel'), whether it comes from a nested dict, a jax key path (attributes, dict keys
and sequence indices alike) or a checkpoint's metadata; so a path printed by compile-check, the sharding check or a
checkpoint error pastes into `config.train.trainable`. Imports nothing of the package."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A nested dict -> {path: leaf}."""
    return traverse_util.flatten_dict(tree, sep='/')


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{path: leaf} -> a nested dict."""
    return traverse_util.unflatten_dict(dict(flat), sep='/')


def _key_name(entry: Any) -> str:
    for attr in ('key', 'name', 'idx'):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def key_path(path: Iterable[Any]) -> str:
    """A jax key path -> its path ('params/model/.../kernel')."""
    return '/'.join(_key_name(k) for k in path)


def leaves(tree: Any) -> dict[str, Any]:
    """{path: leaf} of any pytree (a TrainState, boxed parameters, Orbax metadata)."""
    return {key_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """path -> (shape, dtype name) of every array leaf: a TrainState and the metadata Orbax keeps of one give the
    same paths."""
    return {p: (tuple(leaf.shape), np.dtype(leaf.dtype).name) for p, leaf in leaves(tree).items()}
