"""Mask geometry and training losses against an independent PyTorch reference.

The reference here is written in plain PyTorch (float64, CPU) straight from the reference's model/MedPLIB.py
(`postprocess_masks` and the mask losses), one mask at a time at its own original (H, W) with real per-image tensors,
i.e. without any canvas, padding or validity mask, and without calling any project function for an expected value:
- post-processing: 'reference' crops the 64x64 map with pad = 64 - h', top = pad // 2 and torch (= Python) slice
  semantics, then `F.interpolate(bilinear, align_corners=False)` to (H, W); 'aligned' upsamples to 256 first,
  crops the centred h' x w' region, then resizes;
- per mask: `F.binary_cross_entropy_with_logits` (pixel mean), Dice (1e-6), soft-IoU MSE (1e-7), focal
  (gamma 2, alpha 0.25, log eps 1e-12, / (pixels + 1e-12));
- batch: `F.cross_entropy(ignore_index=-100)` on the shifted logits per group of `loss_group` rows (0 when a group
  has no supervised token), each mask term summed over the group's valid masks / (num_masks + 1e-8), weighted,
  plus w_ce * aux_coef * moe_aux, then the mean over groups.
`resized_size` is used only to derive (h', w') from (H, W) (data plumbing, not under test).

Tolerance 1e-5 everywhere (`_close`): absolute for values of magnitude <= 1, relative to the magnitude above
that. For scalars and the per-mask losses the magnitude is each value's own; for a resized logit map it is the
map's largest |value| (about 7 here): a float32 bilinear resize (torch's own float32 `F.interpolate` as much as the
JAX one) rounds the source coordinate (up to 64, or 256 in 'aligned') to ~1e-7 relative, which moves single pixels
by up to ~1e-5 of the map's magnitude for white-noise maps, so the low-res logits are a lightly smoothed noise
(3x3 box, std ~2, closer to SAM's outputs; still far from smooth enough to hide a one-pixel crop shift). They are
also clipped to +-10: beyond ~15 a float32 sigmoid rounds 1 - s so coarsely that focal's (1 - s) ** 2 drifts from
the float64 reference by more than 1e-5 per pixel (a float32 limit, not a formula difference); saturated logits
(+-40, where both sides round to the same value) have their own test.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medplib_jax.data.regions import resized_size
from medplib_jax.models.masks import masks_to_canvas, postprocess_masks
from medplib_jax.train.losses import LossWeights, medplib_loss, per_mask_losses

TOL = 1e-5
MODES = ('reference', 'aligned')


def _close(actual, expected, what='', magnitude=None):
    """|actual - expected| <= 1e-5 * max(1, magnitude): absolute below magnitude 1, relative above. The magnitude
    is |expected| elementwise unless given (a map's max |value|)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.abs(actual - expected)
    bound = TOL * np.maximum(1.0, np.abs(expected) if magnitude is None else magnitude)
    assert np.all(np.isfinite(actual)), what
    assert np.all(err <= bound), f'{what}: max error {err.max():.3g} (bound {bound.flat[np.argmax(err - bound)]:.3g})'


def _low_res(rng, *lead):
    """(*lead, 64, 64) float32 decoder-like logits: 3x3 box-smoothed N(0, 3^2) noise, times 2, clipped to +-10."""
    x = np.pad(rng.normal(scale=3.0, size=(*lead, 64, 64)), [(0, 0)] * len(lead) + [(1, 1), (1, 1)], mode='edge')
    x = sum(x[..., i:i + 64, j:j + 64] for i in range(3) for j in range(3)) / 9 * 2
    return np.clip(x, -10, 10).astype(np.float32)


def _close_map(actual, expected, what):
    expected = np.asarray(expected)
    _close(actual, expected, what, magnitude=np.abs(expected).max())


# ----------------------------------------------------------------------------------------------------------------
# The independent reference (torch, float64, one mask at its own size)

def _resize(x, size):
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


def ref_postprocess(low, input_size, original_size, mode):
    """low (64, 64) -> (H, W) logits, `postprocess_masks` ('reference') or the corrected geometry ('aligned')."""
    hp, wp = (int(v) for v in input_size)
    x = torch.from_numpy(np.asarray(low, np.float64))[None, None]
    if mode == 'reference':
        pad_h, pad_w = 64 - hp, 64 - wp
        top, left = pad_h // 2, pad_w // 2  # floor division, may be negative
        x = x[..., top:top + 64 - pad_h, left:left + 64 - pad_w]  # torch slicing = Python slice semantics
    else:
        x = _resize(x, (256, 256))
        top, left = (256 - hp) // 2, (256 - wp) // 2
        x = x[..., top:top + hp, left:left + wp]
    return _resize(x, tuple(int(v) for v in original_size))[0, 0]


def ref_mask_losses(pred, target, iou_pred):
    """pred (H, W) float64 logits, target (H, W) {0, 1}, iou_pred float -> dict of floats (model/MedPLIB.py)."""
    p = pred.reshape(1, -1)
    t = torch.as_tensor(np.asarray(target), dtype=torch.float64).reshape(1, -1)
    s = torch.sigmoid(p)
    bce = F.binary_cross_entropy_with_logits(p, t, reduction='none').flatten(1).mean(1).sum() / (1 + 1e-8)
    dice = 1 - (2 * (s * t).sum(-1) + 1e-6) / (s.sum(-1) + t.sum(-1) + 1e-6)
    inter = (s * t).sum(-1)
    iou = (inter + 1e-7) / (s.sum(-1) + t.sum(-1) - inter + 1e-7)
    iou_loss = torch.mean((iou - iou_pred) ** 2)
    alpha, gamma = 0.25, 2
    focal = ((-alpha * t * (1 - s) ** gamma * torch.log(s + 1e-12)).sum()
             + (-(1 - alpha) * (1 - t) * s ** gamma * torch.log(1 - s + 1e-12)).sum()) / (t.numel() + 1e-12)
    return {'bce': bce.item(), 'dice': dice.mean().item(), 'iou': iou_loss.item(), 'focal': focal.item()}


def ref_medplib_loss(logits, labels, mask_logits, iou, seg_valid, seg_masks, sam_size, mask_size, w, *,
                     loss_group, mode, moe_aux, aux_coef):
    """Loss and unweighted per-group terms, group by group, mask by mask."""
    b, _, v = logits.shape
    groups = []
    for rows in np.arange(b).reshape(-1, loss_group):
        lg = torch.from_numpy(np.asarray(logits[rows, :-1], np.float64)).reshape(-1, v)
        lb = torch.from_numpy(np.asarray(labels[rows, 1:], np.int64)).reshape(-1)
        n_tok = int((lb != -100).sum())
        ce = F.cross_entropy(lg, lb, ignore_index=-100).item() if n_tok else 0.0
        sums = dict.fromkeys(('bce', 'dice', 'iou', 'focal'), 0.0)
        n_masks = 0
        for r in rows:
            h, wd = (int(x) for x in mask_size[r])
            for j in np.flatnonzero(seg_valid[r]):
                pred = ref_postprocess(mask_logits[r, j], sam_size[r], (h, wd), mode)
                for k, val in ref_mask_losses(pred, seg_masks[r, j, :h, :wd], float(iou[r, j])).items():
                    sums[k] += val
                n_masks += 1
        terms = {'ce': ce, **{k: val / (n_masks + 1e-8) for k, val in sums.items()}}
        loss = (w.ce * (ce + aux_coef * moe_aux) + w.bce * terms['bce'] + w.dice * terms['dice']
                + w.iou * terms['iou'] + w.focal * terms['focal'])
        groups.append((loss, terms, n_tok, n_masks, sums))
    return groups


# ----------------------------------------------------------------------------------------------------------------
# Tests

# Square, wide, tall, tiny, large, resized sides <= 64 (centred strip) / 65..190 (strip) / 190 and 191 (boundary),
# and sides equal to the 512 canvas.
FIXED_SIZES = [(256, 256), (200, 512), (512, 128), (40, 30), (300, 484), (20, 96), (190, 256), (191, 256),
               (512, 512), (96, 12)]


@pytest.mark.parametrize('mode', MODES)
def test_masks_to_canvas_mixed_sizes(np_rng, mode):
    sizes = FIXED_SIZES + [tuple(int(x) for x in np_rng.integers(1, 513, size=2)) for _ in range(2)]
    n = len(sizes)
    low = _low_res(np_rng, n)
    sam = np.array([resized_size(h, w, 256) for h, w in sizes], np.int32)
    tgt = np.array(sizes, np.int32)
    out, valid = masks_to_canvas(jnp.asarray(low), jnp.asarray(sam), jnp.asarray(tgt), (512, 512), mode)
    out, valid = np.asarray(out), np.asarray(valid)
    assert out.shape == (n, 512, 512) and out.dtype == np.float32 and valid.dtype == bool
    for i, (h, w) in enumerate(sizes):
        region = np.zeros((512, 512), bool)
        region[:h, :w] = True
        assert np.array_equal(valid[i], region), (sizes[i], 'valid')
        _close_map(out[i, :h, :w], ref_postprocess(low[i], sam[i], (h, w), mode).numpy(), f'{mode} {sizes[i]}')
        assert np.all(out[i][~region] == 0.0), (sizes[i], 'padding not exactly 0')


@pytest.mark.parametrize('mode', MODES)
def test_postprocess_masks_static_case(np_rng, mode):
    sizes = [(256, 256), (40, 30), (300, 484), (20, 96), (191, 256), (512, 128)]
    low = _low_res(np_rng, len(sizes), 2)  # per image: lead shape (2,), plus one call with the reference's (1, 1)
    sam = np.array([resized_size(h, w, 256) for h, w in sizes], np.int32)
    canvas, _ = masks_to_canvas(jnp.asarray(low.reshape(-1, 64, 64)), jnp.asarray(np.repeat(sam, 2, 0)),
                                jnp.asarray(np.repeat(np.array(sizes, np.int32), 2, 0)), (512, 512), mode)
    canvas = np.asarray(canvas).reshape(len(sizes), 2, 512, 512)
    post = jax.jit(postprocess_masks, static_argnums=(1, 2, 3))  # one compile per size, not one per eager op
    for i, (h, w) in enumerate(sizes):
        ours = np.asarray(post(jnp.asarray(low[i]), tuple(int(x) for x in sam[i]), (h, w), mode))
        assert ours.shape == (2, h, w) and ours.dtype == np.float32
        _close_map(ours, canvas[i, :, :h, :w], f'{mode} {sizes[i]} vs canvas')
        for k in range(2):
            _close_map(ours[k], ref_postprocess(low[i, k], sam[i], (h, w), mode).numpy(), f'{mode} {sizes[i]} vs torch')
    one = np.asarray(post(jnp.asarray(low[1, :1][None]), tuple(int(x) for x in sam[1]), sizes[1], mode))
    assert one.shape == (1, 1, *sizes[1])
    _close_map(one[0, 0], ref_postprocess(low[1, 0], sam[1], sizes[1], mode).numpy(), f'{mode} (1, 1, 64, 64)')


def test_per_mask_losses(np_rng):
    canvas = (128, 160)
    sizes = [(128, 160), (40, 30), (97, 13), (1, 1), (64, 64), (7, 150), (5, 7), (3, 4)]
    sizes += [tuple(int(x) for x in np_rng.integers(1, (129, 161))) for _ in range(2)]
    n = len(sizes)
    # Junk everywhere, padding included: only the valid (H, W) region may count.
    logits = np.clip(np_rng.normal(scale=3.0, size=(n, *canvas)), -10, 10).astype(np.float32)
    target = (np_rng.random((n, *canvas)) < np_rng.uniform(0.05, 0.95, (n, 1, 1))).astype(np.uint8)
    target[4, :64, :64] = 0  # an empty ground truth
    # Saturated edge cases where the epsilons decide the value: an empty ground truth predicted empty (Dice and
    # IoU ~ eps / eps) and a mask missed entirely (focal's log(s + 1e-12) with s ~ 1e-13). Only negative
    # extremes: a float32 sigmoid of +30 is exactly 1 (see the module docstring).
    logits[6, :5, :7], target[6, :5, :7] = -30.0, 0
    logits[7, :3, :4], target[7, :3, :4] = -30.0, 1
    valid = np.zeros((n, *canvas), bool)
    for i, (h, w) in enumerate(sizes):
        valid[i, :h, :w] = True
    iou_pred = np_rng.uniform(0, 1, n).astype(np.float32)
    ours = per_mask_losses(jnp.asarray(logits), jnp.asarray(target), jnp.asarray(valid), jnp.asarray(iou_pred))
    assert set(ours) == {'bce', 'dice', 'iou', 'focal'}
    for i, (h, w) in enumerate(sizes):
        ref = ref_mask_losses(torch.from_numpy(logits[i, :h, :w].astype(np.float64)), target[i, :h, :w],
                              float(iou_pred[i]))
        for k, val in ref.items():
            assert ours[k].shape == (n,)
            _close(ours[k][i], val, f'{k} {sizes[i]}')


@pytest.mark.slow
def test_saturated_logits_give_finite_losses_and_gradients(np_rng):
    """A confidently right pixel (logit +-40: a float32 sigmoid of +40 is exactly 1) once made focal's
    log(1 - s + 1e-12) = -inf and 0 * -inf = NaN, which skipped the whole train step. At +-40 the float64
    reference has no rounding to hide behind: s = 1 - 4e-18, so both eps terms decide the value there too."""
    logits = np_rng.choice([-40.0, 40.0], size=(1, 8, 8)).astype(np.float32)
    target = (np_rng.random((1, 8, 8)) < 0.5).astype(np.uint8)
    target[0, 0, :2], logits[0, 0, :2] = 1, (40.0, -40.0)  # right and wrong foreground, whatever the draw
    target[0, 1, :2], logits[0, 1, :2] = 0, (40.0, -40.0)  # wrong and right background
    valid, iou_pred = jnp.ones((1, 8, 8), bool), jnp.asarray([0.5], jnp.float32)
    ours = jax.jit(per_mask_losses)(jnp.asarray(logits), jnp.asarray(target), valid, iou_pred)
    ref = ref_mask_losses(torch.from_numpy(logits[0].astype(np.float64)), target[0], 0.5)
    for k, val in ref.items():
        _close(ours[k][0], val, k)
    grads = jax.grad(lambda x: sum(v.sum() for v in per_mask_losses(x, jnp.asarray(target), valid,
                                                                       iou_pred).values()))(jnp.asarray(logits))
    assert np.isfinite(np.asarray(grads)).all()


def _random_batch(rng, *, b=6, s=2, t=9, v=11, c=96):
    sizes = [(96, 96), (40, 30), (96, 20), (60, 90), tuple(int(x) for x in rng.integers(8, 97, 2)), (17, 96)]
    seg_valid = np.array([[1, 1], [1, 0], [0, 0], [0, 0], [0, 1], [1, 1]], bool)  # group 1 (rows 2, 3): no masks
    labels = rng.integers(0, v, (b, t)).astype(np.int32)
    labels[rng.random((b, t)) < 0.4] = -100
    labels[:, 0] = rng.integers(0, v, b)  # never a target (the shift drops it)
    labels[:, 1] = rng.integers(0, v, b)  # so rows with labels have at least one
    labels[3, 1:] = -100  # no supervised token, only the unused position 0
    labels[4] = -100  # nothing at all
    seg_masks = (rng.random((b, s, c, c)) < 0.4).astype(np.uint8)  # junk outside (H, W) and in invalid slots
    for r, (h, w) in enumerate(sizes):
        seg_masks[r, :, :h, :w] = 0
        for j in range(s):  # a blob plus noise, so Dice / IoU are not all near 0.5
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            seg_masks[r, j, y0:y0 + rng.integers(1, h + 1), x0:x0 + rng.integers(1, w + 1)] = 1
            seg_masks[r, j, :h, :w] ^= (rng.random((h, w)) < 0.05).astype(np.uint8)
    out = {'logits': (rng.normal(scale=3.0, size=(b, t, v))).astype(np.float32),
           'mask_logits': _low_res(rng, b, s), 'iou': rng.uniform(0, 1, (b, s)).astype(np.float32),
           'seg_valid': seg_valid}
    batch = {'labels': labels, 'seg_masks': seg_masks, 'seg_valid': seg_valid,
             'sam_size': np.array([resized_size(h, w, 256) for h, w in sizes], np.int32),
             'mask_size': np.array(sizes, np.int32)}
    return out, batch


@pytest.mark.parametrize('mode', MODES)
def test_medplib_loss_batch(np_rng, mode):
    out, batch = _random_batch(np_rng)
    w = LossWeights(*(float(x) for x in np_rng.uniform(0.1, 3.0, 5)))
    moe_aux, aux_coef = float(np_rng.uniform(0.5, 3.0)), float(np_rng.uniform(0.01, 0.5))
    fn = jax.jit(functools.partial(medplib_loss, weights=w, loss_group=2, postprocess=mode, aux_coef=aux_coef))
    loss, metrics = fn(jax.tree.map(jnp.asarray, out), jax.tree.map(jnp.asarray, batch), moe_aux=moe_aux)
    groups = ref_medplib_loss(out['logits'], batch['labels'], out['mask_logits'], out['iou'], batch['seg_valid'],
                              batch['seg_masks'], batch['sam_size'], batch['mask_size'], w, loss_group=2, mode=mode,
                              moe_aux=moe_aux, aux_coef=aux_coef)
    assert [g[3] for g in groups] == [3, 0, 3] and all(g[2] > 0 for g in groups)
    assert groups[1][1]['bce'] == 0.0  # the reference's own check that the mask-less group adds no mask term
    _close(loss, np.mean([g[0] for g in groups]), 'loss')
    for k in ('ce', 'bce', 'dice', 'iou', 'focal'):
        _close(metrics[f'loss/{k}'], np.mean([g[1][k] for g in groups]), f'loss/{k}')
    for k in ('bce', 'dice'):
        _close(metrics[f'mask/{k}_sum'], sum(g[4][k] for g in groups), f'mask/{k}_sum')
    _close(metrics['loss/moe_aux'], moe_aux, 'loss/moe_aux')
    assert int(metrics['tokens/supervised']) == sum(g[2] for g in groups) == int((batch['labels'][:, 1:] != -100).sum())
    assert int(metrics['masks']) == 6


def test_medplib_loss_nothing_supervised(np_rng):
    out, batch = _random_batch(np_rng)
    batch['labels'][:] = -100
    batch['labels'][:, 0] = 3  # position 0 is never a target
    batch['seg_valid'][:] = False
    out['seg_valid'] = batch['seg_valid']
    out, batch = jax.tree.map(jnp.asarray, out), jax.tree.map(jnp.asarray, batch)

    def loss_fn(logits, mask_logits, iou):
        o = {**out, 'logits': logits, 'mask_logits': mask_logits, 'iou': iou}
        return medplib_loss(o, batch, LossWeights(), loss_group=2)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True))(
        out['logits'], out['mask_logits'], out['iou'])
    assert np.isfinite(float(loss)) and float(loss) == 0.0
    for k in ('ce', 'bce', 'dice', 'iou', 'focal'):
        assert float(metrics[f'loss/{k}']) == 0.0, k
    assert int(metrics['tokens/supervised']) == 0 and int(metrics['masks']) == 0
    for g in grads:
        assert np.all(np.asarray(g) == 0.0)
