"""Mesh construction, logical rules, and sharded == unsharded on 8 fake CPU devices."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from configs.common import LOGICAL_AXIS_RULES, get_config
from medplib_jax import sharding
from medplib_jax.infer.generate import greedy_generate
from medplib_jax.models.clip import CLIPVisionConfig, CLIPVisionTower
from medplib_jax.models.llama import LlamaConfig, LlamaForCausalLM

MESH_222 = dict(data=2, fsdp=2, tensor=2)
CFG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16)


def test_mesh_shape_resolution_and_errors():
    assert sharding.mesh_shape(dict(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert sharding.mesh_shape(dict(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
    assert sharding.mesh_shape(dict(data=-1), 8) == (8, 1, 1)
    for bad, match in [(dict(data=-1, fsdp=-1), 'at most one'), (dict(data=3, fsdp=-1), 'not divisible'),
                       (dict(data=2, fsdp=2, tensor=1), 'needs 4 devices'), (dict(expert=2), 'unknown axes'),
                       (dict(data=0), 'positive')]:
        with pytest.raises(ValueError, match=match):
            sharding.mesh_shape(bad, 8)
    mesh = sharding.make_mesh(get_config().mesh)
    assert mesh.axis_names == ('data', 'fsdp', 'tensor') and mesh.size == 8
    assert all(t == AxisType.Auto for t in mesh.axis_types)


def _llama_params(cfg, seed):
    variables = LlamaForCausalLM(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    return variables


@pytest.mark.slow
@pytest.mark.parametrize('scan_layers', [False, True])
def test_llama_forward_sharded_equals_single_device(np_rng, scan_layers):
    cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
    model = LlamaForCausalLM(cfg)
    boxed = _llama_params(cfg, int(np_rng.integers(1 << 30)))
    params = nn.unbox(boxed)['params']
    ids = jnp.asarray(np_rng.integers(0, cfg.vocab_size, size=(4, 16)))
    mask = jnp.asarray(np.arange(16)[None] < np.array([16, 12, 9, 16])[:, None])

    single = jax.device_put((params, ids, mask), jax.devices()[0])
    ref, _ = jax.jit(lambda p, i, m: model.apply({'params': p}, i, token_mask=m))(*single)

    mesh = sharding.make_mesh(MESH_222)
    shardings = sharding.param_shardings(boxed, mesh, LOGICAL_AXIS_RULES)['params']
    sharded = sharding.shard_like(params, shardings)
    sharding.assert_params_sharded(sharded, min_size=1024)
    batch = sharding.data_sharding(mesh, 2)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        fn = jax.jit(lambda p, i, m: model.apply({'params': p}, i, token_mask=m),
                     in_shardings=(shardings, batch, batch))
        compiled = fn.lower(sharded, jax.device_put(ids, batch), jax.device_put(mask, batch)).compile()
        out, _ = fn(sharded, jax.device_put(ids, batch), jax.device_put(mask, batch))

    layer = (lambda t: t['model']['layers']) if scan_layers else (lambda t: t['model']['layers_1'])
    lead = (None,) if scan_layers else ()  # the scanned 'layers' axis is replicated
    in_params = compiled.input_shardings[0][0]
    assert layer(in_params)['self_attn']['q_proj']['kernel'].spec == P(*lead, 'fsdp', 'tensor')
    assert layer(in_params)['self_attn']['o_proj']['kernel'].spec == P(*lead, 'tensor', 'fsdp')
    assert layer(in_params)['mlp']['down_proj']['kernel'].spec == P(*lead, 'tensor', 'fsdp')
    assert in_params['model']['embed_tokens']['embedding'].spec == P('tensor', 'fsdp')
    assert in_params['lm_head']['kernel'].spec == P('fsdp', 'tensor')
    assert in_params['model']['norm']['weight'].spec in (P(), P(None))
    assert out.sharding.spec == P(('data', 'fsdp'), None, 'tensor')
    valid = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], rtol=0,
                               atol=1e-5 * float(np.abs(ref).max()))


def test_init_sharded_places_every_param_in_its_shard():
    mesh = sharding.make_mesh(MESH_222)
    model = LlamaForCausalLM(CFG)
    params, shardings = sharding.init_sharded(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)),
                                              mesh, LOGICAL_AXIS_RULES)
    q = params['params']['model']['layers_0']['self_attn']['q_proj']['kernel']
    assert q.sharding.spec == P('fsdp', 'tensor')
    assert q.addressable_shards[0].data.shape == (32, 32)  # (64/fsdp, 64/tensor)
    sharding.assert_params_sharded(params, min_size=1024)
    # same values as an unsharded init with the same key (jit vs eager sampling: last-bit differences)
    ref = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_assert_params_sharded_catches_a_replicated_weight():
    mesh = sharding.make_mesh(MESH_222)
    big = jax.device_put(jnp.zeros((256, 256)), jax.sharding.NamedSharding(mesh, P()))
    small = jax.device_put(jnp.zeros((8,)), jax.sharding.NamedSharding(mesh, P()))
    with pytest.raises(ValueError, match=r"1 large parameters .* lm_head \(256, 256\)"):
        sharding.assert_params_sharded({'lm_head': big, 'norm': small}, min_size=1024)
    # data-only mesh: nothing to shard over, no error
    data_mesh = sharding.make_mesh(dict(data=-1))
    sharding.assert_params_sharded({'w': jax.device_put(jnp.zeros((256, 256)),
                                                        jax.sharding.NamedSharding(data_mesh, P()))})


def test_kv_cache_decoding_sharded_equals_single_device(np_rng):
    model = LlamaForCausalLM(CFG)
    boxed = _llama_params(CFG, 3)
    params = nn.unbox(boxed)['params']
    prompt = jnp.asarray(np_rng.integers(3, CFG.vocab_size, size=(4, 8)))
    pmask = jnp.asarray(np.arange(8)[None] >= np.array([0, 2, 0, 5])[:, None])
    ref_tokens, ref_logits = greedy_generate(model, jax.device_put(params, jax.devices()[0]), prompt, pmask, 6)
    mesh = sharding.make_mesh(MESH_222)
    sharded = sharding.shard_like(params, sharding.param_shardings(boxed, mesh, LOGICAL_AXIS_RULES)['params'])
    batch = sharding.data_sharding(mesh, 2)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        tokens, logits = greedy_generate(model, sharded, jax.device_put(prompt, batch), jax.device_put(pmask, batch), 6)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(ref_tokens))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=0,
                               atol=1e-5 * float(np.abs(ref_logits).max()))


@pytest.mark.slow
def test_clip_tower_sharded_equals_single_device(np_rng):
    cfg = CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128, num_layers=3,
                           num_heads=4)
    tower = CLIPVisionTower(cfg)
    pixels = jnp.asarray(np_rng.normal(size=(4, 56, 56, 3)), jnp.float32)
    boxed = tower.init(jax.random.key(1), pixels)
    params = nn.unbox(boxed)
    ref = jax.jit(tower.apply)(jax.device_put(params, jax.devices()[0]), pixels)
    mesh = sharding.make_mesh(MESH_222)
    sharded = sharding.shard_like(params, sharding.param_shardings(boxed, mesh, LOGICAL_AXIS_RULES))
    sharding.assert_params_sharded(sharded, min_size=4096)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        out = jax.jit(tower.apply)(sharded, jax.device_put(pixels, sharding.data_sharding(mesh, 4)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-5 * float(np.abs(ref).max()))
