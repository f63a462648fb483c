"""LoRA adapters: peft's forward (x W + alpha/r * x A B), init, dropout, merge."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medplib_jax.models.llama import LlamaConfig, LlamaForCausalLM
from medplib_jax.models.lora import LoRAConfig, LoRADense, merge

LORA = LoRAConfig(rank=4, alpha=16.0, dropout=0.05, targets=('q_proj',))


@pytest.mark.slow
@pytest.mark.parametrize('stacked', [0, 3])
def test_forward_init_and_merge(np_rng, stacked):
    layer = LoRADense(12, ('embed', 'mlp'), LORA, stacked=stacked)
    lead = (stacked,) if stacked else ()
    x = jnp.asarray(np_rng.normal(size=lead + (2, 5, 8)), jnp.float32)
    params = nn.unbox(layer.init(jax.random.key(0), x))['params']
    assert params['kernel'].shape == lead + (8, 12) and params['lora_A'].shape == lead + (8, 4)
    assert params['lora_B'].shape == lead + (4, 12) and np.all(np.asarray(params['lora_B']) == 0)
    bound = 1 / np.sqrt(8)  # torch kaiming_uniform(a=sqrt(5)) on A: U(-1/sqrt(in), 1/sqrt(in))
    assert np.abs(np.asarray(params['lora_A'])).max() <= bound
    base_only = layer.apply({'params': params}, x)
    np.testing.assert_allclose(np.asarray(base_only), _apply(x, params['kernel'], stacked), rtol=1e-5, atol=1e-5)

    params['lora_B'] = jnp.asarray(np_rng.normal(size=params['lora_B'].shape), jnp.float32)
    y = layer.apply({'params': params}, x)
    w = np.asarray(params['kernel']) + 4.0 * np.matmul(np.asarray(params['lora_A']), np.asarray(params['lora_B']))
    expected = _apply(x, w, stacked)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)

    merged = merge(params, LORA)
    assert set(merged) == {'kernel'}
    plain = LoRADense(12, ('embed', 'mlp'), LoRAConfig(), stacked=stacked)
    np.testing.assert_allclose(np.asarray(plain.apply({'params': merged}, x)), np.asarray(y), rtol=1e-5, atol=1e-5)


def _apply(x, w, stacked):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return np.einsum('ebti,eio->ebto', x, w) if stacked else x @ w


@pytest.mark.slow
def test_dropout_only_in_training(np_rng):
    layer = LoRADense(6, ('embed', 'mlp'), LoRAConfig(rank=2, alpha=2.0, dropout=0.5, targets=('q_proj',)))
    x = jnp.asarray(np_rng.normal(size=(4, 16)), jnp.float32)
    params = nn.unbox(layer.init(jax.random.key(0), x))['params']
    params['lora_B'] = jnp.ones_like(params['lora_B'])
    eval_a = layer.apply({'params': params}, x, False)
    eval_b = layer.apply({'params': params}, x, False)
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    train = layer.apply({'params': params}, x, True, rngs={'dropout': jax.random.key(1)})
    assert not np.allclose(np.asarray(train), np.asarray(eval_a))
    with pytest.raises(Exception, match='dropout'):
        layer.apply({'params': params}, x, True)  # training without a dropout rng is an error, not a silent no-op


@pytest.mark.slow
def test_llama_lora_targets_and_stage_handoff(np_rng):
    """Stage-II style LoRA on q,k,v,o,gate,up,down: adapters only on targets; merged params load into the plain
    model and give the same logits (what each stage hands the next)."""
    lora = LoRAConfig(rank=4, alpha=16.0, dropout=0.05, targets=('q_proj', 'k_proj', 'v_proj', 'o_proj',
                                                                  'gate_proj', 'up_proj', 'down_proj'))
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=8, lora=lora)
    model = LlamaForCausalLM(cfg)
    ids = jnp.asarray(np_rng.integers(0, 64, size=(2, 7)))
    params = nn.unbox(model.init(jax.random.key(0), ids))['params']
    layer = params['model']['layers_1']
    assert set(layer['self_attn']['q_proj']) == {'kernel', 'lora_A', 'lora_B'}
    assert set(layer['self_attn']['k_proj']) == {'kernel', 'lora_A', 'lora_B'}
    assert set(params['lm_head']) == {'kernel'}
    params = jax.tree.map(lambda p: p + 0.05 * jnp.asarray(np_rng.normal(size=p.shape), p.dtype), params)
    with_lora, _ = model.apply({'params': params}, ids)
    plain = LlamaForCausalLM(dataclasses.replace(cfg, lora=LoRAConfig()))
    merged_logits, _ = plain.apply({'params': merge(params, lora)}, ids)
    np.testing.assert_allclose(np.asarray(merged_logits), np.asarray(with_lora), rtol=1e-5, atol=1e-5)

    # The layer does not freeze its base: the stage's trainable patterns do (tests/test_train_step.py).
    grads = jax.grad(lambda p: model.apply({'params': p}, ids)[0].sum())(params)
    g = grads['model']['layers_0']['mlp']['up_proj']
    assert np.abs(np.asarray(g['kernel'])).max() > 0 and np.abs(np.asarray(g['lora_A'])).max() > 0


def test_config_errors():
    with pytest.raises(ValueError, match=r"lora.targets: unknown \['qkv'\]"):
        LoRAConfig(rank=2, targets=('qkv',))
    with pytest.raises(ValueError, match='unknown keys'):
        LoRAConfig.from_dict({'r': 8})
