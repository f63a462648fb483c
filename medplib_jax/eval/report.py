"""What `medplib-jax eval` writes: `report.md` (tables laid out as the paper's Table 1 and Table 2, the paper's
MedPLIB row beside this checkpoint's), `metrics.json`, `predictions.jsonl` (one row per scored record and one per
skipped record: enough to re-score without generating again, `rescore`), overlay pictures of grounding samples and
routing pictures of a MoE model's answers. Pure Python / NumPy / Pillow."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medplib_jax.eval.metrics import PAPER_SEG_GROUPS

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


@dataclasses.dataclass
class EvalResult:
    """One evaluator's outcome: its metrics (as `run` returned them), prediction rows, skipped-record rows, the
    records files it read, and the kept samples for pictures."""
    name: str
    kind: str
    metrics: dict[str, float]
    rows: list[dict[str, Any]]
    skips: list[dict[str, Any]]
    files: tuple[str, ...] = ()
    kept: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _fmt(value: float | None) -> str:
    return '-' if value is None else f'{value:.2f}'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return lines + ['| ' + ' | '.join(r) + ' |' for r in rows]


def omni_column(modality: str) -> str | None:
    m = modality.lower()
    return next((label for label, prefixes in OMNI_COLUMNS if m.startswith(prefixes)), None)


def _first(results: Sequence[EvalResult], kind: str) -> EvalResult | None:
    return next((r for r in results if r.kind == kind), None)


def table1(results: Sequence[EvalResult]) -> list[str]:
    """Table 1: OmniMedVQA accuracy per modality and the mean, MeCoVQA-C and -R precision / recall (x100)."""
    omni, c, r = (_first(results, k) for k in ('omnimedvqa', 'mecovqa_c', 'mecovqa_r'))
    if not (omni or c or r):
        return []
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
    columns = [label for label, _ in OMNI_COLUMNS] + extra + ['Mean', 'C precision', 'C recall', 'R precision',
                                                              'R recall']
    header = ['model', *columns[:-4], 'C P', 'C R', 'R P', 'R R']
    lines = ['## Table 1: VQA', '',
             'OmniMedVQA (CT .. Mean): closed-set accuracy per modality and their unweighted mean (over the '
             'modalities present); MeCoVQA-C (C) and -R (R): open-set precision (P) and recall (R, the paper\'s '
             'accuracy). x100; "-": no such records.', '']
    lines += _table(header, [['MedPLIB (paper)', *[_fmt(PAPER_TABLE1.get(c)) for c in columns]],
                             ['this checkpoint', *[_fmt(ours.get(c)) for c in columns]]])
    for label, res in (('MeCoVQA-C', c), ('MeCoVQA-R', r)):
        if res and res.metrics.get('closed/count'):
            lines += ['', f'{label} closed records: accuracy {res.metrics["closed/accuracy"]:.2f} over '
                          f'{int(res.metrics["closed/count"])}.']
    return lines + ['']


def table2(results: Sequence[EvalResult]) -> list[str]:
    """Table 2: MeCoVQA-G Dice per modality, the test modalities' mean and the zero-shot ones' (x100)."""
    g = _first(results, 'mecovqa_g')
    if not g:
        return []
    columns: list[tuple[str, str]] = []  # (label, metric key or paper key)
    for group, modalities in PAPER_SEG_GROUPS.items():
        columns += [(SEG_LABELS.get(m, m), f'dice/{m}') for m in modalities] + [('Mean', f'{group}/mdice')]
    paper = [PAPER_TABLE2.get(label if not key.endswith('/mdice') else key.split('/')[0]) for label, key in columns]
    n_test = len(PAPER_SEG_GROUPS['mecovqa_g']) + 1
    header = ['model', *[f'test {label}' if i < n_test else f'zero-shot {label}' for i, (label, _) in
                         enumerate(columns)]]
    lines = ['## Table 2: MeCoVQA-G (Dice)', '',
             'Dice per modality (file-name prefix), the MeCoVQA-G test modalities (Der, CT, PET) and the zero-shot '
             'ones (X-Ray, End, MR, US, FP) with their unweighted means over the modalities present. x100; "-": no '
             'such records.', '']
    lines += _table(header, [['MedPLIB (paper)', *map(_fmt, paper)],
                             ['this checkpoint', *[_fmt(g.metrics.get(key)) for _, key in columns]]])
    others = sorted(k[len('dice/'):] for k in g.metrics if k.startswith('dice/')
                    and k[len('dice/'):] not in {m for ms in PAPER_SEG_GROUPS.values() for m in ms})
    lines += ['', f'All {int(g.metrics["count"])} samples: mDice {g.metrics["mdice"]:.2f}, mIoU {g.metrics["miou"]:.2f}'
              + (f'; modalities outside the paper\'s columns: ' + ', '.join(
                  f'{m} {g.metrics[f"dice/{m}"]:.2f}' for m in others) if others else '') + '.', '']
    return lines


def report_markdown(results: Sequence[EvalResult], *, checkpoint: str, date: str,
                    pictures: Sequence[str] = ()) -> str:
    lines = ['# Evaluation', '', f'- checkpoint: `{checkpoint}`', f'- date: {date}', '']
    lines += ['## Records', '']
    lines += _table(['evaluator', 'kind', 'records files', 'scored', 'skipped'],
                    [[r.name, r.kind, ', '.join(f'`{f}`' for f in r.files) or '-', str(len(r.rows)),
                      str(len(r.skips))] for r in results])
    lines.append('')
    lines += table1(results) + table2(results)
    lines += ['## All metrics', '']
    for r in results:
        lines += [f'### {r.name} ({r.kind})', '']
        lines += _table(['metric', 'value'], [[k, f'{v:.4f}'] for k, v in r.metrics.items()]) + ['']
    if pictures:
        lines += ['## Pictures', ''] + [f'- [{p}]({p})' for p in pictures] + ['']
    return '\n'.join(lines)


def metrics_json(results: Sequence[EvalResult], *, checkpoint: str, date: str) -> dict[str, Any]:
    return {'checkpoint': checkpoint, 'date': date,
            'evaluators': {r.name: {'kind': r.kind, 'records': len(r.rows), 'skipped': len(r.skips),
                                    'files': list(r.files), 'metrics': r.metrics} for r in results}}


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
    summary = metrics_json(results, checkpoint=checkpoint, date=date)
    with open(os.path.join(out, 'metrics.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    write_predictions(os.path.join(out, 'predictions.jsonl'), results)
    with open(os.path.join(out, 'report.md'), 'w') as f:
        f.write(report_markdown(results, checkpoint=checkpoint, date=date, pictures=pictures))
    return summary


def rescore(path: str, kinds: Mapping[str, Any]) -> list[EvalResult]:
    """predictions.jsonl -> each evaluator's metrics recomputed from its rows (`kinds`: kind -> evaluator class
    with `score_rows` and `report`), in the file's order of evaluators."""
    rows = read_predictions(path)
    order: dict[str, EvalResult] = {}
    for row in rows:
        name, kind = row['evaluator'], row['kind']
        if kind not in kinds:
            raise ValueError(f'{path}: evaluator {name!r} has kind {kind!r}; known: {", ".join(kinds)}')
        result = order.setdefault(name, EvalResult(name, kind, {}, [], []))
        (result.skips if 'skipped' in row else result.rows).append(row)
    for result in order.values():
        cls = kinds[result.kind]
        result.metrics = cls.report(cls.score_rows(result.rows), result.skips)
    return list(order.values())
