"""`medplib-jax check-data`: one pass over the configured datasets before a long run, with a progress bar.

Reports, per dataset, the records that will train and the ones that will be skipped, by reason, with the first
message of each reason, and can draw the first batch. Good records whose every label is ignored (the reference's
"tokenization mismatch", kept as it keeps them) are counted as `no_labels`. With `config.data.strict` the first
bad record is the error.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from tqdm import tqdm

from medplib_jax.constants import IGNORE_INDEX
from medplib_jax.data.config import DataConfig, ModelShapes
from medplib_jax.data.pipeline import build_dataset, build_tokenizer
from medplib_jax.data.records import REASONS


def check_data(config: Mapping[str, Any], *, picture: str = '', log: Callable[[str], None] = print,
               progress: bool = True) -> dict[str, Any]:
    """Returns {'datasets': {name: {'records', 'good', 'no_labels', 'skipped': {reason: n}}}, 'first': {reason: first
    message}}."""
    cfg = DataConfig.from_config(config['data'])
    cfg = dataclasses.replace(cfg, max_skip_fraction=1.0)  # survey everything, never stop early
    shapes = ModelShapes.from_config(config['model'])
    ds = build_dataset(cfg, shapes, seed=config['seed'], train=False)
    names = list(cfg.datasets)
    report = {n: dict(records=0, good=0, no_labels=0, skipped={}) for n in names}
    first_batch = None
    it = iter(ds)
    try:
        for batch in tqdm(it, total=math.ceil(ds.num_records / cfg.batch_size), unit='batch', desc='check-data',
                          disable=not progress):
            first_batch = first_batch or batch
            for i in range(len(batch['example_valid'])):
                d, code = int(batch['dataset_index'][i]), int(batch['skip_reason'][i])
                if d < 0:
                    continue  # padding
                entry = report[names[d]]
                entry['records'] += 1
                if batch['example_valid'][i]:
                    entry['good'] += 1
                    entry['no_labels'] += int((batch['labels'][i] == IGNORE_INDEX).all())
                else:
                    reason = REASONS[code - 1]
                    entry['skipped'][reason] = entry['skipped'].get(reason, 0) + 1
    finally:
        it.close()
    for name in names:
        entry = report[name]
        skipped = ', '.join(f'{r} {n}' for r, n in sorted(entry['skipped'].items())) or 'none'
        unlabelled = f' ({entry["no_labels"]} with every label ignored: tokenization mismatch)' \
            if entry['no_labels'] else ''
        log(f'{name} ({cfg.datasets[name].path}): {entry["records"]} records, {entry["good"]} good{unlabelled}; '
            f'skipped: {skipped}')
    for reason, message in it.first_messages.items():
        log(f'first {reason}: {message.splitlines()[0]}')
    if picture and first_batch is not None:
        from medplib_jax.data.visualize import render_batch
        tokenizer = build_tokenizer(cfg, shapes)
        log(f'first batch drawn to {render_batch(first_batch, tokenizer, picture)}')
    return dict(datasets=report, first=dict(it.first_messages))
