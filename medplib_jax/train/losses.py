"""MedPLIB's training losses (`model/MedPLIB.py` and `model/LISA.py: model_forward` in the reference).

Text: next-token cross-entropy as HF computes it (shift by one, ignore -100, token-level mean). Masks, each at its
original H x W (the 64x64 decoder logits brought there by `models.masks.masks_to_canvas`; canvas padding is
outside every sum and mean): BCE with logits as a per-mask pixel mean (`sigmoid_ce_loss`), Dice with 1e-6
smoothing (`dice_loss`), focal with gamma 2 and alpha 0.25 (`FocalLoss`), and the IoU head's MSE against the soft
IoU (`MaskIoULoss`). Each mask term is summed over a group's masks and divided by (num_masks + 1e-8).

Grouping: the reference takes each term's mean within one GPU's micro-batch and DeepSpeed then averages over GPUs
and accumulation steps. Here that group of sequences is `loss_group` (config.train.loss_group): the loss is the mean
over groups of w_ce * (CE_g + aux_coef * MoE aux) + w_bce * BCE_g + w_dice * Dice_g + w_iou * IoU_g + w_focal * Focal_g,
whatever the mesh.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from medplib_jax.constants import IGNORE_INDEX
from medplib_jax.models.masks import masks_to_canvas
from medplib_jax.train.config import LossWeights

MASK_TERMS = ('bce', 'dice', 'iou', 'focal')


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits (B, L, V), labels (B, L) -> per-position CE (B, L-1) (0 where unsupervised), supervised mask (B, L-1),
    argmax-correct mask (B, L-1). Position t predicts label t + 1."""
    logits, targets = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    valid = targets != IGNORE_INDEX
    safe = jnp.where(valid, targets, 0)
    per_token = jnp.where(valid, optax.softmax_cross_entropy_with_integer_labels(logits, safe), 0.0)
    correct = valid & (jnp.argmax(logits, axis=-1) == safe)
    return per_token, valid, correct


def next_token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean CE over the supervised tokens of the whole batch and their number (0, not NaN, when there are none)."""
    per_token, valid, _ = token_cross_entropy(logits, labels)
    count = valid.sum()
    return per_token.sum() / jnp.maximum(count, 1), count


def per_mask_losses(logits: jax.Array, target: jax.Array, valid: jax.Array, iou_pred: jax.Array
                    ) -> dict[str, jax.Array]:
    """logits, target, valid (N, Hc, Wc): each mask's (H, W) in a canvas, padding invalid; iou_pred (N,).
    -> {'bce', 'dice', 'iou', 'focal'}: (N,) per-mask losses as the reference computes them on (H, W)."""
    x = logits.astype(jnp.float32)
    t = target.astype(jnp.float32)
    v = valid.astype(jnp.float32)
    pixels = v.sum(axis=(1, 2))
    s = jax.nn.sigmoid(x)
    total = lambda a: jnp.sum(a * v, axis=(1, 2))  # noqa: E731
    bce = total(optax.sigmoid_binary_cross_entropy(x, t)) / jnp.maximum(pixels, 1.0)
    inter, s_sum, t_sum = total(s * t), total(s), total(t)
    dice = 1.0 - (2.0 * inter + 1e-6) / (s_sum + t_sum + 1e-6)
    iou = (inter + 1e-7) / (s_sum + t_sum - inter + 1e-7)
    iou_loss = (iou - iou_pred.astype(jnp.float32)) ** 2
    alpha, gamma = 0.25, 2.0
    # log(s + 1e-12) and log(1 - s + 1e-12) as the reference's FocalLoss writes them, from log-sigmoids: taken
    # from s, XLA turned log(1 - s + 1e-12) into log(0) = -inf for a logit above ~17 (s rounds to 1), and a
    # confidently right foreground pixel then made 0 * -inf = NaN, which skipped the whole step.
    log_eps = jnp.log(1e-12)
    log_s, log_not_s = (jnp.logaddexp(jax.nn.log_sigmoid(z), log_eps) for z in (x, -x))
    focal = total(-alpha * t * (1 - s) ** gamma * log_s
                  - (1 - alpha) * (1 - t) * s ** gamma * log_not_s) / (pixels + 1e-12)
    return {'bce': bce, 'dice': dice, 'iou': iou_loss, 'focal': focal}


def _group_sum(x: jax.Array, groups: int) -> jax.Array:
    """(B, ...) -> (groups,) sums over each group's rows and every other axis."""
    return x.reshape(groups, -1).sum(axis=1)


def medplib_loss(out: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], weights: LossWeights, *,
                 loss_group: int, postprocess: str = 'reference', moe_aux: jax.Array | float = 0.0,
                 aux_coef: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted loss of one batch (mean over its groups of `loss_group` rows) and its parts.

    out: the model's `logits` (B, T, V), `mask_logits` (B, S, 64, 64), `iou` (B, S), `seg_valid` (B, S).
    batch: `labels` (B, T), `seg_masks` (B, S, C, C) ground truth top-left in the canvas, `seg_valid` (B, S),
    `sam_size` (B, 2) = (h', w'), `mask_size` (B, 2) = the masks' (H, W) in the canvas.
    Metrics: each unweighted term (mean over groups), supervised `tokens`, `correct_tokens`, `masks`.
    """
    b = batch['labels'].shape[0]
    if b % loss_group:
        raise ValueError(f'config.train.loss_group={loss_group} does not divide the micro-batch of {b} sequences')
    groups = b // loss_group
    per_token, valid, correct = token_cross_entropy(out['logits'], batch['labels'])
    tokens = _group_sum(valid, groups)
    ce = _group_sum(per_token, groups) / jnp.maximum(tokens, 1)  # a group without labels adds 0 (dropped rows)

    seg = batch['seg_masks']
    s, canvas = seg.shape[1], seg.shape[-2:]
    mask_valid = batch['seg_valid'] & out['seg_valid']  # (B, S)
    sizes = lambda k: jnp.repeat(batch[k], s, axis=0)  # noqa: E731  (B * S, 2), row-major like the masks
    logits, pixel_valid = masks_to_canvas(out['mask_logits'].reshape(b * s, *out['mask_logits'].shape[-2:]),
                                          sizes('sam_size'), sizes('mask_size'), tuple(canvas), postprocess)
    per_mask = per_mask_losses(logits, seg.reshape(b * s, *canvas), pixel_valid, out['iou'].reshape(b * s))
    num_masks = _group_sum(mask_valid, groups).astype(jnp.float32)
    terms = {'ce': ce}
    for name in MASK_TERMS:
        per = jnp.where(mask_valid.reshape(b * s), per_mask[name], 0.0)
        terms[name] = _group_sum(per.reshape(b, s), groups) / (num_masks + 1e-8)
    aux = jnp.asarray(moe_aux, jnp.float32)
    total = weights.ce * (terms['ce'] + aux_coef * aux)
    for name in MASK_TERMS:
        total = total + getattr(weights, name) * terms[name]
    metrics = {f'loss/{k}': v.mean() for k, v in terms.items()}
    metrics.update({'loss/moe_aux': aux, 'tokens/supervised': tokens.sum(), 'tokens/correct': correct.sum(),
                    'tokens/ce_sum': per_token.sum(), 'masks': num_masks.sum()})
    # Per-mask sums (the loop divides by `masks`): readable Dice / BCE whatever the grouping.
    metrics.update({f'mask/{name}_sum': jnp.where(mask_valid.reshape(b * s), per_mask[name], 0.0).sum()
                    for name in ('bce', 'dice')})
    return total.mean(), metrics
