"""`config.train`: what a stage trains, how long, with which losses and optimiser, and where it starts.

The dataclasses hold the defaults (configs/common.py builds the config block from them); each stage config
(configs/stage1.py .. stage4.py) sets its recipe. Stages differ only in these values, the data and the model's
adapters: the train step has no per-stage code.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from medplib_jax.config_fields import known_fields

RANDOM = 'random'


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Per-stage weights (the reference's *_loss_weight flags). Defaults are its CLI defaults; each stage config
    sets its script's values (stage II: 1/1/5/-/-, stage III: 1/1/5/0/1, stage IV: 1/2/0.5/0/0)."""
    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    iou: float = 2.0
    focal: float = 2.0


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Where a stage's parameters start. Paths may use `{runs}`: the folder holding this run's workdir (so a stage
    finds its predecessors beside it, e.g. `{runs}/stage2`). A path is a run directory (its `final_params`, written
    at the end of a stage) or an Orbax params directory.

    params: 'random' or the path every parameter comes from (leaves the source lacks, such as a new stage's fresh
      LoRA adapters or router, keep their initialisation and are listed at start).
    experts: stage IV: expert e of every MoE layer takes the dense FFN of experts[e] (0 = grounding from stage III,
      1 = vision-language from stage II); every expert starts with expert 0's LoRA A, as the reference deep-copies
      one LoRA-wrapped MLP.
    load: 'PATTERN=PATH' entries: parameters whose path matches PATTERN come from PATH instead.
    fresh: patterns re-initialised even when the source has them (the reference re-creates the T-projector).
    runs: the folder `{runs}` stands for ('' = the one holding the workdir; a sweep sets it to the folder holding
      the sweep, so every point finds the same predecessors).
    """
    params: str = RANDOM
    experts: tuple[str, ...] = ()
    load: tuple[str, ...] = ()
    fresh: tuple[str, ...] = ()
    runs: str = ''

    def load_rules(self) -> list[tuple[str, str]]:
        rules = []
        for entry in self.load:
            if '=' not in entry:
                raise ValueError(f'config.train.init.load: {entry!r} is not PATTERN=PATH')
            pattern, path = entry.split('=', 1)
            rules.append((pattern, path))
        return rules


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """stage: a label for logs and metadata. trainable: regexes over '/'-joined parameter paths (train/trainable.py).
    lr: peak learning rate. epochs x steps_per_epoch optimizer steps (steps_per_epoch 0 = from the data, as the
    reference counts them); max_steps > 0 stops earlier without changing the schedule. Warmup: max(min_warmup_steps,
    int(warmup_fraction x steps_per_epoch)). grad_accum: micro-batches per optimizer step (the global batch is
    config.data.batch_size). loss_group: sequences per loss mean (the reference's per-GPU micro-batch; 0 = the
    whole micro-batch). weights: the loss weights. max_bad_steps: this many non-finite steps in a row stop the run.
    log_every / eval_every: steps between metric lines / evaluator runs (0 = never). peak_tflops: per-device peak
    for MFU (0 = by device kind where known)."""
    stage: str = ''
    trainable: tuple[str, ...] = ()
    lr: float = 1e-4
    epochs: float = 1.0
    steps_per_epoch: int = 0
    max_steps: int = 0
    warmup_fraction: float = 0.01
    min_warmup_steps: int = 2
    grad_accum: int = 1
    loss_group: int = 0
    weights: LossWeights = LossWeights()
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    max_bad_steps: int = 10
    log_every: int = 10
    eval_every: int = 0
    peak_tflops: float = 0.0
    init: InitConfig = InitConfig()

    def __post_init__(self):
        for name, low in (('grad_accum', 1), ('loss_group', 0), ('max_bad_steps', 1), ('lr', 0),
                          ('steps_per_epoch', 0), ('max_steps', 0)):
            if getattr(self, name) < low:
                raise ValueError(f'config.train.{name}={getattr(self, name)}: must be >= {low}')
        if self.epochs <= 0:
            raise ValueError(f'config.train.epochs={self.epochs}: must be > 0')

    @classmethod
    def from_config(cls, d: Mapping[str, Any]) -> 'TrainConfig':
        d = known_fields(cls, d, 'config.train')
        d['trainable'] = tuple(d.get('trainable', ()))
        d['weights'] = LossWeights(**known_fields(LossWeights, d.get('weights', {}), 'config.train.weights'))
        init = known_fields(InitConfig, d.get('init', {}), 'config.train.init')
        d['init'] = InitConfig(**{k: (v if k in ('params', 'runs') else tuple(v)) for k, v in init.items()})
        return cls(**d)

    def micro_loss_group(self, global_batch: int) -> tuple[int, int]:
        """(micro-batch rows, loss group rows) for a global batch; errors name the fields."""
        if global_batch % self.grad_accum:
            raise ValueError(f'config.data.batch_size={global_batch} is not divisible by config.train.grad_accum='
                             f'{self.grad_accum}')
        micro = global_batch // self.grad_accum
        group = self.loss_group or micro
        if micro % group:
            raise ValueError(f'config.train.loss_group={group} does not divide the micro-batch of {micro} sequences '
                             f'(config.data.batch_size / config.train.grad_accum)')
        return micro, group


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """`config.checkpoint`. every: steps between train-state saves (0 = only at the end and on preemption).
    keep: the newest checkpoints kept. best_metric: an evaluation metric as logged (e.g. 'eval/held_out/loss');
    when set, the `keep_best` best checkpoints by it are kept too (best_mode 'min' or 'max'). async_save: write in
    the background while training goes on. resume: continue from the newest checkpoint of the run directory.
    restore_data: resume the data iterator where it was (False: restart the data order, e.g. when the process
    count changed). fallback: when the newest checkpoint is damaged (a truncated or missing file), resume from the
    newest readable older one, moving the damaged ones to `workdir/damaged_checkpoints/` with a warning (False:
    stop with an error naming the damaged file, so that nothing is retrained without the user choosing it)."""
    every: int = 0
    keep: int = 2
    best_metric: str = ''
    best_mode: str = 'min'
    keep_best: int = 1
    async_save: bool = True
    resume: bool = True
    restore_data: bool = True
    fallback: bool = False

    def __post_init__(self):
        for name in ('every', 'keep', 'keep_best'):
            if getattr(self, name) < (1 if name == 'keep' else 0):
                raise ValueError(f'config.checkpoint.{name}={getattr(self, name)}: must be >= '
                                 f'{1 if name == "keep" else 0}')
        if self.best_mode not in ('min', 'max'):
            raise ValueError(f'config.checkpoint.best_mode={self.best_mode!r}: expected min or max')

    @classmethod
    def from_config(cls, d: Mapping[str, Any] | None) -> 'CheckpointConfig':
        return cls(**known_fields(cls, d or {}, 'config.checkpoint'))
