"""The paper's evaluators: OmniMedVQA (Table 1: closed-set accuracy per modality and their unweighted mean),
MeCoVQA-C and -R (Table 1: open-set precision and recall, recall being the paper's accuracy; closed accuracy where
records are closed) and MeCoVQA-G (Table 2: Dice per modality, mDice, mIoU, the test and zero-shot groups).

Each is registered by kind (eval/registry.py), so `config.evals.<name> = dict(kind=..., datasets=..., ...)`
(configs/common.py `paper_evals`, fields: `EvalSettings`) schedules it in training and `medplib-jax eval` runs it on
a params directory. An evaluator owns its input: the records files (read and checked when it is built, so a bad
file fails before any training step) and a `Predictor` (infer/predict.py) over the run's model config and the
params given to `run`.

As the reference evaluates (`model/eval/vqa_infer.py`, `cal_metric.py`, `cal_metric_omniMedVQA.py`): greedy
decoding up to 1024 new tokens, one request per record (its earlier turns, then the last question); the prediction
is scored against the conversation's FIRST answer by default (`score_turn='first'`: vqa_infer.py `validate_vqa`
writes `gts_list[0][0]`, the first assistant turn, as the answers file's `gt`), against the last one's with
`score_turn='last'`; the row records which (`answer`, `answer_turn`). Grounding takes one mask per sample, from the
first generated `<SEG>` or the fallback state when there is none (`mask='always'`), against the record's first
ground-truth mask at the original size, sigmoid > 0.1, IoU 0 for a missing mask or an empty union. Prompts are built
from the conversation (never cut at the last colon as vqa_infer.py cuts its token ids); the system text is
training's unless `system='reference_eval'`.

A record the reference's scripts pass over is a counted skip (a skip row with its reason in predictions.jsonl,
counted in the report), an error only with `config.data.strict`: an `answer_type` that is neither open
(open/other/number) nor closed (yes/no/closed) (cal_metric.py's if/elif), an OmniMedVQA image without a modality
(cal_metric_omniMedVQA.py would stop with a KeyError), a record whose files cannot be read. A record of the wrong
kind for the evaluator (a grounding record in a VQA file) is an error: the configuration names the wrong file.

Processes: process p of n evaluates the p-th contiguous block of the usable records; the per-item sums (the metrics'
accumulators) and the prediction rows are gathered to every process, so the reported numbers do not depend on the
process count, and the rows come back in record order. Every score is computed from a prediction row by `add_row`,
the path `medplib-jax eval --rescore` takes too.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from medplib_jax.config_fields import known_fields
from medplib_jax.data.config import DataConfig
from medplib_jax.data.conversation import SYSTEMS
from medplib_jax.data.images import ImageError, find_image, load_image, load_mask
from medplib_jax.data.records import Record, RecordError
from medplib_jax.data.regions import RegionPrompt
from medplib_jax.data.sources import open_sources
from medplib_jax.data.tokenizer import load_tokenizer, tiny_tokenizer
from medplib_jax.eval import metrics, report
from medplib_jax.eval.config import EvalSettings
from medplib_jax.eval.registry import Evaluator, register
from medplib_jax.infer.predict import PredictError, Prediction, Predictor, Request
from medplib_jax.models.medplib import MedPLIBConfig

SCORE_TURNS = ('first', 'last')
QA_CONFLICTS = ('first', 'error')
_SHARED_SETTINGS = ('datasets', 'max_records', 'batch_size', 'max_new_tokens', 'system', 'every', 'score_turn')
_DEFAULTS = EvalSettings()


class SkipRecord(ValueError):
    """A record an evaluator passes over as the reference's scripts do, counted under `reason`."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _tokenizer(source: str, where: str):
    if not source:
        raise ValueError(f'{where}: no tokenizer: set config.data.tokenizer (a LLaMA tokenizer folder, or tiny)')
    return tiny_tokenizer() if source == 'tiny' else load_tokenizer(source)


def _local_params(params: Any) -> Any:
    """Parameters every process can use alone: with several processes, arrays sharded across them are gathered
    (each process then holds the whole tree; it predicts its own records, which share no program with the others)."""
    leaves = jax.tree.leaves(params)
    if all(getattr(x, 'is_fully_addressable', True) for x in leaves):
        return params
    from jax.experimental import multihost_utils
    return jax.device_put(multihost_utils.process_allgather(params, tiled=True), jax.local_devices()[0])


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-able `value`, in process order (one process: `[value]`)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(value).encode('utf-8'), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    everything = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bytes(everything[p, :sizes[p]]).decode('utf-8')) for p in range(len(sizes))]


def shard_bounds(count: int, index: int, shards: int) -> tuple[int, int]:
    """Process `index`'s contiguous block of `count` items (the first blocks one longer when it does not divide)."""
    base, extra = divmod(count, shards)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


@dataclasses.dataclass
class ShardResult:
    """One shard's evaluation: the metric sums, the prediction rows (record order), a row per skipped record
    (`skipped`: the reason, `error`: the message), and the kept samples (the `keep` first ones: image, masks,
    routing) for pictures."""
    scores: metrics.MetricSums
    rows: list[dict[str, Any]]
    skips: list[dict[str, Any]]
    kept: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class RecordsEvaluator(Evaluator):
    """What the paper's evaluators share: records, requests, the predictor, shards, gathering. Subclasses say how a
    record is checked and described (`describe`), which mask mode they decode with, and how a row is scored."""
    kind = ''  # the registered kind, written into every prediction row
    mask_mode = 'never'
    own_settings: tuple[str, ...] = ()

    def __init__(self, name: str, settings: Mapping[str, Any], context):
        super().__init__(name, settings, context)
        section = f'config.evals.{name}'
        s = EvalSettings(**known_fields(EvalSettings, self.settings, section))
        for field in dataclasses.fields(EvalSettings):
            if field.name not in _SHARED_SETTINGS + self.own_settings and \
                    getattr(s, field.name) != getattr(_DEFAULTS, field.name):
                raise ValueError(f'{section}.{field.name}: not a setting of kind {self.kind!r}')
        if s.system not in SYSTEMS:
            raise ValueError(f'{section}.system={s.system!r}; known: {sorted(SYSTEMS)}')
        if s.score_turn not in SCORE_TURNS:
            raise ValueError(f'{section}.score_turn={s.score_turn!r}; known: {", ".join(SCORE_TURNS)}')
        if s.batch_size < 1 or s.max_new_tokens < 1 or s.max_records < 0:
            raise ValueError(f'{section}: batch_size and max_new_tokens must be positive, max_records >= 0')
        if not s.datasets:
            raise ValueError(f'{section}.datasets: name at least one records file (configs/common.py dataset(...))')
        self.s = s
        config = context.config
        data = dict(config.data)
        data['datasets'] = {k: dict(v) for k, v in dict(s.datasets).items()}
        self.data = DataConfig.from_config(data)
        self.files: tuple[str, ...] = ()  # the records files read (set by _read_records)
        self.records, self.skips = self._read_records()
        model_cfg = config.model.to_dict() if hasattr(config.model, 'to_dict') else dict(config.model)
        self.mcfg = MedPLIBConfig.from_model_config(model_cfg)
        self.predictor = Predictor(self.mcfg, None, _tokenizer(self.data.tokenizer, section),
                                   max_new_tokens=s.max_new_tokens, system=s.system,
                                   largest_component=self.data.largest_component)
        self.keep = 0  # the first `keep` samples of process 0 keep their image, masks and routing (pictures)
        self.progress = False  # a tqdm bar over this process's records
        self.last: ShardResult | None = None  # the last `run`'s gathered result (rows of every process)

    # ----------------------------------------------------------------------------------------------------------
    def _read_records(self) -> tuple[list[Record], list[dict[str, Any]]]:
        """Every record of the datasets in order (the first `max_records`), parsed and checked now: a file that is
        missing or holds no records is an error; a bad record, or one the reference's scripts pass over
        (`SkipRecord` from `describe`), is skipped and counted (an error with `config.data.strict`); a record of the
        wrong kind for this evaluator is an error naming it."""
        records, skips = [], []
        sources = open_sources(self.data, keep_decoded=True)  # each record decoded once, here
        self.files = tuple(src.path for src in sources)
        for src in sources:
            for i in range(len(src)):
                if self.s.max_records and len(records) + len(skips) >= self.s.max_records:
                    return records, skips
                try:
                    record = src.record(i)
                    self.describe(record)  # SkipRecord, or ValueError for a record of the wrong kind
                except (RecordError, SkipRecord) as e:
                    if self.data.strict:
                        raise
                    skips.append(self._skip(e, src.path))
                    continue
                records.append(record)
        return records, skips

    def _skip(self, error: RecordError | SkipRecord, records_file: str) -> dict[str, Any]:
        """A skip row of predictions.jsonl: `skipped` is the reason, `error` the one-line message."""
        message = str(error).splitlines()[0]
        self.context.log(f'eval {self.name}: skipped {message}')
        return {'evaluator': self.name, 'kind': self.kind, 'records_file': records_file, 'skipped': error.reason,
                'error': message}

    def describe(self, record: Record) -> dict[str, Any]:
        """The row fields a record gives besides the prediction (`answer_type`, `modality`, ...); raises ValueError
        naming the record when this evaluator cannot score it."""
        raise NotImplementedError

    @classmethod
    def new_scores(cls, files: Sequence[str] = ()) -> metrics.MetricSums:
        """An empty accumulator for the records `files` (grounding: the paper's groups only on its records)."""
        raise NotImplementedError

    @classmethod
    def add_row(cls, scores: metrics.MetricSums, row: Mapping[str, Any]) -> None:
        """Adds one prediction row to the sums (live evaluation and `--rescore` alike)."""
        raise NotImplementedError

    @classmethod
    def score_rows(cls, rows: Iterable[Mapping[str, Any]]) -> metrics.MetricSums:
        rows = list(rows)
        scores = cls.new_scores(tuple(dict.fromkeys(r['records_file'] for r in rows if r.get('records_file'))))
        for row in rows:
            cls.add_row(scores, row)
        return scores

    @staticmethod
    def report(scores: metrics.MetricSums, skips: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The metrics `run` returns: the accumulator's numbers and the number of skipped records (plain floats; a
        mean over nothing is `metrics.NA`)."""
        return {**scores.to_dict(), 'skipped': float(len(skips))}

    # ----------------------------------------------------------------------------------------------------------
    def run(self, params: Any) -> dict[str, float]:
        """This process's block of the records, gathered over processes -> the metrics (rows in `self.last`)."""
        mine = self.evaluate_shard(params, jax.process_index(), jax.process_count())
        parts = allgather_json({'scores': mine.scores.state_dict(), 'rows': mine.rows, 'skips': mine.skips})
        scores = sum(type(mine.scores).from_state_dict(p['scores']) for p in parts)
        if isinstance(scores, metrics.SegScores):
            scores.groups = mine.scores.groups
        # the records files' own skips (found alike by every process), then those found while predicting
        skips = self.skips + [s for p in parts for s in p['skips']]
        self.last = ShardResult(scores, [r for p in parts for r in p['rows']], skips, mine.kept)
        return self.report(scores, skips)

    def evaluate_shard(self, params: Any, index: int, count: int) -> ShardResult:
        """Block `index` of `count` of the records -> its sums and rows (skips: only those found while predicting;
        the records files' own are in `self.skips`)."""
        start, stop = shard_bounds(len(self.records), index, count)
        records = self.records[start:stop]
        self.predictor.params = _local_params(params)
        scores, rows, skips, kept = self.new_scores(self.files), [], [], []
        routing = bool(self.mcfg.llm.moe_layers)
        from tqdm import tqdm
        bar = tqdm(total=len(records), desc=f'eval {self.name}', unit='record', dynamic_ncols=True,
                   disable=not self.progress or jax.process_index() != 0)
        # Prompts decode one shard at a time, not sharded over the training mesh: no logical constraints here.
        with nn.logical_axis_rules(()):
            for b in range(0, len(records), self.s.batch_size):
                batch = records[b:b + self.s.batch_size]
                keep = index == 0 and start + b < self.keep
                for record, item in zip(batch, self._predict(batch, skips, routing=keep and routing)):
                    if item is None:
                        continue
                    image, truth, prediction = item
                    row = self.row(record, prediction, truth)
                    self.add_row(scores, row)
                    rows.append(row)
                    if keep and len(kept) < self.keep:
                        kept.append(dict(row=row, image=image, truth=truth, mask=prediction.mask,
                                         tokens=prediction.tokens, routing=prediction.routing))
                bar.update(len(batch))
        bar.close()
        return ShardResult(scores, rows, skips, kept)

    def _request(self, record: Record) -> tuple[Request, np.ndarray, np.ndarray | None]:
        """The record as a request (earlier turns, the last question, its regions), its image and its first
        ground-truth mask; a file that cannot be read is a RecordError naming the record."""
        def read(reason, fn, *args):
            try:
                return fn(*args)
            except ImageError as e:
                raise RecordError(f'{record.where}: {e}', reason) from None
        image = read('image', load_image, find_image(record.image))
        size = image.shape[:2]
        regions = [RegionPrompt('mask', read('region', load_mask, r.path, size)) if r.path else r.prompt
                   for r in record.regions]
        truth = read('mask', load_mask, record.masks[0], size) if record.masks else None
        return Request(image, record.turns[-1][0], regions, record.turns[:-1]), image, truth

    def _predict(self, batch: Sequence[Record], skips: list[dict[str, Any]], routing: bool
                 ) -> list[tuple[np.ndarray, np.ndarray | None, Prediction] | None]:
        """Predictions for a batch (None for a record whose image, masks or regions cannot be used: skipped)."""
        prepared = []
        for record in batch:
            try:
                prepared.append(self._request(record))
            except RecordError as e:
                if self.data.strict:
                    raise
                skips.append(self._skip(e, record.source))
                prepared.append(None)
        good = [(p, r) for p, r in zip(prepared, batch) if p is not None]
        if not good:
            return prepared
        try:
            answers = iter(self.predictor.predict_batch([p[0] for p, _ in good], mask=self.mask_mode,
                                                        routing=routing))
        except PredictError:  # a request that does not fit: answer the others one at a time
            answers = iter(self._one_by_one(good, skips, routing))
        out = []
        for p in prepared:
            answer = next(answers) if p is not None else None
            out.append(None if p is None or answer is None else (p[1], p[2], answer))
        return out

    def _one_by_one(self, good: Sequence[tuple[tuple, Record]], skips: list[dict[str, Any]], routing: bool
                    ) -> list[Prediction | None]:
        out = []
        for (request, _, _), record in good:
            try:
                out.append(self.predictor.predict_batch([request], mask=self.mask_mode, routing=routing)[0])
            except PredictError as e:
                if self.data.strict:
                    raise
                skips.append(self._skip(RecordError(f'{record.where}: {e}', 'region'), record.source))
                out.append(None)
        return out

    def answer_turn(self, record: Record) -> int:
        """The turn whose answer the prediction is scored against (`score_turn`)."""
        return 0 if self.s.score_turn == 'first' else len(record.turns) - 1

    def row(self, record: Record, prediction: Prediction, truth: np.ndarray | None) -> dict[str, Any]:
        """One prediction row of predictions.jsonl: enough to re-score without generating again. `question` is the
        question asked (the last turn's), `answer` the one scored (turn `answer_turn`, 0-based)."""
        turn = self.answer_turn(record)
        return {'evaluator': self.name, 'kind': self.kind, 'question_id': record.id or record.where,
                'records_file': record.source, 'image': record.image, 'question': record.turns[-1][0],
                'answer': record.turns[turn][1], 'answer_turn': turn, 'prediction': prediction.text,
                **self.describe(record)}


class _VQAEvaluator(RecordsEvaluator):
    """MeCoVQA-C / -R: cal_metric.py over the answers (`VQAScores`: open-set precision / recall / F1 / BLEU,
    closed accuracy), routed by each record's answer type; a type that is neither is skipped, as cal_metric.py
    passes it over, and counted (reason `answer_type`)."""
    own_settings = ('answer_type',)

    def __init__(self, name, settings, context):
        answer_type = dict(settings).get('answer_type', '')
        if answer_type:  # one type for every record: a typo would skip them all, so it is an error here
            try:
                metrics.answer_kind(answer_type)
            except ValueError as e:
                raise ValueError(f'config.evals.{name}.answer_type: {e}') from None
        super().__init__(name, settings, context)

    def describe(self, record: Record) -> dict[str, Any]:
        if record.masks:
            raise ValueError(f'{record.where}: field conversations: a grounding record (<mask>) in the VQA '
                             f'evaluator {self.name!r}')
        answer_type = self.s.answer_type or record.answer_type or 'open'
        try:
            metrics.answer_kind(answer_type)
        except ValueError as e:
            raise SkipRecord(f'{record.where}: field answer_type: {e} (cal_metric.py skips it)', 'answer_type') \
                from None
        return {'answer_type': answer_type, 'modality': metrics.seg_modality(record.image)}

    @classmethod
    def new_scores(cls, files: Sequence[str] = ()) -> metrics.VQAScores:
        return metrics.VQAScores()

    @classmethod
    def add_row(cls, scores, row):
        scores.add_item(row['prediction'], row['answer'], row['answer_type'])


@register('mecovqa_c')
class MeCoVQAComplex(_VQAEvaluator):
    """MeCoVQA-C (complex VQA): Table 1's precision and recall."""
    kind = 'mecovqa_c'


@register('mecovqa_r')
class MeCoVQARegion(_VQAEvaluator):
    """MeCoVQA-R (region VQA): region prompts from the records (`<region>` mask files, or box / point)."""
    kind = 'mecovqa_r'


@register('omnimedvqa')
class OmniMedVQA(RecordsEvaluator):
    """OmniMedVQA: closed-set accuracy per `modality_type` and their unweighted mean (cal_metric_omniMedVQA.py:
    every item scored by exact text after normalisation; no option-letter extraction)."""
    kind = 'omnimedvqa'
    own_settings = ('qa_information', 'qa_conflicts')

    def __init__(self, name, settings, context):
        self._modalities = None
        given = dict(settings)
        qa, conflicts = given.get('qa_information', ''), given.get('qa_conflicts', _DEFAULTS.qa_conflicts)
        section = f'config.evals.{name}'
        if conflicts not in QA_CONFLICTS:
            raise ValueError(f'{section}.qa_conflicts={conflicts!r}; known: {", ".join(QA_CONFLICTS)}')
        if qa:
            self._modalities = qa_modalities(qa, f'{section}.qa_information', conflicts=conflicts)
        elif conflicts != _DEFAULTS.qa_conflicts:
            raise ValueError(f'{section}.qa_conflicts: applies to qa_information, which is not set')
        super().__init__(name, settings, context)

    def describe(self, record: Record) -> dict[str, Any]:
        if self._modalities is not None:
            key = metrics.omnimedvqa_image_key(record.image)
            modality = self._modalities.get(key)
            if modality is None:  # cal_metric_omniMedVQA.py: `name_type_dict[relat_img_path]` raises KeyError
                raise SkipRecord(f'{record.where}: field image: {key!r} has no modality_type in the QA_information '
                                 f'files', 'modality')
        else:
            modality = record.modality_type
            if not modality:
                raise SkipRecord(f'{record.where}: field modality_type: missing (config.evals.{self.name}.'
                                 f'qa_information looks it up)', 'modality')
        return {'answer_type': 'closed', 'modality': modality}

    @classmethod
    def new_scores(cls, files: Sequence[str] = ()) -> metrics.OmniMedVQAScores:
        return metrics.OmniMedVQAScores()

    @classmethod
    def add_row(cls, scores, row):
        scores.add_item(row['prediction'], row['answer'], row['modality'])


def _json_files(folder: str) -> list[str]:
    """Every *.json under `folder`, subfolders included, in os.walk's top-down order with names sorted (the
    reference walks in directory-listing order, which the file system decides; sorted is the same on every
    machine)."""
    out = []
    for sub, dirs, files in os.walk(folder):
        dirs.sort()
        out += [os.path.join(sub, f) for f in sorted(files) if f.endswith('.json')]
    return out


def qa_modalities(folder: str, field: str = 'qa_information', conflicts: str = 'first') -> dict[str, str]:
    """OmniMedVQA's QA_information/Open-access folder -> {image_path: modality_type}, as cal_metric_omniMedVQA.py
    `get_name_type` builds it: every JSON file under the folder (subfolders too), entries without `modality_type`
    passed over, an image listed more than once keeping its first entry's modality. `conflicts='error'`: one image
    with two different modality_types is an error naming both files (same-modality repeats are fine)."""
    if conflicts not in QA_CONFLICTS:
        raise ValueError(f'{field}: conflicts={conflicts!r}; known: {", ".join(QA_CONFLICTS)}')
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'{field}: {folder}: folder not found')
    files = _json_files(folder)
    if not files:
        raise FileNotFoundError(f'{field}: {folder}: no QA_information JSON files (subfolders included)')
    out: dict[str, str] = {}
    first_file: dict[str, str] = {}
    for path in files:
        try:
            with open(path) as f:
                entries = json.load(f)
            if not isinstance(entries, list):
                raise TypeError(f'expected a JSON list of entries, got {type(entries).__name__}')
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f'{path}: not an OmniMedVQA QA_information file ({type(e).__name__}: {e})') from None
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ValueError(f'{path}[{i}]: not an OmniMedVQA QA_information entry (a {type(entry).__name__})')
            if 'modality_type' not in entry:
                continue
            if 'image_path' not in entry:
                raise ValueError(f'{path}[{i}]: field image_path: missing')
            image, modality = entry['image_path'], entry['modality_type']
            if image not in out:
                out[image], first_file[image] = modality, path
            elif conflicts == 'error' and out[image] != modality:
                raise ValueError(f'{path}[{i}]: field modality_type: {image!r} is {modality!r} here but '
                                 f'{out[image]!r} in {first_file[image]} ({field} conflicts=error)')
    return out


@register('mecovqa_g')
class MeCoVQAGrounding(RecordsEvaluator):
    """MeCoVQA-G: one mask per sample (the first `<SEG>`'s state, else the reference's fallback state) against the
    record's first ground-truth mask; IoU and Dice per modality (file-name prefix), mDice / mIoU, Table 2's groups
    (`SegScores`)."""
    kind = 'mecovqa_g'
    mask_mode = 'always'

    def describe(self, record: Record) -> dict[str, Any]:
        if not record.masks:
            raise ValueError(f'{record.where}: field conversations: no <mask> (the grounding evaluator '
                             f'{self.name!r} needs grounding records)')
        return {'answer_type': 'grounding', 'modality': metrics.seg_modality(record.image), 'mask': record.masks[0]}

    def row(self, record, prediction, truth):
        iou = metrics.mask_iou(prediction.mask, truth)
        return {**super().row(record, prediction, truth), 'has_seg': prediction.has_seg, 'iou': iou,
                'dice': metrics.dice_from_iou(iou)}

    @classmethod
    def new_scores(cls, files: Sequence[str] = ()) -> metrics.SegScores:
        """Table 2's test / zero-shot groups only on the paper's records (report.paper_records): elsewhere, e.g. on
        the synthetic demo data, every modality may have been trained on, so no group is "zero-shot"."""
        return metrics.SegScores(None if report.paper_records(cls.kind, files) else {})

    @classmethod
    def add_row(cls, scores, row):
        scores.add_iou(row['iou'], row['modality'])


# The paper's evaluators by kind (Table 1: omnimedvqa, mecovqa_c, mecovqa_r; Table 2: mecovqa_g).
KINDS: dict[str, type[RecordsEvaluator]] = {cls.kind: cls for cls in (OmniMedVQA, MeCoVQAComplex, MeCoVQARegion,
                                                                      MeCoVQAGrounding)}
