"""The reference's optimiser: DeepSpeed WarmupDecayLR (linear) written out here, steps per epoch, warmup length,
and clipping + AdamW (0.9, 0.95) against optax's own transforms applied by hand."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from medplib_jax.train.optimizer import make_optimizer, steps_per_epoch, warmup_decay_schedule, warmup_steps


def _deepspeed(i, peak, total, warmup):
    """DeepSpeed 0.13 WarmupDecayLR, warmup_type linear, warmup_min_lr 0 (train_ds_medplib.py), for update index i."""
    if i < warmup:
        return peak * i / warmup
    return peak * max(0.0, (total - i) / max(1, total - warmup))


@pytest.mark.parametrize('peak,total,warmup', [(3e-4, 1000, 10), (1e-4, 7, 2), (1e-3, 50, 2)])
def test_schedule_at_start_end_of_warmup_mid_decay_and_end(peak, total, warmup):
    lr = warmup_decay_schedule(peak, total, warmup)
    for i in (0, 1, warmup - 1, warmup, warmup + 1, (warmup + total) // 2, total - 1, total, total + 5):
        assert float(lr(i)) == pytest.approx(_deepspeed(i, peak, total, warmup), rel=1e-6, abs=1e-12), i
    assert float(lr(0)) == 0.0 and float(lr(warmup)) == pytest.approx(peak) and float(lr(total)) == 0.0


def test_steps_per_epoch_and_warmup_follow_the_reference():
    # stage III: 4 GPUs x 32 x accumulation 1 = 128; N = 10000 -> ceil(10000 / 128) = 79 steps per epoch
    assert steps_per_epoch(10000, 128, 1) == 79
    # stage IV: 4 x 4 x 8 = 128: ceil(ceil(10000 / 16) / 8) = ceil(625 / 8) = 79
    assert steps_per_epoch(10000, 128, 8) == math.ceil(math.ceil(10000 / 16) / 8)
    assert warmup_steps(79) == 2 and warmup_steps(1000) == 10 and warmup_steps(1550) == 15


def test_clip_then_adamw(np_rng):
    params = {'w': jnp.asarray(np_rng.normal(size=(3, 4)), jnp.float32)}
    grads = {'w': jnp.asarray(np_rng.normal(size=(3, 4)) * 5, jnp.float32)}
    tx = make_optimizer(lambda count: 0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    g = np.asarray(grads['w'], np.float64)
    g = g * min(1.0, 1.0 / np.sqrt((g ** 2).sum()))  # global-norm clip at 1.0
    m, v = 0.1 * g, 0.05 * g ** 2  # first Adam step with betas (0.9, 0.95), bias-corrected below
    expected = -0.1 * (m / 0.1) / (np.sqrt(v / 0.05) + 1e-8)  # weight decay 0
    np.testing.assert_allclose(np.asarray(updates['w']), expected, rtol=1e-5, atol=1e-7)
