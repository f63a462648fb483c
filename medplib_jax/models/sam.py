"""SAM-Med2D pieces used by MedPLIB, and the mask post-processing to the original image size.

Post-processing (facts 5.5): the reference crops the 64x64 low-res logits as if they were the 256x256 padded
input (pad = 64 - h', top = pad // 2, Python slice semantics), then resizes bilinearly (align_corners=False)
to (H, W). For non-square images that keeps padding or a wrong strip; the released weights were trained under
it, so `'reference'` is the default. `'aligned'` upsamples to 256 first, crops the centred valid h' x w' region
and then resizes: correct geometry, for new training.
"""
from __future__ import annotations

import jax

SAM_SIZE = 256
LOW_RES = 64
POSTPROCESS_MODES = ('reference', 'aligned')


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch `F.interpolate(mode='bilinear', align_corners=False)` (no antialias) on (..., H, W)."""
    return jax.image.resize(x, x.shape[:-2] + tuple(size), method='bilinear', antialias=False)


def postprocess_masks(low_res: jax.Array, input_size: tuple[int, int], original_size: tuple[int, int],
                      mode: str = 'reference') -> jax.Array:
    """(..., 64, 64) mask logits -> (..., H, W) logits. `input_size` = (h', w') after the longest-side-256
    resize; sizes are static Python ints (one compile per size; call per sample)."""
    if mode not in POSTPROCESS_MODES:
        raise ValueError(f'postprocess mode {mode!r}; known: {POSTPROCESS_MODES}')
    h, w = (int(v) for v in input_size)
    if mode == 'reference':
        pad_h, pad_w = LOW_RES - h, LOW_RES - w
        top, left = pad_h // 2, pad_w // 2
        # Python slice semantics on purpose: negative starts count from the end, as in the reference.
        rows = range(LOW_RES)[top:top + LOW_RES - pad_h]
        cols = range(LOW_RES)[left:left + LOW_RES - pad_w]
        cropped = low_res[..., rows.start:rows.stop, :][..., cols.start:cols.stop]
    else:
        up = resize_bilinear(low_res, (SAM_SIZE, SAM_SIZE))
        top, left = (SAM_SIZE - h) // 2, (SAM_SIZE - w) // 2
        cropped = up[..., top:top + h, left:left + w]
    return resize_bilinear(cropped, original_size)


def binarize(logits: jax.Array, threshold: float = 0.1) -> jax.Array:
    """The reference thresholds the sigmoid at 0.1 (logit about -2.197), not 0.5."""
    return jax.nn.sigmoid(logits) > threshold
