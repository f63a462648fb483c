"""Pictures of pipeline batches: what the model is fed, one row per example (Pillow only).

Each row shows the CLIP input (de-normalised, the region prompt's 24x24 grid tinted green), the ground-truth mask
(red) at the original size, a predicted mask (blue) when given, and the decoded question and supervised answer.
Skipped rows say why; padding rows are left out.
"""
from __future__ import annotations

import textwrap
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medplib_jax.constants import IGNORE_INDEX
from medplib_jax.data.images import CLIP_MEAN, CLIP_SIZE, CLIP_STD
from medplib_jax.data.records import REASONS
from medplib_jax.data.regions import GRID
from medplib_jax.data.tokenizer import MedPLIBTokenizer

PANEL = 224
TEXT_WIDTH = 460


def _panel(image: np.ndarray) -> Image.Image:
    im = Image.fromarray(image)
    im.thumbnail((PANEL, PANEL), Image.NEAREST)
    canvas = Image.new('RGB', (PANEL, PANEL), (24, 24, 24))
    canvas.paste(im, ((PANEL - im.width) // 2, (PANEL - im.height) // 2))
    return canvas


def tint(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float = 0.45) -> np.ndarray:
    out = image.astype(np.float32)
    out[mask > 0] = (1 - alpha) * out[mask > 0] + alpha * np.float32(colour)
    return out.astype(np.uint8)


def clip_image(pixels: np.ndarray) -> np.ndarray:
    """Normalised CLIP input (336, 336, 3) -> uint8 RGB."""
    return np.clip((pixels * np.float32(CLIP_STD) + np.float32(CLIP_MEAN)) * 255 + 0.5, 0, 255).astype(np.uint8)


def row_text(tokenizer: MedPLIBTokenizer, input_ids: np.ndarray, labels: np.ndarray,
             token_mask: np.ndarray) -> tuple[str, str]:
    """(prompt after the system text, supervised answer) decoded from one row; placeholders and padding left out."""
    real = (input_ids >= 0) & token_mask
    prompt = tokenizer.decode(input_ids[real & (labels == IGNORE_INDEX)].tolist())
    answer = tokenizer.decode(labels[labels != IGNORE_INDEX].tolist())
    return prompt[prompt.find('USER:'):] if 'USER:' in prompt else prompt, answer


def render_batch(batch: Mapping[str, np.ndarray], tokenizer: MedPLIBTokenizer, path: str, *,
                 predicted: Sequence[np.ndarray | None] | None = None,
                 predicted_text: Sequence[str | None] | None = None, max_rows: int = 8) -> str:
    """Draws up to `max_rows` non-padding rows of `batch` to a PNG at `path`; `predicted[i]` is an optional
    (H, W) binary mask for row i at the original image size, `predicted_text[i]` the model's answer. Returns
    `path`."""
    font = ImageFont.load_default(size=13)
    rows = [i for i in range(len(batch['example_valid']))
            if batch['example_valid'][i] or batch['skip_reason'][i] > 0][:max_rows]
    height = PANEL + 16
    sheet = Image.new('RGB', (3 * PANEL + TEXT_WIDTH + 40, max(1, len(rows)) * height + 8), 'white')
    draw = ImageDraw.Draw(sheet)
    for r, i in enumerate(rows):
        y = 8 + r * height
        where = f'dataset {batch["dataset_index"][i]}, record {batch["record_index"][i]}'
        if not batch['example_valid'][i]:
            draw.text((8, y), f'skipped ({REASONS[batch["skip_reason"][i] - 1]}): {where}', fill='red', font=font)
            continue
        image = clip_image(np.asarray(batch['clip_pixels'][i]))
        cell = CLIP_SIZE // GRID
        for k in np.nonzero(batch['region_valid'][i])[0]:
            grid = np.kron(batch['region_grids'][i, k], np.ones((cell, cell), np.uint8))
            image = tint(image, grid, (0, 220, 0))
        sheet.paste(_panel(image), (8, y))
        h, w = (int(v) for v in batch['mask_size'][i])
        for k in np.nonzero(batch['seg_valid'][i])[0]:
            sheet.paste(_panel(tint(np.full((h, w, 3), 40, np.uint8), batch['seg_masks'][i, k, :h, :w],
                                     (230, 40, 40), 1.0)), (16 + PANEL, y))
        pred = predicted[i] if predicted is not None else None
        if pred is not None:
            sheet.paste(_panel(tint(np.full(pred.shape + (3,), 40, np.uint8), pred, (60, 110, 250), 1.0)),
                        (24 + 2 * PANEL, y))
        question, answer = row_text(tokenizer, *(np.asarray(batch[k][i]) for k in ('input_ids', 'labels',
                                                                                  'token_mask')))
        lines = [where, *textwrap.wrap(question, 70)[:8], '', *textwrap.wrap('-> ' + answer, 70)[:4]]
        said = predicted_text[i] if predicted_text is not None else None
        if said is not None:
            lines += textwrap.wrap('model: ' + said, 70)[:4]
        draw.multiline_text((32 + 3 * PANEL, y), '\n'.join(lines), fill='black', font=font, spacing=3)
    sheet.save(path)
    return path
