"""The reference's `llava_v1` conversation template, tokenisation and label masking (model/medplib/conversation.py;
`preprocess_multimodal`, `tokenizer_image_token`, `preprocess_v1` in datasets/LazySupervisedDataset.py).

Prompt (`Conversation.get_prompt`, SeparatorStyle.TWO): `{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ...`,
the first question starting with `<im_start><image><im_end>\\n`; an empty message is written `ROLE:` with no
separator, as the reference does.

Ids (`tokenizer_image_token`, datasets/LazySupervisedDataset.py): the prompt is split on `<image>`, each chunk
encoded with its BOS, only the first BOS kept, one IMAGE_TOKEN_INDEX between chunks; then one REGION_TOKEN_INDEX
goes between each adjacent `<region>` `</region>` pair. Afterwards (this project's static layout) the image
placeholder is repeated `num_image_tokens` times (models/multimodal.py fills both kinds of placeholder).

Labels (`preprocess_v1`): a copy of the ids; BOS ignored; the prompt is split into rounds on `</s>` and each round
on " ASSISTANT: "; per round, the instruction's `len(ids("...ASSISTANT: ")) - 2` tokens are ignored and the
cursor moves by `len(ids(round))` (its BOS stands in for the `</s>`); everything after the last round is ignored.
If the cursor does not end on the number of non-pad ids (a question holding " ASSISTANT: ", a literal `</s>` or
`<unk>`, an empty answer), the reference keeps the sample with every label ignored ("tokenization mismatch");
so does this module, and says so in `Tokenized.label_mismatch`. (The reference checks this only below
`model_max_length`; here longer conversations are errors, so it always applies.)

`plain` (stage I, LLaVA's `preprocess_plain`): `<im_start><image><im_end>{caption}\\n`, the question dropped; the
tokens of the image part are ignored, the caption and its newline supervised. A conversation longer than
`max_length` (image placeholders included) is an error, never a silent truncation that could cut a `<SEG>` or a
region slot.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from medplib_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX
from medplib_jax.data.config import TEMPLATES
from medplib_jax.data.tokenizer import MedPLIBTokenizer

SYSTEM_LLAVA_V1 = ('A chat between a curious human and an artificial intelligence assistant. The assistant gives '
                   "helpful, detailed, and polite answers to the human's questions.")
# The reference's evaluation (model/eval/vqa_infer.py) selects conv_templates['v1'], whose system text says "user"
# where training's `llava_v1` says "human": an option for reproducing its numbers, not the default.
SYSTEM_VICUNA_V1 = ('A chat between a curious user and an artificial intelligence assistant. The assistant gives '
                    "helpful, detailed, and polite answers to the user's questions.")
SYSTEMS = {'train': SYSTEM_LLAVA_V1, 'reference_eval': SYSTEM_VICUNA_V1}
ROLES = ('USER', 'ASSISTANT')
SEP, SEP2 = ' ', '</s>'
IMAGE_PREFIX = '<im_start><image><im_end>\n'
PLAIN_IMAGE = '<im_start><image><im_end>'


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
    # (round cursor, non-pad ids) when the reference's arithmetic disagrees: every label is then ignored
    label_mismatch: tuple[int, int] | None = None


def build_prompt(turns: Sequence[tuple[str, str]], system: str = SYSTEM_LLAVA_V1, template: str = 'llava_v1') -> str:
    """(question, answer) pairs -> the prompt text of `template`."""
    if template == 'plain':
        if len(turns) != 1:
            raise ConversationError(f'the plain template takes one (image, caption) turn, got {len(turns)}')
        return PLAIN_IMAGE + turns[0][1] + '\n'
    if template != 'llava_v1':
        raise ValueError(f'conversation template {template!r}; known: {TEMPLATES}')
    text = system + SEP
    for question, answer in turns:
        for k, message in enumerate((question, answer)):
            text += f'{ROLES[k]}: {message}{(SEP, SEP2)[k]}' if message else f'{ROLES[k]}:'
    return text


def with_image_prefix(question: str) -> str:
    """The reference moves `<image>` to the front of the first question and wraps it in im_start / im_end."""
    return IMAGE_PREFIX + question.replace('<image>', '').strip()


def image_token_ids(tokenizer: MedPLIBTokenizer, text: str) -> list[int]:
    """The reference's `tokenizer_image_token`: one IMAGE_TOKEN_INDEX per `<image>`, one REGION_TOKEN_INDEX
    between each adjacent `<region>` `</region>` pair."""
    ids: list[int] = []
    for k, chunk in enumerate(text.split('<image>')):
        enc = tokenizer.encode(chunk)
        ids += enc if k == 0 else [IMAGE_TOKEN_INDEX, *enc[1:]]
    start, end = tokenizer.ids.region_start, tokenizer.ids.region_end
    out: list[int] = []
    for i, t in enumerate(ids):
        out.append(t)
        if t == start and i + 1 < len(ids) and ids[i + 1] == end:
            out.append(REGION_TOKEN_INDEX)
    return out


def _v1_labels(tokenizer: MedPLIBTokenizer, prompt: str, ids: list[int]) -> tuple[np.ndarray, tuple[int, int] | None]:
    """preprocess_v1's label arithmetic (module doc); numpy slices behave as the reference's torch slices."""
    labels = np.asarray(ids, np.int64)
    total = int((labels != tokenizer.ids.pad).sum())
    sep = SEP + ROLES[1] + ': '
    cur = 1
    labels[:cur] = IGNORE_INDEX
    for rnd in prompt.split(SEP2):
        if rnd == '':
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        instruction = len(image_token_ids(tokenizer, parts[0] + sep)) - 2
        labels[cur:cur + instruction] = IGNORE_INDEX
        cur += len(image_token_ids(tokenizer, rnd))
    labels[cur:] = IGNORE_INDEX
    if cur != total:
        labels[:] = IGNORE_INDEX
        return labels, (cur, total)
    return labels, None


def prompt_ids(tokenizer: MedPLIBTokenizer, turns: Sequence[tuple[str, str]], question: str, *,
               num_image_tokens: int, system: str = SYSTEM_LLAVA_V1) -> np.ndarray:
    """The prompt a model answers: earlier (question, answer) turns, then `question` and `ASSISTANT:` (the
    reference's `append_message(roles[1], None)`), ids as in training (the image placeholder repeated
    `num_image_tokens` times). Built from the conversation itself, never by cutting a tokenised answer at its last
    colon as the reference's vqa_infer.py does (which leaks answers holding a colon)."""
    turns = list(turns) + [(question, '')]
    turns[0] = (with_image_prefix(turns[0][0]), turns[0][1])
    ids = np.asarray(image_token_ids(tokenizer, build_prompt(turns, system=system)), np.int64)
    if (ids == IMAGE_TOKEN_INDEX).sum() != 1:
        raise ConversationError(f'prompt: expected exactly one <image>, found {int((ids == IMAGE_TOKEN_INDEX).sum())}')
    repeat = np.where(ids == IMAGE_TOKEN_INDEX, num_image_tokens, 1)
    return np.repeat(ids, repeat).astype(np.int32)


def tokenize_conversation(tokenizer: MedPLIBTokenizer, turns: Sequence[tuple[str, str]], *, num_image_tokens: int,
                          max_length: int, source: str = 'conversation', template: str = 'llava_v1') -> Tokenized:
    """Ids and labels of `template` over `turns` (for llava_v1 the first question must already carry
    IMAGE_PREFIX), with the image placeholder repeated `num_image_tokens` times (1: the reference's own layout)."""
    prompt = build_prompt(turns, template=template)
    if prompt.count('<image>') != 1:
        raise ConversationError(f'{source}: expected exactly one <image>, found {prompt.count("<image>")}')
    ids = image_token_ids(tokenizer, prompt)
    if template == 'plain':  # preprocess_plain: the image part's tokens ignored
        labels, mismatch = np.asarray(ids, np.int64), None
        labels[:len(image_token_ids(tokenizer, PLAIN_IMAGE))] = IGNORE_INDEX
    else:
        labels, mismatch = _v1_labels(tokenizer, prompt, ids)
    ids = np.asarray(ids, np.int64)
    labels[ids < 0] = IGNORE_INDEX  # placeholders are never targets
    image = int(np.argmax(ids == IMAGE_TOKEN_INDEX))
    repeat = np.ones(len(ids), np.int64)
    repeat[image] = num_image_tokens
    ids, labels = np.repeat(ids, repeat), np.repeat(labels, repeat)
    if len(ids) > max_length:
        raise SequenceTooLongError(f'{source}: {len(ids)} tokens (with {num_image_tokens} image tokens) exceed '
                                   f'max_length={max_length}')
    return Tokenized(input_ids=ids.astype(np.int32), labels=labels.astype(np.int32),
                     num_regions=int((ids == REGION_TOKEN_INDEX).sum()),
                     num_seg=int((ids == tokenizer.ids.seg).sum()), label_mismatch=mismatch)
