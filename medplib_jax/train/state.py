"""The train state, its shardings, and its creation from (possibly loaded) parameters.

Parameters are one nested dict (the whole model, frozen parts included); the optimizer state covers only the
trained subtree (train/trainable.py), so frozen parameters have no Adam moments at all.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medplib_jax.sharding import Rules
from medplib_jax.train.trainable import split


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken (applied or skipped)
    params: Any
    opt_state: Any  # over the trained subtree only
    bad_steps: jax.Array  # non-finite steps in a row (reset by a good one)
    skipped_steps: jax.Array  # non-finite steps in all


def _zero() -> jax.Array:
    return jnp.zeros((), jnp.int32)


def create(params: Any, trained: frozenset[str], tx: optax.GradientTransformation) -> TrainState:
    trained_params, _ = split(params, trained)
    return TrainState(step=_zero(), params=params, opt_state=tx.init(trained_params), bad_steps=_zero(),
                      skipped_steps=_zero())


def state_shardings(boxed_params: Any, trained: frozenset[str], tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Rules) -> TrainState:
    """Shardings of the whole state from the (abstract) boxed parameters: the optimizer's moments take their
    parameter's logical axes (optax maps over the boxes), counters are replicated."""
    boxed_trained, _ = split(boxed_params, trained)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(step=scalar, params=boxed_params, opt_state=jax.eval_shape(tx.init, boxed_trained),
                          bad_steps=scalar, skipped_steps=scalar)
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, list(rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_bytes(tree: Any) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))
