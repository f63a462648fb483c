"""`medplib-jax eval`: the paper's evaluators on a params directory, or `--rescore` of a predictions file.

    medplib-jax eval --checkpoint=DIR [--evals=omnimedvqa,mecovqa_g] [--config=configs/eval.py[:data=mecovqa]]
                     [--out=DIR] [--num_pictures=8]
    medplib-jax eval --rescore=DIR/eval/predictions.jsonl [--out=DIR]

The model is the checkpoint's own (its params directory's JSON: a run's `final_params`, an `export`ed or converted
one), read onto this machine's first local device; the records, the tokenizer override and the evaluator settings
come from the eval config (configs/eval.py). Every process evaluates its share of the records and process 0 writes
`--out` (default `<checkpoint>/eval`): report.md, metrics.json, predictions.jsonl, `pictures/` (overlays of the
first grounding samples) and `routing/` (a MoE model's answer tokens by expert).
"""
from __future__ import annotations

import datetime
import os
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections as mlc

from medplib_jax import checkpoint as ckpt
from medplib_jax.eval import report
from medplib_jax.eval.evaluators import KINDS, RecordsEvaluator
from medplib_jax.eval.registry import EvalContext, build_evaluators
from medplib_jax.infer.predict import params_config
from medplib_jax.tree import unflatten


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


def build(checkpoint: str, config: mlc.ConfigDict, names: Sequence[str] = (), log: Callable[[str], None] = print
          ) -> tuple[str, list[RecordsEvaluator]]:
    """The checkpoint's params directory and the named evaluators of `config.evals` (all when `names` is empty),
    built over the checkpoint's model config: one-line errors for a missing checkpoint, an unknown name or a
    missing records file, before any parameter is read."""
    path = ckpt.resolve_params_dir(checkpoint, '--checkpoint')
    available = list(config.get('evals', {}))
    names = list(names) or available
    for name in names:
        if name not in available:
            raise ValueError(f'--evals: unknown evaluator {name!r}; known: {", ".join(available) or "none"} '
                             f'(config.evals)')
    saved = params_config(path)
    data = config.data.copy_and_resolve_references()
    data.tokenizer = ckpt.params_tokenizer(path, data.tokenizer or None)  # the one it carries unless overridden
    context_config = mlc.ConfigDict({'model': saved['model'], 'data': data, 'train': {'eval_every': 0},
                                     'evals': {n: config.evals[n] for n in names}})
    evaluators = build_evaluators(EvalContext(context_config, model=None, mesh=None, rules=(), log=log))
    for ev in evaluators:
        if not isinstance(ev, RecordsEvaluator):
            raise ValueError(f'config.evals.{ev.name}: kind {type(ev).__name__} is not one of the paper\'s evaluators '
                             f'({", ".join(KINDS)}); eval runs only those')
    return path, evaluators


def run_eval(checkpoint: str, config: mlc.ConfigDict, *, names: Sequence[str] = (), out: str = '',
             num_pictures: int = 8, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the evaluators on the checkpoint and writes the outputs (process 0); returns metrics.json's content."""
    path, evaluators = build(checkpoint, config, names, log)
    out = out or os.path.join(checkpoint, 'eval')  # a run directory's eval/, beside its final_params
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params = unflatten(ckpt.restore_params(path, lambda _k, _s: one))
    results = []
    for ev in evaluators:
        ev.keep, ev.progress = num_pictures, True
        start = time.perf_counter()
        values = ev.run(params)
        last = ev.last
        files = tuple(os.path.join(ev.data.root, spec.path) for spec in ev.data.datasets.values())
        results.append(report.EvalResult(ev.name, ev.kind, values, last.rows, last.skips, files, last.kept))
        log(f'eval {ev.name}: {len(last.rows)} records ({len(last.skips)} skipped) in '
            f'{time.perf_counter() - start:.1f}s: ' + _headline(ev.kind, values))
    if jax.process_index() != 0:
        return report.metrics_json(results, checkpoint=path, date=_now())
    tokenizer = evaluators[0].predictor.tokenizer if evaluators else None
    summary = report.write_outputs(out, results, checkpoint=path, date=_now(),
                                   decode_token=(lambda t: tokenizer.decode([t])) if tokenizer else None)
    log(f'eval: wrote {os.path.join(out, "report.md")}, metrics.json, predictions.jsonl')
    return summary


def rescore(predictions: str, out: str = '', log: Callable[[str], None] = print) -> dict[str, Any]:
    """Metrics recomputed from a predictions.jsonl (no model): metrics.json, report.md and the predictions under
    `out` (default: the predictions file's folder, whose predictions.jsonl is rewritten unchanged)."""
    results = report.rescore(predictions, KINDS)
    out = out or os.path.dirname(os.path.abspath(predictions))
    summary = report.write_outputs(out, results, checkpoint=f'rescored from {os.path.abspath(predictions)}',
                                   date=_now())
    for r in results:
        log(f'rescore {r.name}: {len(r.rows)} records: ' + _headline(r.kind, r.metrics))
    return summary


def _headline(kind: str, values: dict[str, float]) -> str:
    """The log line's figures of one evaluator ('n/a' where nothing is behind a mean)."""
    keys = {'omnimedvqa': ('mean_accuracy',), 'mecovqa_c': ('open/precision', 'open/recall'),
            'mecovqa_r': ('open/precision', 'open/recall'), 'mecovqa_g': ('mdice', 'miou')}[kind]
    return ', '.join(f'{k} {report.format_value(values[k])}' for k in keys)
