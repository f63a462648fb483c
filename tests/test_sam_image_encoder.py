"""SAM-Med2D image encoder: without adapters vs HF `SamModel`'s vision encoder (PyTorch, float64); the adapter vs a
NumPy reference written from facts 5.1; sam-med2d_b.pth keys and shapes as facts 10.2 list them."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

from configs.common import LOGICAL_AXIS_RULES
from medplib_jax import sharding
from medplib_jax.convert.common import CONV, CONV_TRANSPOSE, LINEAR, ConversionError, strip_prefix
from medplib_jax.convert.sam_image_encoder import (abstract_params, hf_to_params, med2d_to_params, params_to_hf,
                                                   params_to_med2d)
from medplib_jax.models.sam_image_encoder import SamAdapter, SamImageEncoder, SamImageEncoderConfig, SamVitBlock


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def _assert_same_state_dict(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _random_params(abstract, rng, scale=0.3):
    """Random float32 values for an abstract param tree; LayerNorm scales around 1 (no init: it compiles slowly)."""
    def draw(path, leaf):
        mean = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray(rng.normal(mean, scale, size=leaf.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(draw, abstract)


def _tiny_hf_sam(seed: int, window_size: int) -> SamModel:
    """8x8 patch grid, 4 blocks with global attention in 1 and 3. HF initialises SAM near zero
    (initializer_range 1e-10): every vision weight is redrawn, LayerNorm scales around 1, so mix-ups show."""
    torch.manual_seed(seed)
    vc = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=4, num_attention_heads=4,
                         image_size=64, patch_size=8, mlp_dim=48, window_size=window_size, global_attn_indexes=[1, 3],
                         num_pos_feats=8)
    pc = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4)
    mc = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=16,
                              iou_head_hidden_dim=16)
    model = SamModel(SamConfig(vision_config=vc, prompt_encoder_config=pc, mask_decoder_config=mc)).eval()
    with torch.no_grad():
        for name, p in model.vision_encoder.named_parameters():
            is_scale = ('norm' in name) and name.endswith('weight')
            p.normal_(1.0 if is_scale else 0.0, 0.2 if is_scale else 0.3)
    return model


@pytest.mark.parametrize('window_size', [3, 4])  # 3: windowed blocks pad the 8x8 grid to 9x9; 4: no padding
def test_encoder_without_adapters_matches_hf_vision_encoder(np_rng, window_size):
    model = _tiny_hf_sam(int(np_rng.integers(1 << 30)), window_size)
    full_sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    cfg = SamImageEncoderConfig.from_hf(model.config.vision_config)
    assert (cfg.adapter, cfg.grid, cfg.mlp_dim, cfg.window_of(0), cfg.window_of(1)) == (False, 8, 48, window_size, 0)
    params = hf_to_params(full_sd, cfg)  # a whole SamModel state dict: its `vision_encoder.` part is taken
    pixels = np_rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
    encoder = model.vision_encoder.double()  # float64 reference: the tolerance measures our fp32 error alone
    with torch.no_grad():
        # last_hidden_state is after the neck, channels-first (B, out_chans, H, W)
        ref = encoder(pixel_values=torch.tensor(pixels, dtype=torch.float64)).last_hidden_state.numpy()
    ours = jax.jit(SamImageEncoder(cfg).apply)({'params': params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    assert ours.shape == (2, 8, 8, 16) and ours.dtype == jnp.float32
    assert _rel_err(np.asarray(ours).transpose(0, 3, 1, 2), ref) <= 1e-5

    # HF -> ours -> HF is exact
    _assert_same_state_dict(params_to_hf(params), strip_prefix(full_sd, 'vision_encoder.'))


def _np_conv2d(x, w, stride, pad):
    """torch Conv2d on NHWC x, torch weight [out, in, kh, kw], no bias."""
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = w.shape[-1]
    ho, wo = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[0]))
    for dy in range(k):
        for dx in range(k):
            out += xp[:, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride] @ w[:, :, dy, dx].T
    return out


def _np_conv_transpose2d(x, w, stride, pad):
    """torch ConvTranspose2d on NHWC x, torch weight [in, out, kh, kw], no bias: every input pixel scatters
    w[:, :, dy, dx] to (y * stride + dy, x * stride + dx); then `pad` is cropped from each border."""
    b, h, wd, _ = x.shape
    k = w.shape[-1]
    full = np.zeros((b, (h - 1) * stride + k, (wd - 1) * stride + k, w.shape[1]))
    for dy in range(k):
        for dx in range(k):
            full[:, dy:dy + stride * (h - 1) + 1:stride, dx:dx + stride * (wd - 1) + 1:stride] += x @ w[:, :, dy, dx]
    return full[:, pad:full.shape[1] - pad, pad:full.shape[2] - pad]


def _np_adapter(x, t, eps=1e-5):
    """Facts 5.1, torch-layout weights `t`: gate = sigmoid(W2 relu(W1 mean_hw(x))); s = relu(convT_k4s2p1(relu(
    conv_k3s2p1(x * gate)))); LayerNorm(x + s): the skip adds the *ungated* input."""
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    gate = 1 / (1 + np.exp(-(relu(x.mean(axis=(1, 2)) @ t['channel.0'].T) @ t['channel.2'].T)))
    s = relu(_np_conv_transpose2d(relu(_np_conv2d(x * gate[:, None, None], t['spatial.0'], 2, 1)),
                                  t['spatial.2'], 2, 1))
    y = x + s
    mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    return (y - mu) / np.sqrt(var + eps) * t['norm.weight'] + t['norm.bias']


@pytest.mark.parametrize('size', [(6, 4), (16, 16)])
def test_adapter_matches_numpy_reference(np_rng, size):
    c, hidden = 16, 4
    cfg = SamImageEncoderConfig(hidden_size=c, num_heads=2, adapter_mlp_ratio=hidden / c)
    t = {'channel.0': np_rng.normal(size=(hidden, c)) * 0.5, 'channel.2': np_rng.normal(size=(c, hidden)) * 0.5,
         'spatial.0': np_rng.normal(size=(c, c, 3, 3)) * 0.2, 'spatial.2': np_rng.normal(size=(c, c, 4, 4)) * 0.2,
         'norm.weight': np_rng.normal(1.0, 0.2, size=c), 'norm.bias': np_rng.normal(size=c) * 0.2}
    t = {k: v.astype(np.float32) for k, v in t.items()}
    params = {'channel': {'0': {'kernel': LINEAR.forward(t['channel.0'])},
                          '2': {'kernel': LINEAR.forward(t['channel.2'])}},
              'spatial': {'0': {'kernel': CONV.forward(t['spatial.0'])},
                          '2': {'kernel': CONV_TRANSPOSE.forward(t['spatial.2'])}},
              'norm': {'scale': t['norm.weight'], 'bias': t['norm.bias']}}
    x = np_rng.normal(size=(2, *size, c)).astype(np.float32)
    ours = SamAdapter(cfg).apply({'params': params}, jnp.asarray(x))
    expected = _np_adapter(x.astype(np.float64), {k: v.astype(np.float64) for k, v in t.items()})
    assert ours.shape == x.shape
    assert _rel_err(ours, expected) <= 1e-5


def test_block_adds_mlp_and_adapter_of_the_same_norm2_output(np_rng):
    """x_out = h + mlp(norm2(h)) + Adapter(norm2(h)), h = x + attn(norm1(x)): the adapter only adds a term."""
    cfg = SamImageEncoderConfig(image_size=64, patch_size=8, hidden_size=16, num_heads=2, mlp_dim=32, depth=1,
                                global_attn_indexes=(), window_size=3)
    x = jnp.asarray(np_rng.normal(size=(2, 8, 8, 16)), jnp.float32)
    block = SamVitBlock(cfg, window=3)
    params = _random_params(nn.unbox(jax.eval_shape(block.init, jax.random.key(0), x))['params'], np_rng)
    out, state = jax.jit(lambda p: block.apply({'params': p}, x, capture_intermediates=True))(params)
    normed = state['intermediates']['norm2']['__call__'][0]
    plain = {k: v for k, v in params.items() if k != 'Adapter'}
    without = jax.jit(SamVitBlock(dataclasses.replace(cfg, adapter=False), window=3).apply)({'params': plain}, x)
    adapter = jax.jit(SamAdapter(cfg).apply)({'params': params['Adapter']}, normed)
    assert _rel_err(out, without + adapter) <= 1e-6


def _med2d_image_encoder_shapes(dim, depth, heads, mlp, out, grid, patch, window, global_idx):
    """sam-med2d_b.pth `image_encoder.*` keys and torch shapes, as facts 10.2 list them (any size)."""
    hd, hidden = dim // heads, dim // 4
    keys = {'patch_embed.proj.weight': (dim, 3, patch, patch), 'patch_embed.proj.bias': (dim,),
            'pos_embed': (1, grid, grid, dim), 'neck.0.weight': (out, dim, 1, 1), 'neck.1.weight': (out,),
            'neck.1.bias': (out,), 'neck.2.weight': (out, out, 3, 3), 'neck.3.weight': (out,), 'neck.3.bias': (out,)}
    for i in range(depth):
        n = 2 * (grid if i in global_idx else window) - 1
        keys.update({f'blocks.{i}.{k}': s for k, s in {
            'norm1.weight': (dim,), 'norm1.bias': (dim,), 'norm2.weight': (dim,), 'norm2.bias': (dim,),
            'attn.qkv.weight': (3 * dim, dim), 'attn.qkv.bias': (3 * dim,), 'attn.proj.weight': (dim, dim),
            'attn.proj.bias': (dim,), 'attn.rel_pos_h': (n, hd), 'attn.rel_pos_w': (n, hd),
            'mlp.lin1.weight': (mlp, dim), 'mlp.lin1.bias': (mlp,), 'mlp.lin2.weight': (dim, mlp),
            'mlp.lin2.bias': (dim,), 'Adapter.norm.weight': (dim,), 'Adapter.norm.bias': (dim,),
            'Adapter.channel.0.weight': (hidden, dim), 'Adapter.channel.2.weight': (dim, hidden),
            'Adapter.spatial.0.weight': (dim, dim, 3, 3), 'Adapter.spatial.2.weight': (dim, dim, 4, 4)}.items()})
    return {f'image_encoder.{k}': s for k, s in keys.items()}


def test_sam_med2d_checkpoint_converts_runs_and_round_trips(np_rng):
    """A synthetic sam-med2d_b.pth at the real grid (256 / 16, windows of 14 padded to 28, one global block) and
    out_chans 256, with reduced width and depth."""
    cfg = SamImageEncoderConfig(hidden_size=64, num_heads=4, mlp_dim=128, depth=3, global_attn_indexes=(2,))
    shapes = _med2d_image_encoder_shapes(64, 3, 4, 128, 256, 16, 16, 14, (2,))
    ckpt = {k: (np_rng.normal(size=s) * 0.2).astype(np.float32) for k, s in shapes.items()}
    ckpt['image_encoder.neck.1.weight'] += 1.0
    ckpt['prompt_encoder.no_mask_embed.weight'] = np.zeros((1, 256), np.float32)  # other parts are left alone
    sd = strip_prefix(ckpt, 'image_encoder.')
    params = med2d_to_params(sd, cfg, source='sam-med2d_b.pth')
    assert params['blocks_0']['attn']['rel_pos_h'].shape == (27, 16)
    assert params['blocks_2']['attn']['rel_pos_w'].shape == (31, 16)
    jax.tree.map(np.testing.assert_array_equal, med2d_to_params(ckpt, cfg), params)  # whole checkpoint: same
    pixels = jnp.asarray(np_rng.normal(size=(2, 256, 256, 3)), jnp.float32)
    out = jax.jit(SamImageEncoder(cfg).apply)({'params': params}, pixels)
    assert out.shape == (2, 16, 16, 256) and bool(jnp.isfinite(out).all())
    _assert_same_state_dict(params_to_med2d(params), sd)  # ours -> med2d keys is exact

    renamed = dict(sd)
    renamed['blocks.1.Adapter.spatial.2.weights'] = renamed.pop('blocks.1.Adapter.spatial.2.weight')
    with pytest.raises(ConversionError, match=r'sam-med2d_b\.pth: .*blocks_1/Adapter/spatial/2/kernel.*'
                                              r'blocks\.1\.Adapter\.spatial\.2\.weights'):
        med2d_to_params(renamed, cfg, source='sam-med2d_b.pth')
    swapped = dict(sd)  # a global block's rel_pos in a windowed block
    swapped['blocks.0.attn.rel_pos_h'] = sd['blocks.2.attn.rel_pos_h']
    with pytest.raises(ConversionError, match=r'wrong shape 1: .*blocks\.0\.attn\.rel_pos_h.*\(31, 16\).*\(27, 16\)'):
        med2d_to_params(swapped, cfg)
    with pytest.raises(ConversionError, match=r'missing .*blocks_0/Adapter/norm/scale'):
        hf_to_params({}, cfg)


def test_real_vit_b_shapes_match_the_checkpoint_keys():
    """SAM-Med2D ViT-B without allocating it: rel_pos [27, 64] windowed / [31, 64] global (blocks 2, 5, 8, 11),
    (B, 16, 16, 256) out, and the table maps onto exactly facts 10.2's keys and torch shapes (~0.27 B params)."""
    cfg = SamImageEncoderConfig.sam_med2d_b()
    abstract = abstract_params(cfg)
    for i in range(12):
        want = (31, 64) if i in (2, 5, 8, 11) else (27, 64)
        attn = abstract[f'blocks_{i}']['attn']
        assert attn['rel_pos_h'].shape == attn['rel_pos_w'].shape == want
    pixels = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    assert jax.eval_shape(SamImageEncoder(cfg).apply, {'params': abstract}, pixels).shape == (2, 16, 16, 256)
    # shapes only: 1-byte zero arrays stand in for the 0.27 B weights
    placeholders = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), np.bool_), s.shape), abstract)
    keys = {k: v.shape for k, v in params_to_med2d(placeholders).items()}
    assert keys == strip_prefix(_med2d_image_encoder_shapes(768, 12, 12, 3072, 256, 16, 16, 14, (2, 5, 8, 11)),
                                'image_encoder.')
    assert 0.26e9 < sum(np.prod(s) for s in keys.values()) < 0.28e9


def test_every_param_has_distinct_known_logical_axes():
    cfg = SamImageEncoderConfig(image_size=64, patch_size=8, hidden_size=16, num_heads=2, mlp_dim=32, depth=2,
                                global_attn_indexes=(1,), out_chans=8, window_size=3)
    boxed = jax.eval_shape(SamImageEncoder(cfg).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3),
                                                                                              jnp.float32))['params']
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) == len(jax.tree.leaves(abstract_params(cfg)))
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.Partitioned), where
        names = [n for n in leaf.names if n is not None]
        assert len(leaf.names) == leaf.value.ndim and names, where
        assert len(set(names)) == len(names) and set(names) <= known, (where, leaf.names)


def test_sharded_equals_single_device(np_rng):
    cfg = SamImageEncoderConfig(image_size=64, patch_size=8, hidden_size=32, num_heads=4, mlp_dim=64, depth=2,
                                global_attn_indexes=(1,), out_chans=16, window_size=3)
    encoder = SamImageEncoder(cfg)
    pixels = jnp.asarray(np_rng.normal(size=(4, 64, 64, 3)), jnp.float32)
    boxed = jax.eval_shape(encoder.init, jax.random.key(0), pixels)
    params = {'params': _random_params(nn.unbox(boxed)['params'], np_rng, 0.2)}
    ref = jax.jit(encoder.apply)(jax.device_put(params, jax.devices()[0]), pixels)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    sharded = sharding.shard_like(params, sharding.param_shardings(boxed, mesh, LOGICAL_AXIS_RULES))
    sharding.assert_params_sharded(sharded, min_size=1024)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        out = jax.jit(encoder.apply)(sharded, jax.device_put(pixels, sharding.data_sharding(mesh, 4)))
    assert _rel_err(out, ref) <= 1e-5


def test_bfloat16_compute_stays_close_to_float32(np_rng):
    cfg = SamImageEncoderConfig(image_size=64, patch_size=8, hidden_size=32, num_heads=4, mlp_dim=64, depth=2,
                                global_attn_indexes=(1,), out_chans=16, window_size=3)
    pixels = jnp.asarray(np_rng.normal(size=(2, 64, 64, 3)), jnp.float32)
    params = {'params': _random_params(abstract_params(cfg), np_rng, 0.2)}
    ref = jax.jit(SamImageEncoder(cfg).apply)(params, pixels)
    out = jax.jit(SamImageEncoder(dataclasses.replace(cfg, dtype='bfloat16')).apply)(params, pixels)
    assert out.dtype == jnp.bfloat16 and _rel_err(out, ref) <= 5e-2


def test_config_errors_name_the_field():
    for kwargs, match in [(dict(image_size=250), 'image_size=250 is not a multiple of sam_encoder.patch_size'),
                          (dict(num_heads=5), 'hidden_size=768 is not a multiple of sam_encoder.num_heads'),
                          (dict(global_attn_indexes=(2, 12)), 'global_attn_indexes'),
                          (dict(image_size=240), 'adapter needs an even patch grid'),
                          (dict(window_size=-1), 'window_size'),
                          (dict(dtype='fp8'), 'unknown dtype')]:
        with pytest.raises(ValueError, match=match):
            SamImageEncoderConfig(**kwargs)
    assert SamImageEncoderConfig(image_size=240, adapter=False).grid == 15
    assert SamImageEncoderConfig.from_dict({'global_attn_indexes': [1], 'depth': 2}).global_attn_indexes == (1,)
    with pytest.raises(ValueError, match='sam_encoder: unknown keys'):
        SamImageEncoderConfig.from_dict({'hiden_size': 8})
    with pytest.raises(ValueError, match='hidden_act'):
        SamImageEncoderConfig.from_hf(SamVisionConfig(hidden_act='relu'))
    with pytest.raises(ValueError, match='sam_encoder.image_size=256'):
        SamImageEncoder(SamImageEncoderConfig(depth=1, global_attn_indexes=())).init(
            jax.random.key(0), jnp.zeros((1, 128, 128, 3)))
