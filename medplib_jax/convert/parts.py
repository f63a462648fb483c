"""Per-part converters and the stage starting points (`medplib-jax convert llama | clip | sam-med2d`).

Each writes a params directory holding its part under the MedPLIB model's own paths, so any of them can serve as
`config.train.init.params` or an `init.load` source:

- `convert llama --src DIR`: a LLaVA-v1.5-7B or Vicuna-7B-v1.5 HF directory -> the LLM (`model/embed_tokens`,
  `model/layers_i`, `model/norm`, `lm_head`) and, when the directory has them, the projector (`model/mm_projector`)
  and the CLIP tower (`model/vision_tower`).
  MedPLIB adds 267 tokens to LLaVA's 32000 (the reference's `ADD_OTHERS_TOKENS`, utils/utils.py): the embedding and
  lm_head rows beyond the checkpoint's vocabulary are drawn N(0, initializer_range) as transformers 4.31's
  `resize_token_embeddings` does. With `--clip DIR --sam-med2d FILE` it also writes CLIP and SAM-Med2D: the stage
  starting points `configs/stage1.py` (`{runs}/vicuna-7b-v1.5`) and `configs/stage2.py` (`{runs}/llava-v1.5-7b`) read.
  What a stage adds fresh is left out (the region adapter and the T-projector, and Vicuna's missing projector): those
  stage configs list them in `config.train.init.fresh` (train/handoff.py).
- `convert clip --src DIR`: an HF `CLIPVisionModel` or full `CLIPModel` directory (openai/clip-vit-large-patch14-336;
  the text tower is left out) -> `model/vision_tower`, sizes from its config.json.
- `convert sam-med2d --src FILE`: sam-med2d_b.pth (`{'model': state_dict}`) -> `model/visual_model`, sizes from
  `config.model.sam_encoder` / `sam_decoder` (the file has no config).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Collection

from medplib_jax.convert.hf_config import (
    Setting,
    apply_settings,
    clip_settings,
    llm_settings,
    multimodal_settings,
    read_config_json,
)
from medplib_jax.convert.release import (
    MEDPLIB_TABLE,
    SAM_PREFIX,
    VISION_PREFIX,
    check_unread_fields,
    converted_metadata,
    model_shapes,
    record_tokenizer,
)
from medplib_jax.convert.sources import CheckpointSource
from medplib_jax.convert.stream import convert_to_params_dir
from medplib_jax.convert.writer import GROUP_BYTES

# Our path prefixes of each part.
PARTS = {'llm': ('lm_head/', 'model/embed_tokens/', 'model/layers', 'model/norm/'),
         'projector': ('model/mm_projector/',), 'vision_tower': ('model/vision_tower/',),
         'visual_model': ('model/visual_model/',)}
# A full CLIPModel directory holds more than the vision tower MedPLIB uses.
CLIP_MODEL_EXTRAS = (r'^text_model\.', r'^(text|visual)_projection\.', r'^logit_scale$')
# The vocabulary MedPLIB extends (rows past the checkpoint's are new tokens): the axis of each parameter.
VOCAB_AXES = {'model/embed_tokens/embedding': 0, 'lm_head/kernel': 1}


def _convert(out: str, config: Any, parts: list[str], sources: list[CheckpointSource], kind: str, label: str,
             **kw: Any) -> str:
    shapes = model_shapes(config.model)
    want = {p: v for p, v in shapes.items() if p.startswith(tuple(x for part in parts for x in PARTS[part]))}
    return convert_to_params_dir(out, want, sources, MEDPLIB_TABLE, converted_metadata(config, kind, parts),
                                 label=label, seed=config.seed, **kw)


def _clip_source(path: str) -> CheckpointSource:
    """CLIP keys as MedPLIB holds them. transformers 4.x writes a CLIPVisionModel (and any CLIPModel) with its
    `vision_model.` prefix, 5.x a CLIPVisionModel without it: both are read."""
    src = CheckpointSource(path, skip=CLIP_MODEL_EXTRAS)
    nested = any(k.startswith('vision_model.') for k in src.keys())
    return src.add_prefix(VISION_PREFIX if nested else VISION_PREFIX + 'vision_model.')


def convert_llama(src: str, out: str, config: Any, *, clip: str | None = None, sam_med2d: str | None = None,
                  explicit: Collection[str] = (), group_bytes: int = GROUP_BYTES, progress: bool = True,
                  log: Callable[[str], None] = print) -> str:
    """A LLaVA / Vicuna directory (+ CLIP, SAM-Med2D) -> `out`. The LLM's sizes come from its config.json; the
    vocabulary is the checkpoint's plus the tokens MedPLIB adds (`config.model.llm.vocab_size -
    config.model.medplib.seg_token_id`, 267), unless --config.model.llm.vocab_size is given."""
    where = os.path.join(src, 'config.json')
    hf = read_config_json(src)
    added = config.model.llm.vocab_size - config.model.medplib.seg_token_id
    base = int(hf.get('vocab_size', 0))
    settings = [s for s in llm_settings(hf, where) if s.field != 'model.llm.vocab_size'] + multimodal_settings(hf)
    settings += [Setting('model.llm.vocab_size', base + added, f'vocab_size + {added} MedPLIB tokens'),
                 Setting('model.medplib.seg_token_id', base, 'vocab_size (<SEG> is the first added token)'),
                 Setting('model.moe.mode', 'none', 'a dense LLaMA checkpoint')]
    if clip:
        clip_where = os.path.join(clip, 'config.json')
        settings += clip_settings(read_config_json(clip), clip_where)
    apply_settings(config, settings, explicit, where)
    if config.model.llm.vocab_size < base:
        raise ValueError(f'--config.model.llm.vocab_size={config.model.llm.vocab_size} is smaller than {where} '
                         f'vocab_size={base}')
    check_unread_fields(hf, config, where)
    record_tokenizer(config, src, explicit)
    sources = [CheckpointSource(src)]
    # LLaVA's save_pretrained keeps the projector and, as modules of the model, the CLIP tower it trained with
    # (`model.vision_tower.vision_tower.*`): both are taken when present; --clip then only fills what is absent.
    held = {part for part, prefix in (('projector', 'model.mm_projector.'), ('vision_tower', VISION_PREFIX))
            if any(k.startswith(prefix) for k in sources[0].keys())}
    parts = ['llm'] + [p for p in ('projector', 'vision_tower') if p in held]
    if clip:
        sources.append(_clip_source(clip))
        if 'vision_tower' not in held:
            parts.append('vision_tower')
    if sam_med2d:
        sources.append(CheckpointSource(sam_med2d, prefix=SAM_PREFIX))
        parts.append('visual_model')
    return _convert(out, config, parts, sources, 'llama', src, grow_axes=VOCAB_AXES,
                    init_std=float(hf.get('initializer_range', 0.02)), group_bytes=group_bytes, progress=progress,
                    log=log)


def convert_clip(src: str, out: str, config: Any, *, explicit: Collection[str] = (), group_bytes: int = GROUP_BYTES,
                 progress: bool = True, log: Callable[[str], None] = print) -> str:
    """An HF CLIP directory -> `out` (`model/vision_tower`); its sizes from its config.json."""
    where = os.path.join(src, 'config.json')
    apply_settings(config, clip_settings(read_config_json(src), where), explicit, where)
    return _convert(out, config, ['vision_tower'], [_clip_source(src)], 'clip', src, group_bytes=group_bytes,
                    progress=progress, log=log)


def convert_sam_med2d(src: str, out: str, config: Any, *, group_bytes: int = GROUP_BYTES, progress: bool = True,
                      log: Callable[[str], None] = print) -> str:
    """sam-med2d_b.pth -> `out` (`model/visual_model`)."""
    return _convert(out, config, ['visual_model'], [CheckpointSource(src, prefix=SAM_PREFIX)], 'sam-med2d', src,
                    group_bytes=group_bytes, progress=progress, log=log)
