"""Mask post-processing to the original size: both variants against crops computed independently here."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medplib_jax.data.regions import resized_size
from medplib_jax.models.masks import binarize, postprocess_masks


def _torch_resize(x, size):
    return torch.nn.functional.interpolate(torch.tensor(x)[None], size=size, mode='bilinear',
                                           align_corners=False)[0].numpy()


def _reference_crop(low, h, w):
    """Written from the reference's `postprocess_masks`: which rows/cols of the 64-map it keeps."""
    def keep(n):
        pad = 64 - n
        top = pad // 2
        if n <= 64:  # centred strip of n
            return np.arange(top, top + n)
        start = max(64 + top, 0) if top < 0 else top  # a negative start counts from the end
        return np.arange(start, 64)  # the stop (top + 64 - pad) is past the end: clipped to 64
    return low[:, keep(h)][:, :, keep(w)]


@pytest.mark.slow
@pytest.mark.parametrize('size', [(512, 512), (300, 484), (64, 1000), (1000, 64), (40, 30)])
def test_reference_and_aligned_crops(np_rng, size):
    H, W = size
    h, w = resized_size(H, W, 256)
    low = np_rng.normal(size=(2, 64, 64)).astype(np.float32)
    ours = np.asarray(postprocess_masks(jnp.asarray(low), (h, w), (H, W), 'reference'))
    np.testing.assert_allclose(ours, _torch_resize(_reference_crop(low, h, w), (H, W)), rtol=1e-5, atol=1e-5)
    up = _torch_resize(low, (256, 256))
    top, left = (256 - h) // 2, (256 - w) // 2
    aligned = _torch_resize(up[:, top:top + h, left:left + w], (H, W))
    np.testing.assert_allclose(np.asarray(postprocess_masks(jnp.asarray(low), (h, w), (H, W), 'aligned')), aligned,
                               rtol=1e-5, atol=1e-5)
    assert ours.shape == (2, H, W)


def test_known_quirk_cases():
    """Square: the whole map. 300x484 -> (159, 256): pad -95, top -48, so rows 16..63 of the map are kept (a bottom
    strip, including padding), all columns. 64x1000 -> (16, 256): a centred strip of 16 rows."""
    low = np.arange(64 * 64, dtype=np.float32).reshape(1, 64, 64)
    assert _reference_crop(low, 256, 256).shape == (1, 64, 64)
    assert resized_size(300, 484, 256) == (159, 256)
    crop = _reference_crop(low, 159, 256)
    assert crop.shape == (1, 48, 64) and crop[0, 0, 0] == 16 * 64  # rows 16..63
    assert _reference_crop(low, 16, 256).shape == (1, 16, 64) and _reference_crop(low, 16, 256)[0, 0, 0] == 24 * 64


def test_threshold_and_mode_errors():
    assert binarize(jnp.asarray([-2.3, -2.1, 0.0])).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="postprocess mode 'fixed'"):
        postprocess_masks(jnp.zeros((64, 64)), (64, 64), (64, 64), 'fixed')
