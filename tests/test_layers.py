"""Shared blocks: PyTorch ConvTranspose2d layout and semantics, attention core masking."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medplib_jax.convert.common import CONV_TRANSPOSE
from medplib_jax.models.layers import ConvTranspose2d, causal_attention, dot_product_attention


@pytest.mark.parametrize('kernel,stride,padding', [(4, 2, 1), (2, 2, 0)])
@pytest.mark.parametrize('size', [(8, 8), (5, 7)])
def test_conv_transpose_matches_torch(np_rng, kernel, stride, padding, size):
    """The SAM-Med2D adapter (k4 s2 p1) and SAM upscaling (k2 s2 p0) layers, converted from torch weights."""
    torch.manual_seed(int(np_rng.integers(1 << 30)))
    ref = torch.nn.ConvTranspose2d(6, 5, kernel, stride=stride, padding=padding, bias=True)
    x = np_rng.normal(size=(2, 6) + size).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.tensor(x)).numpy().transpose(0, 2, 3, 1)
    params = {'kernel': CONV_TRANSPOSE.forward(ref.weight.detach().numpy()), 'bias': ref.bias.detach().numpy()}
    ours = ConvTranspose2d(5, kernel, stride, padding).apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert ours.shape == expected.shape == (2, size[0] * 2, size[1] * 2, 5)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(CONV_TRANSPOSE.inverse(params['kernel']), ref.weight.detach().numpy())


def test_attention_fully_masked_rows_stay_finite(np_rng):
    q = jnp.asarray(np_rng.normal(size=(1, 3, 2, 4)), jnp.float32)
    mask = jnp.asarray([[[False, False, False], [True, False, False], [True, True, True]]])
    out = dot_product_attention(q, q, q, mask)
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(np.asarray(out[0, 1]), np.asarray(q[0, 0]), rtol=1e-6)  # attends to key 0 only
    with pytest.raises(ValueError, match='not a multiple'):
        dot_product_attention(jnp.zeros((1, 2, 3, 4)), jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)))


@pytest.mark.slow
@pytest.mark.parametrize('block', [4, 5, 16])
def test_blocked_causal_attention_equals_the_full_mask(np_rng, block):
    """Query blocks skip the upper triangle: same outputs and gradients as the (T, T) mask, including the
    fully-masked rows of left padding (uniform over all keys) and right padding; GQA (4 query, 2 KV heads)."""
    b, t = 3, 13
    q = jnp.asarray(np_rng.normal(size=(b, t, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(np_rng.normal(size=(b, t, 2, 8)), jnp.float32) for _ in range(2))
    mask = np.ones((b, t), bool)
    mask[1, :6] = False   # left padding: rows 0-5 see no key
    mask[2, 9:] = False   # right padding
    mask = jnp.asarray(mask)
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # noqa: E731
    full = lambda q, k, v: causal_attention(q, k, v, mask, 0)  # noqa: E731
    blocked = lambda q, k, v: causal_attention(q, k, v, mask, block)  # noqa: E731
    np.testing.assert_allclose(blocked(q, k, v), full(q, k, v), rtol=1e-5, atol=1e-6)
    for g_full, g_blocked in zip(jax.grad(loss(full), (0, 1, 2))(q, k, v),
                                 jax.grad(loss(blocked), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g_blocked, g_full, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_splash_kernel_equals_the_einsum_attention(np_rng):
    """Pallas's TPU splash attention (interpreted on CPU) against the einsum path (`kernel='xla'`), forward and
    gradients (fp32, 1e-5) on a fresh length that is not a multiple of the kernel's 128-tile: GQA (4 query, 2 KV
    heads), left padding (rows that see no key: the uniform average), right padding, a full row."""
    b, t = 3, int(np_rng.integers(130, 300))
    q = jnp.asarray(np_rng.normal(size=(b, t, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(np_rng.normal(size=(b, t, 2, 16)), jnp.float32) for _ in range(2))
    mask = np.ones((b, t), bool)
    mask[1, :int(np_rng.integers(1, t // 2))] = False  # left padding
    mask[2, int(np_rng.integers(t // 2, t - 1)):] = False  # right padding
    mask = jnp.asarray(mask)
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # noqa: E731
    xla = jax.jit(lambda q, k, v: causal_attention(q, k, v, mask, 0, 'xla'))
    splash = jax.jit(lambda q, k, v: causal_attention(q, k, v, mask, 0, 'splash'))
    np.testing.assert_allclose(splash(q, k, v), xla(q, k, v), rtol=1e-5, atol=1e-5)
    for g_xla, g_splash in zip(jax.jit(jax.grad(loss(xla), (0, 1, 2)))(q, k, v),
                               jax.jit(jax.grad(loss(splash), (0, 1, 2)))(q, k, v)):
        assert np.isfinite(np.asarray(g_splash)).all()
        np.testing.assert_allclose(g_splash, g_xla, rtol=1e-5, atol=1e-5)


def test_cudnn_arguments_equal_the_einsum_attention(np_rng):
    """The cuDNN path's arguments (causal flag, key lengths for the padding, GQA heads, default scale) through
    jax.nn.dot_product_attention's own XLA implementation (the fused kernel itself needs a GPU) against the einsum
    path, forward and gradients (fp32, 1e-5): right padding, a full row, a row of padding only (uniform average);
    a left-padded batch gets NaN rather than a wrong answer."""
    from medplib_jax.models.layers import cudnn_causal_attention
    b, t = 3, int(np_rng.integers(20, 60))
    q = jnp.asarray(np_rng.normal(size=(b, t, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(np_rng.normal(size=(b, t, 2, 16)), jnp.float32) for _ in range(2))
    mask = np.ones((b, t), bool)
    mask[1, int(np_rng.integers(1, t - 1)):] = False  # right padding
    mask[2] = False  # padding only
    mask = jnp.asarray(mask)
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # noqa: E731
    xla = jax.jit(lambda q, k, v: causal_attention(q, k, v, mask, 0, 'xla'))
    fused = jax.jit(lambda q, k, v: cudnn_causal_attention(q, k, v, mask, implementation=None))
    np.testing.assert_allclose(fused(q, k, v), xla(q, k, v), rtol=1e-5, atol=1e-5)
    for g_xla, g_fused in zip(jax.jit(jax.grad(loss(xla), (0, 1, 2)))(q, k, v),
                              jax.jit(jax.grad(loss(fused), (0, 1, 2)))(q, k, v)):
        np.testing.assert_allclose(g_fused, g_xla, rtol=1e-5, atol=1e-5)
    left = jnp.asarray(np.arange(t)[None] >= np.array([[0], [2], [0]]))
    assert np.isnan(np.asarray(cudnn_causal_attention(q, k, v, left, implementation=None))).all()


@pytest.mark.slow
def test_splash_kernel_runs_per_shard_under_a_mesh(np_rng):
    """Under a (data 2, fsdp 2, tensor 2) mesh of 8 fake CPU devices the splash kernel runs per shard (batch over
    data x fsdp, heads over tensor): the values and gradients of the einsum path on one device (fp32, 1e-5; the
    summed loss 1e-4)."""
    import flax.linen as nn

    from medplib_jax import sharding
    from medplib_jax.axis_rules import LOGICAL_AXIS_RULES
    b, t = 4, int(np_rng.integers(130, 260))
    q = jnp.asarray(np_rng.normal(size=(b, t, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(np_rng.normal(size=(b, t, 2, 16)), jnp.float32) for _ in range(2))
    mask = np.ones((b, t), bool)
    mask[1, :int(np_rng.integers(1, t // 2))] = False
    mask[3, int(np_rng.integers(t // 2, t - 1)):] = False
    mask = jnp.asarray(mask)
    loss = lambda kernel: lambda q, k, v: jnp.sum(jnp.sin(causal_attention(q, k, v, mask, 0, kernel)))  # noqa: E731
    want = jax.jit(jax.value_and_grad(loss('xla'), (0, 1, 2)))(q, k, v)
    with jax.set_mesh(sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        fn = jax.jit(jax.value_and_grad(loss('splash'), (0, 1, 2)))
        assert 'shard_map' in str(jax.make_jaxpr(fn)(q, k, v))  # the kernel per shard, not gathered
        got = fn(q, k, v)
        # one row (as model init runs it) does not divide over the 4 batch shards: the kernel takes it whole
        one = jax.jit(lambda q, k, v: causal_attention(q, k, v, mask[3:], 0, 'splash'))(q[3:], k[3:], v[3:])
    np.testing.assert_allclose(one, causal_attention(q[3:], k[3:], v[3:], mask[3:], 0, 'xla'), rtol=1e-5, atol=1e-5)
    # the loss: a sum of about 10^4 terms, reduced over 8 shards in another order (measured: up to 1.2e-5 relative)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
    for g_got, g_want in zip(got[1], want[1]):
        np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-5)
