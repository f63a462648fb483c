"""The predict API on the tiny MoE MedPLIB, restored from a params directory as evaluators restore one: answers,
the `<SEG>` mask at the original image size equal to the training path's mask for the same state, the routing of
every generated token (from decoding itself), batched masks, and one-line errors for requests that do not fit."""
import copy
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import get_config
from medplib_jax import checkpoint
from medplib_jax.data.conversation import prompt_ids
from medplib_jax.data.images import sam_preprocess
from medplib_jax.data.regions import RegionPrompt
from medplib_jax.infer.generate import Sampling, generate
from medplib_jax.infer.predict import PredictError, Predictor, Request
from medplib_jax.models.masks import binarize, postprocess_masks
from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM

SIZE = (300, 484)  # not square: the reference's crop quirk and the resize both matter


@pytest.fixture(scope='module')
def predictor(tmp_path_factory):
    config = get_config('moe=dense')
    mcfg = MedPLIBConfig.from_model_config(config.model)
    model = MedPLIBForCausalLM(mcfg.llm, mcfg=mcfg)
    ids = jnp.zeros((1, 600), jnp.int32).at[0, 10:586].set(-200)
    params = nn.unbox(model.init(jax.random.key(0), ids, jnp.zeros((1, 336, 336, 3)), jnp.zeros((1, 256, 256, 3)),
                                 jnp.zeros((1, 1, 24, 24), jnp.uint8), method=MedPLIBForCausalLM.forward))['params']
    path = checkpoint.save_params(str(tmp_path_factory.mktemp('ckpt') / 'params'), params,
                                  {'config': config.to_dict(), 'stage': 'IV'})
    return Predictor.from_params_dir(path, max_new_tokens=6)


@pytest.fixture
def image(np_rng):
    return np_rng.integers(0, 256, size=SIZE + (3,), dtype=np.uint8)


@pytest.mark.slow
def test_answers_masks_and_routing(predictor, image):
    p = predictor.predict(image, 'What is shown?', routing=True)
    assert isinstance(p.text, str) and 1 <= len(p.tokens) <= 6 and not p.has_seg and p.mask is None
    moe_layers = len(predictor.mcfg.llm.moe_layers)
    assert p.routing.shape == (moe_layers, len(p.tokens))
    assert set(np.unique(p.routing)) <= {0, 1}  # evaluation capacity factor 2: no token dropped
    always = predictor.predict(image, 'What is shown?', mask='always')  # the reference's fallback state
    assert always.tokens == p.tokens and always.mask.shape == SIZE and always.mask.dtype == bool
    assert always.mask_logits.shape == SIZE and np.isfinite(always.mask_logits).all()


@pytest.mark.slow
def test_grounding_mask_equals_the_training_paths_mask(predictor, image):
    """`<SEG>` forced by teacher forcing: the training forward over prompt + `<SEG>` gives the mask of the state
    before `<SEG>` (the prompt's last); decoding whose first token is treated as `<SEG>` yields that same state,
    and the predict path's mask at the original size equals the training path's."""
    mcfg, tok = predictor.mcfg, predictor.tokenizer
    ids = prompt_ids(tok, [], 'Please segment the lesion.', num_image_tokens=mcfg.num_image_tokens)
    inputs = predictor._inputs(Request(image, 'Please segment the lesion.'))
    np.testing.assert_array_equal(inputs['ids'], ids)
    sam, sam_size = sam_preprocess(image)
    clip = jnp.asarray(inputs['clip'])[None]
    forced = jnp.asarray(np.append(ids, mcfg.seg_token_id))[None]
    train = predictor.model.apply({'params': predictor.params}, forced, clip, jnp.asarray(sam)[None],
                                  jnp.asarray(inputs['grids'])[None], method=MedPLIBForCausalLM.forward)
    assert bool(train['seg_valid'][0, 0])
    want = np.asarray(postprocess_masks(train['mask_logits'][0, 0], sam_size, SIZE, mcfg.postprocess))

    first = generate(predictor.model, predictor.params, {'input_ids': jnp.asarray(ids)[None],
                                                          'token_mask': jnp.ones((1, len(ids)), bool),
                                                          'clip_pixels': clip,
                                                          'region_grids': jnp.asarray(inputs['grids'])[None]},
                     max_new_tokens=3, eos_id=-1)
    token0 = int(first['tokens'][0, 0])
    out = generate(predictor.model, predictor.params, {'input_ids': jnp.asarray(ids)[None],
                                                        'token_mask': jnp.ones((1, len(ids)), bool),
                                                        'clip_pixels': clip,
                                                        'region_grids': jnp.asarray(inputs['grids'])[None]},
                   max_new_tokens=3, eos_id=-1, seg_id=token0)
    got = predictor.mask_logits(np.asarray(out['seg_hidden'][0]), sam, sam_size, SIZE)
    assert got.shape == SIZE
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    np.testing.assert_array_equal(np.asarray(binarize(got)), np.asarray(binarize(want)))


def test_requests_that_do_not_fit_are_one_line_errors(predictor, image):
    with pytest.raises(PredictError, match='marks 1 regions with <region></region> but 0 region prompts'):
        predictor.predict(image, 'What is at <region></region>?')
    with pytest.raises(PredictError, match=r'predict: region point \(900, 10\)'):
        predictor.predict(image, 'What is at <region></region>?', [RegionPrompt('point', (900, 10))])
    with pytest.raises(PredictError, match=r'\(H, W, 3\) uint8'):
        predictor.predict(image[..., 0], 'What is shown?')
    with pytest.raises(FileNotFoundError, match='no parameters here'):
        Predictor.from_params_dir('/nonexistent/run')
    region = predictor.predict(image, 'What is at <region></region>?', [RegionPrompt('box', (40, 30, 200, 150))])
    assert isinstance(region.text, str)


@pytest.mark.slow
def test_prompt_routing_is_the_routers_first_choice_at_every_prompt_position(predictor, image):
    """Each prompt (and teacher-forced answer) token's expert is the argmax of its router logits (captured from the
    router itself in a plain forward pass over prompt + answer at its own length, where prompt_routing pads); nothing
    is dropped at the evaluation capacity factor, so neither the answer nor the padding changes the prompt's routing."""
    from medplib_jax.models.moe import _Router
    request = Request(image, 'Could you segment out the liver?')
    answer = predictor.tokenizer.encode('Sure, it is <SEG>.', bos=False)
    ids, experts = predictor.prompt_routing(request, answer)
    inputs = predictor._inputs(request)
    np.testing.assert_array_equal(ids, [*inputs['ids'], *answer])
    prompt_ids, prompt_experts = predictor.prompt_routing(request)
    np.testing.assert_array_equal(prompt_ids, inputs['ids'])
    np.testing.assert_array_equal(prompt_experts, experts[:, :len(prompt_ids)])
    assert len(ids) % predictor.length_step and len(prompt_ids) % predictor.length_step  # both were right-padded
    captured = []

    def capture(next_fn, args, kwargs, context):
        out = next_fn(*args, **kwargs)
        if isinstance(context.module, _Router) and context.method_name == '__call__':
            captured.append(out)
        return out

    with nn.intercept_methods(capture):
        predictor.model.apply({'params': predictor.params}, jnp.asarray(ids)[None], jnp.asarray(inputs['clip'])[None],
                              region_grids=jnp.asarray(inputs['grids'])[None], compute_masks=False,
                              method=MedPLIBForCausalLM.forward)
    want = np.stack([np.asarray(c).reshape(-1, c.shape[-1])[:len(ids)].argmax(-1) for c in captured])
    assert experts.shape == (len(predictor.mcfg.llm.moe_layers), len(ids)) == want.shape
    np.testing.assert_array_equal(experts, want)
    assert len(np.unique(experts)) == 2  # both experts in use: the comparison is not vacuous


def test_routing_from_decoding_equals_a_teacher_forced_pass(predictor, np_rng):
    """The expert of every generated token, collected from the decoding steps themselves (a batch of left-padded
    prompts of different lengths; sampled, so that the answers vary and reach both experts), equals each request's
    own teacher-forced forward pass over prompt + answer."""
    sampled = Predictor(predictor.mcfg, predictor.params, predictor.tokenizer, max_new_tokens=12,
                        sampling=Sampling(temperature=1.0))
    requests = [Request(np_rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), q) for (h, w), q in
                (((120, 90), 'What is shown?'), ((200, 260), 'Which organ is this, and is it normal?'),
                 ((64, 64), 'Describe the image in detail, please.'))]
    predictions = sampled.predict_batch(requests, mask='never', routing=True, rng=jax.random.key(3))
    seen = []
    for request, p in zip(requests, predictions):
        ids, experts = sampled.prompt_routing(request, p.tokens)
        want = experts[:, len(ids) - len(p.tokens):]
        assert p.routing.shape == want.shape == (len(predictor.mcfg.llm.moe_layers), len(p.tokens))
        np.testing.assert_array_equal(p.routing, want)
        seen.append(p.routing.ravel())
    assert set(np.concatenate(seen)) == {0, 1}  # both experts in use: the comparison is not vacuous
    assert all(p.routing is None for p in predictor.predict_batch(requests[:1], mask='never'))


def test_a_batch_of_masks_equals_one_at_a_time(predictor, np_rng):
    """Masks of a batch (one program: the images' SAM embeddings, the mask decoder, the canvas of the largest image
    and the threshold) equal each request's alone, at every size; 'auto' computes them where a `<SEG>` is generated
    (a generated token taken as `<SEG>`) and equals 'always' there."""
    sizes = ((300, 484), (90, 70), (520, 260))
    requests = [Request(np_rng.integers(0, 256, size=s + (3,), dtype=np.uint8), 'Please segment the lesion.')
                for s in sizes]
    batch = predictor.predict_batch(requests, mask='always')
    for request, size, p in zip(requests, sizes, batch):
        alone = predictor.predict_batch([request], mask='always')[0]
        assert alone.tokens == p.tokens and p.mask.shape == p.mask_logits.shape == size and p.mask.dtype == bool
        scale = max(1.0, float(np.abs(alone.mask_logits).max()))
        np.testing.assert_allclose(p.mask_logits, alone.mask_logits, rtol=0, atol=1e-5 * scale)
        np.testing.assert_array_equal(p.mask, alone.mask)
        np.testing.assert_array_equal(p.mask, np.asarray(binarize(alone.mask_logits)))

    seg = batch[0].tokens[0]  # the first request's first answer token plays <SEG>
    tokenizer = copy.copy(predictor.tokenizer)
    tokenizer.ids = dataclasses.replace(tokenizer.ids, seg=seg)
    seg_predictor = Predictor(dataclasses.replace(predictor.mcfg, seg_token_id=seg), predictor.params, tokenizer,
                              max_new_tokens=predictor.max_new_tokens)
    auto = seg_predictor.predict_batch(requests, mask='auto')
    always = seg_predictor.predict_batch(requests, mask='always')
    assert auto[0].has_seg
    for a, b in zip(auto, always):
        assert (a.mask is not None) == a.has_seg
        if a.has_seg:
            np.testing.assert_array_equal(a.mask_logits, b.mask_logits)
            np.testing.assert_array_equal(a.mask, b.mask)
