"""A checkpoint's own `config.json` -> this project's `config.model` fields (the architecture comes from the
checkpoint, not from defaults).

Each reader returns `Setting`s (config field, value, the config.json field it came from). `apply_settings` writes
them into the config; a field the user set on the command line (`--config.model...=`) that disagrees is an error
naming both values, all such conflicts in one line.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Collection, Mapping, Sequence

from medplib_jax.models.moe import MoEConfig


class ConfigConflictError(ValueError):
    """The checkpoint's config.json and a value the user set explicitly disagree."""


@dataclasses.dataclass(frozen=True)
class Setting:
    field: str  # dotted path in the config, e.g. 'model.moe.top_k'
    value: Any
    source: str  # where it came from, e.g. 'moe.top_k_experts'


def read_config_json(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, 'config.json')
    if not os.path.isdir(directory):
        raise FileNotFoundError(f'{directory}: no such directory (an HF checkpoint directory with its config.json)')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no config.json (the checkpoint\'s architecture is read from it)')
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise ValueError(f'{path}: not JSON ({e})') from None
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected a JSON object')
    return data


def need(hf: Mapping[str, Any], field: str, where: str) -> Any:
    if field not in hf:
        raise ValueError(f'{where}: no field {field!r}')
    return hf[field]


def llm_settings(hf: Mapping[str, Any], where: str) -> list[Setting]:
    """LLaMA's sizes from a transformers LlamaConfig (LLaVA / Vicuna / MedPLIB config.json)."""
    rope = hf.get('rope_parameters') or {}  # transformers 5.x; 4.x writes rope_theta / rope_scaling at the top
    if hf.get('rope_scaling') or rope.get('rope_type', 'default') != 'default':
        raise ValueError(f'{where}: rope_scaling={hf.get("rope_scaling") or rope!r} is not supported (LLaMA-2 RoPE '
                         f'only)')
    if hf.get('tie_word_embeddings'):
        raise ValueError(f'{where}: tie_word_embeddings=true is not supported (MedPLIB\'s lm_head is its own)')
    heads = need(hf, 'num_attention_heads', where)
    hidden = need(hf, 'hidden_size', where)
    out = [Setting('model.llm.' + ours, need(hf, theirs, where), theirs) for ours, theirs in (
        ('vocab_size', 'vocab_size'), ('hidden_size', 'hidden_size'), ('intermediate_size', 'intermediate_size'),
        ('num_layers', 'num_hidden_layers'), ('num_heads', 'num_attention_heads'),
        ('rms_norm_eps', 'rms_norm_eps'), ('max_position_embeddings', 'max_position_embeddings'))]
    out += [Setting('model.llm.num_kv_heads', hf.get('num_key_value_heads') or heads, 'num_key_value_heads'),
            Setting('model.llm.head_dim', hf.get('head_dim') or hidden // heads, 'head_dim'),
            Setting('model.llm.rope_theta', float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))), 'rope_theta')]
    return out


def multimodal_settings(hf: Mapping[str, Any]) -> list[Setting]:
    """LLaVA's multimodal fields, where present (LLaVA-v1.5 and MedPLIB config.json)."""
    out = []
    if 'mm_projector_type' in hf:
        out.append(Setting('model.projector.type', hf['mm_projector_type'], 'mm_projector_type'))
    if 'mm_vision_select_layer' in hf:
        out.append(Setting('model.vision.select_layer', hf['mm_vision_select_layer'], 'mm_vision_select_layer'))
    if 'mm_vision_select_feature' in hf:
        out.append(Setting('model.vision.select_feature', hf['mm_vision_select_feature'], 'mm_vision_select_feature'))
    return out


def moe_settings(hf: Mapping[str, Any], num_layers: int, where: str) -> list[Setting]:
    """MedPLIB's `moe` dict (the released checkpoint's config.json, read by the reference's medplib_moe_llama.py) ->
    config.model.moe; no `moe` or moe_enable false -> a dense model."""
    moe = hf.get('moe') or {}
    if not moe.get('moe_enable', bool(moe)):
        return [Setting('model.moe.mode', 'none', 'moe.moe_enable')]
    mode = need(moe, 'moe_mode', f'{where} moe')
    if moe.get('use_residual'):
        raise ValueError(f'{where}: moe.use_residual=true (residual MoE) is not supported')
    try:
        layers = MoEConfig(mode=mode).layer_indices(num_layers)
    except ValueError:
        raise ValueError(f'{where}: moe.moe_mode={mode!r} is not one of dense, first_half, second_half, sparse') \
            from None
    if 'moe_layers_idx' in moe and list(moe['moe_layers_idx']) != list(layers):
        raise ValueError(f'{where}: moe.moe_layers_idx={moe["moe_layers_idx"]} is not what moe_mode={mode!r} selects '
                         f'for {num_layers} layers ({list(layers)})')
    experts = need(moe, 'num_experts', f'{where} moe')
    experts = list(experts) if isinstance(experts, (list, tuple)) else [experts] * len(layers)
    if len(set(experts)) != 1:
        raise ValueError(f'{where}: moe.num_experts={experts}: layers with different expert counts are not supported')
    out = [Setting('model.moe.mode', mode, 'moe.moe_mode'),
           Setting('model.moe.num_experts', int(experts[0]), 'moe.num_experts')]
    for ours, theirs, cast in (('top_k', 'top_k_experts', int), ('capacity_factor', 'capacity_factor', float),
                               ('eval_capacity_factor', 'eval_capacity_factor', float),
                               ('min_capacity', 'min_capacity', int), ('aux_loss_coef', 'router_aux_loss_coef', float)):
        out.append(Setting(f'model.moe.{ours}', cast(need(moe, theirs, f'{where} moe')), f'moe.{theirs}'))
    return out


def clip_settings(hf: Mapping[str, Any], where: str) -> list[Setting]:
    """A CLIP directory's config.json (`CLIPConfig` with `vision_config`, or a flat `CLIPVisionConfig`)."""
    d = hf.get('vision_config', hf)
    if d.get('hidden_act', 'quick_gelu') != 'quick_gelu':
        raise ValueError(f'{where}: hidden_act={d["hidden_act"]!r} is not supported (CLIP uses quick_gelu)')
    return [Setting('model.vision.' + ours, need(d, theirs, where),
                    f'vision_config.{theirs}' if d is not hf else theirs)
            for ours, theirs in (('image_size', 'image_size'), ('patch_size', 'patch_size'),
                                 ('hidden_size', 'hidden_size'), ('intermediate_size', 'intermediate_size'),
                                 ('num_layers', 'num_hidden_layers'), ('num_heads', 'num_attention_heads'),
                                 ('layer_norm_eps', 'layer_norm_eps'))]


def _node(config: Any, field: str) -> tuple[Any, str]:
    """The config block holding `field` (dotted) and its last name; a field the config lacks is a one-line error."""
    *parents, last = field.split('.')
    node = config
    for part in (*parents, last):
        if part not in node:
            raise ValueError(f'the config has no field {field!r} (use a config built by configs/common.py)')
        if part != last:
            node = node[part]
    return node, last


def _get(config: Any, field: str) -> Any:
    node, last = _node(config, field)
    return node[last]


def _set(config: Any, field: str, value: Any) -> None:
    node, last = _node(config, field)
    old = node[last]
    if isinstance(old, bool) or not isinstance(old, (int, float, str)) or isinstance(value, type(old)):
        node[last] = value
    else:  # keep the config field's type (an int 2 from JSON for a float field)
        node[last] = type(old)(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def apply_settings(config: Any, settings: Sequence[Setting], explicit: Collection[str], where: str) -> None:
    """Writes `settings` into `config`; fields in `explicit` (set on the command line) must already agree."""
    conflicts = [f'--config.{s.field}={_get(config, s.field)!r} disagrees with {s.source}={s.value!r}'
                 for s in settings if s.field in explicit and not _same(_get(config, s.field), s.value)]
    if conflicts:
        raise ConfigConflictError(f'{where}: ' + '; '.join(conflicts) + ' (drop the flag: the checkpoint\'s value '
                                  'is what its weights were trained with)')
    for s in settings:
        if s.field not in explicit:
            _set(config, s.field, s.value)
