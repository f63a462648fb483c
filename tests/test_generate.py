"""Multimodal decoding with the KV cache (infer/generate.py) on the tiny MedPLIB, dense and MoE: 32 cached steps equal a
loop of full forwards without a cache, a batch of prompts of different lengths equals each prompt alone, and the
`<SEG>` state is the one that predicted the first generated `<SEG>`."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import get_config
from medplib_jax.constants import IMAGE_TOKEN_INDEX
from medplib_jax.infer.generate import Sampling, generate, next_token
from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM

STEPS = 32


def _model(moe):
    model_cfg = get_config(f'moe={moe}').model
    cfg = MedPLIBConfig.from_model_config(model_cfg)
    return cfg, MedPLIBForCausalLM(cfg.llm, mcfg=cfg)


def _prompt(cfg, rng, n_text):
    base = cfg.seg_token_id
    text = lambda n: list(rng.integers(3, base, size=n))  # noqa: E731
    return [1] + text(3) + [base + 265] + [IMAGE_TOKEN_INDEX] * 576 + [base + 266] + text(n_text)


def _left_pad(rows, length):
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, length - len(row):], mask[i, length - len(row):] = row, True
    return ids, mask


@pytest.fixture(scope='module', params=['none', 'dense'], ids=['dense', 'moe'])
def setup(request):
    cfg, model = _model(request.param)
    rng = np.random.default_rng(0)
    ids = jnp.asarray([_prompt(cfg, rng, 4)])
    pixels = jnp.zeros((1, 336, 336, 3))
    params = nn.unbox(model.init(jax.random.key(1), ids, pixels, method=MedPLIBForCausalLM.forward,
                                 compute_masks=False))['params']
    return cfg, model, params


def _no_cache_loop(model, params, prompt, pixels, steps):
    """The reference's loop without a cache: every step runs the whole model over prompt + tokens so far (one
    compiled forward over a fixed buffer; causal attention and no dropping at evaluation make later buffer
    positions irrelevant)."""
    t = len(prompt)
    ids = np.zeros((1, t + steps), np.int32)
    mask = np.zeros((1, t + steps), bool)
    ids[0, :t], mask[0, :t] = prompt, True
    forward = jax.jit(lambda i, m: model.apply({'params': params}, i, pixels, token_mask=m, compute_masks=False,
                                               method=MedPLIBForCausalLM.forward))
    logits_seen, hidden_seen = [], []
    for n in range(steps):
        out = forward(jnp.asarray(ids), jnp.asarray(mask))
        logits_seen.append(np.asarray(out['logits'][0, t - 1 + n]))
        hidden_seen.append(np.asarray(out['hidden'][0, t - 1 + n]))
        ids[0, t + n], mask[0, t + n] = int(np.argmax(logits_seen[-1])), True
    return ids[0, t:], np.stack(logits_seen), np.stack(hidden_seen)


@pytest.mark.slow
def test_cached_decoding_equals_a_loop_without_cache(setup, np_rng):
    cfg, model, params = setup
    prompt = _prompt(cfg, np_rng, 7)
    pixels = jnp.asarray(np_rng.normal(size=(1, 336, 336, 3)), jnp.float32)
    out = generate(model, params, {'input_ids': jnp.asarray([prompt]), 'token_mask': jnp.ones((1, len(prompt)), bool),
                                   'clip_pixels': pixels}, max_new_tokens=STEPS, eos_id=-1, return_logits=True)
    tokens, logits, hidden = _no_cache_loop(model, params, prompt, pixels, STEPS)
    np.testing.assert_array_equal(np.asarray(out['tokens'][0]), tokens)
    scale = float(np.abs(logits).max())
    np.testing.assert_allclose(np.asarray(out['logits'][0]), logits, rtol=0, atol=1e-5 * scale)
    assert int(out['lengths'][0]) == STEPS
    # <SEG>: pretend a generated token is <SEG> (the latest one that first appears there); its mask prompt must be
    # the no-cache state that predicted it
    n = max(k for k in range(STEPS) if tokens[k] not in tokens[:k])
    seg = int(tokens[n])
    again = generate(model, params, {'input_ids': jnp.asarray([prompt]), 'token_mask': jnp.ones((1, len(prompt)), bool),
                                     'clip_pixels': pixels}, max_new_tokens=STEPS, eos_id=-1, seg_id=seg)
    assert bool(again['has_seg'][0])
    np.testing.assert_allclose(np.asarray(again['seg_hidden'][0]), hidden[n], rtol=0,
                               atol=1e-5 * float(np.abs(hidden).max()))


@pytest.mark.slow
def test_a_batch_of_prompts_of_different_lengths_equals_each_alone(setup, np_rng):
    cfg, model, params = setup
    rows = [_prompt(cfg, np_rng, n) for n in (2, 9, 5)]
    length = max(map(len, rows))
    pixels = jnp.asarray(np_rng.normal(size=(3, 336, 336, 3)), jnp.float32)
    ids, mask = _left_pad(rows, length)
    eos = cfg.llm.vocab_size - 1  # a real stop: whichever sample draws it ends there
    batch = generate(model, params, {'input_ids': jnp.asarray(ids), 'token_mask': jnp.asarray(mask),
                                     'clip_pixels': pixels}, max_new_tokens=12, eos_id=eos, return_logits=True)
    for i in range(3):
        one = {'input_ids': jnp.asarray(ids[i:i + 1]), 'token_mask': jnp.asarray(mask[i:i + 1]),
               'clip_pixels': pixels[i:i + 1]}  # alone, still left-padded to the batch's length
        alone = generate(model, params, one, max_new_tokens=12, eos_id=eos, return_logits=True)
        np.testing.assert_array_equal(np.asarray(batch['tokens'][i]), np.asarray(alone['tokens'][0]))
        assert int(batch['lengths'][i]) == int(alone['lengths'][0])
        n = int(alone['lengths'][0])
        ref = np.asarray(alone['logits'][0, :n])
        np.testing.assert_allclose(np.asarray(batch['logits'][i, :n]), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.slow
def test_sampling_settings(np_rng):
    logits = jnp.asarray(np_rng.normal(size=(4, 50)), jnp.float32)
    assert np.array_equal(np.asarray(next_token(logits, Sampling(), None)), np.asarray(logits).argmax(-1))
    # top_p so small that only the most likely token survives: sampling becomes greedy
    keys = jax.random.split(jax.random.key(0), 5)
    for k in keys:
        np.testing.assert_array_equal(np.asarray(next_token(logits, Sampling(1.0, 1e-6), k)),
                                      np.asarray(logits).argmax(-1))
    # temperature sampling visits more than the argmax
    draws = {int(next_token(logits[:1], Sampling(2.0), k)[0]) for k in jax.random.split(jax.random.key(1), 40)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match='top_p'):
        Sampling(top_p=0.0)
