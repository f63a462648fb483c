"""Greedy decoding with the LLaMA KV cache: one prefill, then one-token steps under `lax.scan`.

Prompts are left-padded (`prompt_mask` False on padding) so every sample's next token lands in the same cache
slot; RoPE positions come from the mask (`cumsum - 1`), so padding does not shift them.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def init_cache(model: nn.Module, batch: int, max_len: int) -> Any:
    """Zeroed `cache` collection for `max_len` total positions (prompt + generated)."""
    dummy = jnp.zeros((batch, max_len), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, decode=True)['cache'])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes))


def positions_from_mask(mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens'))
def greedy_generate(model: nn.Module, params: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
                    max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Returns (tokens (B, N), logits (B, N, V)): token n is argmax of logits n. No early stop (static shapes);
    callers cut at EOS."""
    b, t = prompt_ids.shape
    cache = init_cache(model, b, t + max_new_tokens)
    positions = positions_from_mask(prompt_mask)
    (logits, _), state = model.apply({'params': params, 'cache': cache}, prompt_ids, positions=positions,
                                     token_mask=prompt_mask, decode=True, mutable=['cache'])
    first_logits = logits[:, -1]
    last_pos = positions[:, -1]

    def step(carry, _):
        cache, logits, pos = carry
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        pos = pos + 1
        (new_logits, _), state = model.apply({'params': params, 'cache': cache}, token[:, None],
                                             positions=pos[:, None], token_mask=jnp.ones((b, 1), bool),
                                             decode=True, mutable=['cache'])
        return (state['cache'], new_logits[:, 0], pos), logits

    (_, last_logits, _), step_logits = jax.lax.scan(step, (state['cache'], first_logits, last_pos), None,
                                                    length=max_new_tokens - 1)
    all_logits = jnp.concatenate([step_logits.transpose(1, 0, 2), last_logits[:, None]], axis=1)
    return jnp.argmax(all_logits, axis=-1).astype(jnp.int32), all_logits
