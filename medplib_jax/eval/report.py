"""What `medplib-jax eval` writes: `report.md` (tables laid out as the paper's Table 1 and Table 2, the paper's
MedPLIB row beside this checkpoint's on the paper's records only, the definition of every metric shown),
`metrics.json`, `predictions.jsonl` (one row per scored record and one per skipped record: enough to re-score
without generating again, `rescore`), overlay pictures of grounding samples and routing pictures of a MoE model's
answers. Pure Python / NumPy / Pillow.

Honest reports:
- Synthetic results say so at the top, with `constants.DEMO_NOTICE`: records under a folder `make-demo-data` wrote
  (`data.synthetic.is_synthetic` on the records file's folder or a folder above it), or a checkpoint whose
  metadata has `synthetic_data` (`checkpoint.params_meta`; for `--rescore`, what the eval's metrics.json said).
- The paper's numbers (PAPER_TABLE1 / PAPER_TABLE2) and its test / zero-shot split are shown only beside results on
  the paper's records (`paper_records`, rule in PAPER_RECORDS_RULE, printed in the report).
- A metric with nothing behind it (a mean over zero items, `metrics.NA`) is n/a in report.md and null in
  metrics.json: the key stays, so every run's metrics.json has the same keys for the same kinds of records, and a
  reader cannot take it for a score of 0.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medplib_jax.constants import DEMO_NOTICE, MASK_THRESHOLD
from medplib_jax.eval.config import REFERENCE_TEST_FILES
from medplib_jax.eval.metrics import PAPER_SEG_GROUPS, is_na

# Table 1's OmniMedVQA columns and how a `modality_type` is matched to one (lower-case prefixes; OmniMedVQA writes
# e.g. "CT(Computed Tomography)", "Fundus Photography" [verify against the release]); others get their own column.
OMNI_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ('CT', ('ct', 'computed')), ('MR', ('mr', 'magnetic')), ('OCT', ('oct', 'optical')), ('Der', ('derm',)),
    ('MIC', ('micro',)), ('X-Ray', ('x-ray', 'x_ray', 'xray', 'x ray')), ('FP', ('fundus',)), ('US', ('ultra',)))
# Table 2's column label of each `seg_modality`, in PAPER_SEG_GROUPS' (the paper's) order.
SEG_LABELS = {'dermoscopy': 'Der', 'ct': 'CT', 'pet': 'PET', 'x': 'X-Ray', 'endoscopy': 'End', 'mr': 'MR',
              'ultrasound': 'US', 'fundus': 'FP'}
# The paper's MedPLIB rows (medplib_paper.txt, Tables 1 and 2), printed beside this checkpoint's for scale.
PAPER_TABLE1 = {'CT': 62.70, 'MR': 66.97, 'OCT': 75.05, 'Der': 51.47, 'MIC': 64.40, 'X-Ray': 60.25, 'FP': 65.04,
                'US': 38.75, 'Mean': 60.58, 'C precision': 58.49, 'C recall': 49.41, 'R precision': 64.92,
                'R recall': 63.84}
PAPER_TABLE2 = {'Der': 79.90, 'CT': 59.83, 'PET': 64.59, 'mecovqa_g': 68.11, 'X-Ray': 28.25, 'End': 44.19,
                'MR': 27.52, 'US': 35.64, 'FP': 25.76, 'zero_shot': 32.27}
NA_TEXT = 'n/a'
PAPER_RECORDS_RULE = (
    "The paper's MedPLIB numbers and Table 2's test / zero-shot split are shown only beside an evaluator whose "
    "records are the paper's: every records file it read is named as the reference's test file for its kind "
    "(`REFERENCE_TEST_FILES`, or a released `_rand<N>` subset of it) and none lies under "
    "a folder written by `make-demo-data`. On other records (the synthetic demo split above all, whose modalities "
    "the demo model trained on) the paper's figures measure something else and no modality is zero-shot.")


def synthetic_folder(path: str) -> str | None:
    """The folder written by `make-demo-data` that holds `path` (its own folder or one above), else None."""
    from medplib_jax.data.synthetic import is_synthetic  # lazy: keeps this module free of the data stack
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        if is_synthetic(folder):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def paper_records(kind: str, files: Sequence[str]) -> bool:
    """Whether an evaluator of `kind` reading the records `files` reads the paper's records (PAPER_RECORDS_RULE):
    each file named as the reference's test file of that kind, or its `_rand<N>` subset, and none synthetic. No
    files (e.g. a predictions file written before rows named theirs) -> False."""
    name = REFERENCE_TEST_FILES.get(kind)
    if not name or not files:
        return False
    stem, ext = os.path.splitext(name)
    pattern = re.compile(re.escape(stem) + r'(_rand\d+)?' + re.escape(ext))
    return all(pattern.fullmatch(os.path.basename(f)) and synthetic_folder(f) is None for f in files)


def checkpoint_synthetic(checkpoint: str) -> bool:
    """Whether a params directory's metadata says its weights were trained on synthetic data (`synthetic_data`);
    False for anything else (a missing directory, no metadata, a `--rescore` label)."""
    if not os.path.isdir(checkpoint):
        return False
    from medplib_jax.checkpoint import params_meta  # lazy: the checkpoint module loads JAX and orbax
    try:
        return bool(params_meta(checkpoint).get('synthetic_data'))
    except FileNotFoundError:
        return False


@dataclasses.dataclass
class EvalResult:
    """One evaluator's outcome: its metrics (as `run` returned them), prediction rows, skipped-record rows, the
    records files it read, the kept samples for pictures, and whether its weights were trained on synthetic data
    when the checkpoint cannot say (None: read the checkpoint's metadata; `rescore` sets it from the eval's
    metrics.json)."""
    name: str
    kind: str
    metrics: dict[str, float]
    rows: list[dict[str, Any]]
    skips: list[dict[str, Any]]
    files: tuple[str, ...] = ()
    kept: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    synthetic_weights: bool | None = None

    def records_files(self) -> tuple[str, ...]:
        """The records files read: those given, else (a rescore) those the rows name."""
        named = (r.get('records_file') for r in [*self.rows, *self.skips])
        return tuple(dict.fromkeys([*self.files, *(f for f in named if f)]))


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where the reported numbers come from: the make-demo-data folders among the records' folders, whether the
    weights were trained on synthetic data, and, per evaluator, whether its records are the paper's."""
    synthetic_records: tuple[str, ...]
    synthetic_weights: bool
    paper: Mapping[str, bool]

    @property
    def synthetic(self) -> bool:
        return bool(self.synthetic_records) or self.synthetic_weights

    def to_json(self) -> dict[str, Any]:
        return {'synthetic_records': list(self.synthetic_records), 'synthetic_weights': self.synthetic_weights,
                'paper_records': dict(self.paper), 'paper_records_rule': PAPER_RECORDS_RULE}


def provenance(results: Sequence[EvalResult], checkpoint: str) -> Provenance:
    folders = (synthetic_folder(f) for r in results for f in r.records_files())
    given = [r.synthetic_weights for r in results if r.synthetic_weights is not None]
    weights = any(given) if given else checkpoint_synthetic(checkpoint)
    return Provenance(tuple(dict.fromkeys(f for f in folders if f)), weights,
                      {r.name: paper_records(r.kind, r.records_files()) for r in results})


def format_value(value: float | None, digits: int = 2) -> str:
    """A reported metric as text: 'n/a' where nothing is behind it."""
    return NA_TEXT if is_na(value) else f'{value:.{digits}f}'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return lines + ['| ' + ' | '.join(r) + ' |' for r in rows]


def omni_column(modality: str) -> str | None:
    m = modality.lower()
    return next((label for label, prefixes in OMNI_COLUMNS if m.startswith(prefixes)), None)


def _first(results: Sequence[EvalResult], kind: str) -> EvalResult | None:
    return next((r for r in results if r.kind == kind), None)


def table1(results: Sequence[EvalResult], prov: Provenance) -> list[str]:
    """Table 1: OmniMedVQA accuracy per modality and the mean, MeCoVQA-C and -R precision / recall (x100); the
    paper's row only when every one of them present reads the paper's records."""
    omni, c, r = (_first(results, k) for k in ('omnimedvqa', 'mecovqa_c', 'mecovqa_r'))
    present = [x for x in (omni, c, r) if x]
    if not present:
        return []
    paper = all(prov.paper.get(x.name) for x in present)
    ours: dict[str, float] = {}
    extra: list[str] = []
    if omni:
        for key, value in omni.metrics.items():
            if key.startswith('accuracy/'):
                modality = key[len('accuracy/'):]
                column = omni_column(modality)
                if column is None or column in ours:
                    column = modality
                    extra.append(modality)
                ours[column] = value
        ours['Mean'] = omni.metrics['mean_accuracy']
    for label, res in (('C', c), ('R', r)):
        if res:
            ours[f'{label} precision'] = res.metrics['open/precision']
            ours[f'{label} recall'] = res.metrics['open/recall']
    modality_columns = [label for label, _ in OMNI_COLUMNS if paper or label in ours] + extra
    columns = modality_columns + ['Mean', 'C precision', 'C recall', 'R precision', 'R recall']
    header = ['model', *columns[:-4], 'C P', 'C R', 'R P', 'R R']
    lines = ['## Table 1: VQA', '',
             'OmniMedVQA (modalities .. Mean): closed-set accuracy per modality and their unweighted mean (over the '
             'modalities present); MeCoVQA-C (C) and -R (R): open-set precision (P) and recall (R, the paper\'s '
             f'accuracy). x100; {NA_TEXT}: nothing to average (no such records).', '']
    if not paper:
        lines += ['Not the paper\'s records: the paper\'s numbers are left out (see "Where the numbers come from").',
                  '']
    rows = [['MedPLIB (paper)', *[format_value(PAPER_TABLE1.get(c)) for c in columns]]] if paper else []
    lines += _table(header, rows + [['this checkpoint', *[format_value(ours.get(c)) for c in columns]]])
    for label, res in (('MeCoVQA-C', c), ('MeCoVQA-R', r)):
        if res and res.metrics.get('closed/count'):
            lines += ['', f'{label} closed records: accuracy {format_value(res.metrics["closed/accuracy"])} over '
                          f'{int(res.metrics["closed/count"])}.']
    return lines + ['']


def table2(results: Sequence[EvalResult], prov: Provenance) -> list[str]:
    """Table 2: MeCoVQA-G Dice per modality; on the paper's records its test modalities' mean, the zero-shot ones'
    and the paper's row, elsewhere the modalities present only (x100)."""
    g = _first(results, 'mecovqa_g')
    if not g:
        return []
    paper = bool(prov.paper.get(g.name))
    grouped = {m for ms in PAPER_SEG_GROUPS.values() for m in ms}
    present = sorted(k[len('dice/'):] for k in g.metrics if k.startswith('dice/'))
    lines = ['## Table 2: MeCoVQA-G (Dice)', '']
    if paper:
        columns: list[tuple[str, str]] = []  # (label, metric key)
        for group, modalities in PAPER_SEG_GROUPS.items():
            columns += [(SEG_LABELS.get(m, m), f'dice/{m}') for m in modalities] + [('Mean', f'{group}/mdice')]
        values = [PAPER_TABLE2.get(label if not key.endswith('/mdice') else key.split('/')[0])
                  for label, key in columns]
        n_test = len(PAPER_SEG_GROUPS['mecovqa_g']) + 1
        header = ['model', *[f'test {label}' if i < n_test else f'zero-shot {label}' for i, (label, _) in
                             enumerate(columns)]]
        lines += ['Dice per modality (file-name prefix), the MeCoVQA-G test modalities (Der, CT, PET) and the '
                  'zero-shot ones (X-Ray, End, MR, US, FP) with their unweighted means over the modalities present. '
                  f'x100; {NA_TEXT}: no such records.', '']
        lines += _table(header, [['MedPLIB (paper)', *map(format_value, values)],
                                 ['this checkpoint', *[format_value(g.metrics.get(key)) for _, key in columns]]])
        others = [m for m in present if m not in grouped]
    else:
        lines += ['Dice per modality (file-name prefix) over the modalities present, x100. Not the paper\'s records: '
                  'the paper\'s numbers and its split of the modalities are left out (see "Where the numbers come '
                  'from").', '']
        lines += _table(['model', *[SEG_LABELS.get(m, m) for m in present]],
                        [['this checkpoint', *[format_value(g.metrics[f'dice/{m}']) for m in present]]])
        others = []
    lines += ['', f'All {int(g.metrics["count"])} samples: mDice {format_value(g.metrics["mdice"])}, mIoU '
              f'{format_value(g.metrics["miou"])}' + ('; modalities outside the paper\'s columns: ' + ', '.join(
                  f'{m} {format_value(g.metrics[f"dice/{m}"])}' for m in others) if others else '') + '.', '']
    return lines


# Each metric a report can show: (metric key or pattern, the kinds that report it, its definition). PAPER_ONLY: the
# terms shown only beside the paper's records.
PAPER_ONLY = ('mecovqa_g/*, zero_shot/*',)
DEFINITIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ('answer', ('mecovqa_c', 'mecovqa_r', 'omnimedvqa'),
     "the reference answer scored: by default the conversation's first assistant answer, as vqa_infer.py writes "
     "it (`score_turn='first'`; `'last'`: the answer to the question asked); predictions.jsonl's `answer` and "
     "`answer_turn`. Both sides are normalised first (lower case, glossary.py `normalize_word`: punctuation, "
     "periods, number words, articles, contractions)."),
    ('open/precision', ('mecovqa_c', 'mecovqa_r'),
     'per open item (answer_type open / other / number), tp / (tp + fp) over word counts: tp = how often the '
     "prediction's words that the answer also has occur in the prediction, fp = the prediction's other words; "
     'then the mean over open items (evaluate_metrics.py `calculate_f1score`).'),
    ('open/recall', ('mecovqa_c', 'mecovqa_r'),
     "per open item tp / (tp + fn), fn = the answer's words the prediction lacks; mean over open items. The "
     "paper's accuracy for MeCoVQA-C / -R."),
    ('open/f1', ('mecovqa_c', 'mecovqa_r'), 'per open item 2 P R / (P + R) (0 when nothing is shared); the mean.'),
    ('open/exact_match', ('mecovqa_c', 'mecovqa_r'),
     'not an exact match: per open item, the number of distinct answer words found in the prediction over the '
     "prediction's token count (evaluate_metrics.py `calculate_exactmatch`); the mean."),
    ('open/bleu', ('mecovqa_c', 'mecovqa_r'),
     "nltk `sentence_bleu` of the prediction's words against the answer's: cumulative 4-gram BLEU, no smoothing; "
     'the mean over open items.'),
    ('open/bleu_n', ('mecovqa_c', 'mecovqa_r'),
     'n = 1, 2, 3: the same with the n-gram precision alone (weights one-hot at n, not cumulative), brevity '
     'penalty included (cal_metric.py `bleu_score_1..3`).'),
    ('closed/accuracy', ('mecovqa_c', 'mecovqa_r'),
     'closed items (answer_type yes/no or closed): the share whose normalised prediction equals the normalised '
     'answer exactly (no yes/no or option-letter extraction).'),
    ('open/count, closed/count', ('mecovqa_c', 'mecovqa_r'), 'the number of open and closed items scored.'),
    ('accuracy/<modality>', ('omnimedvqa',),
     "closed accuracy (as closed/accuracy) over OmniMedVQA's items of that `modality_type` (the record's, or "
     "the QA_information files' as cal_metric_omniMedVQA.py looks it up)."),
    ('mean_accuracy', ('omnimedvqa',),
     "the unweighted mean of accuracy/<modality> over the modalities present (Table 1's Mean)."),
    ('count, count/<modality>', ('omnimedvqa', 'mecovqa_g'), 'the number of items scored, all and per modality.'),
    ('IoU, Dice', ('mecovqa_g',),
     f'per sample: IoU = |P and G| / |P or G| with P = sigmoid(mask logits) > {MASK_THRESHOLD} (the first '
     "`<SEG>`'s mask, or the fallback state's when none is generated) and G the record's first ground-truth mask, "
     'at the original size; 0 for an empty union or no mask. Dice = 2 IoU / (1 + IoU) (vqa_infer.py '
     '`validate_seg`).'),
    ('miou, mdice', ('mecovqa_g',), 'the means of IoU and Dice over all samples (mIoU, mDice).'),
    ('iou/<modality>, dice/<modality>', ('mecovqa_g',),
     "the means over the samples of one modality: the image file name's text before its first `_` (SA-Med2D "
     'naming; `x_ray...` -> `x`).'),
    ('mecovqa_g/*, zero_shot/*', ('mecovqa_g',),
     "on the paper's records only: the unweighted means of dice/<m> (mdice) and iou/<m> (miou) over the present "
     "modalities of Table 2's MeCoVQA-G test group (Der, CT, PET) and zero-shot group (X-Ray, End, MR, US, FP); "
     '`modalities`: how many were present.'),
    ('skipped', ('omnimedvqa', 'mecovqa_c', 'mecovqa_r', 'mecovqa_g'),
     'records not scored, for the reasons in the Records table (skip rows in predictions.jsonl): files that '
     "cannot be read, an answer_type that is neither open nor closed (cal_metric.py passes it over), an "
     'OmniMedVQA image without a modality.'),
    (NA_TEXT, ('omnimedvqa', 'mecovqa_c', 'mecovqa_r', 'mecovqa_g'),
     'a mean over zero items: nothing behind it (null in metrics.json), never a score of 0.'),
)


def definitions(results: Sequence[EvalResult], prov: Provenance) -> list[str]:
    """The definitions of the metrics the report shows (those of the evaluators' kinds; Table 2's groups only on
    the paper's records)."""
    kinds = {r.kind for r in results}
    paper_kinds = {r.kind for r in results if prov.paper.get(r.name)}
    shown = [(term, text) for term, of, text in DEFINITIONS
             if (paper_kinds if term in PAPER_ONLY else kinds) & set(of)]
    if not shown:
        return []
    return (['## Definitions', '', 'Percentages (x100) except counts; each mean is over items, then x100.', '']
            + [f'- `{term}`: {text}' for term, text in shown] + [''])


def _provenance_lines(prov: Provenance) -> list[str]:
    lines = []
    if prov.synthetic:
        lines += [f'> **Synthetic results.** {DEMO_NOTICE}.', '>']
        if prov.synthetic_records:
            lines += ['> - records: synthetic held-out data written by `make-demo-data` ('
                      + ', '.join(f'`{f}`' for f in prov.synthetic_records) + ')']
        if prov.synthetic_weights:
            lines += ['> - weights: trained on synthetic data (the checkpoint\'s metadata: `synthetic_data`)']
        lines += ['>', '> These figures say whether the code path works, not how well a model reads medical '
                       'images; they are not comparable with the paper\'s.', '']
    return lines


def report_markdown(results: Sequence[EvalResult], *, checkpoint: str, date: str,
                    pictures: Sequence[str] = (), prov: Provenance | None = None) -> str:
    prov = prov or provenance(results, checkpoint)
    lines = ['# Evaluation' + (' (synthetic)' if prov.synthetic else ''), '']
    lines += _provenance_lines(prov)
    lines += [f'- checkpoint: `{checkpoint}`', f'- date: {date}', '']
    lines += ['## Records', '']
    lines += _table(['evaluator', 'kind', 'records files', "the paper's records", 'scored', 'skipped',
                     'skip reasons'],
                    [[r.name, r.kind, ', '.join(f'`{f}`' for f in r.records_files()) or '-',
                      'yes' if prov.paper.get(r.name) else 'no', str(len(r.rows)), str(len(r.skips)),
                      ', '.join(f'{k} {n}' for k, n in _skip_reasons(r).items()) or '-'] for r in results])
    lines += ['', '### Where the numbers come from', '', PAPER_RECORDS_RULE, '']
    lines += table1(results, prov) + table2(results, prov)
    lines += definitions(results, prov)
    lines += ['## All metrics', '']
    for r in results:
        lines += [f'### {r.name} ({r.kind})', '']
        lines += _table(['metric', 'value'], [[k, format_value(v, 4)] for k, v in r.metrics.items()]) + ['']
    if pictures:
        lines += ['## Pictures', ''] + [f'- [{p}]({p})' for p in pictures] + ['']
    return '\n'.join(lines)


def _skip_reasons(result: EvalResult) -> dict[str, int]:
    return dict(collections.Counter(s.get('skipped', 'record') for s in result.skips))


def json_metrics(values: Mapping[str, float]) -> dict[str, float | None]:
    """Metrics as metrics.json holds them: n/a (NaN) as null."""
    return {k: None if is_na(v) else v for k, v in values.items()}


def metrics_json(results: Sequence[EvalResult], *, checkpoint: str, date: str, prov: Provenance | None = None
                 ) -> dict[str, Any]:
    """metrics.json's content: per evaluator its metrics (null: nothing behind it), counts and skip reasons; where
    the numbers come from (`provenance`, `synthetic`, and `notice` = DEMO_NOTICE when synthetic)."""
    prov = prov or provenance(results, checkpoint)
    out: dict[str, Any] = {'checkpoint': checkpoint, 'date': date, 'synthetic': prov.synthetic}
    if prov.synthetic:
        out['notice'] = DEMO_NOTICE
    out['provenance'] = prov.to_json()
    out['evaluators'] = {r.name: {'kind': r.kind, 'records': len(r.rows), 'skipped': len(r.skips),
                                  'skip_reasons': _skip_reasons(r), 'files': list(r.records_files()),
                                  'metrics': json_metrics(r.metrics)} for r in results}
    return out


def write_predictions(path: str, results: Sequence[EvalResult]) -> None:
    with open(path, 'w') as f:
        for r in results:
            for row in [*r.rows, *r.skips]:
                f.write(json.dumps(row, ensure_ascii=False) + '\n')


def read_predictions(path: str) -> list[dict[str, Any]]:
    """predictions.jsonl -> rows; a line that is not a prediction row is an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: predictions file not found')
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row['evaluator'], row['kind']  # noqa: B018  (both required)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f'{path}: line {n}: not a prediction row ({type(e).__name__}: {e})') from None
            rows.append(row)
    return rows


def write_pictures(out: str, results: Sequence[EvalResult], decode_token) -> list[str]:
    """Overlays of the kept grounding samples (image, ground-truth contour, predicted mask, question, answer, Dice)
    and routing pictures of the kept samples of a MoE model -> their paths relative to `out`."""
    from medplib_jax.infer.overlay import overlay, routing_image
    written = []
    for r in results:
        for k, item in enumerate(r.kept):
            row = item['row']
            if item['truth'] is not None or item['mask'] is not None:
                dice = f', Dice {row["dice"]:.3f}' if 'dice' in row else ''
                pic = overlay(item['image'], item['mask'], item['truth'], question=row['question'],
                              answer=row['prediction'], title=f'{r.name} {row["question_id"]}{dice}')
                written.append(_save(out, f'pictures/{r.name}_{k:02d}.png', pic))
            if item['routing'] is not None and len(item['tokens']):
                tokens = [decode_token(t) for t in item['tokens']]
                pic = routing_image(tokens, np.asarray(item['routing']),
                                    title=f'{r.name} {row["question_id"]}: answer tokens by expert')
                written.append(_save(out, f'routing/{r.name}_{k:02d}.png', pic))
    return written


def _save(out: str, relative: str, picture) -> str:
    path = os.path.join(out, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    picture.save(path)
    return relative


def write_outputs(out: str, results: Sequence[EvalResult], *, checkpoint: str, date: str,
                  decode_token=None) -> dict[str, Any]:
    """report.md, metrics.json, predictions.jsonl and (with `decode_token`) the pictures under `out`."""
    os.makedirs(out, exist_ok=True)
    pictures = write_pictures(out, results, decode_token) if decode_token is not None else []
    prov = provenance(results, checkpoint)
    summary = metrics_json(results, checkpoint=checkpoint, date=date, prov=prov)
    with open(os.path.join(out, 'metrics.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    write_predictions(os.path.join(out, 'predictions.jsonl'), results)
    with open(os.path.join(out, 'report.md'), 'w') as f:
        f.write(report_markdown(results, checkpoint=checkpoint, date=date, pictures=pictures, prov=prov))
    return summary


def _saved_synthetic_weights(predictions: str) -> bool | None:
    """What the eval that wrote `predictions` said of its weights (its metrics.json beside it), None if unknown."""
    path = os.path.join(os.path.dirname(os.path.abspath(predictions)), 'metrics.json')
    try:
        with open(path) as f:
            value = json.load(f)['provenance']['synthetic_weights']
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, bool) else None


def rescore(path: str, kinds: Mapping[str, Any]) -> list[EvalResult]:
    """predictions.jsonl -> each evaluator's metrics recomputed from its rows (`kinds`: kind -> evaluator class
    with `score_rows` and `report`), in the file's order of evaluators. The rows name their records files (for
    the provenance); the weights' provenance is the eval's metrics.json's beside the file, when there is one."""
    rows = read_predictions(path)
    weights = _saved_synthetic_weights(path)
    order: dict[str, EvalResult] = {}
    for row in rows:
        name, kind = row['evaluator'], row['kind']
        if kind not in kinds:
            raise ValueError(f'{path}: evaluator {name!r} has kind {kind!r}; known: {", ".join(kinds)}')
        result = order.setdefault(name, EvalResult(name, kind, {}, [], [], synthetic_weights=weights))
        (result.skips if 'skipped' in row else result.rows).append(row)
    for result in order.values():
        cls = kinds[result.kind]
        result.metrics = cls.report(cls.score_rows(result.rows), result.skips)
    return list(order.values())
