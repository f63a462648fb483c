"""Collation: a list of examples, skips and padding -> one static-shape batch (as the reference's
DataCollatorForSupervisedDataset, padded to a length bucket instead of the longest row)."""
from __future__ import annotations

from typing import Any, Sequence

from medplib_jax.data.batch import empty_batch
from medplib_jax.data.config import DataConfig, ModelShapes
from medplib_jax.data.records import REASONS
from medplib_jax.data.skips import MESSAGES_KEY, Skipped


class Padding:
    """Fills the rows after the end of a finite pass (and evens out shards): invalid, counted as nothing."""


PADDING = Padding()


def length_bucket(length: int, buckets: Sequence[int]) -> int:
    """The one bucket rule: the smallest of `buckets` (increasing) that holds `length`. Processes that chose
    different buckets agree on the largest (medplib_jax.train.inputs), which is this rule's bucket for their
    longest row."""
    return next(b for b in buckets if b >= length)


class Collator:
    """A list of examples / Skipped / padding -> one batch of `batch_size` rows with static shapes.

    Sequence length = the smallest bucket holding the longest example; pad id 0 (`<unk>`, the reference's pad),
    labels IGNORE_INDEX, `token_mask` True on real tokens. Skipped and padding rows are zeros with
    `example_valid` False; `skip_reason` is 0 for good and padding rows, 1 + REASONS.index(reason) otherwise.
    """

    def __init__(self, batch_size: int, cfg: DataConfig, shapes: ModelShapes):
        self.batch_size, self.cfg, self.shapes = batch_size, cfg, shapes

    def __call__(self, elements: Sequence[Any]) -> dict[str, Any]:
        rows = list(elements) + [PADDING] * (self.batch_size - len(elements))
        examples = [e for e in rows if isinstance(e, dict)]
        t = length_bucket(max((len(e['input_ids']) for e in examples), default=1), self.cfg.length_buckets)
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
