"""Training losses. Text: next-token cross-entropy with HF's conventions (shift by one, ignore -100,
token-level mean over the whole batch)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medplib_jax.constants import IGNORE_INDEX


def next_token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits (B, L, V), labels (B, L) with IGNORE_INDEX on unsupervised positions.

    Returns (mean loss over supervised tokens, number of supervised tokens). Position t predicts label t+1.
    With no supervised token the loss is 0 (not NaN), so a batch of prompts only cannot poison a run.
    """
    logits, targets = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    valid = targets != IGNORE_INDEX
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
    count = valid.sum()
    return jnp.where(valid, per_token, 0.0).sum() / jnp.maximum(count, 1), count
