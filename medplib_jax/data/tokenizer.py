"""MedPLIB's tokenizer: LLaMA's SentencePiece model plus the reference's 267 added tokens, with the encoding of
transformers 4.31's slow `LlamaTokenizer` (`use_fast=False`, `legacy=True`) that the released checkpoint was
trained under (the reference's train_ds_medplib.py, with utils/utils.py `ADD_OTHERS_TOKENS`).

Ids: the added tokens follow the base vocab in the reference's order, so on LLaMA's 32000 `<SEG>` is 32000,
`<region>` / `</region>` 32003 / 32004, `<im_start>` / `<im_end>` 32265 / 32266, vocab 32267.

Encoding (`tokenization_utils.PreTrainedTokenizer.tokenize` + `LlamaTokenizer._tokenize` in 4.31): the text is split
on the no-split tokens (the added ones and `<unk>` `<s>` `</s>`); the whitespace on both sides of every *added*
token occurrence is stripped (they were added as plain strings; the three specials are AddedTokens with lstrip /
rstrip False, so nothing is stripped around `</s>`); chunks left empty are dropped; every other chunk is encoded
on its own by SentencePiece, which gives it LLaMA's dummy-prefix `▁`; BOS is prepended, no EOS. So no `▁` or
`<0x0A>` piece ever touches an added token. A fast (tokenizers) tokenizer keeps those spaces and gives other ids,
so there is none here. Only local files are read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Sequence

import sentencepiece as spm

ADDED_TOKENS: tuple[str, ...] = ('<SEG>', '<ref>', '</ref>', '<region>', '</region>', '<sr>', '</sr>', '<mask>',
                                 '</mask>', *[f'<gen_{i}>' for i in range(1, 257)], '<im_start>', '<im_end>')
SPECIAL_PIECES = ('<unk>', '<s>', '</s>')  # LLaMA's ids 0, 1, 2


class TokenizerError(ValueError):
    """A tokenizer folder or model that is not LLaMA's layout with MedPLIB's tokens."""


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
        """Ids when the added tokens follow a base vocab of `base` tokens (LLaMA layout: unk 0, BOS 1, EOS 2; pad =
        unk, as the reference sets it)."""
        return cls(bos=1, eos=2, pad=0, seg=base, region_start=base + 3, region_end=base + 4, im_start=base + 265,
                   im_end=base + 266, vocab_size=base + len(ADDED_TOKENS))


class MedPLIBTokenizer:
    """A SentencePiece model + MedPLIB's added tokens, encoding as the reference's slow tokenizer (module doc).
    Padding is on the right with `ids.pad` (0, `<unk>`). Picklable (grain worker processes)."""

    def __init__(self, model_proto: bytes, source: str):
        self.source = source
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        base = self._sp.get_piece_size()
        layout = [(self._sp.id_to_piece(i), i) for i in range(min(3, base))]
        if layout != [(p, i) for i, p in enumerate(SPECIAL_PIECES)] or \
                (self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()) != (0, 1, 2):
            raise TokenizerError(f'{source}: not LLaMA\'s layout (<unk> 0, <s> 1, </s> 2): ids 0-2 are {layout}, '
                                 f'unk/bos/eos ids {self._sp.unk_id()}/{self._sp.bos_id()}/{self._sp.eos_id()}')
        clash = [t for t in ADDED_TOKENS if self._sp.piece_to_id(t) != 0]
        if clash:
            raise TokenizerError(f'{source}: the SentencePiece vocab already holds MedPLIB tokens {clash[:5]}')
        self.ids = TokenIds.for_base_vocab(base)
        self._added = {t: base + k for k, t in enumerate(ADDED_TOKENS)}
        self._no_split = {**{p: i for i, p in enumerate(SPECIAL_PIECES)}, **self._added}
        # Every token is '<...>' with no '<' or '>' inside, so matches cannot overlap: the alternation equals
        # transformers' trie split.
        self._split = re.compile('(' + '|'.join(re.escape(t) for t in sorted(self._no_split, key=len,
                                                                              reverse=True)) + ')')

    def __reduce__(self):
        return type(self), (self._sp.serialized_model_proto(), self.source)

    def __len__(self) -> int:
        return self.ids.vocab_size

    def token_to_id(self, token: str) -> int:
        """An added token's, a special's or a SentencePiece piece's id (`<unk>`'s, 0, for an unknown piece)."""
        return self._no_split.get(token, self._sp.piece_to_id(token))

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """`text` -> ids exactly as the reference's `tokenizer(text).input_ids` (`bos=False`: as with
        `add_special_tokens=False`)."""
        parts = self._split.split(text)  # [text, token, text, token, ..., text]
        for i in range(1, len(parts), 2):
            if parts[i] in self._added:  # added tokens eat the whitespace on both sides; specials keep it
                parts[i - 1] = parts[i - 1].rstrip()
                parts[i + 1] = parts[i + 1].lstrip()
        ids = [self.ids.bos] if bos else []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self._no_split[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids (no placeholders) -> text: added tokens and `<unk>` `<s>` `</s>` written out, the pieces between
        decoded by SentencePiece (each run's dummy-prefix space dropped), so the text reads as encoded, without
        the whitespace the encoding stripped next to added tokens."""
        out, run = [], []
        for t in (int(t) for t in ids):
            if not 0 <= t < self.ids.vocab_size:
                raise ValueError(f'{self.source}: id {t} is outside the vocab of {self.ids.vocab_size} '
                                 f'(placeholders are not text)')
            if t < 3 or t >= self.ids.seg:
                out.append(self._sp.decode(run))
                run = []
                out.append(SPECIAL_PIECES[t] if t < 3 else ADDED_TOKENS[t - self.ids.seg])
            else:
                run.append(t)
        out.append(self._sp.decode(run))
        return ''.join(out)


def _check_added_tokens_json(path: str, base: int) -> None:
    """The released checkpoint's `added_tokens.json` must hold exactly the 267 tokens at the reference's ids."""
    try:
        with open(path, encoding='utf-8') as f:
            found = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f'{path}: cannot read it as JSON ({e})') from None
    if not isinstance(found, dict):
        raise TokenizerError(f'{path}: expected an object {{token: id}}, got {type(found).__name__}')
    want = {t: base + k for k, t in enumerate(ADDED_TOKENS)}
    diffs = [f'{t} missing (expected {i})' for t, i in want.items() if t not in found]
    diffs += [f'{t} is {found[t]}, expected {i}' for t, i in want.items() if t in found and found[t] != i]
    diffs += [f'{t} ({found[t]}) is not a MedPLIB token' for t in found if t not in want]
    if diffs:
        more = f' and {len(diffs) - 8} more' if len(diffs) > 8 else ''
        raise TokenizerError(f'{path}: added tokens differ from MedPLIB\'s after a base vocab of {base}: '
                             f'{"; ".join(diffs[:8])}{more}')


def load_tokenizer(folder: str | os.PathLike) -> MedPLIBTokenizer:
    """LLaMA's tokenizer from a local folder's `tokenizer.model` (LLaVA-v1.5-7B's, or the released checkpoint's).
    MedPLIB's tokens are added after the base vocab; a folder with `added_tokens.json` must agree with that."""
    folder = os.fspath(folder)
    path = os.path.join(folder, 'tokenizer.model')
    if not os.path.isdir(folder):
        raise TokenizerError(f'{folder}: no such tokenizer folder (from {os.getcwd()})')
    if not os.path.isfile(path):
        raise TokenizerError(f'{folder}: no tokenizer.model (a SentencePiece model) in this tokenizer folder; a '
                             f'fast-only folder (tokenizer.json) gives other ids than the reference\'s slow tokenizer')
    with open(path, 'rb') as f:
        proto = f.read()
    try:
        tokenizer = MedPLIBTokenizer(proto, path)
    except (RuntimeError, OSError) as e:  # sentencepiece's parse error
        raise TokenizerError(f'{path}: not a SentencePiece model ({str(e).splitlines()[0]})') from None
    added = os.path.join(folder, 'added_tokens.json')
    if os.path.isfile(added):
        _check_added_tokens_json(added, tokenizer.ids.seg)
    return tokenizer


TINY_PIECES = ('▁', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'k', 'l', 'm', 'n', 'o', 'p', 'r', 's', 't', 'u',
               'v', 'w', 'y', ':', '?', '.', ',', '▁t', 'th', '▁th', '▁the', 'in', 'er', 'an', 'on', 're', '▁a',
               '▁i', '▁s', '▁c', 'is', '▁is', 'at', 'en', 'ed', 'es', 'or', 'ar', '▁w', 'le')
TINY_BASE_VOCAB = 3 + 256 + len(TINY_PIECES)  # 309: the tiny model's vocab is this + 267 = 576


def word_pieces(words: Sequence[str]) -> list[str]:
    """BPE pieces that make each of `words` one token, with or without a leading `▁` (after a space, or at the
    start of a line / after an added token): every prefix of length >= 2 of both spellings, in first-seen order,
    minus TINY_PIECES. Every merge inside a word then joins a prefix to its neighbour and yields the next prefix,
    so SentencePiece's BPE ends on the whole word whatever order it merges in."""
    have, out = set(TINY_PIECES), []
    for word in words:
        for spelled in ('▁' + word, word):
            for i in range(2, len(spelled) + 1):
                if spelled[:i] not in have:
                    have.add(spelled[:i])
                    out.append(spelled[:i])
    return out


def tiny_base_vocab(words: Sequence[str] = ()) -> int:
    """The base vocab of `tiny_model_proto(words)` (the model's vocab is this + 267)."""
    return TINY_BASE_VOCAB + len(word_pieces(words))


def tiny_model_proto(words: Sequence[str] = ()) -> bytes:
    """A SentencePiece BPE model with LLaMA's layout and normaliser settings (unk/BOS/EOS, the 256 byte-fallback
    pieces, TINY_PIECES with merge priority in their order, dummy prefix, no whitespace folding, identity
    normalisation), built in code: nothing is downloaded or trained. `words`: whole words to add as single pieces
    (`word_pieces`; the synthetic set's vocabulary for the demo tokenizer), after TINY_PIECES."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2  # needs protobuf; reading a model does not
    m = sp_pb2.ModelProto()
    piece = sp_pb2.ModelProto.SentencePiece
    for text, kind in zip(SPECIAL_PIECES, (piece.UNKNOWN, piece.CONTROL, piece.CONTROL)):
        m.pieces.add(piece=text, score=0.0, type=kind)
    for b in range(256):
        m.pieces.add(piece=f'<0x{b:02X}>', score=0.0, type=piece.BYTE)
    for k, text in enumerate((*TINY_PIECES, *word_pieces(words))):
        m.pieces.add(piece=text, score=-float(k), type=piece.NORMAL)
    t = m.trainer_spec
    t.model_type, t.vocab_size, t.byte_fallback = sp_pb2.TrainerSpec.BPE, len(m.pieces), True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    n = m.normalizer_spec
    n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces = 'identity', True, False, True
    return m.SerializeToString()


def tiny_tokenizer() -> MedPLIBTokenizer:
    """The offline tokenizer for tests and the CPU demo (base vocab 309, so the tiny model's vocab is 576)."""
    return MedPLIBTokenizer(tiny_model_proto(), 'tiny tokenizer')
