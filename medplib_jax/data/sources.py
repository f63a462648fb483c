"""Records files as grain random-access sources: JSON lists, JSON lines and ArrayRecord files, one raw JSON payload
per record, each record decoded once at start-up (duplicate ids, and the records themselves where a caller reads
them all now: evaluators, the image cache); and the ArrayRecord writer."""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import grain

from medplib_jax.data.config import DataConfig
from medplib_jax.data.images import find_image
from medplib_jax.data.records import (
    Record,
    RecordError,
    build_record,
    decode_payloads,
    decode_record,
    duplicate_ids,
    record_id,
    split_records,
    where_of,
)

ARRAY_RECORD_SUFFIX = '.array_record'


@dataclasses.dataclass(frozen=True)
class RawElement:
    dataset: int
    index: int
    payload: bytes
    duplicate_of: int | None


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What the preprocessing needs of a source (not its records): path, image folder, JSON-lines line numbers."""
    path: str
    image_folder: str
    lines: list[int] | None

    def line(self, index: int) -> int | None:
        return self.lines[index] if self.lines is not None else None


def _array_record_paths(path: str) -> list[str]:
    paths = sorted(glob.glob(path)) if any(c in path for c in '*?[') else [path]
    if not paths or not all(os.path.isfile(p) for p in paths):
        raise RecordError(f'{path}: no such ArrayRecord file')
    return paths


class RecordSource:
    """One records file as a grain random-access source of `RawElement`s (payload = one record's JSON bytes).
    JSON files are split at start-up (a large set reads faster as ArrayRecord: `write_array_record`). Duplicate ids
    are found here, decoding each record once, and reported when the record comes up. `keep_decoded` keeps those
    decoded records for `record` (a caller that reads every record now), instead of decoding them again; a
    pipeline's source leaves it off, as its workers decode each payload when they preprocess it."""

    def __init__(self, path: str, dataset: int, image_folder: str, *, check_duplicate_ids: bool = True,
                 keep_decoded: bool = False):
        self.path, self.dataset, self.image_folder = path, dataset, image_folder
        lines = parsed = None
        if path.endswith(ARRAY_RECORD_SUFFIX):
            self._records = grain.sources.ArrayRecordDataSource(_array_record_paths(path))
        else:
            if not os.path.isfile(path):
                raise RecordError(f'{path}: records file not found')
            self._records, lines, parsed = split_records(path)
        self.info = SourceInfo(path, image_folder, lines)
        raws = None
        if check_duplicate_ids or keep_decoded:
            raws = decode_payloads([self._records[i] for i in range(len(self))], path, lines, parsed)
        self.duplicates = duplicate_ids(map(record_id, raws)) if check_duplicate_ids else {}
        self._raws = raws if keep_decoded else None

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> RawElement:
        return RawElement(self.dataset, index, self._records[index], self.duplicates.get(index))

    def record(self, index: int, *, check_files: bool = True) -> Record:
        """Record `index`, parsed and checked (RecordError otherwise), from its start-up decoding where kept."""
        line = self.info.line(index)
        raw = self._raws[index] if self._raws is not None else \
            decode_record(self._records[index], where_of(self.path, index, line=line))
        return build_record(raw, source=self.path, index=index, image_folder=self.image_folder, line=line,
                            duplicate_of=self.duplicates.get(index), check_files=check_files)


def open_sources(cfg: DataConfig, *, keep_decoded: bool = False) -> list[RecordSource]:
    """The configured records files, in config order. Problems that concern a whole file (missing, a JSON list
    that does not decode, no records) and, with `strict`, duplicate ids are errors here, before any work."""
    if not cfg.datasets:
        raise ValueError('config.data.datasets is empty: name at least one records file')
    sources = []
    for k, (name, spec) in enumerate(cfg.datasets.items()):
        path = os.path.join(cfg.root, spec.path)
        folder = spec.image_folder or cfg.image_folder
        folder = os.path.join(cfg.root, folder) if folder else os.path.dirname(os.path.abspath(path))
        src = RecordSource(path, k, folder, check_duplicate_ids=cfg.check_duplicate_ids, keep_decoded=keep_decoded)
        if not len(src):
            raise ValueError(f'config.data.datasets.{name}: {path} holds no records')
        if cfg.strict and src.duplicates:
            src.record(next(iter(src.duplicates)), check_files=False)  # raises the duplicate id's error
        sources.append(src)
    return sources


def image_paths(cfg: DataConfig) -> list[str]:
    """Every image the configured datasets reference (resolved, in order, once each), for the image cache.
    Records that do not parse are passed over: the pipeline reports them."""
    paths: dict[str, Any] = {}
    for src in open_sources(cfg, keep_decoded=True):
        for i in range(len(src)):
            try:
                rec = src.record(i, check_files=False)
            except RecordError:
                continue
            paths[find_image(rec.image)] = None
    return list(paths)


def write_array_record(src: str, dst: str) -> int:
    """Copies a JSON / JSON-lines records file to ArrayRecord (one record's JSON per entry); returns the count."""
    from array_record.python.array_record_module import ArrayRecordWriter
    if not dst.endswith(ARRAY_RECORD_SUFFIX):
        raise ValueError(f'{dst}: ArrayRecord files must end in {ARRAY_RECORD_SUFFIX}')
    payloads, _, _ = split_records(src)
    writer = ArrayRecordWriter(dst, 'group_size:1')
    try:
        for payload in payloads:
            writer.write(payload)
    finally:
        writer.close()
    return len(payloads)
