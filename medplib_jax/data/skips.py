"""Skip accounting: a bad record is a `Skipped` row, not a gap; the main process logs each one, keeps totals by
reason in the iterator state (they survive a restore), and stops the run with one clear error when more than
`max_skip_fraction` of the records it has seen are bad (a wrong image folder should not train for a day on empty
batches; each process checks its own share, which shuffling makes representative)."""
from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from absl import logging

from medplib_jax.data.records import REASONS

# Batch key holding the skipped records' (reason, message) pairs; the DataIterator logs and removes it (host-only).
MESSAGES_KEY = '_skip_messages'


class TooManySkipsError(RuntimeError):
    """More records were bad than `config.data.max_skip_fraction` allows."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A record preprocessing could not use (dataset, index), why (one of REASONS) and the message naming it."""
    dataset: int
    index: int
    reason: str
    message: str


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
