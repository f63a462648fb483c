"""SAM image-encoder state dicts <-> our `SamImageEncoder` params (facts 10.2, 10.4).

Two sources map onto the same param tree:
- `sam-med2d_b.pth` (SAM-Med2D, with adapters): keys relative to `image_encoder.` (`blocks.{i}.attn.qkv.weight`);
  inside a merged MedPLIB checkpoint the prefix is `model.visual_model.image_encoder.`: strip it first
  (`convert.common.strip_prefix`).
- HF transformers `SamModel` (original SAM, no adapters): keys relative to `vision_encoder.`
  (`layers.{i}.attn.qkv.weight`).
A dict that still carries `image_encoder.` / `vision_encoder.` (a whole SAM checkpoint) is cut to that part.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medplib_jax.convert.common import CONV, CONV_TRANSPOSE, IDENTITY, LINEAR, KeyTable, Rule, strip_prefix
from medplib_jax.models.sam_image_encoder import SamImageEncoder, SamImageEncoderConfig

_O = 'blocks_{i}/'


def _affine(src: str, dst: str, layout=LINEAR, weight: str = 'kernel') -> list[Rule]:
    return [(f'{src}.weight', f'{dst}/{weight}', layout), (f'{src}.bias', f'{dst}/bias', IDENTITY)]


def _ln(src: str, dst: str) -> list[Rule]:
    return _affine(src, dst, IDENTITY, 'scale')


def _vit_rules(patch: str, block: str, norm1: str, norm2: str, neck: tuple[str, str, str, str]) -> list[Rule]:
    """Rules shared by both sources; they differ only in these module names."""
    b = block
    return [
        *_affine(patch, 'patch_embed/proj', CONV),
        ('pos_embed', 'pos_embed', IDENTITY),
        *_ln(f'{b}{norm1}', f'{_O}norm1'),
        *_ln(f'{b}{norm2}', f'{_O}norm2'),
        *_affine(f'{b}attn.qkv', f'{_O}attn/qkv'),
        *_affine(f'{b}attn.proj', f'{_O}attn/proj'),
        (f'{b}attn.rel_pos_h', f'{_O}attn/rel_pos_h', IDENTITY),
        (f'{b}attn.rel_pos_w', f'{_O}attn/rel_pos_w', IDENTITY),
        *_affine(f'{b}mlp.lin1', f'{_O}mlp/lin1'),
        *_affine(f'{b}mlp.lin2', f'{_O}mlp/lin2'),
        (f'{neck[0]}.weight', 'neck/0/kernel', CONV),
        *_ln(neck[1], 'neck/1'),
        (f'{neck[2]}.weight', 'neck/2/kernel', CONV),
        *_ln(neck[3], 'neck/3'),
    ]


SAM_MED2D_IMAGE_ENCODER_TABLE = KeyTable(rules=[
    *_vit_rules('patch_embed.proj', 'blocks.{i}.', 'norm1', 'norm2', ('neck.0', 'neck.1', 'neck.2', 'neck.3')),
    ('blocks.{i}.Adapter.channel.0.weight', f'{_O}Adapter/channel/0/kernel', LINEAR),
    ('blocks.{i}.Adapter.channel.2.weight', f'{_O}Adapter/channel/2/kernel', LINEAR),
    ('blocks.{i}.Adapter.spatial.0.weight', f'{_O}Adapter/spatial/0/kernel', CONV),
    ('blocks.{i}.Adapter.spatial.2.weight', f'{_O}Adapter/spatial/2/kernel', CONV_TRANSPOSE),  # [in, out, kh, kw]
    *_ln('blocks.{i}.Adapter.norm', f'{_O}Adapter/norm'),
])

HF_SAM_VISION_TABLE = KeyTable(rules=_vit_rules(
    'patch_embed.projection', 'layers.{i}.', 'layer_norm1', 'layer_norm2',
    ('neck.conv1', 'neck.layer_norm1', 'neck.conv2', 'neck.layer_norm2')))


def abstract_params(cfg: SamImageEncoderConfig) -> Any:
    """Our param tree as shapes/dtypes only (no allocation), unboxed."""
    pixels = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return nn.unbox(jax.eval_shape(SamImageEncoder(cfg).init, jax.random.key(0), pixels)['params'])


def _part(state_dict: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    return strip_prefix(state_dict, prefix) if any(k.startswith(prefix) for k in state_dict) else state_dict


def med2d_to_params(state_dict: Mapping[str, Any], cfg: SamImageEncoderConfig,
                    source: str = 'sam-med2d image encoder') -> dict:
    """`sam-med2d_b.pth` image-encoder keys (`blocks.{i}.…`, or a whole checkpoint with `image_encoder.…`)."""
    return SAM_MED2D_IMAGE_ENCODER_TABLE.to_ours(_part(state_dict, 'image_encoder.'), abstract_params(cfg),
                                                 source=source)


def params_to_med2d(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of `med2d_to_params`: keys relative to `image_encoder.`."""
    return SAM_MED2D_IMAGE_ENCODER_TABLE.to_source(params)


def hf_to_params(state_dict: Mapping[str, Any], cfg: SamImageEncoderConfig,
                 source: str = 'HF SamModel vision encoder') -> dict:
    """HF `SamModel` vision-encoder keys (`layers.{i}.…`, or a whole `SamModel` state dict with `vision_encoder.…`).
    `cfg` must have `adapter=False` (HF SAM has none; otherwise the adapter params are reported missing)."""
    return HF_SAM_VISION_TABLE.to_ours(_part(state_dict, 'vision_encoder.'), abstract_params(cfg), source=source)


def params_to_hf(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of `hf_to_params`: keys relative to `vision_encoder.`."""
    return HF_SAM_VISION_TABLE.to_source(params)
