"""MedPLIB's tokenizer: a LLaMA tokenizer plus the reference's 267 added tokens in the reference's order
(facts 1.1), so ids match the released checkpoint: on a 32000-token vocab `<SEG>` is 32000, `<region>` /
`</region>` 32003 / 32004, `<im_start>` / `<im_end>` 32265 / 32266, vocab 32267. Loaded from local files only.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

ADDED_TOKENS: tuple[str, ...] = ('<SEG>', '<ref>', '</ref>', '<region>', '</region>', '<sr>', '</sr>', '<mask>',
                                 '</mask>', *[f'<gen_{i}>' for i in range(1, 257)], '<im_start>', '<im_end>')


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The ids the data pipeline and the model need."""
    bos: int
    eos: int
    pad: int
    seg: int
    region_start: int
    region_end: int
    im_start: int
    im_end: int
    vocab_size: int

    @classmethod
    def for_base_vocab(cls, base: int) -> 'TokenIds':
        """Ids when the added tokens follow a base vocab of `base` tokens (LLaMA layout: unk 0, BOS 1, EOS 2)."""
        return cls(bos=1, eos=2, pad=0, seg=base, region_start=base + 3, region_end=base + 4, im_start=base + 265,
                   im_end=base + 266, vocab_size=base + len(ADDED_TOKENS))


def add_medplib_tokens(tokenizer: Any, source: str = 'tokenizer') -> TokenIds:
    """Adds the reference's tokens in order, or, when the tokenizer already has them (the released checkpoint's
    tokenizer), verifies they sit right after the base vocab in that order. Pads with `<unk>` (id 0), right side,
    as the reference does."""
    vocab = tokenizer.get_vocab()
    present = [t for t in ADDED_TOKENS if t in vocab]
    if not present:
        base = len(tokenizer)
        tokenizer.add_tokens(list(ADDED_TOKENS), special_tokens=True)
    elif len(present) == len(ADDED_TOKENS):
        base = vocab['<SEG>']
    else:
        missing = [t for t in ADDED_TOKENS if t not in vocab]
        raise ValueError(f'{source}: has {len(present)} of the {len(ADDED_TOKENS)} MedPLIB tokens; '
                         f'missing e.g. {missing[:5]}')
    ids = TokenIds.for_base_vocab(base)
    got = tokenizer.convert_tokens_to_ids(list(ADDED_TOKENS))
    want = list(range(base, base + len(ADDED_TOKENS)))
    if got != want or len(tokenizer) != ids.vocab_size:
        wrong = [(t, g, w) for t, g, w in zip(ADDED_TOKENS, got, want) if g != w][:5]
        raise ValueError(f'{source}: MedPLIB tokens are not in the reference order after the base vocab of {base} '
                         f'(token, id, expected): {wrong}; vocab {len(tokenizer)} vs {ids.vocab_size}')
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    tokenizer.padding_side = 'right'
    return ids


def load_tokenizer(path: str | os.PathLike) -> tuple[Any, TokenIds]:
    """A LLaMA tokenizer from a local directory, with MedPLIB's tokens added or verified. Nothing is downloaded."""
    from transformers import AutoTokenizer
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f'{path}: tokenizer directory does not exist')
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return tokenizer, add_medplib_tokens(tokenizer, source=path)


TINY_PIECES = ('▁', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'k', 'l', 'm', 'n', 'o', 'p', 'r', 's', 't', 'u',
               'v', 'w', 'y', ':', '?', '.', ',', '▁t', 'th', '▁th', '▁the', 'in', 'er', 'an', 'on', 're', '▁a',
               '▁i', '▁s', '▁c', 'is', '▁is', 'at', 'en', 'ed', 'es', 'or', 'ar', '▁w', 'le')
TINY_BASE_VOCAB = 3 + 256 + len(TINY_PIECES)  # 309: the tiny model's vocab is this + 267 = 576


def tiny_tokenizer() -> tuple[Any, TokenIds]:
    """An offline LLaMA-layout tokenizer (`<unk>` 0, `<s>` 1, `</s>` 2, byte fallback tokens, a few merges) with
    MedPLIB's tokens: for tests and the CPU demo, where no real tokenizer may be downloaded."""
    from transformers import LlamaTokenizer
    vocab = {'<unk>': 0, '<s>': 1, '</s>': 2, **{f'<0x{i:02X}>': 3 + i for i in range(256)}}
    for piece in TINY_PIECES:
        vocab[piece] = len(vocab)
    merges = [(p[:-1], p[-1]) for p in TINY_PIECES if len(p) > 1 and p[:-1] in vocab]
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    return tokenizer, add_medplib_tokens(tokenizer, source='tiny tokenizer')
