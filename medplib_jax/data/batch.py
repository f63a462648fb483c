"""The batch schema: every array a collated batch holds, with its dtype, shape and padding value; the collator
builds batches from it, the train step, compile-check and the predictor read their keys from it.

Shapes use: b rows, t the sequence bucket, s `<SEG>` slots, r region slots, c the mask canvas side.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from medplib_jax.constants import CLIP_SIZE, GRID, IGNORE_INDEX, SAM_SIZE
from medplib_jax.models.inputs import MODEL_INPUTS

TARGETS = ('labels', 'seg_masks', 'seg_valid', 'sam_size', 'mask_size')
TRAIN_KEYS = MODEL_INPUTS + TARGETS  # the arrays a train step reads
SEQUENCE_KEYS = ('input_ids', 'labels', 'token_mask')  # the arrays whose second axis is the sequence

# name -> (dtype, shape in the letters above, value of a padding row / position)
SCHEMA = {
    'input_ids': (np.int32, 'bt', 0),  # pad id 0 (`<unk>`, the reference's pad)
    'labels': (np.int32, 'bt', IGNORE_INDEX),
    'token_mask': (bool, 'bt', False),  # True on real tokens
    'clip_pixels': (np.float32, (CLIP_SIZE, CLIP_SIZE, 3), 0),
    'sam_pixels': (np.float32, (SAM_SIZE, SAM_SIZE, 3), 0),
    'sam_size': (np.int32, (2,), 0),  # the image's size inside the SAM canvas
    'image_size': (np.int32, (2,), 0),
    'region_grids': (np.uint8, ('r', GRID, GRID), 0),
    'region_valid': (bool, ('r',), False),
    'seg_masks': (np.uint8, ('s', 'c', 'c'), 0),
    'seg_valid': (bool, ('s',), False),
    'mask_size': (np.int32, (2,), 0),  # the ground-truth mask's size inside the canvas
    'example_valid': (bool, (), False),  # False: a skipped record or a padding row
    'skip_reason': (np.int32, (), 0),  # 0 good or padding, else 1 + pipeline REASONS.index(reason)
    'label_mismatch': (bool, (), False),
    'dataset_index': (np.int32, (), -1),
    'record_index': (np.int32, (), -1),
}
assert set(TRAIN_KEYS) <= set(SCHEMA)


def empty_batch(b: int, t: int, s: int, r: int, c: int) -> dict[str, np.ndarray]:
    """Every schema array for `b` padding rows."""
    sizes = {'t': t, 's': s, 'r': r, 'c': c}
    out = {}
    for name, (dtype, shape, fill) in SCHEMA.items():
        dims = (t,) if shape == 'bt' else tuple(sizes.get(d, d) for d in shape)
        out[name] = np.full((b, *dims), fill, dtype)
    return out


def pad_batch(batch: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Pads the sequence arrays of a batch (right, with their padding values) to `length`: how processes that
    chose different length buckets agree on one before forming global arrays (medplib_jax.train.inputs)."""
    t = max((v.shape[1] for k, v in batch.items() if k in SEQUENCE_KEYS), default=length)
    if length < t:
        raise ValueError(f'pad_batch: length {length} is shorter than the batch ({t})')
    return {k: np.pad(v, ((0, 0), (0, length - t)), constant_values=SCHEMA[k][2]) if k in SEQUENCE_KEYS else v
            for k, v in batch.items()}
