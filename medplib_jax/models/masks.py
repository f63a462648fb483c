"""Mask geometry: SAM-Med2D's 64x64 low-res logits -> each image's original size, batched with static shapes.

One function, `masks_to_canvas`, serves the training losses (inside jit, every mask at its own traced size, in a
fixed canvas) and inference (`postprocess_masks`: static sizes, the canvas is the image). Resizing is separable
bilinear interpolation written as two small matrix products, with torch `F.interpolate(mode='bilinear',
align_corners=False)` coordinates (no antialias): source = (y + 0.5) * in / out - 0.5, clamped at 0.

Post-processing modes (`MedPLIBForCausalLM.postprocess_masks` in the reference, model/MedPLIB.py):
- 'reference' (default): the 64x64 map is cropped as if it were the 256x256 padded input (pad = 64 - h',
  top = pad // 2, Python slice semantics), then resized to (H, W). For non-square images that keeps padding or a
  wrong strip; the released weights were trained under it.
- 'aligned': upsample to 256 first, crop the centred valid h' x w' region, then resize: correct geometry, for new
  training.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from medplib_jax.constants import MASK_THRESHOLD, SAM_SIZE
from medplib_jax.models.config import POSTPROCESS_MODES

LOW_RES = 64
_HIGHEST = jax.lax.Precision.HIGHEST  # geometry must not drop to bf16 passes on TPU


def _python_slice(start: jax.Array, stop: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """`range(n)[start:stop]` for traced ints (negative indices count from the end) -> (first index, length)."""
    def norm(i):
        return jnp.clip(jnp.where(i < 0, i + n, i), 0, n)
    first, last = norm(start), norm(stop)
    return first, jnp.maximum(last - first, 0)


def bilinear_matrix(out_len: jax.Array, src_start: jax.Array, src_len: jax.Array, src_size: int,
                    out_size: int) -> jax.Array:
    """(out_size, src_size) interpolation weights: row y < out_len resamples the window
    [src_start, src_start + src_len) of a length-`src_size` axis to `out_len` samples; rows >= out_len are zero
    (canvas padding). Lengths may be traced."""
    out_len = jnp.asarray(out_len, jnp.int32)
    src_len = jnp.maximum(jnp.asarray(src_len, jnp.int32), 1)
    y = jnp.arange(out_size, dtype=jnp.float32)
    scale = src_len.astype(jnp.float32) / jnp.maximum(out_len, 1).astype(jnp.float32)
    src = jnp.maximum((y + 0.5) * scale - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), src_len - 1)
    i1 = jnp.minimum(i0 + 1, src_len - 1)
    lam = src - i0.astype(jnp.float32)
    cols = jnp.arange(src_size)[None]
    start = jnp.asarray(src_start, jnp.int32)
    w = ((1.0 - lam)[:, None] * (cols == (start + i0)[:, None])
         + lam[:, None] * (cols == (start + i1)[:, None]))
    return jnp.where((jnp.arange(out_size) < out_len)[:, None], w, 0.0)


def _axis_weights(resized: jax.Array, target: jax.Array, out_size: int, mode: str) -> jax.Array:
    """Weights (out_size, 64) taking one axis of the 64-map to `target` samples, for a side resized to `resized`."""
    if mode == 'reference':
        pad = LOW_RES - resized
        top = jnp.floor_divide(pad, 2)
        first, length = _python_slice(top, top + LOW_RES - pad, LOW_RES)
        return bilinear_matrix(target, first, length, LOW_RES, out_size)
    up = bilinear_matrix(SAM_SIZE, 0, LOW_RES, LOW_RES, SAM_SIZE)  # (256, 64), static
    top = jnp.floor_divide(SAM_SIZE - resized, 2)
    crop = bilinear_matrix(target, top, resized, SAM_SIZE, out_size)  # (out, 256)
    return jnp.matmul(crop, up, precision=_HIGHEST)


def masks_to_canvas(low_res: jax.Array, input_size: jax.Array, target_size: jax.Array,
                    canvas: tuple[int, int], mode: str = 'reference') -> tuple[jax.Array, jax.Array]:
    """low_res (N, 64, 64) logits; input_size (N, 2) = (h', w') after the longest-side-256 resize; target_size
    (N, 2) = (H, W) each mask's size; canvas (Hc, Wc) static, >= every target.

    Returns (logits (N, Hc, Wc) fp32 with mask n's (H, W) result top-left, valid (N, Hc, Wc) bool marking it)."""
    if mode not in POSTPROCESS_MODES:
        raise ValueError(f'postprocess mode {mode!r} (config.model.medplib.postprocess); known: {POSTPROCESS_MODES}')
    hc, wc = canvas
    input_size = jnp.asarray(input_size, jnp.int32)
    target_size = jnp.asarray(target_size, jnp.int32)
    rows = jax.vmap(lambda r, t: _axis_weights(r, t, hc, mode))(input_size[:, 0], target_size[:, 0])
    cols = jax.vmap(lambda r, t: _axis_weights(r, t, wc, mode))(input_size[:, 1], target_size[:, 1])
    out = jnp.einsum('nyi,nij,nxj->nyx', rows, low_res.astype(jnp.float32), cols, precision=_HIGHEST)
    valid = ((jnp.arange(hc)[None, :, None] < target_size[:, 0, None, None])
             & (jnp.arange(wc)[None, None, :] < target_size[:, 1, None, None]))
    return out, valid


def postprocess_masks(low_res: jax.Array, input_size: tuple[int, int], original_size: tuple[int, int],
                      mode: str = 'reference') -> jax.Array:
    """(..., 64, 64) mask logits -> (..., H, W) logits for one image: `masks_to_canvas` with static sizes and the
    image itself as the canvas."""
    h, w = (int(v) for v in original_size)
    lead = low_res.shape[:-2]
    flat = low_res.reshape((-1, LOW_RES, LOW_RES))
    n = flat.shape[0]
    sizes = jnp.broadcast_to(jnp.asarray(input_size, jnp.int32), (n, 2))
    out, _ = masks_to_canvas(flat, sizes, jnp.broadcast_to(jnp.asarray((h, w), jnp.int32), (n, 2)), (h, w), mode)
    return out.reshape(lead + (h, w))


def binarize(logits: jax.Array, threshold: float = MASK_THRESHOLD) -> jax.Array:
    """The reference thresholds the sigmoid at 0.1 (logit about -2.197), not 0.5."""
    return jax.nn.sigmoid(logits) > threshold
