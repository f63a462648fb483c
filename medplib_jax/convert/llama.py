"""HF `LlamaForCausalLM` state dict <-> our `LlamaForCausalLM` params (both layer layouts)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medplib_jax.convert.common import IDENTITY, LINEAR, KeyTable, stack_layers, unstack_layers
from medplib_jax.models.llama import LlamaConfig, LlamaForCausalLM

_LAYER = 'model.layers.{i}.'
_OURS = 'model/layers_{i}/'
LLAMA_TABLE = KeyTable(
    rules=[
        ('model.embed_tokens.weight', 'model/embed_tokens/embedding', IDENTITY),
        ('model.norm.weight', 'model/norm/weight', IDENTITY),
        ('lm_head.weight', 'lm_head/kernel', LINEAR),
        *[(f'{_LAYER}self_attn.{p}.weight', f'{_OURS}self_attn/{p}/kernel', LINEAR)
          for p in ('q_proj', 'k_proj', 'v_proj', 'o_proj')],
        *[(f'{_LAYER}mlp.{p}.weight', f'{_OURS}mlp/{p}/kernel', LINEAR)
          for p in ('gate_proj', 'up_proj', 'down_proj')],
        *[(f'{_LAYER}{n}.weight', f'{_OURS}{n}/weight', IDENTITY)
          for n in ('input_layernorm', 'post_attention_layernorm')],
    ],
    # RoPE tables are recomputed, never loaded.
    ignore=[r'\.rotary_emb\.inv_freq$'],
)


def abstract_params(cfg: LlamaConfig) -> Any:
    """Shapes/dtypes of our params (unboxed), without allocating them."""
    model = LlamaForCausalLM(cfg)
    ids = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))['params']
    return nn.unbox(shapes)


def hf_to_params(state_dict: Mapping[str, Any], cfg: LlamaConfig, source: str = 'llama checkpoint') -> dict:
    """HF state dict -> params for `cfg` (scanned or not, in `cfg.param_dtype`)."""
    unscanned = dataclasses.replace(cfg, scan_layers=False)
    params = LLAMA_TABLE.to_ours(state_dict, abstract_params(unscanned), source=source)
    if cfg.scan_layers:
        params = stack_layers(params, 'model', cfg.num_layers)
    return params


def params_to_hf(params: Mapping[str, Any], cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """Our params (either layout) -> HF state dict as numpy arrays."""
    if cfg.scan_layers:
        params = unstack_layers(params, 'model', cfg.num_layers)
    return LLAMA_TABLE.to_source(params)
