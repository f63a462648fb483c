"""Decoding with the LLaMA KV cache: one prefill of the (multimodal) prompt, then one-token steps.

Prompts are left-padded (`token_mask` False on padding) so every sample's next token lands in the same cache slot;
RoPE positions come from the mask (`cumsum - 1`), so padding shifts nothing and a batch of prompts of different
lengths decodes as each prompt alone. Shapes are static: one compiled program per (batch, prompt length,
max_new_tokens, sampling settings); callers pad prompts to a few length buckets. Steps run in a `lax.while_loop`
that ends when every sample has produced `eos_id` (or after `max_new_tokens`).

`<SEG>` (the reference's `MedPLIBForCausalLM.evaluate`, model/MedPLIB.py): the mask prompt is the last-layer state
that predicted the first generated `<SEG>` (the state one position before it in prompt + generation). With no
`<SEG>` the reference takes the second-to-last of the concatenated states (prefill's, then one per step); both are
returned, with a flag.

Routing (MoE): the layers sow each token's first-choice expert and its keep / drop decision (models/moe.py); the
decode steps collect them as they go, so the expert of every generated token comes out of decoding itself (token n
is routed when step n feeds it in), with no second, teacher-forced pass.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medplib_jax.models.moe import collect_moe_metrics


def init_cache(model: nn.Module, batch: int, max_len: int) -> Any:
    """Zeroed `cache` collection for `max_len` total positions (prompt + generated)."""
    dummy = jnp.zeros((batch, max_len), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, decode=True)['cache'])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes))


def _first_choice(intermediates: Any) -> jax.Array | None:
    """(MoE layers, B, L) first-choice expert of every token of one apply, -1 where it was dropped; None: no MoE."""
    m = collect_moe_metrics(intermediates)
    return jnp.where(m['token_slots'] > 0, m['token_expert'], -1) if m else None


def positions_from_mask(mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Greedy (temperature 0, the reference's default: `do_sample=False`, one beam) or temperature / top-p
    sampling (nucleus: the smallest set of tokens whose probability reaches `top_p`)."""
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f'sampling: temperature={self.temperature} must be >= 0 and top_p={self.top_p} in (0, 1]')


def next_token(logits: jax.Array, sampling: Sampling, rng: jax.Array | None) -> jax.Array:
    """(B, V) fp32 logits -> (B,) int32 tokens."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        keep_sorted = cum - jax.nn.softmax(sorted_logits, axis=-1) < sampling.top_p  # the first always stays
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'eos_id', 'seg_id', 'pad_id', 'sampling',
                                             'return_logits'))
def generate(model: nn.Module, params: Any, prompt: dict[str, jax.Array], *, max_new_tokens: int, eos_id: int,
             seg_id: int | None = None, pad_id: int = 0, sampling: Sampling = Sampling(),
             rng: jax.Array | None = None, return_logits: bool = False) -> dict[str, jax.Array]:
    """Decodes `prompt`: `input_ids` (B, T) left-padded, `token_mask` (B, T), and for MedPLIB `clip_pixels`
    (B, 336, 336, 3) and optionally `region_grids` (B, R, 24, 24) (then `model` is a MedPLIBForCausalLM; without
    them any LlamaForCausalLM decodes text). The model runs in evaluation mode (MoE: the evaluation capacity
    factor, routing groups no larger than the batch).

    Returns `tokens` (B, N) int32 (`pad_id` after a sample's EOS), `lengths` (B,) generated tokens including the
    EOS, `seg_hidden` (B, D) the state that predicted the first generated `<SEG>` (else the reference's fallback,
    the second-to-last concatenated state), `has_seg` (B,) bool, for a MoE model `routing` (MoE layers, B, N)
    int32: the first-choice expert of each generated token (-1: dropped), and with `return_logits` the step
    `logits` (B, N, V) (logits n gave token n)."""
    ids, mask = prompt['input_ids'], prompt['token_mask'].astype(bool)
    b, t = ids.shape
    if 'clip_pixels' in prompt:
        from medplib_jax.models.medplib import MedPLIBForCausalLM
        embeds = model.apply({'params': params}, ids, prompt['clip_pixels'], prompt.get('region_grids'),
                             method=MedPLIBForCausalLM.embed_multimodal)
    else:
        embeds = model.apply({'params': params}, ids, method=lambda m, i: m.embed(i))
    cache = init_cache(model, b, t + max_new_tokens)
    positions = positions_from_mask(mask)
    (logits, hidden), state = model.apply({'params': params, 'cache': cache}, inputs_embeds=embeds,
                                          positions=positions, token_mask=mask, decode=True,
                                          mutable=['cache', 'intermediates'])
    prefill_routing = _first_choice(state.get('intermediates', {}))  # only its shape: how many MoE layers
    rng = jax.random.key(0) if rng is None else rng
    seg = -1 if seg_id is None else seg_id
    d, v = hidden.shape[-1], logits.shape[-1]

    tokens0 = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    # predictor[n]: the state that predicted token n (step n's input state); prefill's last state predicts token 0.
    predictors0 = jnp.zeros((b, max_new_tokens, d), hidden.dtype)
    logits0 = jnp.zeros((b, max_new_tokens if return_logits else 0, v), jnp.float32)
    routing0 = None if prefill_routing is None else jnp.full((prefill_routing.shape[0], b, max_new_tokens), -1,
                                                             jnp.int32)

    def cond(carry):
        n, done = carry[0], carry[4]
        return (n < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        n, cache, last_logits, last_hidden, done, tokens, predictors, all_logits, routing, pos, key = carry
        key, sub = jax.random.split(key)
        token = jnp.where(done, pad_id, next_token(last_logits, sampling, sub))
        tokens = tokens.at[:, n].set(token)
        predictors = predictors.at[:, n].set(last_hidden)
        if return_logits:
            all_logits = all_logits.at[:, n].set(last_logits)
        done = done | (token == eos_id)
        pos = pos + 1
        (new_logits, new_hidden), st = model.apply({'params': params, 'cache': cache}, token[:, None],
                                                   positions=pos[:, None], token_mask=jnp.ones((b, 1), bool),
                                                   decode=True, mutable=['cache', 'intermediates'])
        if routing is not None:
            routing = routing.at[:, :, n].set(_first_choice(st['intermediates'])[:, :, 0])
        return (n + 1, st['cache'], new_logits[:, 0], new_hidden[:, 0], done, tokens, predictors, all_logits,
                routing, pos, key)

    carry = (jnp.int32(0), state['cache'], logits[:, -1], hidden[:, -1], jnp.zeros((b,), bool), tokens0,
             predictors0, logits0, routing0, positions[:, -1], rng)
    _, _, _, _, _, tokens, predictors, all_logits, routing, _, _ = jax.lax.while_loop(cond, body, carry)

    is_eos = tokens == eos_id
    lengths = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1) + 1, max_new_tokens).astype(jnp.int32)
    is_seg = (tokens == seg) & (jnp.arange(max_new_tokens)[None] < lengths[:, None])
    has_seg = is_seg.any(-1)
    first = jnp.argmax(is_seg, axis=-1)
    # Fallback: the second-to-last of the concatenated states (prompt states, then the states of generated
    # tokens 0 .. n - 2), i.e. the state that predicted token n - 2; the prompt's second-to-last for n = 1.
    fallback_from_steps = jnp.take_along_axis(predictors, jnp.maximum(lengths - 2, 0)[:, None, None], axis=1)[:, 0]
    fallback = jnp.where((lengths >= 2)[:, None], fallback_from_steps, hidden[:, -2])
    found = jnp.take_along_axis(predictors, first[:, None, None], axis=1)[:, 0]
    out = dict(tokens=tokens, lengths=lengths, seg_hidden=jnp.where(has_seg[:, None], found, fallback),
               has_seg=has_seg)
    if return_logits:
        out['logits'] = all_logits
    if routing is not None:
        out['routing'] = routing
    return out


def greedy_generate(model: nn.Module, params: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
                    max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Text-only greedy decoding for exactly `max_new_tokens` (no EOS stop) -> (tokens (B, N), logits (B, N, V))."""
    out = generate(model, params, {'input_ids': prompt_ids, 'token_mask': prompt_mask},
                   max_new_tokens=max_new_tokens, eos_id=-1, return_logits=True)
    return out['tokens'], out['logits']
