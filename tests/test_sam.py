"""SAM-Med2D image encoder, prompt encoder and mask decoder vs HF `SamModel` (PyTorch); the adapter vs NumPy;
sam-med2d_b.pth key names as the reference's model/segment_anything_med2d modules name them."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support.sam_keys import med2d_keys
from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

from medplib_jax.convert.common import ConversionError
from medplib_jax.convert.sam import (
    decoder_to_ours,
    decoder_to_source,
    image_encoder_to_ours,
    image_encoder_to_source,
    split_components,
)
from medplib_jax.models.sam_decoder import SamDecoderConfig, SamMaskDecoder, SamPromptEncoder
from medplib_jax.models.sam_encoder import Adapter, SamImageEncoder, SamImageEncoderConfig


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


# The IoU head's output is two numbers per test (relative to their max, no averaging) at the end of the two-way
# transformer and a 3-layer MLP with N(0, 0.3) weights: our fp32 error against the float64 reference reached
# 2.4e-5 in 1 of 120 random draws (median 1.7e-6), so its bound is 1e-4.
IOU_RTOL = 1e-4
# The masks, measured over 800 fresh draws (200 models x both prompt kinds x multimask on/off): median 2.2e-6,
# 99th percentile 1.1e-5, largest 2.0e-5, so 1e-5 failed about one draw in 80; the bound leaves 2.5x over the
# largest. The image encoder's output stays within 2.5e-6 over 200 draws, so it keeps 1e-5.
MASK_RTOL = 5e-5


@pytest.fixture(scope='module')
def hf_sam():
    """Tiny SAM: 8x8 embedding grid, windows of 3 (so windowed blocks pad 8 -> 9), global blocks 1 and 3.
    HF initialises SAM near zero (initializer_range 1e-10): every weight is redrawn so nothing hides."""
    seed = int(os.environ.get('MEDPLIB_TEST_SEED') or int.from_bytes(os.urandom(4), 'little'))
    print(f'hf_sam seed: {seed}')  # module-scoped, so not from np_rng; MEDPLIB_TEST_SEED replays it too
    torch.manual_seed(seed % (1 << 30))
    vc = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=4, num_attention_heads=4,
                         image_size=64, patch_size=8, mlp_dim=64, window_size=3, global_attn_indexes=[1, 3],
                         num_pos_feats=8)
    pc = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4)
    mc = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, mlp_dim=32,
                              iou_head_hidden_dim=16)
    config = SamConfig(vision_config=vc, prompt_encoder_config=pc, mask_decoder_config=mc)
    model = SamModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if 'norm' in name and name.endswith('weight') else 0.0, 0.3)
    sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    # The reference runs in float64, so the stated tolerance measures our fp32 error alone.
    return model.double(), config, sd


@pytest.mark.slow
def test_image_encoder_without_adapters_matches_hf(hf_sam, np_rng):
    model, config, sd = hf_sam
    cfg = SamImageEncoderConfig.from_hf(config.vision_config)
    parts = split_components(sd, hf=True)
    params = image_encoder_to_ours(parts['image_encoder'], cfg, hf=True)
    x = np_rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        # (B, C, H, W) after the neck
        ref = model.vision_encoder(torch.tensor(x, dtype=torch.float64)).last_hidden_state.numpy()
    ours = SamImageEncoder(cfg).apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert ours.shape == (2, 8, 8, 16)
    assert _rel(np.asarray(ours).transpose(0, 3, 1, 2), ref) <= 1e-5
    back = image_encoder_to_source(params, hf=True)
    assert set(back) == set(parts['image_encoder'])
    for k in back:
        np.testing.assert_array_equal(back[k], parts['image_encoder'][k])


def _hf_decode(model, emb, sparse, multimask):
    with torch.no_grad():
        pe = model.get_image_wide_positional_embeddings().repeat(emb.shape[0], 1, 1, 1)
        dense = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            emb.shape[0], -1, emb.shape[2], emb.shape[3])
        out = model.mask_decoder(image_embeddings=torch.tensor(emb, dtype=torch.float64),
                                 image_positional_embeddings=pe,
                                 sparse_prompt_embeddings=torch.tensor(sparse, dtype=torch.float64)[:, None],
                                 dense_prompt_embeddings=dense, multimask_output=multimask)
    return out[0][:, 0].numpy(), out[1][:, 0].numpy()


@pytest.mark.slow
@pytest.mark.parametrize('multimask', [False, True])
def test_prompt_encoder_and_mask_decoder_match_hf(hf_sam, np_rng, multimask):
    model, config, sd = hf_sam
    cfg = SamDecoderConfig.from_hf(config)
    parts = split_components(sd, hf=True)
    pp, dp = decoder_to_ours(parts['prompt_encoder'], parts['mask_decoder'], cfg, hf=True)
    prompt, decoder = SamPromptEncoder(cfg), SamMaskDecoder(cfg)
    emb = np_rng.normal(size=(2, 16, 8, 8)).astype(np.float32)
    pe = prompt.apply({'params': pp}, method=SamPromptEncoder.get_dense_pe)

    # (a) a box prompt, through the whole HF model
    boxes = np.sort(np_rng.uniform(0, 63, size=(2, 1, 2, 2)), axis=2).reshape(2, 1, 4).astype(np.float32)
    with torch.no_grad():
        out = model(image_embeddings=torch.tensor(emb, dtype=torch.float64),
                    input_boxes=torch.tensor(boxes, dtype=torch.float64), multimask_output=multimask)
    sparse, dense = prompt.apply({'params': pp}, boxes=jnp.asarray(boxes))
    masks, iou = decoder.apply({'params': dp}, jnp.asarray(emb.transpose(0, 2, 3, 1)), pe, sparse, dense,
                               multimask_output=multimask)
    n_masks = 3 if multimask else 1
    assert masks.shape == (2, n_masks, 32, 32) and iou.shape == (2, n_masks)
    assert _rel(masks, out.pred_masks[:, 0].numpy()) <= MASK_RTOL
    assert _rel(iou, out.iou_scores[:, 0].numpy()) <= IOU_RTOL

    # (b) an externally given sparse embedding (MedPLIB's <SEG> prompt), dense = no_mask_embed
    text = np_rng.normal(size=(2, 1, 16)).astype(np.float32)
    sparse, dense = prompt.apply({'params': pp}, text_embeds=jnp.asarray(text))
    np.testing.assert_array_equal(np.asarray(sparse), text)
    masks, iou = decoder.apply({'params': dp}, jnp.asarray(emb.transpose(0, 2, 3, 1)), pe, sparse, dense,
                               multimask_output=multimask)
    ref_masks, ref_iou = _hf_decode(model, emb, text, multimask)
    assert _rel(masks, ref_masks) <= MASK_RTOL and _rel(iou, ref_iou) <= IOU_RTOL

    bp, bd = decoder_to_source(pp, dp, hf=True)
    for ours, theirs in ((bp, parts['prompt_encoder']), (bd, parts['mask_decoder'])):  # exact, float32 as stored
        assert set(ours) == set(theirs)
        for k in ours:
            np.testing.assert_array_equal(ours[k], theirs[k])


@pytest.mark.slow
def test_adapter_matches_numpy_reference(np_rng):
    """Facts 5.1: gate = sigmoid(W2 relu(W1 mean_hw(x))); s = relu(convT_k4s2p1(relu(conv_k3s2p1(x * gate))));
    out = LayerNorm(x + s), the skip adding the *ungated* input."""
    cfg = SamImageEncoderConfig(hidden_size=8, num_heads=2, adapter_ratio=0.25)
    x = np_rng.normal(size=(2, 6, 6, 8)).astype(np.float32)
    adapter = Adapter(cfg)
    params = jax.tree.map(lambda p: jnp.asarray(np_rng.normal(size=p.shape) * 0.5, jnp.float32),
                          jax.tree.map(lambda p: p.value if hasattr(p, 'value') else p,
                                       adapter.init(jax.random.key(0), jnp.asarray(x))['params'],
                                       is_leaf=lambda p: hasattr(p, 'value')))
    ours = np.asarray(adapter.apply({'params': params}, jnp.asarray(x)))
    p = jax.tree.map(np.asarray, params)
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    gate = 1 / (1 + np.exp(-(relu(x.mean((1, 2)) @ p['channel_0']['kernel']) @ p['channel_2']['kernel'])))
    gated = x * gate[:, None, None]
    with torch.no_grad():  # torch convs as the independent reference for the two spatial layers
        conv = torch.nn.Conv2d(8, 8, 3, 2, 1, bias=False)
        conv.weight.copy_(torch.tensor(p['spatial_0']['kernel'].transpose(3, 2, 0, 1)))
        convt = torch.nn.ConvTranspose2d(8, 8, 4, 2, 1, bias=False)
        convt.weight.copy_(torch.tensor(p['spatial_2']['kernel'].transpose(3, 2, 0, 1)))
        s = relu(convt(torch.tensor(relu(conv(torch.tensor(gated.transpose(0, 3, 1, 2))).numpy()))).numpy())
    y = x + s.transpose(0, 2, 3, 1)
    mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    expected = (y - mu) / np.sqrt(var + 1e-5) * p['norm']['scale'] + p['norm']['bias']
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_sam_med2d_checkpoint_keys_convert_and_run(np_rng):
    """A synthetic sam-med2d_b.pth with the reference's key names (reduced sizes: width 64, depth 3, embed 16)."""
    enc_cfg = SamImageEncoderConfig(hidden_size=64, depth=3, num_heads=4, mlp_dim=128, out_chans=16, window_size=14,
                                    global_attn_indexes=(2,))
    dec_cfg = SamDecoderConfig(embed_dim=16, num_heads=4, mlp_dim=32, iou_head_hidden_dim=16, mask_in_chans=4)
    shapes = med2d_keys(3, 64, 128, 16, 16, 14, (2,))
    sd = {k: (np_rng.normal(size=s) * 0.2).astype(np.float32) for k, s in shapes.items()}
    parts = split_components(sd)
    enc = image_encoder_to_ours(parts['image_encoder'], enc_cfg, source='sam-med2d_b.pth')
    pp, dp = decoder_to_ours(parts['prompt_encoder'], parts['mask_decoder'], dec_cfg, source='sam-med2d_b.pth')
    pixels = jnp.asarray(np_rng.normal(size=(2, 256, 256, 3)), jnp.float32)
    image_emb = SamImageEncoder(enc_cfg).apply({'params': enc}, pixels)
    assert image_emb.shape == (2, 16, 16, 16)
    sparse, dense = SamPromptEncoder(dec_cfg).apply({'params': pp}, text_embeds=jnp.ones((2, 1, 16)))
    pe = SamPromptEncoder(dec_cfg).apply({'params': pp}, method=SamPromptEncoder.get_dense_pe)
    masks, iou = SamMaskDecoder(dec_cfg).apply({'params': dp}, image_emb, pe, sparse, dense)
    assert masks.shape == (2, 1, 64, 64) and iou.shape == (2, 1) and bool(jnp.isfinite(masks).all())
    # round trips back to the checkpoint's keys, exactly
    back = image_encoder_to_source(enc)
    bp, bd = decoder_to_source(pp, dp)
    for got, want in ((back, parts['image_encoder']), (bp, parts['prompt_encoder']), (bd, parts['mask_decoder'])):
        assert set(got) == set(want)
        for k in got:
            np.testing.assert_array_equal(got[k], want[k])
    bad = dict(parts['image_encoder'])
    bad['blocks.1.Adapter.spatial.2.weights'] = bad.pop('blocks.1.Adapter.spatial.2.weight')
    with pytest.raises(ConversionError, match=r"sam-med2d_b.pth: .*blocks_1/Adapter/spatial_2/kernel.*"
                                              r"blocks\.1\.Adapter\.spatial\.2\.weights"):
        image_encoder_to_ours(bad, enc_cfg, source='sam-med2d_b.pth')


def test_unsupported_hf_vision_settings_are_rejected():
    with pytest.raises(ValueError, match="unsupported settings {'qkv_bias': False}"):
        SamImageEncoderConfig.from_hf(SamVisionConfig(qkv_bias=False))


def test_real_vit_b_shapes():
    """SAM-Med2D ViT-B: rel_pos [27, 64] in windowed blocks and [31, 64] in global ones; (B, 16, 16, 256) out."""
    cfg = SamImageEncoderConfig()
    pixels = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    variables = jax.eval_shape(SamImageEncoder(cfg).init, jax.random.key(0), pixels)
    p = variables['params']
    assert p['blocks_0']['attn']['rel_pos_h'].value.shape == (27, 64)
    assert p['blocks_2']['attn']['rel_pos_w'].value.shape == (31, 64)
    assert p['blocks_5']['Adapter']['spatial_2']['kernel'].value.shape == (4, 4, 768, 768)
    assert jax.eval_shape(SamImageEncoder(cfg).apply, variables, pixels).shape == (1, 16, 16, 256)
