"""SAM-Med2D (`sam-med2d_b.pth`) and HF `SamModel` state dicts <-> our SAM params (the modules the reference's
`build_sam_vit_b` builds, model/segment_anything_med2d/build_sam.py).

Both tables map onto the same trees: the image encoder (`models/sam_encoder.py`) and the prompt encoder / mask
decoder (`models/sam_decoder.py`). Keys are relative to the component prefix (`image_encoder.`, `prompt_encoder.`,
`mask_decoder.` in sam-med2d_b.pth; `vision_encoder.`, `prompt_encoder.`, `mask_decoder.` in HF);
`split_components` cuts a whole checkpoint into the three parts.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medplib_jax.convert.common import CONV, CONV_TRANSPOSE, IDENTITY, LINEAR, KeyTable, strip_prefix
from medplib_jax.models.sam_decoder import SamDecoderConfig, SamMaskDecoder, SamPromptEncoder
from medplib_jax.models.sam_encoder import SamImageEncoder, SamImageEncoderConfig


def _affine(src: str, dst: str, layout=LINEAR, weight: str = 'kernel') -> list:
    return [(f'{src}.weight', f'{dst}/{weight}', layout), (f'{src}.bias', f'{dst}/bias', IDENTITY)]


def _ln(src: str, dst: str) -> list:
    return _affine(src, dst, IDENTITY, 'scale')


def _encoder_rules(block: str, names: Mapping[str, str]) -> list:
    b, o = block, 'blocks_{i}/'
    return [
        (names['patch'] + '.weight', 'patch_embed/proj/kernel', CONV),
        (names['patch'] + '.bias', 'patch_embed/proj/bias', IDENTITY),
        ('pos_embed', 'pos_embed', IDENTITY),
        *_ln(f'{b}{names["norm1"]}', f'{o}norm1'), *_ln(f'{b}{names["norm2"]}', f'{o}norm2'),
        *_affine(f'{b}attn.qkv', f'{o}attn/qkv'), *_affine(f'{b}attn.proj', f'{o}attn/proj'),
        (f'{b}attn.rel_pos_h', f'{o}attn/rel_pos_h', IDENTITY), (f'{b}attn.rel_pos_w', f'{o}attn/rel_pos_w', IDENTITY),
        *_affine(f'{b}mlp.lin1', f'{o}mlp/lin1'), *_affine(f'{b}mlp.lin2', f'{o}mlp/lin2'),
        (names['neck0'], 'neck/0/kernel', CONV), *_ln(names['neck1'], 'neck/1'),
        (names['neck2'], 'neck/2/kernel', CONV), *_ln(names['neck3'], 'neck/3'),
    ]


SAM_MED2D_IMAGE_ENCODER = KeyTable(rules=[
    *_encoder_rules('blocks.{i}.', dict(patch='patch_embed.proj', norm1='norm1', norm2='norm2', neck0='neck.0.weight',
                                        neck1='neck.1', neck2='neck.2.weight', neck3='neck.3')),
    ('blocks.{i}.Adapter.channel.0.weight', 'blocks_{i}/Adapter/channel_0/kernel', LINEAR),
    ('blocks.{i}.Adapter.channel.2.weight', 'blocks_{i}/Adapter/channel_2/kernel', LINEAR),
    ('blocks.{i}.Adapter.spatial.0.weight', 'blocks_{i}/Adapter/spatial_0/kernel', CONV),
    ('blocks.{i}.Adapter.spatial.2.weight', 'blocks_{i}/Adapter/spatial_2/kernel', CONV_TRANSPOSE),
    *_ln('blocks.{i}.Adapter.norm', 'blocks_{i}/Adapter/norm'),
])

HF_SAM_VISION_ENCODER = KeyTable(rules=_encoder_rules(
    'layers.{i}.', dict(patch='patch_embed.projection', norm1='layer_norm1', norm2='layer_norm2',
                        neck0='neck.conv1.weight', neck1='neck.layer_norm1', neck2='neck.conv2.weight',
                        neck3='neck.layer_norm2')))


def abstract_encoder_params(cfg: SamImageEncoderConfig) -> Any:
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return nn.unbox(jax.eval_shape(lambda: SamImageEncoder(cfg).init(jax.random.key(0), pixels))['params'])


def image_encoder_to_ours(state_dict: Mapping[str, Any], cfg: SamImageEncoderConfig, *, hf: bool = False,
                          source: str = 'sam image encoder') -> dict:
    table = HF_SAM_VISION_ENCODER if hf else SAM_MED2D_IMAGE_ENCODER
    return table.to_ours(state_dict, abstract_encoder_params(cfg), source=source)


def image_encoder_to_source(params: Mapping[str, Any], *, hf: bool = False) -> dict[str, np.ndarray]:
    return (HF_SAM_VISION_ENCODER if hf else SAM_MED2D_IMAGE_ENCODER).to_source(params)


def split_components(state_dict: Mapping[str, Any], *, hf: bool = False) -> dict[str, dict[str, Any]]:
    """A whole SAM checkpoint -> {'image_encoder': ..., 'prompt_encoder': ..., 'mask_decoder': ...}, prefixes cut.
    Accepts sam-med2d_b.pth's `{'model': state_dict}` wrapper (load_state_dict unwraps it)."""
    prefixes = {'image_encoder': 'vision_encoder.' if hf else 'image_encoder.',
                'prompt_encoder': 'prompt_encoder.', 'mask_decoder': 'mask_decoder.'}
    return {name: strip_prefix(state_dict, p) for name, p in prefixes.items()}


def _decoder_rules(hf: bool) -> tuple[list, list]:
    """(prompt encoder rules, mask decoder rules) for sam-med2d_b.pth (hf=False) or HF SamModel (hf=True)."""
    emb = lambda src, dst: (f'{src}.weight', f'{dst}/embedding', IDENTITY)  # noqa: E731
    if hf:
        prompt = [('shared_embedding.positional_embedding', 'pe_layer_positional_encoding_gaussian_matrix', IDENTITY),
                  *[emb(f'point_embed.{i}', f'point_embeddings_{i}') for i in range(4)]]
        down = [('mask_embed.conv1', '0'), ('mask_embed.layer_norm1', '1'), ('mask_embed.conv2', '3'),
                ('mask_embed.layer_norm2', '4'), ('mask_embed.conv3', '6')]
        layer, mlp = 'transformer.layers.{i}.', 'mlp.'
        norms = ('layer_norm1', 'layer_norm2', 'layer_norm3', 'layer_norm4')
        final_norm, ups = 'transformer.layer_norm_final_attn', ('upscale_conv1', 'upscale_layer_norm', 'upscale_conv2')
        head_layers = lambda n: [('proj_in', 0), *[(f'layers.{j}', j + 1) for j in range(n - 2)], ('proj_out', n - 1)]  # noqa: E731,E501
    else:
        prompt = [('pe_layer.positional_encoding_gaussian_matrix', 'pe_layer_positional_encoding_gaussian_matrix',
                   IDENTITY), *[emb(f'point_embeddings.{i}', f'point_embeddings_{i}') for i in range(4)]]
        down = [(f'mask_downscaling.{i}', str(i)) for i in (0, 1, 3, 4, 6)]
        layer, norms, mlp = 'transformer.layers.{i}.', ('norm1', 'norm2', 'norm3', 'norm4'), 'mlp.'
        final_norm, ups = 'transformer.norm_final_attn', ('output_upscaling.0', 'output_upscaling.1',
                                                           'output_upscaling.3')
        head_layers = lambda n: [(f'layers.{j}', j) for j in range(n)]  # noqa: E731
    prompt += [emb('not_a_point_embed', 'not_a_point_embed'), emb('no_mask_embed', 'no_mask_embed')]
    for src, dst in down:
        is_norm = dst in ('1', '4')
        prompt += _ln(src, f'mask_downscaling/{dst}') if is_norm else _affine(src, f'mask_downscaling/{dst}', CONV)

    attn = lambda src, dst: [r for p in ('q_proj', 'k_proj', 'v_proj', 'out_proj')  # noqa: E731
                             for r in _affine(f'{src}.{p}', f'{dst}/{p}')]
    o = 'transformer/layers_{i}/'
    decoder = [emb('iou_token', 'iou_token'), emb('mask_tokens', 'mask_tokens'),
               *attn(f'{layer}self_attn', f'{o}self_attn'),
               *attn(f'{layer}cross_attn_token_to_image', f'{o}cross_attn_token_to_image'),
               *attn(f'{layer}cross_attn_image_to_token', f'{o}cross_attn_image_to_token'),
               *[r for n, ours in zip(norms, ('norm1', 'norm2', 'norm3', 'norm4'))
                 for r in _ln(f'{layer}{n}', o + ours)],
               *_affine(f'{layer}{mlp}lin1', f'{o}mlp_lin1'), *_affine(f'{layer}{mlp}lin2', f'{o}mlp_lin2'),
               *attn('transformer.final_attn_token_to_image', 'transformer/final_attn_token_to_image'),
               *_ln(final_norm, 'transformer/norm_final_attn'),
               *_affine(ups[0], 'output_upscaling_0', CONV_TRANSPOSE), *_ln(ups[1], 'output_upscaling_1'),
               *_affine(ups[2], 'output_upscaling_3', CONV_TRANSPOSE)]
    for src_layer, j in head_layers(3):
        decoder += _affine(f'output_hypernetworks_mlps.{{m}}.{src_layer}',
                           f'output_hypernetworks_mlps_{{m}}/layers_{j}')
        decoder += _affine(f'iou_prediction_head.{src_layer}', f'iou_prediction_head/layers_{j}')
    return prompt, decoder


_MED2D_PROMPT, _MED2D_DECODER = _decoder_rules(hf=False)
_HF_PROMPT, _HF_DECODER = _decoder_rules(hf=True)
SAM_MED2D_PROMPT_ENCODER = KeyTable(rules=_MED2D_PROMPT)
SAM_MED2D_MASK_DECODER = KeyTable(rules=_MED2D_DECODER)
# HF ties the prompt encoder's positional embedding to `shared_image_embedding` (same tensor, may be absent).
HF_SAM_PROMPT_ENCODER = KeyTable(rules=_HF_PROMPT)
HF_SAM_MASK_DECODER = KeyTable(rules=_HF_DECODER)


def abstract_decoder_params(cfg: SamDecoderConfig) -> tuple[Any, Any]:
    n = cfg.image_embedding_size
    prompt = SamPromptEncoder(cfg)
    decoder = SamMaskDecoder(cfg)
    p = jax.eval_shape(lambda: prompt.init(jax.random.key(0), text_embeds=jnp.zeros((1, 1, cfg.embed_dim))))
    img = jnp.zeros((1, n, n, cfg.embed_dim))
    d = jax.eval_shape(lambda: decoder.init(jax.random.key(0), img, img, jnp.zeros((1, 1, cfg.embed_dim)), img))
    return nn.unbox(p['params']), nn.unbox(d['params'])


def decoder_to_ours(prompt_sd: Mapping[str, Any], decoder_sd: Mapping[str, Any], cfg: SamDecoderConfig, *,
                    hf: bool = False, source: str = 'sam checkpoint') -> tuple[dict, dict]:
    """-> (prompt encoder params, mask decoder params). For HF, a missing tied positional embedding is taken from
    `shared_image_embedding.positional_embedding` if given in `prompt_sd`."""
    prompt_t, decoder_t = (HF_SAM_PROMPT_ENCODER, HF_SAM_MASK_DECODER) if hf else (SAM_MED2D_PROMPT_ENCODER,
                                                                                   SAM_MED2D_MASK_DECODER)
    abstract_p, abstract_d = abstract_decoder_params(cfg)
    return (prompt_t.to_ours(prompt_sd, abstract_p, source=f'{source} (prompt_encoder)'),
            decoder_t.to_ours(decoder_sd, abstract_d, source=f'{source} (mask_decoder)'))


def decoder_to_source(prompt_params: Mapping[str, Any], decoder_params: Mapping[str, Any], *,
                      hf: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    prompt_t, decoder_t = (HF_SAM_PROMPT_ENCODER, HF_SAM_MASK_DECODER) if hf else (SAM_MED2D_PROMPT_ENCODER,
                                                                                   SAM_MED2D_MASK_DECODER)
    return prompt_t.to_source(prompt_params), decoder_t.to_source(decoder_params)
