"""LLaMA decoder vs HF `LlamaForCausalLM` (PyTorch, fp32): logits, loss, KV-cache decoding, layouts, dtypes."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support.hf_refs import state_dict_numpy, tiny_hf_llama

from medplib_jax.convert.llama import hf_to_params
from medplib_jax.infer.generate import greedy_generate, positions_from_mask
from medplib_jax.models.llama import LlamaConfig, LlamaForCausalLM, apply_rope, rope_cos_sin
from medplib_jax.train.losses import IGNORE_INDEX, next_token_cross_entropy

B, T = 3, 24


@pytest.fixture(scope='module')
def hf_model():
    return tiny_hf_llama(seed=1234)


def _inputs(rng, vocab):
    """Right-padded batch: sample 1 ends 5 tokens early, sample 2 has 9 padding tokens."""
    ids = rng.integers(0, vocab, size=(B, T))
    mask = np.ones((B, T), bool)
    mask[1, T - 5:] = False
    mask[2, T - 9:] = False
    labels = np.where(mask, ids, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX  # an unsupervised prompt
    return ids, mask, labels


def _ours(hf_model, **overrides):
    cfg = LlamaConfig.from_hf(hf_model.config, **overrides)
    return cfg, LlamaForCausalLM(cfg), hf_to_params(state_dict_numpy(hf_model), cfg)


def _rel_err(a, b, mask=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.slow
@pytest.mark.parametrize('scan_layers,attention_block,attention', [(False, 0, 'xla'), (True, 0, 'xla'),
                                                                    (False, 7, 'xla'), (False, 0, 'splash')])
def test_logits_and_loss_match_hf(hf_model, np_rng, scan_layers, attention_block, attention):
    cfg, model, params = _ours(hf_model, scan_layers=scan_layers, attention_block=attention_block,
                               attention=attention)
    ids, mask, labels = _inputs(np_rng, cfg.vocab_size)
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                       labels=torch.tensor(labels))
    logits, hidden = model.apply({'params': params}, jnp.asarray(ids), token_mask=jnp.asarray(mask))
    assert logits.dtype == jnp.float32 and hidden.shape == (B, T, cfg.hidden_size)
    # Padding positions' outputs are meaningless in both implementations: compare real tokens.
    assert _rel_err(logits, ref.logits.numpy(), mask) <= 1e-5
    loss, count = next_token_cross_entropy(logits, jnp.asarray(labels))
    assert int(count) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    # fp32 loss of ~6 has an ulp of ~5e-7: 1e-6 is stated relative to the loss.
    assert abs(float(loss) - ref.loss.item()) <= 1e-6 * abs(ref.loss.item())
    # Our loss function alone, on HF's own logits: same conventions (shift, ignore -100, token mean).
    hf_loss_ours, _ = next_token_cross_entropy(jnp.asarray(ref.logits.numpy()), jnp.asarray(labels))
    assert abs(float(hf_loss_ours) - ref.loss.item()) <= 1e-6 * abs(ref.loss.item())


def test_rope_matches_hf(np_rng):
    """Our rotary tables/rotation against transformers' own functions, at arbitrary (non-arange) positions."""
    from transformers.models.llama import modeling_llama as hf
    hf_model = tiny_hf_llama(seed=7)
    positions = np_rng.integers(0, 200, size=(2, 10))
    x = np_rng.normal(size=(2, 10, 4, 16)).astype(np.float32)
    cos, sin = hf_model.model.rotary_emb(torch.tensor(x), torch.tensor(positions))
    ref, _ = hf.apply_rotary_pos_emb(torch.tensor(x).transpose(1, 2), torch.tensor(x).transpose(1, 2), cos, sin)
    ours = apply_rope(jnp.asarray(x), *rope_cos_sin(jnp.asarray(positions), 16, 5000.0))
    np.testing.assert_allclose(np.asarray(ours), ref.transpose(1, 2).numpy(), rtol=0, atol=2e-5)


def test_inputs_embeds_path_equals_ids_path(hf_model, np_rng):
    cfg, model, params = _ours(hf_model)
    ids, mask, _ = _inputs(np_rng, cfg.vocab_size)
    by_ids, _ = model.apply({'params': params}, jnp.asarray(ids), token_mask=jnp.asarray(mask))
    embeds = model.apply({'params': params}, jnp.asarray(ids), method=LlamaForCausalLM.embed)
    by_embeds, _ = model.apply({'params': params}, inputs_embeds=embeds, token_mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(by_ids), np.asarray(by_embeds))
    with pytest.raises(ValueError, match='exactly one'):
        model.apply({'params': params}, jnp.asarray(ids), inputs_embeds=embeds)


@pytest.mark.slow
@pytest.mark.parametrize('scan_layers', [False, True])
def test_kv_cache_decoding_equals_full_forward(hf_model, np_rng, scan_layers):
    """Prefill a left-padded prompt, decode 16 tokens; the full forward over prompt + generated tokens must give
    the same tokens (its argmax) and the same logits. Also the first step's logits equal HF's."""
    cfg, model, params = _ours(hf_model, scan_layers=scan_layers)
    prompt = np_rng.integers(3, cfg.vocab_size, size=(2, 12))
    prompt_mask = np.ones((2, 12), bool)
    prompt_mask[1, :4] = False  # left padding
    tokens, step_logits = greedy_generate(model, params, jnp.asarray(prompt), jnp.asarray(prompt_mask), 16)
    assert tokens.shape == (2, 16) and step_logits.shape == (2, 16, cfg.vocab_size)

    full = np.concatenate([prompt, np.asarray(tokens)], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones((2, 16), bool)], axis=1)
    ref, _ = model.apply({'params': params}, jnp.asarray(full), positions=positions_from_mask(jnp.asarray(full_mask)),
                         token_mask=jnp.asarray(full_mask))
    ref = np.asarray(ref)[:, 11:-1]  # logits that predicted each generated token
    np.testing.assert_array_equal(ref.argmax(-1), np.asarray(tokens))
    assert _rel_err(step_logits, ref) <= 1e-5

    with torch.no_grad():
        hf_logits = hf_model(torch.tensor(prompt), attention_mask=torch.tensor(prompt_mask.astype(np.int64)),
                             position_ids=torch.tensor(np.asarray(positions_from_mask(prompt_mask)))).logits
    assert _rel_err(step_logits[:, 0], hf_logits[:, -1].numpy()) <= 1e-5


@pytest.mark.slow
def test_remat_policies_preserve_values_and_grads(hf_model, np_rng):
    cfg, _, params = _ours(hf_model)
    ids, mask, labels = _inputs(np_rng, cfg.vocab_size)

    def loss_fn(model, params):
        logits, _ = model.apply({'params': params}, jnp.asarray(ids), token_mask=jnp.asarray(mask))
        return next_token_cross_entropy(logits, jnp.asarray(labels))[0]

    ref_loss, ref_grads = jax.value_and_grad(lambda p: loss_fn(LlamaForCausalLM(cfg), p))(params)
    for policy in ('full', 'dots'):
        model = LlamaForCausalLM(dataclasses.replace(cfg, remat_policy=policy))
        loss, grads = jax.jit(jax.value_and_grad(lambda p, m=model: loss_fn(m, p)))(params)
        assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-7)


def test_bf16_compute_close_to_fp32(hf_model, np_rng):
    cfg, model32, params = _ours(hf_model)
    ids, mask, _ = _inputs(np_rng, cfg.vocab_size)
    logits32, _ = model32.apply({'params': params}, jnp.asarray(ids), token_mask=jnp.asarray(mask))
    model16 = LlamaForCausalLM(dataclasses.replace(cfg, dtype='bfloat16'))
    logits16, hidden16 = model16.apply({'params': params}, jnp.asarray(ids), token_mask=jnp.asarray(mask))
    assert hidden16.dtype == jnp.bfloat16 and logits16.dtype == jnp.float32
    assert bool(jnp.isfinite(logits16).all())
    err = _rel_err(logits16, logits32, mask)
    assert 0 < err <= 2e-2, err  # > 0: the bf16 path really ran in bf16
    # bf16 parameters too (what a real run stores)
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    model_p16 = LlamaForCausalLM(dataclasses.replace(cfg, dtype='bfloat16', param_dtype='bfloat16'))
    logits_p16, _ = model_p16.apply({'params': bf16_params}, jnp.asarray(ids), token_mask=jnp.asarray(mask))
    assert _rel_err(logits_p16, logits32, mask) <= 2e-2


@pytest.mark.slow
def test_init_has_logical_axes_on_every_param():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    for scan in (False, True):
        variables = LlamaForCausalLM(dataclasses.replace(cfg, scan_layers=scan)).init(
            jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        leaves = jax.tree.leaves(variables['params'], is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
        if scan:
            q = variables['params']['model']['layers']['self_attn']['q_proj']['kernel']
            assert q.names == ('layers', 'embed', 'heads') and q.value.shape == (2, 32, 32)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match='num_kv_heads'):
        LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=3, num_kv_heads=2,
                    head_dim=4)
    with pytest.raises(ValueError, match='remat_policy'):
        LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=2,
                    head_dim=4, remat_policy='everything')
