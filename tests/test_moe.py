"""MoE gate and layer against a naive loop reference (DeepSpeed 0.13.1's top-1 gating, `deepspeed.moe.layer.MoE`),
hand-computed cases, the dense-mixture limit, gradients, padding routing, mesh independence, and the grouped dispatch
against the einsum one."""
import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import LOGICAL_AXIS_RULES
from medplib_jax import sharding
from medplib_jax.models.grouped import grouped_matmul, make_layout
from medplib_jax.models.llama import LlamaConfig, LlamaForCausalLM
from medplib_jax.models.lora import LoRAConfig
from medplib_jax.models.moe import MoEConfig, MoEFFN, collect_moe_metrics, routed_positions, top_k_gating


# ----------------------------------------------------------------------------------------------------------
# Naive reference: loops over tokens and experts, written from the semantics (not from the implementation).
def _softmax32(logits):
    z = logits.astype(np.float32) - logits.max(-1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def naive_gating(logits, k, cf, min_capacity, noise, used=None):
    s, e = logits.shape
    used = np.ones(s, bool) if used is None else used.astype(bool)
    n = int(used.sum()) if not np.all(used) else s
    cap_static = max(math.ceil(s / e * cf * k), min_capacity)
    cap = max(math.ceil(n / e * cf * k), min_capacity)
    gates = _softmax32(logits)
    first = [int(np.argmax(gates[t])) for t in range(s)]
    counts = np.zeros(e, np.int64)
    for t in range(s):
        if used[t]:
            counts[first[t]] += 1
    me = np.array([sum(gates[t, x] for t in range(s) if used[t]) / n for x in range(e)])
    ce = counts / n
    combine = np.zeros((s, e, cap_static), np.float64)
    if k == 1:
        aux = e * float(np.sum(me * ce))
        for x in range(e):
            mine = [t for t in range(s) if used[t] and first[t] == x]
            kept = set(sorted(mine, key=lambda t: -noise[t, x])[:cap])
            slot = 0
            for t in range(s):  # buffer slots in token order
                if t in kept:
                    combine[t, x, slot] = gates[t, x]
                    slot += 1
    else:
        aux = e * e * float(np.mean(me * ce))
        second = []
        for t in range(s):
            scores = [logits[t, x] + noise[t, x] if x != first[t] else -np.inf for x in range(e)]
            second.append(int(np.argmax(scores)))
        slot1, slot2 = np.zeros(e, int), np.zeros(e, int)
        pos1, pos2 = {}, {}
        for t in range(s):
            if used[t]:
                pos1[t] = slot1[first[t]]
                slot1[first[t]] += 1
        for t in range(s):
            if used[t]:
                pos2[t] = counts[second[t]] + slot2[second[t]]  # behind all first choices of that expert
                slot2[second[t]] += 1
        for t in range(s):
            if not used[t]:
                continue
            k1, k2 = pos1[t] < cap, pos2[t] < cap
            g1 = gates[t, first[t]] if k1 else 0.0
            g2 = gates[t, second[t]] if k2 else 0.0
            denom = max(g1 + g2, np.finfo(np.float32).eps)
            if k1:
                combine[t, first[t], pos1[t]] = g1 / denom
            if k2:
                combine[t, second[t], pos2[t]] = g2 / denom
    return aux, combine, combine != 0, counts


def naive_swiglu(x, gate_w, up_w, down_w):
    g = x @ gate_w
    return ((g / (1 + np.exp(-g))) * (x @ up_w)) @ down_w


def _noise(rng, shape, k):
    return rng.uniform(size=shape).astype(np.float32) if k == 1 else rng.gumbel(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('k', [1, 2])
@pytest.mark.parametrize('cf', [0.5, 1.0, 1.5, 2.0])
@pytest.mark.parametrize('min_capacity', [0, 4])
def test_gate_matches_naive_reference(np_rng, k, cf, min_capacity):
    for s, e in ((37, 2), (24, 3)):
        logits = np_rng.normal(size=(s, e)).astype(np.float32) * 2
        noise = _noise(np_rng, (s, e), k)
        aux, combine, dispatch, counts = top_k_gating(jnp.asarray(logits), k=k, capacity_factor=cf,
                                                      min_capacity=min_capacity, noise=jnp.asarray(noise))
        r_aux, r_combine, r_dispatch, r_counts = naive_gating(logits, k, cf, min_capacity, noise)
        assert combine.shape == r_combine.shape
        np.testing.assert_allclose(np.asarray(combine), r_combine, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(dispatch), r_dispatch)
        np.testing.assert_array_equal(np.asarray(counts), r_counts)
        assert abs(float(aux) - r_aux) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize('k', [1, 2])
@pytest.mark.parametrize('cf', [0.5, 1.0, 1.5, 2.0])
@pytest.mark.parametrize('min_capacity', [0, 4])
def test_layer_output_matches_naive_reference(np_rng, k, cf, min_capacity):
    """Whole layer (router -> gate -> dispatch -> LoRA experts -> combine) vs per-token loops."""
    b, length, d, f, e = 4, 6, 16, 24, 3
    moe = MoEConfig(mode='dense', num_experts=e, top_k=k, capacity_factor=cf, min_capacity=min_capacity,
                    group_size=2)
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=('gate_proj', 'up_proj', 'down_proj'))
    layer = MoEFFN(moe, f, lora)
    x = np_rng.normal(size=(b, length, d)).astype(np.float32)
    params = nn.unbox(layer.init(jax.random.key(0), jnp.asarray(x), None, True,
                                 noise=jnp.zeros((2, 12, e))))['params']
    # non-zero LoRA B so the adapters take part
    for name in ('gate_proj', 'up_proj', 'down_proj'):
        params['experts'][name]['lora_B'] = jnp.asarray(np_rng.normal(size=params['experts'][name]['lora_B'].shape)
                                                        * 0.1, jnp.float32)
    noise = _noise(np_rng, (2, 12, e), k)
    y, state = layer.apply({'params': params}, jnp.asarray(x), None, True, noise=jnp.asarray(noise),
                           mutable=['intermediates'])
    wg = np.asarray(params['gate']['wg']['kernel'])
    p = jax.tree.map(np.asarray, params['experts'])

    def w(name, i):  # merged expert weight: W + alpha/r A B
        return p[name]['kernel'][i] + lora.scale * p[name]['lora_A'][i] @ p[name]['lora_B'][i]

    xg = x.reshape(2, 12, d)
    expected = np.zeros_like(xg, dtype=np.float64)
    auxes = []
    for g in range(2):
        aux, combine, _, _ = naive_gating(xg[g] @ wg, k, cf, min_capacity, noise[g])
        auxes.append(aux)
        for t in range(12):
            for i in range(e):
                weight = combine[t, i].sum()
                if weight:
                    expected[g, t] += weight * naive_swiglu(xg[g, t], w('gate_proj', i), w('up_proj', i),
                                                            w('down_proj', i))
    np.testing.assert_allclose(np.asarray(y).reshape(2, 12, d), expected, rtol=0,
                               atol=1e-6 * max(1.0, np.abs(expected).max()))
    sown = state['intermediates']
    assert abs(float(sown['moe_aux_loss'][0]) - np.mean(auxes)) <= 1e-6


def test_hand_computed_top1_dropping_and_buffer_positions():
    """6 tokens, 2 experts, cf 1 -> capacity 3. Expert 0 is chosen by tokens 0, 1, 3, 4 (one too many): the
    random token selection keeps the 3 highest priorities (tokens 0, 4, 3), drops token 1; buffer slots follow
    token order among the kept: 0 -> 0, 3 -> 1, 4 -> 2. Expert 1 keeps tokens 2 -> 0, 5 -> 1."""
    logits = np.array([[2., 0.], [1., 0.], [0., 1.], [3., 0.], [0.5, 0.], [0., 2.]], np.float32)
    priority = np.array([[.9, .3], [.1, .3], [.5, .8], [.5, .3], [.7, .3], [.2, .6]], np.float32)
    aux, combine, dispatch, counts = top_k_gating(jnp.asarray(logits), k=1, capacity_factor=1.0, min_capacity=0,
                                                  noise=jnp.asarray(priority))
    p = lambda a, b: float(np.exp(a) / (np.exp(a) + np.exp(b)))  # noqa: E731
    expected = np.zeros((6, 2, 3))
    expected[0, 0, 0] = p(2, 0)
    expected[3, 0, 1] = p(3, 0)
    expected[4, 0, 2] = p(0.5, 0)
    expected[2, 1, 0] = p(1, 0)
    expected[5, 1, 1] = p(2, 0)
    np.testing.assert_allclose(np.asarray(combine), expected, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(dispatch), expected > 0)
    np.testing.assert_array_equal(np.asarray(counts), [4, 2])  # counted before dropping
    me = np.array([p(2, 0) + p(1, 0) + p(0, 1) + p(3, 0) + p(.5, 0) + p(0, 2)]) / 6
    me = np.array([me[0], 1 - me[0]])
    np.testing.assert_allclose(float(aux), 2 * np.sum(me * np.array([4, 2]) / 6), atol=1e-6)


@pytest.mark.slow
def test_hand_computed_top2_and_token_dropped_by_both_passes_through():
    """Same tokens, k=2, cf 0.5 -> capacity ceil(6/2*0.5*2) = 3. First choices of expert 0 (tokens 0,1,3,4) take
    slots 0,1,2,3 -> token 4 dropped. Second choices queue behind all first choices of their expert: expert 1 had
    2 first choices, so tokens 0,1,3,4 get slots 2,3,4,5 (only token 0 fits); tokens 2,5 go to expert 0 slots
    4,5 (dropped). Token 4 is dropped by both experts and its MoE output is exactly 0."""
    logits = np.array([[2., 0.], [1., 0.], [0., 1.], [3., 0.], [0.5, 0.], [0., 2.]], np.float32)
    _, combine, dispatch, _ = top_k_gating(jnp.asarray(logits), k=2, capacity_factor=0.5, min_capacity=0,
                                           noise=jnp.zeros((6, 2)))
    g = _softmax32(logits)
    expected = np.zeros((6, 2, 3))
    expected[0, 0, 0], expected[0, 1, 2] = g[0, 0], g[0, 1]  # both kept: renormalised gates = softmax
    expected[1, 0, 1] = 1.0  # only its first choice kept: renormalised to 1
    expected[3, 0, 2] = 1.0
    expected[2, 1, 0] = 1.0
    expected[5, 1, 1] = 1.0
    np.testing.assert_allclose(np.asarray(combine), expected, atol=1e-6)
    assert not np.asarray(dispatch)[4].any()

    # The same case through the layer: hidden size 2 with an identity router makes the router logits = x.
    moe = MoEConfig(mode='dense', num_experts=2, top_k=2, capacity_factor=0.5, group_size=1)
    layer = MoEFFN(moe, 8, LoRAConfig())
    x = jnp.asarray(logits[None])
    params = nn.unbox(layer.init(jax.random.key(0), x, None, True))['params']
    params['gate']['wg']['kernel'] = jnp.eye(2)
    y = np.asarray(layer.apply({'params': params}, x, None, True, noise=jnp.zeros((1, 6, 2))))[0]
    assert np.all(y[4] == 0)  # its MoE contribution is exactly zero: the residual carries it unchanged
    assert np.all(np.abs(y[[0, 1, 2, 3, 5]]).sum(-1) > 0)


@pytest.mark.slow
def test_top2_with_capacity_factor_two_is_the_dense_mixture(np_rng):
    """E=2, k=2, cf>=2: nobody is dropped; output = sum_e softmax_e * FFN_e(x)."""
    d, f = 8, 12
    moe = MoEConfig(mode='dense', num_experts=2, top_k=2, capacity_factor=2.0, group_size=2)
    layer = MoEFFN(moe, f, LoRAConfig())
    x = np_rng.normal(size=(4, 5, d)).astype(np.float32)
    variables = nn.unbox(layer.init(jax.random.key(1), jnp.asarray(x), None, True))
    y, state = layer.apply(variables, jnp.asarray(x), None, True, mutable=['intermediates'])
    p = jax.tree.map(np.asarray, variables['params'])
    gates = _softmax32(x.reshape(-1, d) @ p['gate']['wg']['kernel'])
    dense = sum(gates[:, i:i + 1] * naive_swiglu(x.reshape(-1, d), p['experts']['gate_proj']['kernel'][i],
                                                 p['experts']['up_proj']['kernel'][i],
                                                 p['experts']['down_proj']['kernel'][i]) for i in range(2))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, d), dense, rtol=0, atol=1e-6 * np.abs(dense).max())
    assert float(state['intermediates']['moe_drop_fraction'][0]) == 0.0


@pytest.mark.slow
def test_dropped_token_passes_through_the_decoder_layer_unchanged(np_rng):
    """With a tiny capacity most tokens are dropped; for them the block's FFN adds exactly 0, so the layer output
    equals the post-attention residual stream."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                      head_dim=8, moe=MoEConfig(mode='dense', capacity_factor=0.25, group_size=1))
    model = LlamaForCausalLM(cfg)
    ids = jnp.asarray(np_rng.integers(0, 64, size=(1, 12)))
    rngs = {'params': jax.random.key(0), 'moe': jax.random.key(1)}
    variables = nn.unbox(model.init(rngs, ids, train=True))
    _, state = model.apply(variables, ids, train=True, rngs={'moe': jax.random.key(2)},
                           mutable=['intermediates'], capture_intermediates=True)
    inter = state['intermediates']['model']['layers_0']
    mlp_out = np.asarray(inter['mlp']['__call__'][0])[0]
    dropped = np.all(mlp_out == 0, axis=-1)
    # capacity ceil(12/2*0.25) = 2 per expert: at most 4 of 12 tokens are kept
    assert dropped.sum() >= 8
    assert float(inter['mlp']['moe_drop_fraction'][0]) == pytest.approx(dropped.mean())


@pytest.mark.slow
def test_gradients_reach_router_and_lora(np_rng):
    moe = MoEConfig(mode='dense', capacity_factor=1.5, group_size=2)
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.05, targets=('gate_proj', 'up_proj', 'down_proj'))
    layer = MoEFFN(moe, 12, lora)
    x = jnp.asarray(np_rng.normal(size=(4, 6, 8)), jnp.float32)
    rngs = {'params': jax.random.key(0), 'moe': jax.random.key(1), 'dropout': jax.random.key(2)}
    params = nn.unbox(layer.init(rngs, x, None, True))['params']
    params['experts']['down_proj']['lora_B'] = jnp.full_like(params['experts']['down_proj']['lora_B'], 0.1)
    target = jnp.asarray(np_rng.normal(size=x.shape), jnp.float32)

    def loss(p):
        y = layer.apply({'params': p}, x, None, True, rngs={'moe': jax.random.key(3), 'dropout': jax.random.key(4)})
        return jnp.sum((y - target) ** 2)

    grads = jax.grad(loss)(params)
    assert np.abs(np.asarray(grads['gate']['wg']['kernel'])).max() > 0
    for name in ('gate_proj', 'up_proj', 'down_proj'):
        assert np.abs(np.asarray(grads['experts'][name]['lora_B'])).max() > 0
        # the base is not frozen by the layer (the stage's trainable patterns freeze it)
        assert np.abs(np.asarray(grads['experts'][name]['kernel'])).max() > 0, name
    assert np.abs(np.asarray(grads['experts']['down_proj']['lora_A'])).max() > 0


@pytest.mark.slow
def test_padding_routing_modes(np_rng):
    s, e = 20, 2
    logits = jnp.asarray(np_rng.normal(size=(s, e)), jnp.float32)
    noise = jnp.asarray(np_rng.uniform(size=(s, e)), jnp.float32)
    used = np.ones(s, bool)
    used[13:] = False  # 7 padding positions
    # default (reference): padding routed, counted, and capacity from all 20 tokens
    _, combine, _, counts = top_k_gating(logits, k=1, capacity_factor=1.0, min_capacity=0, noise=noise)
    assert int(counts.sum()) == s and combine.shape[-1] == 10
    # used-token mask: padding not routed, capacity ceil(13/2*1.0) = 7 per expert, aux over real tokens
    aux, combine_u, dispatch_u, counts_u = top_k_gating(logits, k=1, capacity_factor=1.0, min_capacity=0,
                                                        noise=noise, used_token=jnp.asarray(used))
    assert int(counts_u.sum()) == 13
    assert not np.asarray(dispatch_u)[13:].any()
    assert np.asarray(dispatch_u).sum(axis=(0, 2)).max() <= 7
    r_aux, r_combine, _, r_counts = naive_gating(np.asarray(logits), 1, 1.0, 0, np.asarray(noise), used)
    np.testing.assert_allclose(np.asarray(combine_u), r_combine, atol=1e-6)
    assert abs(float(aux) - r_aux) <= 1e-6

    # the layer: lengths 6 and 3 in a bucket of 10, one routing group of 2 sequences
    x = jnp.asarray(np_rng.normal(size=(2, 10, 8)), jnp.float32)
    mask = jnp.asarray(np.arange(10)[None] < np.array([6, 3])[:, None])
    for route_padding, n_routed in (('all', 20), ('micro_batch', 12), ('none', 9)):
        layer = MoEFFN(MoEConfig(mode='dense', route_padding=route_padding, group_size=2), 12, LoRAConfig())
        variables = nn.unbox(layer.init(jax.random.key(0), x, mask, False))
        _, state = layer.apply(variables, x, mask, False, mutable=['intermediates'])
        assert int(state['intermediates']['moe_expert_counts'][0].sum()) == n_routed, route_padding


@pytest.mark.slow
@pytest.mark.parametrize('k', [1, 2])
def test_bucket_padding_routes_as_the_reference_padded_micro_batch(np_rng, k):
    """The reference pads a micro-batch only to its longest sequence and routes all of it. A batch padded further
    (to a length bucket) with route_padding='micro_batch' gives, on those positions, exactly the outputs, aux loss,
    expert counts and keep / drop decisions of the reference's shorter batch routed whole (training, capacity
    factor 0.5 / k: tokens are dropped, with the same gate noise per token)."""
    group, bucket, lengths = 4, 16, np.array([11, 5, 9, 3])
    longest = int(lengths.max())
    x = np_rng.normal(size=(8, bucket, 8)).astype(np.float32)
    mask = np.arange(bucket)[None] < np.concatenate([lengths, lengths[::-1]])[:, None]
    noise = _noise(np_rng, (2, group * bucket, 2), k)
    layer = MoEFFN(MoEConfig(mode='dense', top_k=k, capacity_factor=0.5 / k, group_size=group), 12,
                   LoRAConfig(rank=2, alpha=4.0, dropout=0.0, targets=('gate_proj', 'up_proj', 'down_proj')))
    variables = nn.unbox(layer.init(jax.random.key(0), jnp.asarray(x), jnp.asarray(mask), False))

    def run(inputs, token_mask, gate_noise, route_padding):
        layer_ = layer.clone(moe=dataclasses.replace(layer.moe, route_padding=route_padding))
        y, state = layer_.apply(variables, jnp.asarray(inputs), jnp.asarray(token_mask), True,
                                jnp.asarray(gate_noise), mutable=['intermediates'])
        return np.asarray(y), {name: np.asarray(v[0]) for name, v in state['intermediates'].items()}

    y, m = run(x, mask, noise, 'micro_batch')
    # the reference's batch: each group cut at its own longest sequence (both groups have the same longest here)
    cut_noise = noise.reshape(2, group, bucket, 2)[:, :, :longest].reshape(2, group * longest, 2)
    y_ref, m_ref = run(x[:, :longest], mask[:, :longest], cut_noise, 'all')
    np.testing.assert_allclose(y[:, :longest], y_ref, rtol=0, atol=1e-6)
    assert not y[:, longest:].any()  # bucket padding: not routed, nothing added
    assert float(m['moe_drop_fraction']) > 0  # the test exercises dropping
    for name in ('moe_aux_loss', 'moe_expert_counts', 'moe_drop_fraction'):
        np.testing.assert_allclose(m[name], m_ref[name], rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(m['moe_token_slots'][:, :longest], m_ref['moe_token_slots'])


@pytest.mark.slow
def test_eval_top1_touches_exactly_one_expert_per_token(np_rng):
    moe = MoEConfig(mode='dense')  # eval capacity factor 2.0 with 2 experts: capacity = S, nothing dropped
    logits = jnp.asarray(np_rng.normal(size=(64, 2)), jnp.float32)
    _, combine, dispatch, _ = top_k_gating(logits, k=1, capacity_factor=moe.eval_capacity_factor, min_capacity=0)
    np.testing.assert_array_equal(np.asarray(dispatch).sum(axis=(1, 2)), np.ones(64))
    # the weight is the (unrenormalised) top-1 probability, in [0.5, 1] for 2 experts
    w = np.asarray(combine).sum(axis=(1, 2))
    assert np.all((w >= 0.5) & (w <= 1.0))


def test_gate_needs_noise_or_rng_when_tokens_can_drop():
    with pytest.raises(ValueError, match='pass `noise` or `rng`'):
        top_k_gating(jnp.zeros((8, 2)), k=1, capacity_factor=1.0, min_capacity=0)
    a = top_k_gating(jnp.ones((8, 2)), k=1, capacity_factor=1.0, min_capacity=0, rng=jax.random.key(0))
    b = top_k_gating(jnp.ones((8, 2)), k=1, capacity_factor=1.0, min_capacity=0, rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def _moe_llama(scan_layers=False):
    return LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, scan_layers=scan_layers,
                       lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.0,
                                       targets=('q_proj', 'v_proj', 'gate_proj', 'up_proj', 'down_proj')),
                       moe=MoEConfig(mode='dense', capacity_factor=1.0, group_size=4))


@pytest.mark.slow
@pytest.mark.parametrize('scan_layers', [False, True])
def test_moe_model_on_8_devices_equals_1_device(np_rng, scan_layers):
    """Mesh (data=4, fsdp=2): logits, per-layer aux loss, expert counts and drop fraction identical to 1 device,
    in training mode (capacity factor 1.0: tokens are dropped, by random token selection)."""
    cfg = _moe_llama(scan_layers)
    model = LlamaForCausalLM(cfg)
    ids = jnp.asarray(np_rng.integers(0, cfg.vocab_size, size=(32, 8)))
    boxed = model.init({'params': jax.random.key(0), 'moe': jax.random.key(1)}, ids, train=True)
    params = nn.unbox(boxed)['params']

    def run(p, i):
        (logits, _), state = model.apply({'params': p}, i, train=True, rngs={'moe': jax.random.key(7)},
                                         mutable=['intermediates'])
        return logits, collect_moe_metrics(state['intermediates'])

    ref_logits, ref_m = jax.jit(run)(jax.device_put(params, jax.devices()[0]), ids)
    assert float(ref_m['drop_fraction'].max()) > 0  # the test exercises dropping
    mesh = sharding.make_mesh(dict(data=4, fsdp=2, tensor=1))
    shardings = sharding.param_shardings(boxed, mesh, LOGICAL_AXIS_RULES)['params']
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        logits, m = jax.jit(run)(sharding.shard_like(params, shardings),
                                 jax.device_put(ids, sharding.data_sharding(mesh, 2)))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=0,
                               atol=1e-5 * float(np.abs(ref_logits).max()))
    np.testing.assert_array_equal(np.asarray(m['expert_counts']), np.asarray(ref_m['expert_counts']))
    np.testing.assert_array_equal(np.asarray(m['drop_fraction']), np.asarray(ref_m['drop_fraction']))
    np.testing.assert_allclose(np.asarray(m['aux_loss_per_layer']), np.asarray(ref_m['aux_loss_per_layer']),
                               rtol=1e-6)
    assert m['expert_counts'].shape == (2, 2)


@pytest.mark.slow
def test_moe_model_decodes_a_batch_of_one_with_the_kv_cache(np_rng):
    """A batch of 1 (smaller than the training routing group of 4) decodes with the KV cache: prefill, then
    one-token steps. With the evaluation capacity factor 2 and top-1 no token is dropped, so the steps' logits equal
    a full forward over prompt + generated tokens, and every token gets its expert."""
    from medplib_jax.infer.generate import greedy_generate, positions_from_mask
    cfg = _moe_llama()
    model = LlamaForCausalLM(cfg)
    prompt = jnp.asarray(np_rng.integers(3, cfg.vocab_size, size=(1, 10)))
    params = nn.unbox(model.init(jax.random.key(3), prompt))['params']
    tokens, step_logits = greedy_generate(model, params, prompt, jnp.ones((1, 10), bool), 8)
    full = jnp.concatenate([prompt, tokens], axis=1)
    (logits, _), state = model.apply({'params': params}, full, positions=positions_from_mask(jnp.ones_like(full)),
                                     mutable=['intermediates'])
    ref = np.asarray(logits)[:, 9:-1]  # the logits that predicted each generated token
    np.testing.assert_array_equal(ref.argmax(-1), np.asarray(tokens))
    np.testing.assert_allclose(np.asarray(step_logits), ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    m = collect_moe_metrics(state['intermediates'])
    assert float(m['drop_fraction'].max()) == 0.0 and np.all(np.asarray(m['token_slots']) == 1)
    assert np.asarray(m['expert_counts']).sum(-1).tolist() == [18, 18]  # every token routed, in both layers


@pytest.mark.slow
def test_metrics_collected_per_layer_and_in_total(np_rng):
    cfg = dataclasses.replace(_moe_llama(), moe=MoEConfig(mode='sparse', group_size=4), num_layers=3)
    model = LlamaForCausalLM(cfg)
    ids = jnp.asarray(np_rng.integers(0, cfg.vocab_size, size=(4, 8)))
    variables = nn.unbox(model.init(jax.random.key(0), ids))
    assert 'experts' in variables['params']['model']['layers_0']['mlp']
    assert 'experts' not in variables['params']['model']['layers_1']['mlp']  # sparse: layers 0 and 2
    _, state = model.apply(variables, ids, mutable=['intermediates'])
    m = collect_moe_metrics(state['intermediates'])
    assert m['aux_loss_per_layer'].shape == (2,) and m['expert_counts'].shape == (2, 2)
    np.testing.assert_allclose(float(m['aux_loss']), float(m['aux_loss_per_layer'].sum()), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(m['expert_counts']).sum(-1), [32, 32])
    assert collect_moe_metrics({}) == {}


@pytest.mark.slow
def test_config_validation():
    with pytest.raises(ValueError, match='top_k=3'):
        MoEConfig(top_k=3)
    with pytest.raises(ValueError, match="moe.mode='half'"):
        MoEConfig(mode='half')
    with pytest.raises(ValueError, match='unknown keys'):
        MoEConfig.from_dict({'capacity': 2})
    with pytest.raises(ValueError, match='nn.scan needs identical layers'):
        dataclasses.replace(_moe_llama(scan_layers=True), moe=MoEConfig(mode='sparse'))
    with pytest.raises(ValueError, match="route_padding='yes'"):
        MoEConfig(route_padding='yes')
    layer = MoEFFN(MoEConfig(mode='dense', group_size=4), 8, LoRAConfig())
    with pytest.raises(ValueError, match='group_size=4 does not divide the batch of 3'):
        layer.init({'params': jax.random.key(0), 'moe': jax.random.key(1)}, jnp.zeros((3, 2, 4)), None, True)
    # evaluation routes the largest divisor of the batch up to group_size: a batch of 3 routes one by one
    variables = nn.unbox(layer.init(jax.random.key(0), jnp.zeros((3, 2, 4)), None, False))
    assert layer.apply(variables, jnp.ones((3, 2, 4)), None, False).shape == (3, 2, 4)


def _two_dispatches(moe: MoEConfig, f: int, lora: LoRAConfig):
    layer = MoEFFN(moe, f, lora)
    return {d: layer.clone(moe=dataclasses.replace(moe, dispatch=d)) for d in ('einsum', 'grouped')}


def _random_params(layer, x, mask, np_rng):
    init = jax.jit(functools.partial(layer.init, train=True))
    params = nn.unbox(init({'params': jax.random.key(0), 'moe': jax.random.key(1)}, x, mask))['params']
    # perturb everything (LoRA B included, so the adapters take part)
    return jax.tree.map(lambda p: p + 0.1 * jnp.asarray(np_rng.normal(size=p.shape), p.dtype), params)


@pytest.mark.slow
@pytest.mark.parametrize('k,cf', [(1, 0.5), (2, 0.5)])
def test_grouped_dispatch_equals_einsum_outputs_gradients_and_decisions(np_rng, k, cf):
    """3 experts, 2 routing groups, LoRA on every expert projection: outputs, gradients w.r.t. every parameter
    and the input, aux loss, counts and the per-token keep / drop decisions agree (cf 0.5 drops tokens)."""
    b, length, d, f = 4, 6, 16, 24
    moe = MoEConfig(mode='dense', num_experts=3, top_k=k, capacity_factor=cf, group_size=2)
    layers = _two_dispatches(moe, f, LoRAConfig(rank=4, alpha=8.0, dropout=0.0,
                                                targets=('gate_proj', 'up_proj', 'down_proj')))
    x = jnp.asarray(np_rng.normal(size=(b, length, d)), jnp.float32)
    params = _random_params(layers['einsum'], x, None, np_rng)
    noise = jnp.asarray(_noise(np_rng, (2, 12, 3), k))
    target = jnp.asarray(np_rng.normal(size=x.shape), jnp.float32)

    def loss(layer, p, inputs):
        y, state = layer.apply({'params': p}, inputs, None, True, noise=noise, mutable=['intermediates'])
        return jnp.sum((y - target) ** 2), (y, state['intermediates'])

    out = {name: jax.jit(jax.value_and_grad(functools.partial(loss, layer), argnums=(0, 1), has_aux=True))(params, x)
           for name, layer in layers.items()}
    (_, (y_ref, m_ref)), g_ref = out['einsum']
    (_, (y, m)), g = out['grouped']
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=0, atol=1e-5 * float(np.abs(y_ref).max()))
    for path, ref in jax.tree_util.tree_flatten_with_path(g_ref)[0]:
        got = functools.reduce(lambda t, key: t[getattr(key, 'key', getattr(key, 'idx', None))], path, g)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0,
                                   atol=1e-5 * max(1.0, float(np.abs(ref).max())), err_msg=str(path))
    for name in ('moe_token_slots', 'moe_expert_counts', 'moe_drop_fraction'):
        np.testing.assert_array_equal(np.asarray(m[name][0]), np.asarray(m_ref[name][0]), err_msg=name)
    np.testing.assert_allclose(float(m['moe_aux_loss'][0]), float(m_ref['moe_aux_loss'][0]), rtol=1e-6)
    assert float(m_ref['moe_drop_fraction'][0]) > 0  # cf 0.5: at most half of the choices find a slot


@pytest.mark.slow
def test_grouped_dispatch_with_bucket_padding_equals_einsum(np_rng):
    """route_padding='micro_batch' on a batch padded to a longer bucket, capacity factor 0.5: the unrouted bucket
    padding and the dropped tokens get exactly 0 in both dispatches, the rest agrees."""
    lengths = np.array([11, 5, 9, 3, 7, 16, 2, 4])
    x = jnp.asarray(np_rng.normal(size=(8, 16, 8)), jnp.float32)
    mask = jnp.asarray(np.arange(16)[None] < lengths[:, None])
    layers = _two_dispatches(MoEConfig(mode='dense', capacity_factor=0.5, group_size=4), 12,
                             LoRAConfig(rank=2, alpha=4.0, dropout=0.0, targets=('gate_proj', 'down_proj')))
    params = _random_params(layers['einsum'], x, mask, np_rng)
    noise = jnp.asarray(_noise(np_rng, (2, 64, 2), 1))
    res = {}
    for name, layer in layers.items():
        y, state = jax.jit(functools.partial(layer.apply, mutable=['intermediates']), static_argnums=3)(
            {'params': params}, x, mask, True, noise)
        res[name] = np.asarray(y), np.asarray(state['intermediates']['moe_token_slots'][0])
    (y_ref, slots_ref), (y, slots) = res['einsum'], res['grouped']
    np.testing.assert_array_equal(slots, slots_ref)
    assert not slots[:4, 11:].any() and 0 < slots.sum() < mask.sum()  # bucket padding unrouted; tokens dropped
    np.testing.assert_array_equal(y == 0, y_ref == 0)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * float(np.abs(y_ref).max()))


@pytest.mark.slow
@pytest.mark.parametrize('kernel', ['tiles', 'ragged_dot'])
def test_grouped_matmul_skips_an_empty_expert_and_matches_per_row_products(np_rng, kernel):
    """Expert 1 gets no rows (its tiles are never visited); rows and weight gradients equal per-row products, by
    either kernel."""
    expert = jnp.asarray([2, 0, 2, 2, 0, 2, 2, 0, 2, 2], jnp.int32)
    keep = jnp.asarray([1, 1, 1, 0, 1, 1, 1, 1, 1, 0], bool)
    layout, row = make_layout(expert, keep, 3, 10)
    layout = dataclasses.replace(layout, kernel=kernel)
    np.testing.assert_array_equal(np.diff(np.asarray(layout.tile_bounds)[0], axis=1)[:, 0], [1, 0, 1])
    kept_rows = np.asarray(row)[np.asarray(keep)]
    num_rows = layout.row_expert.shape[0]
    assert len(set(kept_rows.tolist())) == kept_rows.size and np.all(np.asarray(row)[~np.asarray(keep)] == num_rows)
    x = jnp.asarray(np_rng.normal(size=(10, 5)), jnp.float32)
    w = jnp.asarray(np_rng.normal(size=(3, 5, 4)), jnp.float32)
    rows_in = jnp.zeros((num_rows, 5)).at[row].set(x, mode='drop')

    def via_rows(w_, x_rows):
        return jnp.take(grouped_matmul(x_rows, w_, layout), row, axis=0, mode='fill', fill_value=0)

    def per_row(w_, x_rows):
        return jnp.einsum('nd,ndf->nf', x_rows.at[row].get(mode='fill', fill_value=0), w_[expert]) * keep[:, None]

    close = lambda got, ref: np.testing.assert_allclose(  # noqa: E731  (fp32: 1e-5 of the largest value)
        np.asarray(got), np.asarray(ref), rtol=0, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    close(via_rows(w, rows_in), per_row(w, rows_in))
    loss = lambda fn: jax.grad(lambda w_, r_: jnp.sum(jnp.sin(fn(w_, r_))), argnums=(0, 1))(w, rows_in)  # noqa: E731
    for got, ref in zip(loss(via_rows), loss(per_row)):
        close(got, ref)


def _gathered_shapes(hlo: str) -> set[tuple[int, ...]]:
    """Result shapes of every all-gather in a compiled HLO module."""
    return {tuple(int(n) for n in dims.split(',') if n)
            for dims in re.findall(r'= \w+\[([\d,]*)\][^=]*? all-gather(?:-start)?\(', hlo)}


@pytest.mark.slow
@pytest.mark.parametrize('k,kernel,group', [(1, 'tiles', 2), (2, 'ragged_dot', 4)])
def test_grouped_dispatch_per_shard_on_8_devices_equals_einsum_on_1(np_rng, k, kernel, group):
    """The grouped MoE layer on a (data=4, fsdp=2) mesh, each shard laying out and computing its own sequences'
    rows, against the einsum dispatch (the reference) on 1 device: training with dropping and bucket padding, 3
    experts, top-1 and top-2, routing groups within a shard (2 sequences per shard, groups of 2) and straddling two
    (groups of 4). Same keep / drop decisions, outputs and gradients; and the compiled program gathers only
    parameters (whole weights, as FSDP does), never tokens or rows."""
    x = jnp.asarray(np_rng.normal(size=(16, 8, 16)), jnp.float32)
    mask = jnp.asarray(np.arange(8)[None] < np_rng.integers(1, 9, size=(16, 1)))
    moe = MoEConfig(mode='dense', num_experts=3, top_k=k, capacity_factor=0.5, group_size=group,
                    grouped_matmul=kernel)
    layers = _two_dispatches(moe, 24, LoRAConfig(rank=2, alpha=4.0, dropout=0.0,
                                                 targets=('gate_proj', 'up_proj', 'down_proj')))
    boxed = jax.jit(functools.partial(layers['grouped'].init, train=True))(
        {'params': jax.random.key(0), 'moe': jax.random.key(1)}, x, mask)
    params = _random_params(layers['grouped'], x, mask, np_rng)

    def run(layer, p, inputs, token_mask):
        def loss(p_, inputs_):
            y, state = layer.apply({'params': p_}, inputs_, token_mask, True, rngs={'moe': jax.random.key(7)},
                                   mutable=['intermediates'])
            return jnp.sum(y ** 2), (y, state['intermediates']['moe_token_slots'][0])
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(p, inputs)

    ref_grads, (ref_y, ref_slots) = jax.jit(functools.partial(run, layers['einsum']))(params, x, mask)
    assert 0 < int(ref_slots.sum()) < k * int(routed_positions(mask, group, 'micro_batch').sum())  # some dropped
    mesh = sharding.make_mesh(dict(data=4, fsdp=2, tensor=1))
    shardings = sharding.param_shardings(boxed, mesh, LOGICAL_AXIS_RULES)['params']
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        args = (sharding.shard_like(params, shardings), jax.device_put(x, sharding.data_sharding(mesh, 3)),
                jax.device_put(mask, sharding.data_sharding(mesh, 2)))
        step = jax.jit(functools.partial(run, layers['grouped'])).lower(*args).compile()
        grads, (y, slots) = step(*args)
    np.testing.assert_array_equal(np.asarray(slots), np.asarray(ref_slots))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=0, atol=1e-5 * float(np.abs(ref_y).max()))
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0,
                                   atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    weights = {tuple(p.shape) for p in jax.tree.leaves(params)}
    gathered = _gathered_shapes(step.as_text())
    others = gathered - weights
    # Groups within a shard: only weights. Straddling groups: the gate's small per-token arrays too (logits,
    # routed positions: a group's capacity counts all its tokens), never hidden states or rows (last dim D).
    assert weights & gathered and (not others if group == 2 else all(s[-1] != x.shape[-1] for s in others)), others


def test_dispatch_is_validated():
    with pytest.raises(ValueError, match="moe.dispatch='ragged'; known"):
        MoEConfig(dispatch='ragged')
    assert MoEConfig.from_dict({'dispatch': 'grouped'}).dispatch == 'grouped'
