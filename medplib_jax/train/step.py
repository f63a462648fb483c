"""The one train step of every stage: `train_step(state, batch, rng) -> (state, metrics)`.

Built from the config by `build_train_step`; stages differ only in the data (which losses have anything to act
on), the loss weights and the trained paths, never in code. Inside one step:

- the global batch is split into `grad_accum` micro-batches, micro-batch m holding rows m, m + n, m + 2n, ...
  (strided, so every device keeps its rows: no data moves between devices), and `lax.scan` accumulates their
  gradients; the loss is the mean over every loss group of the step (train/losses.py), as DeepSpeed averages the
  per-GPU micro-batch losses over GPUs and accumulation steps;
- gradients are taken only for the trained subtree (frozen parameters are closed over, so no gradient is formed
  for them); global-norm clipping and AdamW (train/optimizer.py) update it;
- a non-finite loss or gradient norm skips the update (parameters and optimizer state unchanged) and is counted.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from medplib_jax.data.batch import TRAIN_KEYS
from medplib_jax.models.inputs import MODEL_INPUTS
from medplib_jax.models.layers import constrain
from medplib_jax.models.medplib import MedPLIBForCausalLM
from medplib_jax.models.moe import collect_moe_metrics
from medplib_jax.train.losses import LossWeights, medplib_loss
from medplib_jax.train.state import TrainState
from medplib_jax.train.trainable import merge, split

RNG_STREAMS = ('dropout', 'moe', 'region')  # LoRA dropout, MoE random token selection, region cell subsets
# Metrics summed over micro-batches (counts); every other metric is averaged.
SUMMED = ('tokens/supervised', 'tokens/correct', 'tokens/ce_sum', 'tokens/total', 'masks', 'mask/bce_sum',
          'mask/dice_sum', 'moe/expert_counts')


def micro_batches(x: jax.Array, n: int) -> jax.Array:
    """(B, ...) -> (n, B / n, ...), micro-batch m = rows m, m + n, ...: each device's contiguous block of rows
    splits into its own share of every micro-batch."""
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, 'activation_batch') + (None,) * (x.ndim - 2))


def forward_loss(model: MedPLIBForCausalLM, params: Any, batch: Mapping[str, jax.Array], *, weights: LossWeights,
                 loss_group: int, train: bool, rngs: Mapping[str, jax.Array] | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The whole MedPLIB forward and its weighted loss on one micro-batch (training or held-out evaluation)."""
    m = model.mcfg
    out, state = model.apply({'params': params}, **{k: batch[k] for k in MODEL_INPUTS}, train=train,
                             rngs=rngs, mutable=['intermediates'], method=MedPLIBForCausalLM.forward)
    moe = collect_moe_metrics(state.get('intermediates', {}))
    loss, metrics = medplib_loss(out, batch, weights, loss_group=loss_group, postprocess=m.postprocess,
                                 moe_aux=moe.get('aux_loss', 0.0), aux_coef=m.llm.moe.aux_loss_coef)
    metrics['tokens/total'] = batch['token_mask'].sum()
    if moe:
        metrics['moe/expert_counts'] = moe['expert_counts']  # (layers, experts) first choices
        metrics['moe/drop_fraction'] = moe['drop_fraction']  # (layers,)
    return loss, metrics


def build_train_step(model: MedPLIBForCausalLM, trained: frozenset[str], tx: optax.GradientTransformation,
                     schedule: optax.Schedule, *, weights: LossWeights, grad_accum: int, loss_group: int
                     ) -> Callable[[TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, dict]]:
    """The pure train step for this model, trained set, optimizer and loss recipe (jit it with shardings)."""

    def loss_fn(trained_params, frozen_params, batch, rngs):
        return forward_loss(model, merge(trained_params, frozen_params), batch, weights=weights,
                            loss_group=loss_group, train=True, rngs=rngs)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array):
        trained_params, frozen_params = split(state.params, trained)
        micro = {k: micro_batches(batch[k], grad_accum) for k in TRAIN_KEYS}
        step_rng = jax.random.fold_in(rng, state.step)

        def one(index, mb):
            keys = jax.random.split(jax.random.fold_in(step_rng, index), len(RNG_STREAMS))
            (loss, metrics), grads = grad_fn(trained_params, frozen_params, mb, dict(zip(RNG_STREAMS, keys)))
            return loss, grads, metrics

        first = {k: v[0] for k, v in micro.items()}
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32),
                             jax.eval_shape(one, jnp.int32(0), first))

        def body(acc, xs):
            out = one(*xs)
            return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, out), None

        (loss, grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
        loss = loss / grad_accum
        grads = jax.tree.map(lambda g, p: (g / grad_accum).astype(p.dtype), grads, trained_params)
        metrics = {k: v if k in SUMMED else v / grad_accum for k, v in metrics.items()}

        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, trained_params)
        new_trained = optax.apply_updates(trained_params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        bad = jnp.where(ok, 0, state.bad_steps + 1)
        new_state = state.replace(step=state.step + 1, params=merge(keep(new_trained, trained_params), frozen_params),
                                  opt_state=keep(opt_state, state.opt_state), bad_steps=bad,
                                  skipped_steps=state.skipped_steps + (~ok).astype(jnp.int32))
        metrics.update({'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(_update_count(state.opt_state)),
                        'accuracy': metrics['tokens/correct'] / jnp.maximum(metrics['tokens/supervised'], 1),
                        'update_skipped': (~ok).astype(jnp.int32), 'bad_steps': bad,
                        'skipped_steps': new_state.skipped_steps})
        return new_state, metrics

    return train_step


def _update_count(opt_state: Any) -> jax.Array:
    """The number of updates applied so far: the count of optax's learning-rate schedule (skipped steps keep the
    old optimizer state, so they do not advance it)."""
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
              if isinstance(s, optax.ScaleByScheduleState)]
    if len(states) != 1:
        raise ValueError(f'train step: expected one learning-rate schedule in the optimizer, found {len(states)}')
    return states[0].count
