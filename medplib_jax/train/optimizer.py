"""The reference's optimiser (train_ds_medplib.py's DeepSpeed config): AdamW with betas (0.9, 0.95), weight decay 0,
global-norm clipping 1.0, and DeepSpeed 0.13's `WarmupDecayLR` (linear warmup type) as the schedule."""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax


def warmup_steps(steps_per_epoch: int, fraction: float = 0.01, minimum: int = 2) -> int:
    """The reference warms up over int(0.01 * steps_per_epoch) optimizer steps; DeepSpeed's WarmupLR raises that to
    at least 2."""
    return max(minimum, int(fraction * steps_per_epoch))


def steps_per_epoch(num_records: int, global_batch: int, grad_accum: int) -> int:
    """train_ds_medplib.py: ceil(ceil(N / (micro_batch x gpus)) / grad_accum), with micro_batch x gpus = the
    global batch of one accumulation step."""
    micro = global_batch // grad_accum
    return math.ceil(math.ceil(num_records / micro) / grad_accum)


def warmup_decay_schedule(peak_lr: float, total_steps: int, warmup: int) -> optax.Schedule:
    """DeepSpeed WarmupDecayLR (warmup_min_lr 0, linear): lr(i) = peak * i / warmup for i < warmup, then
    peak * (total - i) / max(1, total - warmup), never below 0. `i` is the number of updates done so far, so the
    first update runs at lr 0 as in DeepSpeed."""
    def schedule(count):
        i = jnp.asarray(count, jnp.float32)
        up = peak_lr * i / warmup
        down = peak_lr * jnp.maximum(0.0, (total_steps - i) / max(1, total_steps - warmup))
        return jnp.where(i < warmup, up, down)
    return schedule


def make_optimizer(schedule: optax.Schedule, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.0, clip_norm: float = 1.0) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (DeepSpeed clips the gradients before the optimizer step)."""
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
