"""Static-shape sequence assembly for MedPLIB (the reference's medplib_arch.py `prepare_inputs_labels_for_multimodal`
and MedPLIB.py `MedPLIBForCausalLM.model_forward`).

Input ids carry placeholders instead of the reference's single -200 / -300 sentinels: the data pipeline expands
`<image>` to `num_image_tokens` IMAGE_TOKEN_INDEX positions (between `<im_start>` and `<im_end>`) and puts one
REGION_TOKEN_INDEX between each `<region>` `</region>` pair. The merge below replaces them with the projected
image tokens / region embeddings by mask + cumsum gather, so shapes never depend on the data.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from medplib_jax.constants import IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX


def merge_embeddings(token_embeds: jax.Array, input_ids: jax.Array, image_tokens: jax.Array | None,
                     region_embeds: jax.Array | None) -> jax.Array:
    """token_embeds (B, T, D) of the ids with placeholders embedded as anything; image_tokens (B, N, D);
    region_embeds (B, R, D). The k-th image placeholder of a sample gets its k-th image token, the k-th region
    placeholder its k-th region embedding (placeholders beyond N / R reuse the last one: the pipeline checks
    counts before batching)."""
    out = token_embeds
    for index, values in ((IMAGE_TOKEN_INDEX, image_tokens), (REGION_TOKEN_INDEX, region_embeds)):
        if values is None:
            continue
        is_slot = input_ids == index
        slot = jnp.clip(jnp.cumsum(is_slot, axis=-1) - 1, 0, values.shape[1] - 1)
        gathered = jnp.take_along_axis(values.astype(out.dtype), slot[..., None], axis=1)
        out = jnp.where(is_slot[..., None], gathered, out)
    return out


def embeddable_ids(input_ids: jax.Array) -> jax.Array:
    """Placeholders (negative ids) -> 0 so the embedding lookup stays in range; merge_embeddings overwrites them."""
    return jnp.where(input_ids < 0, 0, input_ids)


def seg_positions(input_ids: jax.Array, seg_token_id: int, max_seg: int) -> tuple[jax.Array, jax.Array]:
    """Positions whose hidden state feeds the mask decoder: the one *before* each `<SEG>` (the state that
    predicts it, as the reference's `build_seg_token_mask`). Returns (B, max_seg) positions and validity; `<SEG>`s past
    `max_seg` are ignored (the pipeline rejects such records)."""
    before_seg = jnp.concatenate([input_ids[:, 1:] == seg_token_id,
                                  jnp.zeros((input_ids.shape[0], 1), bool)], axis=1)
    positions = jax.vmap(lambda m: jnp.nonzero(m, size=max_seg, fill_value=0)[0])(before_seg)
    valid = jnp.arange(max_seg)[None] < before_seg.sum(-1, keepdims=True)
    return positions.astype(jnp.int32), valid
