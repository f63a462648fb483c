"""`medplib-jax sweep`: every point of a config's `sweep()` (e.g. configs/stage4.py: the paper's Table 4 grid of
capacity factor and top-k), one after the other here or, with `--print-launch`, one launch line per point for a
cluster; then a table comparing them (final losses, dropped fraction, per-expert load, evaluation metrics)."""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
from typing import Any, Callable, Iterable, Mapping

import ml_collections as mlc
import numpy as np

from medplib_jax.train.loop import StageResult, train_stage
from medplib_jax.train.preemption import Preemption

COLUMNS = (('loss', 'loss'), ('ce', 'loss/ce'), ('accuracy', 'accuracy'), ('dice loss', 'mask/dice'),
           ('dropped', 'moe/drop_fraction'))


def sweep_points(config_file: str) -> list[tuple[str, dict[str, Any]]]:
    """The (name, {dotted field: value}) points of `sweep()` in a config file (`path[:arg]`)."""
    path = config_file.split(':', 1)[0]
    spec = importlib.util.spec_from_file_location('_sweep_config', path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f'sweep: {path}: no such config file')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, 'sweep'):
        raise ValueError(f'sweep: {path} has no sweep() function')
    points = [(str(name), dict(overrides)) for name, overrides in module.sweep()]
    names = [n for n, _ in points]
    if len(set(names)) != len(names):
        raise ValueError(f'sweep: {path}: point names repeat: {names}')
    return points


def apply_overrides(config: mlc.ConfigDict, overrides: Mapping[str, Any]) -> mlc.ConfigDict:
    out = config.copy_and_resolve_references()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split('.')
        node = out
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ValueError(f'sweep: config field {dotted!r} does not exist')
        node[leaf] = value
    return out


def launch_lines(config_file: str, workdir: str, points: Iterable[tuple[str, dict]],
                 argv: list[str] | None = None) -> list[str]:
    """One `medplib-jax train` command per point, carrying this command line's own `--config.` overrides."""
    argv = sys.argv if argv is None else argv
    passed = [a for a in argv if a.startswith('--config.')]
    lines = []
    for name, overrides in points:
        args = [f'--config={config_file}', f'--workdir={os.path.join(workdir, name)}', *passed,
                *(f'--config.{k}={v}' for k, v in overrides.items())]
        lines.append('medplib-jax train ' + ' '.join(shlex.quote(a) for a in args))
    return lines


def _runs(config: mlc.ConfigDict, workdir: str) -> dict[str, str]:
    """Every point trains one folder deeper than a lone run: `{runs}` must still name the folder holding the sweep
    (where the previous stages are), not the sweep itself."""
    if config.train.init.runs:
        return {}
    return {'train.init.runs': os.path.dirname(os.path.abspath(workdir))}


def _row(name: str, overrides: Mapping[str, Any], result: StageResult) -> dict[str, Any]:
    last = result.last
    row: dict[str, Any] = {'point': name, **{k.split('.')[-1]: v for k, v in overrides.items()},
                           'steps': result.steps}
    for label, key in COLUMNS:
        if key in last:
            row[label] = last[key]
    loads = {}
    for key, value in last.items():
        if key.startswith('moe/load/'):
            expert = key.rsplit('/', 1)[-1]
            loads.setdefault(expert, []).append(value)
    for expert, values in sorted(loads.items()):
        row[f'load {expert}'] = float(np.mean(values))
    for entry in result.history:
        row.update({k[len('eval/'):]: v for k, v in entry.items() if k.startswith('eval/')})
    return row


def table(rows: list[dict[str, Any]], settings: tuple[str, ...] = ()) -> str:
    """A markdown table; `settings` columns (the swept config values) print as given, metrics to 4 decimals."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda c, v: f'{v:.4f}' if isinstance(v, float) and c not in settings else str(v)  # noqa: E731
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(fmt(c, r.get(c, '')) for c in columns) + ' |' for r in rows]
    return '\n'.join(lines)


def run_sweep(config_file: str, config: mlc.ConfigDict, workdir: str, *, points: list[str] | None = None,
              print_launch: bool = False, log: Callable[[str], None] = print,
              preemption: Preemption | None = None) -> list[dict[str, Any]]:
    """Runs (or prints launch lines for) the chosen points; writes `sweep.md` and `sweep.json` in `workdir`. A
    SIGTERM (`preemption`'s request) ends the sweep after the point in progress is saved; the same command goes on
    (finished points are not trained again: their run directories hold their last step)."""
    chosen = sweep_points(config_file)
    if points:
        unknown = sorted(set(points) - {n for n, _ in chosen})
        if unknown:
            raise ValueError(f'sweep: --points {unknown} not in the sweep (points: {[n for n, _ in chosen]})')
        chosen = [(n, o) for n, o in chosen if n in points]
    if print_launch:
        for line in launch_lines(config_file, workdir, [(n, {**_runs(config, workdir), **o}) for n, o in chosen]):
            log(line)
        return []
    if preemption is None:
        with Preemption() as preemption:
            return run_sweep(config_file, config, workdir, points=points, log=log, preemption=preemption)
    rows = []
    for name, overrides in chosen:
        if rows and preemption.agreed():
            log(f'preempted (SIGTERM) before sweep point {name}: run the same command to go on')
            return rows
        log(f'=== sweep point {name}: {overrides} ===')
        result = train_stage(apply_overrides(config, {**_runs(config, workdir), **overrides}),
                             os.path.join(workdir, name), log, preemption=preemption)
        if result.preempted:
            return rows
        rows.append(_row(name, overrides, result))
    text = table(rows, settings=tuple({k.split('.')[-1] for _, o in chosen for k in o}))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'sweep.md'), 'w') as f:
        f.write(text + '\n')
    with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    log(f'sweep of {len(rows)} points ({os.path.join(workdir, "sweep.md")}):\n{text}')
    return rows
