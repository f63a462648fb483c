"""MeCoVQA / LLaVA-style records: typed parsing and validation (facts 8.1, 8.3).

A record is `{"image": path, "conversations": [{"from": "human"|"gpt", "value": str}, ...], "answer_type"?,
"id"?}`. Masks are referenced inside the text: grounding answers carry `<SEG>` and `<mask>PATH</mask>`, region
questions `<region>PATH</region>` (and, as this project's documented extension, `<region>box:x0,y0,x1,y1</region>`
or `<region>point:x,y</region>` in original-image pixels). Paths are removed from the text, leaving
`<region></region>` and `<SEG>`. Every problem raises a `RecordError` naming file, record index / id and field.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterator, Sequence

from medplib_jax.data.regions import RegionPrompt

REGION_RE = re.compile(r'<region>(.*?)</region>', re.S)
MASK_RE = re.compile(r'<mask>(.*?)</mask>', re.S)
# SA-Med2D file-name prefixes (`ct_00--...`, `x_ray--...`): the reference's per-modality metric key is the part
# before the first '_' (so X-ray is 'x').
KNOWN_MODALITIES = frozenset({'ct', 'mr', 'x', 'pet', 'ultrasound', 'dermoscopy', 'endoscopy', 'fundus',
                              'histopathology', 'microscopy', 'oct'})


class RecordError(ValueError):
    """A record that cannot be used; the message names file, record and field."""


@dataclasses.dataclass(frozen=True)
class Region:
    """A region reference: a mask file (`path`) or an inline point / box prompt."""
    path: str | None = None
    prompt: RegionPrompt | None = None


@dataclasses.dataclass(frozen=True)
class Record:
    source: str
    index: int
    id: str | None
    image: str  # resolved path
    turns: tuple[tuple[str, str], ...]  # (question, answer), reference paths removed
    regions: tuple[Region, ...]  # in order of appearance
    masks: tuple[str, ...]  # grounding masks (resolved paths), one per <SEG>, in order
    answer_type: str | None
    modality: str | None

    @property
    def kind(self) -> str:
        return 'grounding' if self.masks else 'region' if self.regions else 'vqa'

    @property
    def where(self) -> str:
        return f'{self.source}[{self.index}]' + (f' (id {self.id})' if self.id is not None else '')


def modality_of(image: str) -> str | None:
    """SA-Med2D names (`<modality>_<sub>--<dataset>--<case>--<slice>.png`) -> modality; None for other names."""
    name = os.path.basename(image)
    if '--' not in name:
        return None
    return name.split('--')[0].split('_')[0].lower()


def resolve_image(image: str, image_folder: str) -> str:
    """As the reference: absolute paths as-is; paths containing 'llavamed' relative to the image folder's parent."""
    if os.path.isabs(image):
        return image
    if 'llavamed' in image:
        return os.path.join(os.path.dirname(os.path.normpath(image_folder)), image)
    return os.path.join(image_folder, image)


def _parse_region(spec: str, where: str) -> Region:
    spec = spec.strip()
    for kind, n in (('box', 4), ('point', 2)):
        if spec.startswith(f'{kind}:'):
            try:
                values = tuple(float(v) for v in spec[len(kind) + 1:].split(','))
            except ValueError:
                raise RecordError(f'{where}: field conversations: bad {kind} region {spec!r}') from None
            if len(values) != n:
                raise RecordError(f'{where}: field conversations: {kind} region needs {n} numbers, got {spec!r}')
            return Region(prompt=RegionPrompt(kind, values))
    if not spec:
        raise RecordError(f'{where}: field conversations: empty <region></region> reference')
    return Region(path=spec)


def parse_record(raw: Any, *, source: str, index: int, image_folder: str, check_files: bool = True) -> Record:
    """One JSON object -> Record, or RecordError."""
    rid = raw.get('id') if isinstance(raw, dict) else None
    where = f'{source}[{index}]' + (f' (id {rid})' if rid is not None else '')
    if not isinstance(raw, dict):
        raise RecordError(f'{where}: record is a {type(raw).__name__}, expected an object')
    image = raw.get('image')
    if not isinstance(image, str) or not image:
        raise RecordError(f'{where}: field image: missing or not a string')
    convs = raw.get('conversations')
    if not isinstance(convs, list) or len(convs) < 2:
        raise RecordError(f'{where}: field conversations: expected a list of at least 2 turns')
    turns, regions, masks = [], [], []
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict) or 'from' not in turn or 'value' not in turn:
            raise RecordError(f'{where}: field conversations[{k}]: expected {{"from", "value"}}')
        role, value = turn['from'], turn['value']
        expected = 'human' if k % 2 == 0 else 'gpt'
        if role != expected:
            raise RecordError(f'{where}: field conversations[{k}].from: {role!r}, expected {expected!r} '
                              f'(turns alternate, starting with human)')
        if isinstance(value, (dict, list)) or value is None:
            raise RecordError(f'{where}: field conversations[{k}].value: {type(value).__name__} is not text')
        value = str(value)  # the reference casts numbers to str
        if role == 'human':
            if MASK_RE.search(value):
                raise RecordError(f'{where}: field conversations[{k}]: <mask> in a human turn')
            regions += [_parse_region(m, where) for m in REGION_RE.findall(value)]
            value = REGION_RE.sub('<region></region>', value)
        else:
            found = MASK_RE.findall(value)
            if len(found) > 1 or (found and '<SEG>' not in value):
                raise RecordError(f'{where}: field conversations[{k}]: a grounding answer needs exactly one '
                                  f'<mask>…</mask> and a <SEG>')
            masks += [resolve_image(m.strip(), image_folder) for m in found]
            value = MASK_RE.sub('', value).strip()
        turns.append(value)
    if len(turns) % 2:
        raise RecordError(f'{where}: field conversations: {len(turns)} turns, the last question has no answer')
    if '<image>' not in turns[0]:
        raise RecordError(f'{where}: field conversations[0]: the first question has no <image>')
    modality = modality_of(image)
    if modality is not None and modality not in KNOWN_MODALITIES:
        raise RecordError(f'{where}: field image: unknown modality {modality!r} in {os.path.basename(image)!r}')
    path = resolve_image(image, image_folder)
    if check_files:
        for field, p in [('image', path)] + [('conversations (<mask>)', m) for m in masks] + \
                [('conversations (<region>)', resolve_image(r.path, image_folder)) for r in regions if r.path]:
            if not os.path.isfile(p):
                raise RecordError(f'{where}: field {field}: file not found: {p}')
    answer_type = raw.get('answer_type')
    if answer_type is not None and not isinstance(answer_type, str):
        raise RecordError(f'{where}: field answer_type: {type(answer_type).__name__}, expected a string')
    regions = tuple(Region(path=resolve_image(r.path, image_folder)) if r.path else r for r in regions)
    return Record(source=source, index=index, id=None if rid is None else str(rid), image=path,
                  turns=tuple(zip(turns[0::2], turns[1::2])), regions=regions, masks=tuple(masks),
                  answer_type=answer_type, modality=modality)


def read_records(path: str, image_folder: str, *, strict: bool = True, check_files: bool = True
                 ) -> tuple[list[Record], dict[str, int]]:
    """A JSON list or JSON-lines file -> (records, skipped-by-reason counts). `strict` raises on the first bad
    record; otherwise bad records are skipped and counted. Duplicate ids are an error / skip too."""
    try:
        with open(path, 'rb') as f:
            text = f.read().decode('utf-8')
    except UnicodeDecodeError as e:
        raise RecordError(f'{path}: not UTF-8 ({e.reason} at byte {e.start})') from None
    raws = _load_json(text, path)
    records, skipped, seen = [], {}, set()
    for i, raw in enumerate(raws):
        try:
            rec = parse_record(raw, source=path, index=i, image_folder=image_folder, check_files=check_files)
            if rec.id is not None:
                if rec.id in seen:
                    raise RecordError(f'{rec.where}: field id: duplicate id {rec.id!r}')
                seen.add(rec.id)
            records.append(rec)
        except RecordError as e:
            if strict:
                raise
            reason = str(e).split(': field ')[-1].split(':')[0] if ': field ' in str(e) else 'record'
            skipped[reason] = skipped.get(reason, 0) + 1
    return records, skipped


def _load_json(text: str, path: str) -> Sequence[Any]:
    stripped = text.lstrip()
    try:
        if stripped.startswith('['):
            data = json.loads(text)
            return data
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise RecordError(f'{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}') from None


def iter_records(paths: Sequence[str], image_folder: str, **kwargs: Any) -> Iterator[Record]:
    for p in paths:
        yield from read_records(p, image_folder, **kwargs)[0]
