"""The grain input pipeline: MeCoVQA / VQA record files -> static-shape batches for MedPLIB (as the reference's
datasets/LazySupervisedDataset.py and DataCollatorForSupervisedDataset.py prepare them).

    RecordSource per file (JSON list, JSON lines or ArrayRecord; one raw JSON payload per record)
      -> shuffle per dataset (seeded; reshuffled each epoch)  -> mix by weight  -> repeat
      -> random_map(Preprocessor): parse, load image / masks / regions, tokenise  -> example or Skipped
      -> EvenShard (this process's block of every global batch; shards equally long)  -> batch(Collator)
      -> to_iter_dataset (threads)  -> mp_prefetch (worker processes)  -> SkipAccounting (main process)

Static shapes: sequences are padded to the smallest length bucket that holds the batch's longest one (the last
bucket is the maximum length; longer records are skipped as `too_long`), `max_regions` region grids and `max_seg`
ground-truth masks per row with validity masks. A bad record never stops a run unless `strict`: it becomes an
invalid row (`example_valid` False) whose `skip_reason` names why, so every good record is yielded exactly once,
batch composition does not depend on which records fail, and a global sum of the skip codes over the batch counts
skips over all hosts. The main process logs each skip and keeps running totals in the iterator state (they survive
a restore), and stops the run with one clear error when more than `max_skip_fraction` of the records it has seen
are bad (a wrong image folder should not train for a day on empty batches; each process checks its own share,
which shuffling makes representative).

Deliberate differences from the reference's dataset: a region that vanishes on the 24x24 grid is a skip (the
reference keeps the sample with every label ignored, which trains nothing), `<SEG>` tokens must match `<mask>`
references one for one (the reference pairs them by order across the batch), and over-long records are skipped
instead of truncated. A "tokenization mismatch" (data/conversation.py) is kept with every label ignored, as in
the reference, and logged (an error with `strict`; `check-data` counts these rows). With several processes each
picks its length bucket from its own rows; `medplib_jax.train.inputs.global_batch` pads them to the longest before
forming global arrays.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import sys
import traceback
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from absl import logging

from medplib_jax.data.batch import empty_batch
from medplib_jax.data.config import DataConfig
from medplib_jax.data.conversation import (
    ConversationError,
    SequenceTooLongError,
    tokenize_conversation,
    with_image_prefix,
)
from medplib_jax.data.images import (
    ImageError,
    clip_canvas,
    clip_normalize,
    find_image,
    load_image,
    load_mask,
    sam_canvas,
    sam_normalize,
)
from medplib_jax.data.records import (
    REASONS,
    Record,
    RecordError,
    decode_record,
    duplicate_error,
    duplicate_ids,
    load_record,
    record_id,
    split_records,
    where_of,
)
from medplib_jax.data.regions import RegionError, RegionPrompt, regions_to_grids
from medplib_jax.data.tokenizer import MedPLIBTokenizer, load_tokenizer, tiny_tokenizer

# Batch key holding the skipped records' (reason, message) pairs; the DataIterator logs and removes it (host-only).
MESSAGES_KEY = '_skip_messages'
ARRAY_RECORD_SUFFIX = '.array_record'


class TooManySkipsError(RuntimeError):
    """More records were bad than `config.data.max_skip_fraction` allows."""


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """What the pipeline needs from the model config: fixed counts per sample and the token ids."""
    num_image_tokens: int
    max_regions: int
    max_seg: int
    seg_token_id: int
    vocab_size: int

    @classmethod
    def from_config(cls, model: Mapping[str, Any]) -> 'ModelShapes':
        vision, medplib = model['vision'], model['medplib']
        return cls(num_image_tokens=(vision['image_size'] // vision['patch_size']) ** 2,
                   max_regions=medplib['max_regions'], max_seg=medplib['max_seg'],
                   seg_token_id=medplib['seg_token_id'], vocab_size=model['llm']['vocab_size'])


@dataclasses.dataclass(frozen=True)
class RawElement:
    dataset: int
    index: int
    payload: bytes
    duplicate_of: int | None


@dataclasses.dataclass(frozen=True)
class Skipped:
    dataset: int
    index: int
    reason: str
    message: str


class _Padding:
    """Fills the rows after the end of a finite pass (and evens out shards): invalid, counted as nothing."""


PADDING = _Padding()


def _array_record_paths(path: str) -> list[str]:
    paths = sorted(glob.glob(path)) if any(c in path for c in '*?[') else [path]
    if not paths or not all(os.path.isfile(p) for p in paths):
        raise RecordError(f'{path}: no such ArrayRecord file')
    return paths


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What the preprocessing needs of a source (not its records): path, image folder, JSON-lines line numbers."""
    path: str
    image_folder: str
    lines: list[int] | None

    def line(self, index: int) -> int | None:
        return self.lines[index] if self.lines is not None else None


class RecordSource:
    """One records file as a grain random-access source of `RawElement`s (payload = one record's JSON bytes).
    JSON files are split at start-up (a large set reads faster as ArrayRecord: `write_array_record`); duplicate
    ids are found here, in one pass, and reported when the record comes up."""

    def __init__(self, path: str, dataset: int, image_folder: str, *, check_duplicate_ids: bool = True):
        self.path, self.dataset, self.image_folder = path, dataset, image_folder
        lines = None
        if path.endswith(ARRAY_RECORD_SUFFIX):
            self._records = grain.sources.ArrayRecordDataSource(_array_record_paths(path))
        else:
            if not os.path.isfile(path):
                raise RecordError(f'{path}: records file not found')
            self._records, lines = split_records(path)
        self.info = SourceInfo(path, image_folder, lines)
        self.duplicates = duplicate_ids(self._records[i] for i in range(len(self))) if check_duplicate_ids else {}

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> RawElement:
        return RawElement(self.dataset, index, self._records[index], self.duplicates.get(index))


def open_sources(cfg: DataConfig) -> list[RecordSource]:
    """The configured records files, in config order. Problems that concern a whole file (missing, a JSON list
    that does not decode, no records) and, with `strict`, duplicate ids are errors here, before any work."""
    if not cfg.datasets:
        raise ValueError('config.data.datasets is empty: name at least one records file')
    sources = []
    for k, (name, spec) in enumerate(cfg.datasets.items()):
        path = os.path.join(cfg.root, spec.path)
        folder = spec.image_folder or cfg.image_folder
        folder = os.path.join(cfg.root, folder) if folder else os.path.dirname(os.path.abspath(path))
        src = RecordSource(path, k, folder, check_duplicate_ids=cfg.check_duplicate_ids)
        if not len(src):
            raise ValueError(f'config.data.datasets.{name}: {path} holds no records')
        if cfg.strict and src.duplicates:
            i, first = next(iter(src.duplicates.items()))
            rid = record_id(decode_record(src[i].payload, path))
            raise duplicate_error(where_of(path, i, rid, src.info.line(i)), rid, first)
        sources.append(src)
    return sources


def image_paths(cfg: DataConfig) -> list[str]:
    """Every image the configured datasets reference (resolved, in order, once each), for the image cache.
    Records that do not parse are passed over: the pipeline reports them."""
    paths = {}
    for src in open_sources(cfg):
        for i in range(len(src)):
            try:
                rec = load_record(src[i].payload, source=src.path, index=i, image_folder=src.image_folder,
                                  check_files=False)
            except RecordError:
                continue
            paths[find_image(rec.image)] = None
    return list(paths)


def write_array_record(src: str, dst: str) -> int:
    """Copies a JSON / JSON-lines records file to ArrayRecord (one record's JSON per entry); returns the count."""
    from array_record.python.array_record_module import ArrayRecordWriter
    if not dst.endswith(ARRAY_RECORD_SUFFIX):
        raise ValueError(f'{dst}: ArrayRecord files must end in {ARRAY_RECORD_SUFFIX}')
    payloads, _ = split_records(src)
    writer = ArrayRecordWriter(dst, 'group_size:1')
    try:
        for payload in payloads:
            writer.write(payload)
    finally:
        writer.close()
    return len(payloads)


class Preprocessor:
    """`RawElement` + rng -> one example (dict of numpy arrays, variable sequence length) or `Skipped`.

    Every failure becomes a `RecordError` naming file, record and field; with `strict` it is raised, otherwise
    returned as `Skipped(reason)`. Picklable: it runs in grain's worker processes.
    """

    def __init__(self, sources: Sequence[SourceInfo], tokenizer: MedPLIBTokenizer, cfg: DataConfig,
                 shapes: ModelShapes, image_cache: Any = None):
        self.sources, self.tokenizer, self.cfg, self.shapes = sources, tokenizer, cfg, shapes
        self.image_cache = image_cache

    def __call__(self, element: RawElement | _Padding, rng: np.random.Generator) -> dict | Skipped | _Padding:
        if isinstance(element, _Padding):
            return element
        src = self.sources[element.dataset]
        try:
            return self.example(element, rng)
        except RecordError as e:
            if self.cfg.strict:
                raise
            return Skipped(element.dataset, element.index, e.reason, str(e))
        except Exception as e:  # noqa: BLE001 - a bug on one record must not lose a long run; logged in full
            where = where_of(src.path, element.index, line=src.line(element.index))
            error = RecordError(f'{where}: unexpected {type(e).__name__}: {e}', 'error')
            if self.cfg.strict:
                raise error from e
            return Skipped(element.dataset, element.index, 'error', f'{error}\n{traceback.format_exc()}')

    def example(self, element: RawElement, rng: np.random.Generator) -> dict:
        src, shapes = self.sources[element.dataset], self.shapes
        # Files are checked when they are read below, with the right reason.
        rec = load_record(element.payload, source=src.path, index=element.index, image_folder=src.image_folder,
                          line=src.line(element.index), duplicate_of=element.duplicate_of, check_files=False)
        if len(rec.masks) > shapes.max_seg:
            raise RecordError(f'{rec.where}: field conversations: {len(rec.masks)} grounding masks, more than '
                              f'config.model.medplib.max_seg={shapes.max_seg}', 'too_many_seg')
        if len(rec.regions) > shapes.max_regions:
            raise RecordError(f'{rec.where}: field conversations: {len(rec.regions)} regions, more than '
                              f'config.model.medplib.max_regions={shapes.max_regions}', 'too_many_regions')
        clip, sam, sam_size, (h, w) = self._image(rec)
        masks = [self._mask(rec, path, (h, w)) for path in rec.masks]
        prompts = [self._region_prompt(rec, k, r, (h, w)) for k, r in enumerate(rec.regions)]
        grids, region_valid = regions_to_grids(prompts, h, w, shapes.max_regions,
                                               largest_component=self.cfg.largest_component, rng=rng)
        for k in range(len(prompts)):
            if not region_valid[k]:  # the reference keeps it with every label ignored: nothing to learn from
                raise RecordError(f'{rec.where}: field <region> {k}: the region vanishes on the 24x24 grid (thinner '
                                  f'than the 14-pixel step)', 'region')
        turns = [(with_image_prefix(rec.turns[0][0]), rec.turns[0][1]), *rec.turns[1:]]
        try:
            tok = tokenize_conversation(self.tokenizer, turns, num_image_tokens=shapes.num_image_tokens,
                                        max_length=self.cfg.max_length, source=f'{rec.where}: field conversations',
                                        template=self.cfg.template)
        except SequenceTooLongError as e:
            raise RecordError(str(e), 'too_long') from None
        except ConversationError as e:
            raise RecordError(str(e)) from None
        if tok.label_mismatch:  # kept with every label ignored, as in the reference (check-data counts these rows)
            message = (f'{rec.where}: field conversations: tokenization mismatch (rounds {tok.label_mismatch[0]} vs '
                       f'{tok.label_mismatch[1]} tokens), every label ignored')
            if self.cfg.strict:
                raise RecordError(message)
            logging.warning('%s', message)
        if tok.num_seg != len(masks):  # prompts and ground truths pair by order (the reference's `model_forward`)
            raise RecordError(f'{rec.where}: field conversations: {tok.num_seg} <SEG> tokens for {len(masks)} '
                              f'<mask> references')
        if tok.num_regions != len(prompts):
            raise RecordError(f'{rec.where}: field conversations: {tok.num_regions} <region></region> slots for '
                              f'{len(prompts)} region references')
        seg_masks, mask_size = self._seg_canvas(masks, (h, w))
        return dict(input_ids=tok.input_ids, labels=tok.labels, clip_pixels=clip, sam_pixels=sam,
                    sam_size=np.asarray(sam_size, np.int32), image_size=np.asarray((h, w), np.int32),
                    region_grids=grids, region_valid=region_valid, seg_masks=seg_masks,
                    seg_valid=np.arange(shapes.max_seg) < len(masks), mask_size=np.asarray(mask_size, np.int32),
                    label_mismatch=np.bool_(bool(tok.label_mismatch)), dataset_index=np.int32(element.dataset),
                    record_index=np.int32(element.index))

    def _image(self, rec: Record) -> tuple[np.ndarray, np.ndarray, tuple[int, int], tuple[int, int]]:
        """-> normalised CLIP (336, 336, 3) and SAM (256, 256, 3) inputs, SAM's (h', w'), original (H, W)."""
        path = find_image(rec.image)
        cached = self.image_cache.get(path) if self.image_cache is not None else None
        if cached is not None:
            clip, sam, sam_size, size = cached
        else:
            try:
                image = load_image(path)
            except ImageError as e:
                raise RecordError(f'{rec.where}: field image: {e}', 'image') from None
            clip, (sam, sam_size), size = clip_canvas(image), sam_canvas(image), image.shape[:2]
        return clip_normalize(clip), sam_normalize(sam, sam_size), tuple(sam_size), tuple(size)

    def _mask(self, rec: Record, path: str, size: tuple[int, int]) -> np.ndarray:
        try:
            mask = load_mask(path, size)
        except ImageError as e:
            raise RecordError(f'{rec.where}: field <mask>: {e}', 'mask') from None
        if not mask.any():
            raise RecordError(f'{rec.where}: field <mask>: {path}: the mask is empty', 'mask')
        return mask

    def _region_prompt(self, rec: Record, k: int, region: Any, size: tuple[int, int]) -> RegionPrompt:
        """Region k as a mask prompt at the image size (points and boxes drawn, mask files loaded), errors named."""
        try:
            if region.prompt is not None:
                return RegionPrompt('mask', region.prompt.to_mask(*size))
            mask = load_mask(region.path, size)
        except (ImageError, RegionError) as e:
            raise RecordError(f'{rec.where}: field <region> {k}: {e}', 'region') from None
        if not mask.any():
            raise RecordError(f'{rec.where}: field <region> {k}: {region.path}: the free-form region is empty',
                              'region')
        return RegionPrompt('mask', mask)

    def _seg_canvas(self, masks: Sequence[np.ndarray], size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
        """Ground-truth masks at the original resolution (where the reference computes the mask losses), top-left
        in a (max_seg, C, C) canvas; an image larger than C is scaled down (nearest) to fit, and `mask_size`
        records the size the masks have in the canvas."""
        c = self.cfg.mask_canvas
        h, w = size
        scale = min(1.0, c / max(h, w))
        mh, mw = (h, w) if scale == 1.0 else (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
        out = np.zeros((self.shapes.max_seg, c, c), np.uint8)
        for k, mask in enumerate(masks):
            if (mh, mw) != (h, w):
                rows = np.minimum((np.arange(mh) * h / mh).astype(int), h - 1)
                cols = np.minimum((np.arange(mw) * w / mw).astype(int), w - 1)
                mask = mask[rows][:, cols]
            out[k, :mh, :mw] = mask
        return out, (mh, mw)


class Collator:
    """A list of examples / Skipped / padding -> one batch of `batch_size` rows with static shapes.

    Sequence length = the smallest bucket holding the longest example; pad id 0 (`<unk>`, the reference's pad),
    labels IGNORE_INDEX, `token_mask` True on real tokens. Skipped and padding rows are zeros with
    `example_valid` False; `skip_reason` is 0 for good and padding rows, 1 + REASONS.index(reason) otherwise.
    """

    def __init__(self, batch_size: int, cfg: DataConfig, shapes: ModelShapes):
        self.batch_size, self.cfg, self.shapes = batch_size, cfg, shapes

    def bucket(self, length: int) -> int:
        return next(b for b in self.cfg.length_buckets if b >= length)

    def __call__(self, elements: Sequence[Any]) -> dict[str, Any]:
        rows = list(elements) + [PADDING] * (self.batch_size - len(elements))
        examples = [e for e in rows if isinstance(e, dict)]
        t = self.bucket(max((len(e['input_ids']) for e in examples), default=1))
        b, s, r, c = self.batch_size, self.shapes.max_seg, self.shapes.max_regions, self.cfg.mask_canvas
        out = empty_batch(b, t, s, r, c)
        messages = []
        for i, row in enumerate(rows):
            if isinstance(row, dict):
                n = len(row['input_ids'])
                out['input_ids'][i, :n], out['labels'][i, :n], out['token_mask'][i, :n] = \
                    row['input_ids'], row['labels'], True
                for key in ('clip_pixels', 'sam_pixels', 'sam_size', 'image_size', 'region_grids', 'region_valid',
                            'seg_masks', 'seg_valid', 'mask_size', 'label_mismatch', 'dataset_index', 'record_index'):
                    out[key][i] = row[key]
                out['example_valid'][i] = True
            elif isinstance(row, Skipped):
                out['skip_reason'][i] = 1 + REASONS.index(row.reason)
                out['dataset_index'][i], out['record_index'][i] = row.dataset, row.index
                messages.append((row.reason, row.message))
        out[MESSAGES_KEY] = messages
        return out


class EvenShard(grain.MapDataset):
    """This process's rows of every global batch: with `block` = rows per process and batch, global batch k holds
    elements k * block * count ..., and shard `index` takes its contiguous `block` of them (`index` = 0 the first).
    Process p's rows then land on process p's devices in the order one process would hold them, so n processes
    train on exactly the global batches of one (same loss groups, same per-row randomness). Every shard has the
    same length (the ends are padding elements), so all processes run the same number of batches."""

    def __init__(self, parent: grain.MapDataset, index: int, count: int, block: int = 1):
        super().__init__(parent)
        if not 0 <= index < count:
            raise ValueError(f'shard index {index} outside 0..{count - 1}')
        self._index, self._count, self._block, self._n = index, count, block, len(parent)
        per_batch = block * count
        self._length = self._n if self._n >= sys.maxsize else -(-self._n // per_batch) * block

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._block)
        g = (batch * self._count + self._index) * self._block + row
        return self._parent[g] if g < self._n else PADDING

    def __str__(self) -> str:
        return f'EvenShard({self._index}/{self._count})'


class SkipAccounting(grain.IterDataset):
    """Main-process stage: logs each skipped record, keeps totals by reason, enforces `max_skip_fraction`."""

    def __init__(self, parent: grain.IterDataset, max_skip_fraction: float, check_after: int, num_records: int,
                 epoch_records: int | None = None):
        super().__init__(parent)
        self._max_fraction, self._check_after = max_skip_fraction, check_after
        self.num_records = num_records  # in one pass over the sources (progress bars)
        # records in one epoch of the mix (what config.data.num_epochs and the train schedule count)
        self.epoch_records = num_records if epoch_records is None else epoch_records

    def __iter__(self) -> 'DataIterator':
        return DataIterator(self._parent.__iter__(), self._max_fraction, self._check_after)


class DataIterator(grain.DatasetIterator):
    """The iterator training and evaluation use. `skipped` (totals by reason) and `records_seen` are part of the
    state, so they continue across a restore; the state round-trips through Orbax with
    `grain.checkpoint.CheckpointSave / CheckpointRestore`."""

    def __init__(self, parent: grain.DatasetIterator, max_skip_fraction: float, check_after: int):
        super().__init__(parent)
        self._max_fraction, self._check_after = max_skip_fraction, check_after
        self.skipped = {r: 0 for r in REASONS}
        self.records_seen = 0
        self.label_mismatches = 0  # kept rows whose labels are all ignored (the reference's tokenization mismatch)
        self.first_messages: dict[str, str] = {}  # the first message of each reason (diagnostics, not state)

    def __next__(self) -> dict[str, Any]:
        batch = next(self._parent)
        for reason, message in batch.pop(MESSAGES_KEY, []):
            logging.warning('skipped (%s): %s', reason, message)
            self.first_messages.setdefault(reason, message)
        codes = np.asarray(batch['skip_reason'])
        for code in codes[codes > 0]:
            self.skipped[REASONS[code - 1]] += 1
        self.records_seen += int(np.asarray(batch['example_valid']).sum()) + int((codes > 0).sum())
        self.label_mismatches += int(np.asarray(batch['label_mismatch']).sum())
        bad = sum(self.skipped.values())
        if self.records_seen >= self._check_after and bad > self._max_fraction * self.records_seen:
            top = max(self.skipped, key=self.skipped.get)
            first = self.first_messages.get(top, 'before the last restore').splitlines()[0]
            raise TooManySkipsError(f'data: {bad} of {self.records_seen} records skipped, more than config.data.'
                                    f'max_skip_fraction={self._max_fraction} (most: {top}, {self.skipped[top]}); '
                                    f'first: {first}')
        return batch

    def metrics(self) -> dict[str, int]:
        """Running totals for the training log: `data/records_seen`, `data/skipped/<reason>` and
        `data/label_mismatch` (kept rows that train nothing) (this process)."""
        return {'data/records_seen': self.records_seen, **{f'data/skipped/{r}': n for r, n in self.skipped.items()},
                'data/label_mismatch': self.label_mismatches}

    def get_state(self) -> dict[str, Any]:
        return {'parent': self._parent.get_state(), 'skipped': dict(self.skipped), 'records_seen': self.records_seen,
                'label_mismatches': self.label_mismatches}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state['parent'])
        self.skipped = {r: int(state['skipped'].get(r, 0)) for r in REASONS}
        self.records_seen = int(state['records_seen'])
        self.label_mismatches = int(state.get('label_mismatches', 0))  # absent from states saved before it existed


def skip_counts(skip_reason: np.ndarray) -> dict[str, int]:
    """A batch's `skip_reason` codes (any shape) -> {reason: count} over REASONS."""
    counts = np.bincount(np.asarray(skip_reason).ravel(), minlength=len(REASONS) + 1)
    return {r: int(counts[i + 1]) for i, r in enumerate(REASONS)}


def build_tokenizer(cfg: DataConfig, shapes: ModelShapes) -> MedPLIBTokenizer:
    """The configured tokenizer ('tiny' = the offline test tokenizer), checked against the model's ids."""
    tokenizer = tiny_tokenizer() if cfg.tokenizer == 'tiny' else load_tokenizer(cfg.tokenizer)
    ids = tokenizer.ids
    if (ids.seg, ids.vocab_size) != (shapes.seg_token_id, shapes.vocab_size):
        raise ValueError(f'config.data.tokenizer={cfg.tokenizer!r} gives <SEG> {ids.seg} and vocab {ids.vocab_size}; '
                         f'the model has seg_token_id {shapes.seg_token_id} and vocab_size {shapes.vocab_size}')
    return tokenizer


def _seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def build_dataset(cfg: DataConfig, shapes: ModelShapes, *, seed: int, train: bool = True,
                  shard: grain.sharding.ShardOptions | None = None) -> grain.IterDataset:
    """The configured datasets -> an IterDataset of this process's batches (`cfg.batch_size` is global).

    train: shuffled per dataset (reshuffled every epoch), mixed by weight, repeated `num_epochs` times (0 =
    forever). Otherwise one pass in file order (datasets concatenated), the last batch padded. `shard` defaults
    to this JAX process of all (`grain.sharding.ShardByJaxProcess`).
    """
    shard = shard or grain.sharding.ShardByJaxProcess()
    if cfg.batch_size % shard.shard_count:
        raise ValueError(f'config.data.batch_size={cfg.batch_size} is not divisible by the {shard.shard_count} '
                         f'data processes')
    tokenizer = build_tokenizer(cfg, shapes)
    names = list(cfg.datasets)
    sources = open_sources(cfg)
    parts = [grain.MapDataset.source(s) for s in sources]
    if train:
        if cfg.shuffle:
            parts = [p.shuffle(seed=_seed(seed, k)) for k, p in enumerate(parts)]
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [cfg.datasets[n].weight for n in names])
        epoch = len(ds)
        ds = ds.repeat(cfg.num_epochs or None)
    else:
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
        epoch = len(ds)
    cache = None
    if cfg.image_cache:
        from medplib_jax.data.image_cache import ImageCache
        cache = ImageCache(cfg.image_cache)
    ds = ds.random_map(Preprocessor([s.info for s in sources], tokenizer, cfg, shapes, cache),
                       seed=_seed(seed, len(names)))
    local = cfg.batch_size // shard.shard_count
    ds = EvenShard(ds, shard.shard_index, shard.shard_count, local)
    ds = ds.batch(local, drop_remainder=False, batch_fn=Collator(local, cfg, shapes))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch))
    if cfg.worker_count:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                         per_worker_buffer_size=cfg.worker_buffer_size))
    return SkipAccounting(it, cfg.max_skip_fraction, cfg.skip_check_after, sum(len(s) for s in sources), epoch)


def make_iterator(config: Mapping[str, Any], *, train: bool = True,
                  shard: grain.sharding.ShardOptions | None = None) -> DataIterator:
    """From the whole config (`config.data`, the model's shapes, `config.seed`) to a fresh iterator."""
    ds = build_dataset(DataConfig.from_config(config['data']), ModelShapes.from_config(config['model']),
                       seed=config['seed'], train=train, shard=shard)
    return iter(ds)

