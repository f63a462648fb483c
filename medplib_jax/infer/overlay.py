"""Pictures of predictions (Pillow only): an image with the predicted mask and the ground-truth contour beside the
question and answer, and the answer's tokens coloured by the expert each was routed to."""
from __future__ import annotations

import functools
import math
import textwrap
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medplib_jax.data.visualize import tint

PREDICTED = (40, 120, 255)  # predicted mask: blue tint
TRUTH = (255, 60, 60)  # ground-truth mask: red contour
# Expert 0 = grounding (stage III's FFN), 1 = vision-language (stage II's); -1: dropped (passed through).
EXPERT_COLOURS = {0: (255, 150, 40), 1: (60, 140, 255), -1: (160, 160, 160)}
EXPERT_NAMES = {0: 'expert 0 (grounding)', 1: 'expert 1 (vision-language)', -1: 'dropped'}
LEGEND = (0, 1, -1)  # the legend's order


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


def flow(widths: Sequence[int], max_width: int, *, pad: int = 4, gap: int = 3) -> tuple[list[tuple[int, int]], int]:
    """Boxes `widths` wide placed left to right from `pad`, `gap` apart, a new row before one that would pass
    `max_width - pad` (never before a row's first box): ((x, row) of each box, the width used, `pad` included)."""
    places, x, row, used = [], pad, 0, 0
    for w in widths:
        if x + w > max_width - pad and x > pad:
            x, row = pad, row + 1
        places.append((x, row))
        used = max(used, x + w + pad)
        x += w + gap
    return places, used


class RoutingLayout(NamedTuple):
    """Where `routing_image` draws, as (x, y, w, h) rectangles: each token's box (its text, then one strip per
    layer), each legend entry, the title (None without one); `size`: the picture's (width, height)."""
    size: tuple[int, int]
    boxes: list[tuple[int, int, int, int]]
    legend: list[tuple[int, int, int, int]]
    title: tuple[int, int, int, int] | None


_PAD, _LINE = 4, 18  # margin; a line of text


def routing_layout(texts: Sequence[str], layers: int, *, title: str = '', width: int = 720) -> RoutingLayout:
    """The routing picture's layout for the token texts as drawn (`readable_token`): as wide as its widest row, at
    most `width` (wider only for a single box wider than that), so a short answer is not a corner of a wide picture
    that the page scales down; rows wrap; no rectangle overlaps another."""
    font = _font()
    box_h = _LINE + 2 + 3 * layers
    widths = [max(12, _text_width(t, font) + 6) for t in texts]
    legend = [24 + _text_width(EXPERT_NAMES[e], font) for e in LEGEND]
    title_w = _text_width(title, font)
    width = max(width, max([*widths, *legend, title_w]) + 2 * _PAD)
    token_places, token_used = flow(widths, width, pad=_PAD, gap=3)
    legend_places, legend_used = flow(legend, width, pad=_PAD, gap=0)
    top = _PAD + (_LINE if title else 0)
    row_h = box_h + 6
    boxes = [(x, top + r * row_h, w, box_h) for (x, r), w in zip(token_places, widths)]
    legend_top = top + (1 + max((r for _, r in token_places), default=0)) * row_h
    entries = [(x, legend_top + r * _LINE, w, _LINE) for (x, r), w in zip(legend_places, legend)]
    height = entries[-1][1] + _LINE + _PAD
    size = (max(token_used, legend_used, title_w + 2 * _PAD), height)
    return RoutingLayout(size, boxes, entries, (_PAD, _PAD, title_w, _LINE) if title else None)


def readable_token(text: str) -> str:
    """A token as the routing picture writes it: SentencePiece's word-start mark as a space; characters the font
    cannot draw (PIL's bundled font is ASCII only: a byte-fallback piece's U+FFFD, accents) and control characters
    (a newline token: PIL cannot measure a line break) escaped as Python writes them; a blank token quoted, so no
    box is empty."""
    text = ''.join(c if _drawable(c) else c.encode('unicode_escape').decode('ascii')
                   for c in text.replace('\u2581', ' '))
    return text if text.strip() else repr(text)


@functools.lru_cache(maxsize=None)
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=13)


@functools.lru_cache(maxsize=4096)
def _drawable(c: str) -> bool:
    """Whether the font has a glyph for `c`: a missing one renders as the font's box, as a private-use code does."""
    if c == ' ':
        return True
    if not c.isprintable():
        return False
    font = _font()
    glyph, missing = font.getmask(c), font.getmask('\U000f0000')
    return (glyph.size, bytes(glyph)) != (missing.size, bytes(missing))


def _text_width(text: str, font: ImageFont.FreeTypeFont) -> int:
    return math.ceil(font.getlength(text)) if text else 0


def routing_image(tokens: Sequence[str], experts: np.ndarray, *, title: str = '', width: int = 720) -> Image.Image:
    """The answer's tokens in order (as `readable_token` writes them: `<SEG>`, `</s>` literally), each box coloured
    by its majority expert over the MoE layers, with one thin strip per layer beneath it (`experts`: (layers,
    tokens), -1 = dropped), and a legend; at most `width` pixels wide, rows wrapping (`routing_layout`)."""
    experts = np.asarray(experts)
    if experts.shape[1] != len(tokens):
        raise ValueError(f'routing_image: {len(tokens)} tokens, routing for {experts.shape[1]}')
    font, layers = _font(), experts.shape[0]
    texts = [readable_token(t) for t in tokens]
    layout = routing_layout(texts, layers, title=title, width=width)
    out = Image.new('RGB', layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(out)
    if layout.title:
        draw.text(layout.title[:2], title, fill=(0, 0, 0), font=font)
    for k, (x, y, w, _) in enumerate(layout.boxes):
        column = experts[:, k]
        values, counts = np.unique(column, return_counts=True)
        majority = int(values[np.argmax(counts)])
        draw.rectangle([x, y, x + w - 1, y + _LINE - 1], fill=EXPERT_COLOURS.get(majority, (0, 0, 0)))
        draw.text((x + 3, y + 2), texts[k], fill=(0, 0, 0), font=font)
        for layer in range(layers):  # 2 pixels of colour, 1 of white
            top = y + _LINE + 2 + 3 * layer
            draw.rectangle([x, top, x + w - 1, top + 1], fill=EXPERT_COLOURS.get(int(column[layer]), (0, 0, 0)))
    for expert, (x, y, _, _) in zip(LEGEND, layout.legend):
        draw.rectangle([x, y + 4, x + 10, y + 14], fill=EXPERT_COLOURS[expert])
        draw.text((x + 14, y + 1), EXPERT_NAMES[expert], fill=(0, 0, 0), font=font)
    return out
