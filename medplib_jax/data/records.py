"""MeCoVQA / LLaVA-style records: typed parsing and validation (as the reference's datasets/LazySupervisedDataset.py
reads them; SA-Med2D-20M's file names).

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
from typing import Any, Iterable, Sequence

from medplib_jax.data.regions import RegionPrompt

REGION_RE = re.compile(r'<region>(.*?)</region>', re.S)
MASK_RE = re.compile(r'<mask>(.*?)</mask>', re.S)
# SA-Med2D file-name prefixes (`ct_00--...`, `x_ray--...`): the reference's per-modality metric key is the part
# before the first '_' (so X-ray is 'x').
KNOWN_MODALITIES = frozenset({'ct', 'mr', 'x', 'pet', 'ultrasound', 'dermoscopy', 'endoscopy', 'fundus',
                              'histopathology', 'microscopy', 'oct'})


# Why a record cannot be used, for skip counts (fixed order: the pipeline reports counts as an array by code).
REASONS = ('json', 'record', 'duplicate_id', 'image', 'mask', 'region', 'too_long', 'too_many_seg',
           'too_many_regions', 'error')


class RecordError(ValueError):
    """A record that cannot be used; the message names file, record and field, `reason` is one of REASONS."""

    def __init__(self, message: str, reason: str = 'record'):
        if reason not in REASONS:
            raise ValueError(f'RecordError reason {reason!r} is not one of {REASONS}')
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # survives pickling between grain worker processes
        return type(self), (str(self), self.reason)


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
    modality: str | None  # SA-Med2D file-name prefix (per-modality segmentation metrics)
    modality_type: str | None = None  # OmniMedVQA's field (per-modality closed-set accuracy)
    options: tuple[str, ...] | None = None  # closed-set choices (`options`, or OmniMedVQA's option_A, option_B, ...)
    line: int | None = None  # 1-based line in a JSON-lines file

    @property
    def kind(self) -> str:
        return 'grounding' if self.masks else 'region' if self.regions else 'vqa'

    @property
    def where(self) -> str:
        return where_of(self.source, self.index, self.id, self.line)


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
    for kind, counts in (('box', (4,)), ('point', (2, 3))):
        if spec.startswith(f'{kind}:'):
            try:
                values = tuple(float(v) for v in spec[len(kind) + 1:].split(','))
            except ValueError:
                raise RecordError(f'{where}: field conversations: bad {kind} region {spec!r}', 'region') from None
            if len(values) not in counts:
                raise RecordError(f'{where}: field conversations: {kind} region needs '
                                  f'{" or ".join(map(str, counts))} numbers, got {spec!r}', 'region')
            if kind == 'point' and len(values) == 3 and values[2] < 0:
                raise RecordError(f'{where}: field conversations: point region {spec!r} has a negative half-size',
                                  'region')
            if kind == 'box' and not (values[0] <= values[2] and values[1] <= values[3]):
                raise RecordError(f'{where}: field conversations: box region {spec!r} needs x0 <= x1 and y0 <= y1 '
                                  f'(inclusive pixel corners)', 'region')
            return Region(prompt=RegionPrompt(kind, values))
    if not spec:
        raise RecordError(f'{where}: field conversations: empty <region></region> reference', 'region')
    return Region(path=spec)


def record_id(raw: Any) -> Any:
    """A record's id: `id`, or OmniMedVQA's `question_id`."""
    return raw.get('id', raw.get('question_id')) if isinstance(raw, dict) else None


def _options(raw: dict, answer: str, where: str) -> tuple[str, ...] | None:
    """Closed-set choices, checked to be strings and to hold the answer (scored by exact text, as the reference's
    model/eval/cal_metric_omniMedVQA.py does)."""
    options = raw.get('options')
    if options is None:
        letters = sorted(k for k in raw if re.fullmatch(r'option_[A-Z]', k))
        options = [raw[k] for k in letters] or None
    if options is None:
        return None
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise RecordError(f'{where}: field options: expected a non-empty list of strings')
    if answer.strip() not in [o.strip() for o in options]:
        raise RecordError(f'{where}: field options: the answer {answer.strip()!r} is not one of {options}')
    return tuple(options)


def where_of(source: str, index: int, rid: Any = None, line: int | None = None) -> str:
    """How errors name a record: `file[index] (line N) (id X)`, the line for JSON-lines files."""
    return f'{source}[{index}]' + (f' (line {line})' if line else '') + (f' (id {rid})' if rid is not None else '')


def parse_record(raw: Any, *, source: str, index: int, image_folder: str, check_files: bool = True,
                 line: int | None = None) -> Record:
    """One JSON object -> Record, or RecordError."""
    rid = record_id(raw)
    where = where_of(source, index, rid, line)
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
        try:
            value.encode('utf-8')
        except UnicodeEncodeError as e:  # an escaped lone surrogate: valid JSON, not text a tokenizer takes
            raise RecordError(f'{where}: field conversations[{k}].value: not valid Unicode ({e.reason} at '
                              f'character {e.start})', 'json') from None
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
            value = MASK_RE.sub('', value)  # deleted as the reference does, surrounding text kept as it is
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
                reason = 'image' if field == 'image' else 'mask' if 'mask' in field else 'region'
                raise RecordError(f'{where}: field {field}: file not found: {p}', reason)
    optional = {}
    for field in ('answer_type', 'modality_type'):
        value = raw.get(field)
        if value is not None and not isinstance(value, str):
            raise RecordError(f'{where}: field {field}: {type(value).__name__}, expected a string')
        optional[field] = value
    optional['options'] = _options(raw, turns[-1], where)
    regions = tuple(Region(path=resolve_image(r.path, image_folder)) if r.path else r for r in regions)
    return Record(source=source, index=index, id=None if rid is None else str(rid), image=path,
                  turns=tuple(zip(turns[0::2], turns[1::2])), regions=regions, masks=tuple(masks),
                  modality=modality, line=line, **optional)


def split_records(path: str) -> tuple[list[bytes], list[int] | None, list[Any] | None]:
    """A JSON list or JSON-lines file -> one JSON payload per record, decoded on its own (`decode_payloads`), so one
    bad record is one skip: a JSON-lines line that does not decode, or a record of a JSON list holding bytes that
    are not UTF-8 (kept as they are, through surrogateescape). Also returns the 1-based line of each JSON-lines
    record (None for a JSON list) and the records a JSON list's one parse gave (None for JSON lines), so that they
    are not parsed again. A JSON list that is not valid JSON is an error for the whole file."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise RecordError(f'{path}: cannot read records file ({e.strerror})') from None
    data = data.removeprefix(b'\xef\xbb\xbf')  # a UTF-8 byte-order mark
    if data.lstrip()[:1] == b'[':
        try:
            raws = json.loads(data.decode('utf-8', 'surrogateescape'))
        except json.JSONDecodeError as e:
            raise RecordError(f'{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}', 'json') from None
        return [_payload(r) for r in raws], None, raws
    lines = [(n, line) for n, line in enumerate(data.split(b'\n'), 1) if line.strip()]
    return [line for _, line in lines], [n for n, _ in lines], None


def _payload(raw: Any) -> bytes:
    try:  # undecodable bytes of the file come back as they were, so decode_record reports them
        return json.dumps(raw, ensure_ascii=False).encode('utf-8', 'surrogateescape')
    except UnicodeEncodeError:  # an escaped lone surrogate (valid JSON, not text): keep it escaped
        return json.dumps(raw).encode('ascii')


def decode_record(payload: bytes, where: str) -> Any:
    """One UTF-8 JSON payload -> the decoded object, or RecordError (reason 'json')."""
    try:
        return json.loads(payload.decode('utf-8'))
    except UnicodeDecodeError as e:
        raise RecordError(f'{where}: not UTF-8 ({e.reason} at byte {e.start})', 'json') from None
    except json.JSONDecodeError as e:
        raise RecordError(f'{where}: invalid JSON at column {e.colno}: {e.msg}', 'json') from None


def decode_payloads(payloads: Sequence[bytes], source: str, lines: Sequence[int] | None = None,
                    parsed: Sequence[Any] | None = None) -> list[Any]:
    """Each payload decoded once: the object, or the RecordError `decode_record` gives. `parsed` (a JSON list's
    records from `split_records`) is taken as it is wherever its payload is UTF-8, since decoding that payload
    gives the same object back."""
    out = []
    for i, payload in enumerate(payloads):
        if parsed is not None and _is_utf8(payload):
            out.append(parsed[i])
            continue
        try:
            out.append(decode_record(payload, where_of(source, i, line=lines[i] if lines else None)))
        except RecordError as e:
            out.append(e)
    return out


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode('utf-8')
    except UnicodeDecodeError:
        return False
    return True


def duplicate_ids(ids: Iterable[Any]) -> dict[int, int]:
    """Record ids (`record_id`, in file order) -> {index: index of the first record with the same id} for every
    later record repeating an id (within one file). Records without an id (None) are not compared."""
    first: dict[str, int] = {}
    duplicates = {}
    for i, rid in enumerate(ids):
        if rid is None:
            continue
        if str(rid) in first:
            duplicates[i] = first[str(rid)]
        else:
            first[str(rid)] = i
    return duplicates


def duplicate_error(where: str, rid: Any, first: int) -> RecordError:
    return RecordError(f'{where}: field id: duplicate id {rid!r} (first at record {first})', 'duplicate_id')


def load_record(payload: bytes, *, source: str, index: int, image_folder: str, line: int | None = None,
                duplicate_of: int | None = None, check_files: bool = True) -> Record:
    """One payload of `split_records` -> Record: decoded, checked against duplicate ids, parsed."""
    return build_record(decode_record(payload, where_of(source, index, line=line)), source=source, index=index,
                        image_folder=image_folder, line=line, duplicate_of=duplicate_of, check_files=check_files)


def build_record(raw: Any, *, source: str, index: int, image_folder: str, line: int | None = None,
                 duplicate_of: int | None = None, check_files: bool = True) -> Record:
    """One decoded record of `decode_payloads` (or the RecordError decoding it gave) -> Record: checked against
    duplicate ids, parsed."""
    if isinstance(raw, RecordError):
        raise raw
    if duplicate_of is not None:
        rid = record_id(raw)
        raise duplicate_error(where_of(source, index, rid, line), rid, duplicate_of)
    return parse_record(raw, source=source, index=index, image_folder=image_folder, check_files=check_files,
                        line=line)


def read_records(path: str, image_folder: str, *, strict: bool = True, check_files: bool = True
                 ) -> tuple[list[Record], dict[str, int]]:
    """A JSON list or JSON-lines file -> (records, skipped-by-reason counts), each record parsed once. `strict`
    raises on the first bad record; otherwise bad records (a JSON-lines line that does not decode, a duplicate id,
    ...) are skipped and counted by `RecordError.reason`."""
    payloads, lines, parsed = split_records(path)
    raws = decode_payloads(payloads, path, lines, parsed)
    duplicates = duplicate_ids(map(record_id, raws))
    records, skipped = [], {}
    for i, raw in enumerate(raws):
        try:
            records.append(build_record(raw, source=path, index=i, image_folder=image_folder,
                                        line=lines[i] if lines else None, duplicate_of=duplicates.get(i),
                                        check_files=check_files))
        except RecordError as e:
            if strict:
                raise
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
    return records, skipped
