"""Pictures of predictions (Pillow only): an image with the predicted mask and the ground-truth contour beside the
question and answer, and the answer's tokens coloured by the expert each was routed to."""
from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medplib_jax.data.visualize import tint

PREDICTED = (40, 120, 255)  # predicted mask: blue tint
TRUTH = (255, 60, 60)  # ground-truth mask: red contour
# Expert 0 = grounding (stage III's FFN), 1 = vision-language (stage II's); -1: dropped (passed through).
EXPERT_COLOURS = {0: (255, 150, 40), 1: (60, 140, 255), -1: (160, 160, 160)}
EXPERT_NAMES = {0: 'expert 0 (grounding)', 1: 'expert 1 (vision-language)', -1: 'dropped'}


def contour(mask: np.ndarray) -> np.ndarray:
    """A mask's boundary pixels (inside, with a 4-neighbour outside or on the image edge), 2 pixels wide."""
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    edge = mask.astype(bool) & ~inner
    grown = np.pad(edge, 1)
    return edge | grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:]


def overlay(image: np.ndarray, mask: np.ndarray | None = None, truth: np.ndarray | None = None, *,
            question: str = '', answer: str = '', title: str = '', width: int = 420) -> Image.Image:
    """(H, W, 3) uint8 image with the predicted mask tinted blue and the ground truth outlined red (both (H, W) at
    the image's size), scaled to `width`, above the title, question and answer."""
    shown = np.asarray(image, np.uint8).copy()
    if mask is not None:
        shown = tint(shown, np.asarray(mask), PREDICTED)
    if truth is not None:
        shown[contour(np.asarray(truth))] = TRUTH
    picture = Image.fromarray(shown)
    picture = picture.resize((width, max(1, round(picture.height * width / picture.width))), Image.NEAREST)
    font = ImageFont.load_default(size=13)
    lines = [title] if title else []
    for label, text in (('Q', question), ('A', answer)):
        if text:
            lines += textwrap.wrap(f'{label}: {text}', width=width // 7) or [f'{label}:']
    legend = []
    if mask is not None:
        legend.append(('predicted', PREDICTED))
    if truth is not None:
        legend.append(('ground truth', TRUTH))
    height = picture.height + 10 + 17 * (len(lines) + bool(legend))
    out = Image.new('RGB', (width, height), (255, 255, 255))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    y = picture.height + 5
    x = 4
    for label, colour in legend:
        draw.rectangle([x, y + 3, x + 10, y + 13], fill=colour)
        draw.text((x + 14, y), label, fill=(0, 0, 0), font=font)
        x += 24 + int(draw.textlength(label, font=font))
    y += 17 if legend else 0
    for line in lines:
        draw.text((4, y), line, fill=(0, 0, 0), font=font)
        y += 17
    return out


def routing_image(tokens: Sequence[str], experts: np.ndarray, *, title: str = '', width: int = 720) -> Image.Image:
    """The answer's tokens in order, each box coloured by its majority expert over the MoE layers, with one thin
    strip per layer beneath it (`experts`: (layers, tokens), -1 = dropped), and a legend."""
    experts = np.asarray(experts)
    if experts.shape[1] != len(tokens):
        raise ValueError(f'routing_image: {len(tokens)} tokens, routing for {experts.shape[1]}')
    font = ImageFont.load_default(size=13)
    scratch = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    layers, strip, pad, line_h = experts.shape[0], 3, 4, 20 + 3 * experts.shape[0] + 6
    # SentencePiece's word-start mark has no glyph in the font; control characters (a byte-fallback newline
    # token) are written escaped: PIL cannot measure or draw a token holding a line break.
    tokens = [''.join(c if c.isprintable() else repr(c)[1:-1] for c in t.replace('\u2581', ' ')) for t in tokens]
    boxes, x, y = [], pad, pad + (18 if title else 0)
    for k, text in enumerate(tokens):
        w = max(12, int(scratch.textlength(text, font=font)) + 6)
        if x + w > width - pad and x > pad:
            x, y = pad, y + line_h
        boxes.append((x, y, w, k))
        x += w + 3
    height = y + line_h + 24
    out = Image.new('RGB', (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    for x, y, w, k in boxes:
        column = experts[:, k]
        values, counts = np.unique(column, return_counts=True)
        majority = int(values[np.argmax(counts)])
        draw.rectangle([x, y, x + w, y + 18], fill=EXPERT_COLOURS.get(majority, (0, 0, 0)))
        draw.text((x + 3, y + 2), tokens[k], fill=(0, 0, 0), font=font)
        for layer in range(layers):
            top = y + 20 + strip * layer
            draw.rectangle([x, top, x + w, top + strip - 1], fill=EXPERT_COLOURS.get(int(column[layer]), (0, 0, 0)))
    x = pad
    for expert in (0, 1, -1):
        draw.rectangle([x, height - 18, x + 10, height - 8], fill=EXPERT_COLOURS[expert])
        draw.text((x + 14, height - 21), EXPERT_NAMES[expert], fill=(0, 0, 0), font=font)
        x += 24 + int(draw.textlength(EXPERT_NAMES[expert], font=font))
    return out
