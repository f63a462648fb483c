"""The reference's `llava_v1` conversation template, tokenisation and label masking (facts 1.2).

Prompt: `{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...`, the first question starting
with `<im_start><image><im_end>\\n`. `<image>` becomes `num_image_tokens` IMAGE_TOKEN_INDEX placeholders; one
REGION_TOKEN_INDEX goes between each `<region>` `</region>` pair (models/multimodal.py fills both).

Labels: the reference computes instruction lengths with legacy-tokenizer arithmetic; we get the same intent
exactly from character offsets: a token is supervised iff it overlaps an assistant answer (its text and the
closing `</s>`), so the answer's first token (`▁yes`, which carries the space after `ASSISTANT:`) is supervised
and nothing of the prompt is. A conversation longer than `max_length` is an error, never a silent truncation
that could cut a `<SEG>` or a region slot.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from medplib_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX
from medplib_jax.data.tokenizer import TokenIds

SYSTEM_LLAVA_V1 = ('A chat between a curious human and an artificial intelligence assistant. The assistant gives '
                   "helpful, detailed, and polite answers to the human's questions.")
IMAGE_PREFIX = '<im_start><image><im_end>\n'
# llava_v1: MedPLIB's stages II-IV. plain: LLaVA-1.5's projector pre-training (stage I, `preprocess_plain` in
# LLaVA's train.py): the image then the caption and '\n', the question dropped, one turn.
TEMPLATES = ('llava_v1', 'plain')


class ConversationError(ValueError):
    """A conversation that cannot become a training example (too long, no image, bad turn order)."""


class SequenceTooLongError(ConversationError):
    """More tokens (image placeholders included) than the longest sequence the pipeline batches."""


@dataclasses.dataclass(frozen=True)
class Tokenized:
    input_ids: np.ndarray  # (T,) int32, with IMAGE / REGION placeholders
    labels: np.ndarray  # (T,) int32, IGNORE_INDEX except on assistant answers
    num_regions: int
    num_seg: int


def build_prompt(turns: Sequence[tuple[str, str]], system: str = SYSTEM_LLAVA_V1, template: str = 'llava_v1'
                 ) -> tuple[str, list[tuple[int, int]]]:
    """(question, answer) pairs -> prompt text and the character span of each answer (answer + `</s>`, or
    caption + newline for `plain`)."""
    if template == 'plain':
        if len(turns) != 1:
            raise ConversationError(f'the plain template takes one (image, caption) turn, got {len(turns)}')
        text = '<im_start><image><im_end>'
        return text + turns[0][1] + '\n', [(len(text), len(text) + len(turns[0][1]) + 1)]
    if template != 'llava_v1':
        raise ValueError(f'conversation template {template!r}; known: {TEMPLATES}')
    text = system + ' '
    spans = []
    for question, answer in turns:
        text += f'USER: {question} ASSISTANT: '
        start = len(text)
        text += f'{answer}</s>'
        spans.append((start, len(text)))
    return text, spans


def with_image_prefix(question: str) -> str:
    """The reference moves `<image>` to the front of the first question and wraps it in im_start / im_end."""
    return IMAGE_PREFIX + question.replace('<image>', '').strip()


def tokenize_conversation(tokenizer: Any, ids: TokenIds, turns: Sequence[tuple[str, str]], *,
                          num_image_tokens: int, max_length: int, source: str = 'conversation',
                          template: str = 'llava_v1') -> Tokenized:
    """Tokenises the template over `turns` (for llava_v1 the first question must already carry IMAGE_PREFIX)."""
    text, spans = build_prompt(turns, template=template)
    parts = text.split('<image>')
    if len(parts) != 2:
        raise ConversationError(f'{source}: expected exactly one <image>, found {len(parts) - 1}')
    tokens: list[int] = []
    labels: list[int] = []
    offset = 0
    for k, part in enumerate(parts):
        enc = tokenizer(part, add_special_tokens=k == 0, return_offsets_mapping=True)
        for tok, (s, e) in zip(enc['input_ids'], enc['offset_mapping']):
            s, e = s + offset, e + offset
            supervised = e > s and any(s < end and e > start for start, end in spans)
            tokens.append(tok)
            labels.append(tok if supervised else IGNORE_INDEX)
        offset += len(part) + len('<image>')
        if k == 0:
            tokens += [IMAGE_TOKEN_INDEX] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
    # One region placeholder between each adjacent <region></region> pair.
    out_ids, out_labels = [], []
    for i, (tok, lab) in enumerate(zip(tokens, labels)):
        out_ids.append(tok)
        out_labels.append(lab)
        if tok == ids.region_start and i + 1 < len(tokens) and tokens[i + 1] == ids.region_end:
            out_ids.append(REGION_TOKEN_INDEX)
            out_labels.append(IGNORE_INDEX)
    if len(out_ids) > max_length:
        raise SequenceTooLongError(f'{source}: {len(out_ids)} tokens (with {num_image_tokens} image tokens) exceed '
                                f'max_length={max_length}')
    input_ids = np.asarray(out_ids, np.int32)
    return Tokenized(input_ids=input_ids, labels=np.asarray(out_labels, np.int32),
                     num_regions=int((input_ids == REGION_TOKEN_INDEX).sum()),
                     num_seg=int((input_ids == ids.seg).sum()))
