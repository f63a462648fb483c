"""The assembled tiny MedPLIB: image + one region + two <SEG> -> logits and masks at the original size."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import get_config
from medplib_jax.data.regions import RegionPrompt, regions_to_grids, resized_size
from medplib_jax.models.masks import binarize, postprocess_masks
from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM
from medplib_jax.models.multimodal import IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX


@pytest.fixture(scope='module')
def setup():
    model_cfg = get_config().model
    model_cfg.medplib.max_seg = 2
    cfg = MedPLIBConfig.from_model_config(model_cfg)
    model = MedPLIBForCausalLM(cfg.llm, mcfg=cfg)
    return cfg, model


def _batch(cfg, rng, sizes=((300, 484), (512, 512))):
    seg = cfg.seg_token_id
    base = seg  # added tokens follow the base vocab: <region> = base + 3, </region> = base + 4 (ADD_OTHERS_TOKENS)
    im_start, im_end, region, region_end = base + 265, base + 266, base + 3, base + 4
    text = lambda n: list(rng.integers(3, base, size=n))  # noqa: E731
    ids = []
    for _ in sizes:
        row = ([1] + text(5) + [im_start] + [IMAGE_TOKEN_INDEX] * 576 + [im_end] + text(3)
               + [region, REGION_TOKEN_INDEX, region_end] + text(4) + [seg] + text(2) + [seg, 2])
        ids.append(row)
    ids = np.array(ids, np.int32)
    grids, valid = zip(*[regions_to_grids([RegionPrompt('box', (40, 30, 200, 150))], h, w, 1) for h, w in sizes])
    return dict(input_ids=jnp.asarray(ids), clip_pixels=jnp.asarray(rng.normal(size=(len(sizes), 336, 336, 3)),
                                                                         jnp.float32),
                sam_pixels=jnp.asarray(rng.normal(size=(len(sizes), 256, 256, 3)), jnp.float32),
                region_grids=jnp.asarray(np.stack(grids)))


def _init(model, batch):
    return nn.unbox(model.init(jax.random.key(0), **batch, method=MedPLIBForCausalLM.forward))['params']


@pytest.mark.slow
def test_full_forward_shapes_and_masks_at_original_size(setup, np_rng):
    cfg, model = setup
    sizes = ((300, 484), (512, 512))
    batch = _batch(cfg, np_rng, sizes)
    params = _init(model, batch)
    assert set(params) == {'model', 'lm_head'}
    assert {'vision_tower', 'mm_projector', 'region_fea_adapter', 'text_hidden_fcs', 'visual_model', 'embed_tokens',
            'norm', 'layers_0'} <= set(params['model'])
    out = jax.jit(lambda p, b: model.apply({'params': p}, **b, method=MedPLIBForCausalLM.forward))(params, batch)
    t = batch['input_ids'].shape[1]
    assert out['logits'].shape == (2, t, cfg.llm.vocab_size) and bool(jnp.isfinite(out['logits']).all())
    assert out['mask_logits'].shape == (2, 2, 64, 64) and out['iou'].shape == (2, 2)
    assert out['seg_valid'].tolist() == [[True, True], [True, True]]
    for i, (h, w) in enumerate(sizes):
        masks = postprocess_masks(out['mask_logits'][i], resized_size(h, w, 256), (h, w), cfg.postprocess)
        assert masks.shape == (2, h, w) and binarize(masks, cfg.mask_threshold).dtype == jnp.bool_


@pytest.mark.slow
def test_seg_mask_comes_from_the_hidden_state_before_seg(setup, np_rng):
    cfg, model = setup
    batch = _batch(cfg, np_rng)
    params = _init(model, batch)
    fwd = jax.jit(lambda p, b: model.apply({'params': p}, **b, method=MedPLIBForCausalLM.forward))
    out = fwd(params, batch)
    ids = np.asarray(batch['input_ids'])
    t = int(np.nonzero(ids[0] == cfg.seg_token_id)[0][0]) - 1  # the position before the first <SEG>

    # the masks are exactly the decoder applied to T-projector(hidden[t])
    def decode_from(mdl, hidden, sam_pixels):
        prompts = mdl.model.text_hidden_fcs(hidden)
        emb = mdl.model.visual_model.embed_image(sam_pixels)
        return mdl.model.visual_model(emb, prompts)
    masks, _ = model.apply({'params': params}, out['hidden'][:, [t]], batch['sam_pixels'], method=decode_from)
    np.testing.assert_allclose(np.asarray(masks[:, 0]), np.asarray(out['mask_logits'][:, 0]), rtol=1e-5, atol=1e-5)

    # perturbing the token at t changes the first mask; perturbing tokens after the <SEG> does not (causality)
    changed = ids.copy()
    changed[0, t] = (changed[0, t] + 1) % cfg.seg_token_id
    after = ids.copy()
    after[0, t + 2] = (after[0, t + 2] + 1) % cfg.seg_token_id
    out_changed = fwd(params, dict(batch, input_ids=jnp.asarray(changed)))
    out_after = fwd(params, dict(batch, input_ids=jnp.asarray(after)))
    assert not np.allclose(np.asarray(out_changed['mask_logits'][0, 0]), np.asarray(out['mask_logits'][0, 0]))
    np.testing.assert_allclose(np.asarray(out_after['mask_logits'][0, 0]), np.asarray(out['mask_logits'][0, 0]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out_changed['mask_logits'][1]), np.asarray(out['mask_logits'][1]),
                               rtol=1e-5, atol=1e-6)  # the other sample is untouched


@pytest.mark.slow
def test_gradients_reach_every_part_that_feeds_a_loss(setup, np_rng):
    """The model stops no gradient of its own: the towers the recipe freezes (CLIP, SAM's image encoder) get
    gradients here and are frozen by config.train.trainable in the train step (tests/test_train_step.py)."""
    cfg, model = setup
    batch = _batch(cfg, np_rng)
    params = _init(model, batch)
    r = jnp.asarray(np_rng.normal(size=(2, 2, 64, 64)), jnp.float32)

    def loss(p):
        out = model.apply({'params': p}, **batch, method=MedPLIBForCausalLM.forward)
        return jnp.sum(out['mask_logits'] * r) + jnp.mean(out['logits'])

    grads = jax.jit(jax.grad(loss))(params)['model']
    norm = lambda tree: float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(tree)))  # noqa: E731
    for trained in ('region_fea_adapter', 'text_hidden_fcs', 'mm_projector'):
        assert norm(grads[trained]) > 0, trained
    assert norm(grads['visual_model']['mask_decoder']) > 0
    for tower in (grads['vision_tower'], grads['visual_model']['image_encoder']):
        assert norm(tower) > 0


@pytest.mark.slow
def test_splash_attention_gives_the_xla_model(setup, np_rng):
    """The whole model with the LLM's attention through the splash kernel (`llm.attention='splash'`, interpreted on
    CPU): the logits, the masks and every gradient of the einsum path's model (fp32)."""
    cfg, model = setup
    batch = _batch(cfg, np_rng)
    params = _init(model, batch)
    splash_cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, attention='splash'))
    r = jnp.asarray(np_rng.normal(size=(2, 2, 64, 64)), jnp.float32)
    results = []
    for m in (model, MedPLIBForCausalLM(splash_cfg.llm, mcfg=splash_cfg)):
        def loss(p, m=m):
            out = m.apply({'params': p}, **batch, method=MedPLIBForCausalLM.forward)
            return jnp.sum(out['mask_logits'] * r) + jnp.mean(out['logits'] ** 2), out
        results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(params))
    ((_, xla), g_xla), ((_, splash), g_splash) = results
    for k in ('logits', 'mask_logits'):
        np.testing.assert_allclose(splash[k], xla[k], rtol=1e-4, atol=1e-5, err_msg=k)
    flat_xla, flat_splash = (dict(jax.tree_util.tree_leaves_with_path(g)) for g in (g_xla, g_splash))
    largest = max(float(jnp.abs(g).max()) for g in flat_xla.values())
    for path, g in flat_xla.items():
        name = jax.tree_util.keystr(path)
        # Attention key biases: softmax ignores a shift shared by all keys, so their true gradient is 0 and both
        # paths give rounding noise: compared against the largest gradient of the model.
        atol = 1e-5 * (largest if "['k_proj']['bias']" in name else max(float(jnp.abs(g).max()), 1e-3))
        np.testing.assert_allclose(flat_splash[path], g, rtol=1e-4, atol=atol, err_msg=name)


def test_config_errors():
    model_cfg = get_config().model
    model_cfg.medplib.postprocess = 'exact'
    with pytest.raises(ValueError, match="medplib.postprocess='exact'"):
        MedPLIBConfig.from_model_config(model_cfg)
    model_cfg = get_config().model
    model_cfg.unlock()
    model_cfg.medplib.max_masks = 3
    with pytest.raises(ValueError, match=r"config.model.medplib: unknown keys \['max_masks'\]"):
        MedPLIBConfig.from_model_config(model_cfg)
    cfg = MedPLIBConfig.from_model_config(get_config().model)
    assert dataclasses.replace(cfg, max_seg=3).max_seg == 3


@pytest.mark.slow
def test_sharded_forward_equals_single_device(setup, np_rng):
    """The whole MedPLIB forward (CLIP, regions, LLM, SAM) on a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU
    devices equals the 1-device result."""
    from configs.common import LOGICAL_AXIS_RULES
    from medplib_jax import sharding
    cfg, model = setup
    batch = _batch(cfg, np_rng, sizes=((300, 484),) * 4)
    boxed = model.init(jax.random.key(0), **batch, method=MedPLIBForCausalLM.forward)
    params = nn.unbox(boxed)['params']
    fwd = lambda p, b: model.apply({'params': p}, **b, method=MedPLIBForCausalLM.forward)  # noqa: E731
    ref = jax.jit(fwd)(jax.device_put(params, jax.devices()[0]), batch)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    shardings = sharding.param_shardings(boxed, mesh, LOGICAL_AXIS_RULES)['params']
    placed = {k: jax.device_put(v, sharding.data_sharding(mesh, v.ndim)) for k, v in batch.items()}
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        out = jax.jit(fwd)(sharding.shard_like(params, shardings), placed)
    for key in ('logits', 'mask_logits', 'iou'):
        np.testing.assert_allclose(np.asarray(out[key]), np.asarray(ref[key]), rtol=0,
                                   atol=1e-5 * float(np.abs(ref[key]).max()), err_msg=key)


def test_t_projector_starts_as_torch_linear_layers():
    """The reference creates `text_hidden_fcs` fresh at stage III with PyTorch's default Linear init: kernels and
    biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Compared with fresh torch.nn.Linear layers of the same sizes: the
    same bound, and the spread of a uniform on it (std = bound / sqrt(3))."""
    import torch

    from medplib_jax.models.medplib import TextHiddenFcs
    hidden, out = 512, 256
    params = nn.unbox(TextHiddenFcs(hidden, out).init(jax.random.key(np.random.randint(2 ** 31)),
                                                     jnp.zeros((1, hidden))))['params']['0']
    for name, ref in (('0', torch.nn.Linear(hidden, hidden)), ('2', torch.nn.Linear(hidden, out))):
        bound = 1 / np.sqrt(hidden)  # both layers take `hidden` inputs
        for ours, theirs in ((params[name]['kernel'], ref.weight), (params[name]['bias'], ref.bias)):
            ours, theirs = np.asarray(ours), theirs.detach().numpy()
            assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound + 1e-7
            assert np.abs(ours).max() > 0.9 * bound  # filled, not zeros: max of >= 256 uniforms
            np.testing.assert_allclose(ours.std(), theirs.std(), rtol=0.15)
            np.testing.assert_allclose(ours.std(), bound / np.sqrt(3), rtol=0.15)
