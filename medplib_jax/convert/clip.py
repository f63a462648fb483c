"""HF `CLIPVisionModel` state dict <-> our `CLIPVisionTower` params; LLaVA projector <-> `MultimodalProjector`.

Inside a MedPLIB/LLaVA checkpoint the tower sits under `model.vision_tower.vision_tower.vision_model.` and the
projector under `model.mm_projector.`: strip those prefixes (`convert.common.strip_prefix`) before calling these.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medplib_jax.convert.common import CONV, IDENTITY, LINEAR, KeyTable, strip_prefix
from medplib_jax.models.clip import CLIPVisionConfig, CLIPVisionTower, MultimodalProjector

_L = 'encoder.layers.{i}.'
_O = 'vision_model/encoder/layers_{i}/'


def _affine(src: str, dst: str, weight_layout=IDENTITY, weight_name: str = 'kernel') -> list:
    return [(f'{src}.weight', f'{dst}/{weight_name}', weight_layout), (f'{src}.bias', f'{dst}/bias', IDENTITY)]


CLIP_TABLE = KeyTable(
    rules=[
        ('embeddings.class_embedding', 'vision_model/embeddings/class_embedding', IDENTITY),
        ('embeddings.patch_embedding.weight', 'vision_model/embeddings/patch_embedding/kernel', CONV),
        ('embeddings.position_embedding.weight', 'vision_model/embeddings/position_embedding/embedding',
         IDENTITY),
        *_affine('pre_layrnorm', 'vision_model/pre_layrnorm', weight_name='scale'),
        *_affine('post_layernorm', 'vision_model/post_layernorm', weight_name='scale'),
        *[r for p in ('q_proj', 'k_proj', 'v_proj', 'out_proj')
          for r in _affine(f'{_L}self_attn.{p}', f'{_O}self_attn/{p}', LINEAR)],
        *[r for p in ('fc1', 'fc2') for r in _affine(f'{_L}mlp.{p}', f'{_O}mlp/{p}', LINEAR)],
        *[r for n in ('layer_norm1', 'layer_norm2') for r in _affine(f'{_L}{n}', f'{_O}{n}', weight_name='scale')],
    ],
    ignore=[r'embeddings\.position_ids$'],
)

PROJECTOR_TABLE = KeyTable(rules=[*_affine('0', '0', LINEAR), *_affine('2', '2', LINEAR)])


def abstract_clip_params(cfg: CLIPVisionConfig) -> Any:
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return nn.unbox(jax.eval_shape(lambda: CLIPVisionTower(cfg).init(jax.random.key(0), pixels))['params'])


def hf_to_clip_params(state_dict: Mapping[str, Any], cfg: CLIPVisionConfig, source: str = 'clip checkpoint') -> dict:
    """Keys as `CLIPVisionModel.state_dict()` gives them (`embeddings.…`, `encoder.layers.…`). A full `CLIPModel`
    checkpoint (`vision_model.…` next to `text_model.…`) is accepted: its vision part is taken."""
    if any(k.startswith('vision_model.') for k in state_dict):
        state_dict = strip_prefix(state_dict, 'vision_model.')
    return CLIP_TABLE.to_ours(state_dict, abstract_clip_params(cfg), source=source)


def clip_params_to_hf(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return CLIP_TABLE.to_source(params)


def hf_to_projector_params(state_dict: Mapping[str, Any], in_features: int, out_features: int,
                           source: str = 'mm_projector') -> dict:
    """`state_dict` keyed `0.weight`, `0.bias`, `2.weight`, `2.bias` (prefix `model.mm_projector.` stripped)."""
    abstract = nn.unbox(jax.eval_shape(lambda: MultimodalProjector(out_features).init(
        jax.random.key(0), jnp.zeros((1, 1, in_features))))['params'])
    return PROJECTOR_TABLE.to_ours(state_dict, abstract, source=source)


def projector_params_to_hf(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return PROJECTOR_TABLE.to_source(params)
