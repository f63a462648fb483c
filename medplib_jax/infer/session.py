"""What an interactive session (`chat`, `serve`) shares: the predictor with the reference demo's region handling,
the image a user names, region prompts from flags, and the `<region></region>` slot rule. Errors are one line
(`ChatError`) naming the flag or file."""
from __future__ import annotations

import os
import re
from typing import Callable, Sequence

import numpy as np

from medplib_jax.data.images import ImageError, image_kind, load_dicom, load_image, load_mask
from medplib_jax.data.regions import RegionPrompt

REGION_SLOT = '<region></region>'
# The demo's worker feeds drawn regions to the region encoder without the dataset's largest-component step
# (model/serve/model_worker.py), so chat and serve do the same.
DEMO_LARGEST_COMPONENT = False


class ChatError(ValueError):
    """A bad chat / serve flag value; one line naming the flag."""


def numbers(flag: str, text: str, count: int) -> tuple[float, ...]:
    """'12,34' -> (12.0, 34.0): exactly `count` comma-separated finite numbers, else a one-line error."""
    parts = [p.strip() for p in text.split(',')]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count or not all(np.isfinite(values)):
        raise ChatError(f'--{flag}={text}: expected {count} comma-separated numbers')
    return values


def region_from_flags(point: str | None, box: str | None, mask: str | None,
                      size: tuple[int, int]) -> list[RegionPrompt]:
    """At most one of --point / --box / --mask -> region prompts, checked against the image's (H, W) now, so a
    region off the image is an error before the model loads."""
    given = [(k, v) for k, v in (('point', point), ('box', box), ('mask', mask)) if v]
    if len(given) > 1:
        raise ChatError(f'--{given[0][0]} and --{given[1][0]}: give one region (--point, --box or --mask)')
    if not given:
        return []
    kind, value = given[0]
    if kind == 'mask':
        region = RegionPrompt('mask', load_mask(value, shape=size))
    else:
        region = RegionPrompt(kind, numbers(kind, value, 2 if kind == 'point' else 4))
    region.to_mask(*size)  # RegionError (a ValueError): outside the image, empty
    return [region]


def with_region_slots(question: str, regions: int) -> str:
    """The demo's `<region>` shorthand becomes `<region></region>`; a question about one region that marks none
    gets one appended after a space (format_region_prompt in the reference's gradio_web_server.py)."""
    question = re.sub(r'<region>(?!</region>)', REGION_SLOT, question.strip())
    if regions and REGION_SLOT not in question:
        question = f'{question} {REGION_SLOT}'
    return question


def load_chat_image(path: str, *, slice_index: int | None = None, window: str | None = None) -> np.ndarray:
    """The image to ask about, (H, W, 3) uint8; `window` only for DICOM, `slice_index` only for NIfTI."""
    kind = image_kind(path)
    is_dicom, is_nifti = kind == 'dicom', kind == 'nifti'
    if window and not is_dicom:
        raise ChatError(f'--window={window}: windowing applies to DICOM (.dcm) images, not {path}')
    if slice_index is not None and not is_nifti:
        raise ChatError(f'--slice={slice_index}: slices apply to NIfTI (.nii, .nii.gz) volumes, not {path}')
    if is_dicom and window:
        centre, width = numbers('window', window, 2)
        if width <= 0:
            raise ChatError(f'--window={window}: the width must be positive')
        if not os.path.isfile(path):
            raise ImageError(f'{path}: image file not found')
        return load_dicom(path, (centre, width))
    return load_image(path, nifti_slice=slice_index)


def token_texts(tokenizer, tokens: Sequence[int]) -> list[str]:
    """Each generated id as text on its own (`<SEG>`, `</s>` written out)."""
    return [tokenizer.decode([t]).strip() or repr(tokenizer.decode([t])) for t in tokens]


def check_mask_mode(mask_mode: str) -> str:
    """--mask_mode: one of the predict API's modes, else a one-line error."""
    from medplib_jax.infer.predict import MASK_MODES
    if mask_mode not in MASK_MODES:
        raise ChatError(f'--mask_mode={mask_mode}: expected one of {", ".join(MASK_MODES)}')
    return mask_mode


def build_predictor(checkpoint: str, *, max_new_tokens: int | None = None, temperature: float | None = None,
                    tokenizer: str | None = None, log: Callable[[str], None] | None = None):
    """The params directory's model (its own config) with the demo's region handling; greedy unless a temperature
    is given (then plain temperature sampling: the demo's worker ignores its top-p slider). `tokenizer`: a folder
    (or 'tiny') instead of the one the directory carries; `log`: progress lines."""
    from medplib_jax.infer.generate import Sampling
    from medplib_jax.infer.predict import Predictor
    kwargs = {'largest_component': DEMO_LARGEST_COMPONENT}
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise ChatError(f'--max_new_tokens={max_new_tokens}: must be at least 1')
        kwargs['max_new_tokens'] = max_new_tokens
    if temperature is not None:
        if not temperature >= 0:
            raise ChatError(f'--temperature={temperature}: must be >= 0 (0: greedy)')
        kwargs['sampling'] = Sampling(temperature=temperature)
    return Predictor.from_params_dir(checkpoint, tokenizer=tokenizer or None, log=log, **kwargs)
