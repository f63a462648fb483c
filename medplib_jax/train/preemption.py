"""Preemption: SIGTERM (what TPU VMs and SLURM send before taking the machine) becomes a request that training
honours at the next safe point (train/loop.py holds one context over the whole of `train()`: start-up, steps,
saves, hand-offs, stages): the step in progress is saved, or the save in flight finished, the run returns and the
command exits 0; the same command resumes."""
from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


class Preemption:
    """A context that turns SIGTERM into `requested`; the previous handler comes back on exit. Outside the main
    thread (where Python cannot take signals) it only ever reports False."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> 'Preemption':
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """Whether any process was asked to stop: every process checks at every step, so all of them save the same
        step (one small all-gather with several processes)."""
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))
