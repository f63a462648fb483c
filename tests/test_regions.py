"""Region prompts -> 24x24 grids (data side) and the region encoder (model side) vs torch grid_sample."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medplib_jax.data.regions import (
    RegionError,
    RegionPrompt,
    box_to_mask,
    largest_component_with_sub_region,
    mask_to_grid,
    point_to_mask,
    regions_to_grids,
    resized_size,
)
from medplib_jax.models.region import RegionEncoder


def _torch_reference(feats, adapter_w, adapter_b, grid, subset=None):
    """The reference's computation: adapter on all cells -> (C, 24, 24) map -> grid_sample(align_corners=True) at
    (col/24, row/24) * 2 - 1 -> mean over the region's cells."""
    adapted = torch.tensor(feats) @ torch.tensor(adapter_w) + torch.tensor(adapter_b)  # (576, D)
    fmap = adapted.T.reshape(1, -1, 24, 24)
    rows, cols = np.nonzero(grid)
    if subset is not None:
        rows, cols = rows[subset], cols[subset]
    if len(rows) == 0:
        return np.zeros(adapter_w.shape[1], np.float32)
    pts = np.stack([cols / 24, rows / 24], -1) * 2 - 1
    sampled = torch.nn.functional.grid_sample(fmap, torch.tensor(pts[None, None], dtype=torch.float32),
                                              mode='bilinear', align_corners=True)
    return sampled[0, :, 0].mean(-1).numpy()


@pytest.fixture
def encoder_setup(np_rng):
    c, d = 16, 12
    feats = np_rng.normal(size=(1, 576, c)).astype(np.float32)
    enc = RegionEncoder(d, max_points=576)
    params = nn.unbox(enc.init(jax.random.key(0), jnp.asarray(feats), jnp.zeros((1, 1, 24, 24))))['params']
    params['bias'] = jnp.asarray(np_rng.normal(size=d), jnp.float32)
    return enc, params, feats


@pytest.mark.slow
def test_one_cell_is_the_bilinear_sample_of_that_cell(encoder_setup):
    enc, params, feats = encoder_setup
    w, b = np.asarray(params['kernel']), np.asarray(params['bias'])
    for r, c in ((0, 0), (5, 17), (23, 23), (12, 0)):
        grid = np.zeros((24, 24), np.uint8)
        grid[r, c] = 1
        out = enc.apply({'params': params}, jnp.asarray(feats), jnp.asarray(grid[None, None]))
        # by hand: bilinear at (r * 23/24, c * 23/24) of the adapted map
        fmap = (feats[0] @ w + b).reshape(24, 24, -1)
        py, px = r * 23 / 24, c * 23 / 24
        y0, x0 = int(np.floor(py)), int(np.floor(px))
        y1, x1 = min(y0 + 1, 23), min(x0 + 1, 23)
        wy, wx = py - y0, px - x0
        by_hand = ((1 - wy) * (1 - wx) * fmap[y0, x0] + (1 - wy) * wx * fmap[y0, x1] + wy * (1 - wx) * fmap[y1, x0]
                   + wy * wx * fmap[y1, x1])
        np.testing.assert_allclose(np.asarray(out)[0, 0], by_hand, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out)[0, 0], _torch_reference(feats[0], w, b, grid), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.slow
def test_full_and_free_form_masks_match_torch_grid_sample(encoder_setup, np_rng):
    enc, params, feats = encoder_setup
    w, b = np.asarray(params['kernel']), np.asarray(params['bias'])
    full = np.ones((24, 24), np.uint8)
    blob = (np_rng.uniform(size=(24, 24)) > 0.7).astype(np.uint8)
    empty = np.zeros((24, 24), np.uint8)
    grids = np.stack([full, blob, empty])[None]
    out = np.asarray(enc.apply({'params': params}, jnp.asarray(feats), jnp.asarray(grids)))
    np.testing.assert_allclose(out[0, 0], _torch_reference(feats[0], w, b, full), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0, 1], _torch_reference(feats[0], w, b, blob), rtol=1e-5, atol=1e-5)
    assert np.all(out[0, 2] == 0)  # empty region -> zeros


@pytest.mark.slow
def test_at_most_512_points_random_subset(encoder_setup):
    _, params, feats = encoder_setup
    enc = RegionEncoder(12)  # max_points 512 < 576 cells of a full mask
    full = jnp.ones((1, 1, 24, 24))
    a = enc.apply({'params': params}, jnp.asarray(feats), full, rngs={'region': jax.random.key(1)})
    b = enc.apply({'params': params}, jnp.asarray(feats), full, rngs={'region': jax.random.key(2)})
    assert not np.allclose(np.asarray(a), np.asarray(b))  # different subsets
    from medplib_jax.models.region import sampling_weights
    weights = np.asarray(sampling_weights(full, 512, jax.random.key(1)))
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
    # a small region (fewer than 512 cells) is used whole, whatever the rng
    small = jnp.zeros((1, 1, 24, 24)).at[0, 0, 3:9, 4:10].set(1)
    s1 = enc.apply({'params': params}, jnp.asarray(feats), small, rngs={'region': jax.random.key(1)})
    s2 = enc.apply({'params': params}, jnp.asarray(feats), small, rngs={'region': jax.random.key(2)})
    np.testing.assert_allclose(np.asarray(s1), np.asarray(s2), rtol=1e-6)


def test_point_and_box_masks_on_a_non_square_image():
    h, w = 300, 484
    m = point_to_mask(10, 200, height=h, width=w)  # x=10 near the left edge: clipped
    assert m.shape == (h, w) and m.sum() == 41 * 31
    assert m[180:221, 0:31].all() and m[200, 31] == 0
    box = box_to_mask(100, 20, 400, 40, height=h, width=w)  # wide and short: columns 100..400, rows 20..40
    assert box.sum() == 301 * 21
    assert box[20:41, 100:401].all() and box[41:, :].sum() == 0 and box[:, 401:].sum() == 0


def test_grid_conversion_resize_pad_and_nearest_step():
    """300x484 full-image mask: resized to 208x336, padded 64 rows on top; grid row i reads padded row 14 i, so
    rows 5..19 (padded rows 70..266) are inside, the rest padding."""
    assert resized_size(300, 484, 336) == (208, 336)
    grid = mask_to_grid(np.ones((300, 484), np.uint8))
    expected = np.zeros((24, 24), np.uint8)
    expected[5:20] = 1
    np.testing.assert_array_equal(grid, expected)
    # a thin line thinner than the 14-pixel step can vanish, as in the reference
    thin = np.zeros((336, 336), np.uint8)
    thin[:, 5] = 1
    assert mask_to_grid(thin).sum() == 0


def test_largest_component_and_sub_region():
    grid = np.zeros((24, 24), np.uint8)
    grid[2:8, 2:8] = 1  # 36 cells
    grid[15:17, 15:17] = 1  # 4 cells, dropped
    only_largest = largest_component_with_sub_region(grid)
    assert only_largest.sum() == 36 and only_largest[15:17, 15:17].sum() == 0
    rng = np.random.default_rng(0)
    for _ in range(20):
        sub = largest_component_with_sub_region(grid, rng)
        assert 0 < sub.sum() <= 36 and not (sub & ~grid.astype(bool)).any()
    tiny = np.zeros((24, 24), np.uint8)
    tiny[0, 0:3] = 1  # under 10 cells: unchanged
    np.testing.assert_array_equal(largest_component_with_sub_region(tiny, rng), tiny)


def test_bad_regions_are_clear_errors():
    with pytest.raises(RegionError, match=r'point \(500, 10\) is outside the 484x300 image'):
        point_to_mask(500, 10, height=300, width=484)
    with pytest.raises(RegionError, match='outside the 484x300 image'):
        box_to_mask(0, 0, 484, 10, height=300, width=484)
    with pytest.raises(RegionError, match='need x0 <= x1'):
        box_to_mask(50, 0, 10, 10, height=300, width=484)
    with pytest.raises(RegionError, match=r'shape \(2, 2\) != image size \(300, 484\)'):
        RegionPrompt('mask', np.ones((2, 2))).to_mask(300, 484)
    with pytest.raises(RegionError, match='more than the configured maximum 1'):
        regions_to_grids([RegionPrompt('point', (1, 1))] * 2, 300, 484, max_regions=1)
    grids, valid = regions_to_grids([RegionPrompt('box', (0, 0, 483, 299))], 300, 484, max_regions=3)
    assert grids.shape == (3, 24, 24) and valid.tolist() == [True, False, False]
