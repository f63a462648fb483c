"""Where training metrics go: a line on stdout, TensorBoard event files (tensorboardX, no TensorFlow) and
`metrics.jsonl`, all from process 0 only."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import numpy as np

# Shown on the stdout line, in this order, when present.
HEADLINE = ('loss', 'loss/ce', 'accuracy', 'mask/dice', 'loss/bce', 'moe/drop_fraction', 'grad_norm', 'lr',
            'perf/step_s', 'perf/tokens_per_s', 'perf/mfu')


def flatten_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device metrics of one step -> scalars: per-layer MoE arrays become `moe/drop_fraction/layer_i` and
    `moe/load/layer_i/expert_e` (share of the layer's first choices), per-mask sums become means."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        value = np.asarray(value)
        if key == 'moe/expert_counts':
            load = value / np.maximum(value.sum(-1, keepdims=True), 1)
            for layer, row in enumerate(load):
                for e, share in enumerate(row):
                    out[f'moe/load/layer_{layer}/expert_{e}'] = float(share)
        elif key == 'moe/drop_fraction':
            out[key] = float(value.mean())
            for layer, v in enumerate(value):
                out[f'{key}/layer_{layer}'] = float(v)
        elif key.startswith('mask/') and key.endswith('_sum'):
            continue
        else:
            out[key] = float(value)
    masks = float(np.asarray(metrics.get('masks', 0)))
    for key in ('bce', 'dice'):
        if f'mask/{key}_sum' in metrics and masks > 0:
            out[f'mask/{key}'] = float(np.asarray(metrics[f'mask/{key}_sum'])) / masks
    return out


def _number(v: float) -> str:
    return f'{v:.3g}' if v and (abs(v) < 1e-3 or abs(v) >= 1e4) else f'{v:.4f}'


def headline(step: int, total: int, metrics: Mapping[str, float]) -> str:
    parts = [f'{key} {_number(metrics[key])}' for key in HEADLINE if key in metrics]
    return f'step {step}/{total}: ' + ', '.join(parts)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """A metrics.jsonl's records. An unterminated last line (a kill mid-write) is dropped: its step comes after the
    newest checkpoint, as a step's line is written before its checkpoint starts. Any other bad line is an error."""
    with open(path) as f:
        lines = f.read().split('\n')
    torn = lines.pop()  # '' when the file ends with a newline
    records = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f'{path}:{n}: not a JSON record ({e}); fix or remove the line') from None
    if torn.strip():
        try:
            records.append(json.loads(torn))
        except ValueError:
            pass  # cut off mid-write
    return records


def _replace(path: str, text: str) -> None:
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricWriter:
    """Writes scalars at a step to every sink; a no-op on processes other than 0."""

    def __init__(self, workdir: str, enabled: bool, echo: Callable[[str], None] = print, total_steps: int = 0,
                 resume_step: int | None = None):
        """resume_step: a resumed run keeps the records up to this step (`kept`) and drops later ones, which the
        interrupted run wrote after its last checkpoint and the resumed run writes again."""
        self.enabled, self.echo, self.total = enabled, echo, total_steps
        self._tb = self._jsonl = None
        self.kept: list[dict[str, Any]] = []
        if enabled:
            from tensorboardX import SummaryWriter
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, 'metrics.jsonl')
            if resume_step is not None and os.path.exists(path):
                self.kept = [r for r in read_metrics(path) if r['step'] <= resume_step]
            # One run's metrics (a resumed run's: the kept ones, then its own), written whole under another name and
            # renamed over the old file, so that a kill meanwhile leaves the old one.
            _replace(path, ''.join(json.dumps(record) + '\n' for record in self.kept))
            self._jsonl = open(path, 'a')
            self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'),
                                     purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, metrics: Mapping[str, float], line: bool = True) -> None:
        if not self.enabled:
            return
        for key, value in metrics.items():
            self._tb.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
        self._jsonl.flush()
        if line:
            self.echo(headline(step, self.total, metrics))

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
