"""The released MedPLIB checkpoint (`Huangxs/MedPLIB-7b-2e`, as the reference's
merge_lora_weights_and_save_hf_model_moe.py writes it) -> an Orbax params directory.

`MEDPLIB_TABLE` names every parameter of `MedPLIBForCausalLM` by its key in the released (merged, HF-style)
checkpoint; it is the LLaMA, CLIP, projector and SAM-Med2D tables under their prefixes, plus the MoE keys of
DeepSpeed's layer (`mlp.deepspeed_moe.gate.wg`, `...experts.deepspeed_experts.{e}.{gate,up,down}_proj`, stacked
on our leading expert axis in that order: expert 0 = grounding, 1 = vision-language, as the reference's
`initialize_moe_modules` loads them), the region adapter and the T-projector. Every part converter (parts.py) reads its
files in this namespace too.

`convert_release` takes the architecture from the checkpoint's config.json (LLM sizes, the `moe` dict, out_dim),
not from defaults; SAM-Med2D's weights from the directory where it has them, else from `--sam-med2d`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Collection

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medplib_jax import checkpoint
from medplib_jax.convert.clip import CLIP_TABLE, PROJECTOR_TABLE
from medplib_jax.convert.common import IDENTITY, LINEAR, ConversionError, KeyTable, prefixed
from medplib_jax.convert.hf_config import (
    ConfigConflictError,
    Setting,
    apply_settings,
    llm_settings,
    moe_settings,
    multimodal_settings,
    need,
    read_config_json,
)
from medplib_jax.convert.llama import LLAMA_TABLE
from medplib_jax.convert.sam import SAM_MED2D_IMAGE_ENCODER, SAM_MED2D_MASK_DECODER, SAM_MED2D_PROMPT_ENCODER
from medplib_jax.convert.sources import CheckpointSource
from medplib_jax.convert.stream import convert_to_params_dir
from medplib_jax.convert.writer import GROUP_BYTES
from medplib_jax.models.sam_encoder import SamImageEncoderConfig
from medplib_jax.tree import flatten

VISION_PREFIX = 'model.vision_tower.vision_tower.'  # + a CLIPVisionModel's own `vision_model.*` keys
SAM_PREFIX = 'model.visual_model.'  # + sam-med2d_b.pth's own `image_encoder.*` / `prompt_encoder.*` / `mask_decoder.*`
_MOE = 'model.layers.{i}.mlp.deepspeed_moe.'
_PROJ = ('gate_proj', 'up_proj', 'down_proj')


def _affine(src: str, dst: str) -> list:
    return [(f'{src}.weight', f'{dst}/kernel', LINEAR), (f'{src}.bias', f'{dst}/bias', IDENTITY)]


_PARTS = [prefixed(CLIP_TABLE, VISION_PREFIX + 'vision_model.', 'model/vision_tower/'),
          prefixed(PROJECTOR_TABLE, 'model.mm_projector.', 'model/mm_projector/'),
          prefixed(SAM_MED2D_IMAGE_ENCODER, SAM_PREFIX + 'image_encoder.', 'model/visual_model/image_encoder/'),
          prefixed(SAM_MED2D_PROMPT_ENCODER, SAM_PREFIX + 'prompt_encoder.', 'model/visual_model/prompt_encoder/'),
          prefixed(SAM_MED2D_MASK_DECODER, SAM_PREFIX + 'mask_decoder.', 'model/visual_model/mask_decoder/')]

MEDPLIB_TABLE = KeyTable(
    rules=[
        *LLAMA_TABLE.rules,  # dense FFNs (`mlp.{gate,up,down}_proj`) for the layers that are not MoE
        (_MOE + 'gate.wg.weight', 'model/layers_{i}/mlp/gate/wg/kernel', LINEAR),
        *[(f'{_MOE}experts.deepspeed_experts.{{e}}.{p}.weight', f'model/layers_{{i}}/mlp/experts/{p}/kernel[{{e}}]',
           LINEAR) for p in _PROJ],
        *[r for part in _PARTS for r in part.rules],
        *_affine('model.region_fea_adapter', 'model/region_fea_adapter'),
        *_affine('model.text_hidden_fcs.0.0', 'model/text_hidden_fcs/0/0'),
        *_affine('model.text_hidden_fcs.0.2', 'model/text_hidden_fcs/0/2'),
    ],
    # Buffers, recomputed: RoPE tables (saved by transformers 4.31), CLIP's position ids, SAM's pixel statistics.
    ignore=[*LLAMA_TABLE.ignore, *CLIP_TABLE.ignore, r'(^|\.)pixel_(mean|std)$'],
)


def model_shapes(model_cfg: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """'/'-joined path -> (shape, dtype) of every parameter of the MedPLIB `config.model` describes, from shapes
    only (`jax.eval_shape` of its init, as training builds it: models/medplib.py `init_fn`)."""
    from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM, init_fn
    mcfg = MedPLIBConfig.from_model_config(model_cfg)
    model = MedPLIBForCausalLM(mcfg.llm, mcfg=mcfg)
    clip, sam = mcfg.vision.image_size, mcfg.sam_encoder.image_size
    example = {'input_ids': jax.ShapeDtypeStruct((1, 8), jnp.int32),
               'clip_pixels': jax.ShapeDtypeStruct((1, clip, clip, 3), jnp.float32),
               'sam_pixels': jax.ShapeDtypeStruct((1, sam, sam, 3), jnp.float32),
               'region_grids': jax.ShapeDtypeStruct((1, 1, 24, 24), jnp.uint8),
               'token_mask': jax.ShapeDtypeStruct((1, 8), jnp.bool_)}
    boxed = jax.eval_shape(init_fn(model, example, 0))['params']
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flatten(nn.unbox(boxed)).items()}


def converted_metadata(config: Any, kind: str, parts: list[str]) -> dict[str, Any]:
    """What a converted directory's JSON records: the config it was converted with (so a later run can check
    the architecture, `check_model_config`), the layout and the dtype."""
    from medplib_jax.models.llama import LlamaConfig
    llm = LlamaConfig.from_model_config(config.model)
    return {'kind': kind, 'parts': parts, 'scan_layers': llm.scan_layers, 'moe_layers': list(llm.moe_layers),
            'param_dtype': config.model.param_dtype, 'config': config.to_dict()}


def check_model_config(params_dir: str, model_cfg: Any) -> None:
    """A converted directory against the `config.model` a run uses: every field of the model config the
    directory was converted with that differs (dtypes, layout and MoE routing settings aside, which need no
    other weights) is listed in one error."""
    recorded = checkpoint.params_meta(params_dir)['config']['model']
    free = {'dtype', 'param_dtype', 'scan_layers', 'remat_policy', 'moe.group_size', 'moe.route_padding',
            'moe.capacity_factor', 'moe.eval_capacity_factor', 'moe.min_capacity', 'moe.aux_loss_coef',
            'moe.dispatch', 'moe.grouped_matmul', 'lora'}
    ours = _dotted(_complete(model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg)))
    theirs = _dotted(_complete(recorded))
    differ = [f'model.{k}: {theirs.get(k)!r} (converted) vs {ours.get(k)!r}' for k in sorted(set(ours) | set(theirs))
              if not any(k == f or k.startswith(f + '.') for f in free) and _norm(ours.get(k)) != _norm(theirs.get(k))]
    if differ:
        raise ValueError(f'{params_dir}: converted with another model config: ' + '; '.join(differ))


def _complete(model: dict[str, Any]) -> dict[str, Any]:
    """SAM-Med2D's blocks of directories converted before the config held every field were only overrides of their
    dataclasses' defaults (`{}` at model=7b): compare the sizes they stand for."""
    from medplib_jax.models.sam_decoder import SamDecoderConfig
    out = dict(model)
    for name, cls in (('sam_encoder', SamImageEncoderConfig), ('sam_decoder', SamDecoderConfig)):
        if name in out:
            full = dataclasses.asdict(cls.from_dict(out[name]))
            out[name] = {k: v for k, v in full.items() if k not in ('dtype', 'param_dtype')}
    return out


def _dotted(tree: Any) -> dict[str, Any]:
    return {k.replace('/', '.'): v for k, v in flatten(tree).items()}


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def release_settings(hf: dict[str, Any], config: Any, where: str) -> list[Setting]:
    """The released checkpoint's config.json -> config.model fields."""
    added = config.model.llm.vocab_size - config.model.medplib.seg_token_id  # MedPLIB's 267 ADD_OTHERS_TOKENS
    settings = llm_settings(hf, where) + multimodal_settings(hf)
    settings += moe_settings(hf, int(need(hf, 'num_hidden_layers', where)), where)
    settings.append(Setting('model.medplib.seg_token_id', int(need(hf, 'vocab_size', where)) - added,
                            f'vocab_size - {added} added tokens'))
    if 'out_dim' in hf:
        settings.append(Setting('model.sam_decoder.embed_dim', int(hf['out_dim']), 'out_dim'))
    return settings


def check_unread_fields(hf: dict[str, Any], config: Any, where: str) -> None:
    """Fields of config.json that the model config cannot take but must agree with (one error for all)."""
    problems = []
    if 'mm_hidden_size' in hf and hf['mm_hidden_size'] != config.model.vision.hidden_size:
        problems.append(f'mm_hidden_size={hf["mm_hidden_size"]} but config.model.vision.hidden_size='
                        f'{config.model.vision.hidden_size} (the vision tower\'s sizes are not in config.json: '
                        f'pick them with --config=configs/common.py:model=7b or --config.model.vision.*)')
    out_chans = SamImageEncoderConfig.from_dict(config.model.sam_encoder).out_chans
    if 'out_dim' in hf and hf['out_dim'] != out_chans:
        problems.append(f'out_dim={hf["out_dim"]} but config.model.sam_encoder.out_chans={out_chans}')
    if problems:
        raise ConfigConflictError(f'{where}: ' + '; '.join(problems))


def record_tokenizer(config: Any, src: str, explicit: Collection[str]) -> None:
    """A directory with its tokenizer (the release's save_pretrained wrote one; LLaVA's has one) is recorded as
    `config.data.tokenizer`, so the converted directory carries a copy of its files (`checkpoint.describe_params_dir`)
    and whoever reads it (infer/predict.py) loads that. It is not converted: data/tokenizer.py reads it as it is."""
    if 'data.tokenizer' not in explicit and os.path.isfile(os.path.join(src, 'tokenizer.model')):
        config.data.tokenizer = os.path.abspath(src)


def convert_release(src: str, out: str, config: Any, *, sam_med2d: str | None = None,
                    explicit: Collection[str] = (), group_bytes: int = GROUP_BYTES, progress: bool = True,
                    log: Callable[[str], None] = print) -> str:
    """`medplib-jax convert medplib`: the released HF directory (+ sam-med2d_b.pth for what it lacks) -> `out`.
    `config` is updated in place with the checkpoint's architecture; `explicit`: config fields the user set on
    the command line (dotted, e.g. 'model.moe.top_k'), which must agree with config.json."""
    where = os.path.join(src, 'config.json')
    hf = read_config_json(src)
    apply_settings(config, release_settings(hf, config, where), explicit, where)
    check_unread_fields(hf, config, where)
    record_tokenizer(config, src, explicit)
    sources = [CheckpointSource(src)]
    if sam_med2d:
        sources.append(CheckpointSource(sam_med2d, prefix=SAM_PREFIX))
    try:
        return convert_to_params_dir(
            out, model_shapes(config.model), sources, MEDPLIB_TABLE,
            converted_metadata(config, 'medplib release', ['llm', 'projector', 'vision_tower', 'region_fea_adapter',
                                                           'text_hidden_fcs', 'visual_model']),
            label=src, seed=config.seed, group_bytes=group_bytes, progress=progress, log=log)
    except ConversionError as e:
        if not sam_med2d and 'missing' in str(e) and SAM_PREFIX in str(e).split('unexpected')[0]:
            held = sum(k.startswith(SAM_PREFIX) for k in sources[0].keys())
            hint = ('the directory has no SAM-Med2D weights: pass --sam-med2d sam-med2d_b.pth' if not held else
                    f'the directory holds {held} SAM-Med2D tensors ({SAM_PREFIX}*) but lacks those named missing: '
                    f'pass --sam-med2d sam-med2d_b.pth to take them from it (or fix their names)')
            raise ConversionError(f'{e}; {hint}') from None
        raise
