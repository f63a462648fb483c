"""The held-out-loss evaluator (`kind='held_out_loss'`): the training losses in evaluation mode (no dropout, the
MoE's evaluation capacity factor) over one pass of held-out records files.

Settings: `datasets` (name -> configs.common.dataset(...), defaults to the training mix), `max_batches` (0 = the
whole pass). Reports token-weighted CE and accuracy, per-mask BCE and Dice, and the weighted loss averaged over
batches. The pipeline is built once, with the evaluator, and read afresh by each evaluation.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from medplib_jax.data.pipeline import dataset_from_config
from medplib_jax.eval.registry import Evaluator, register
from medplib_jax.train.config import TrainConfig
from medplib_jax.train.inputs import global_batch
from medplib_jax.train.step import TRAIN_KEYS, forward_loss


@register('held_out_loss')
class HeldOutLoss(Evaluator):

    def __init__(self, name, settings, context):
        super().__init__(name, settings, context)
        config = context.config
        self.data = config.copy_and_resolve_references()
        datasets = self.settings.pop('datasets', None)
        if datasets:
            self.data.data.datasets = datasets
        # Built once (missing or empty held-out files fail now, not after the training steps); each evaluation
        # iterates it afresh: one pass, in file order, the same records every time.
        self.dataset = dataset_from_config(self.data, train=False)
        self.max_batches = int(self.settings.pop('max_batches', 0))
        if self.settings:
            raise ValueError(f'config.evals.{name}: unknown settings {sorted(self.settings)}')
        tcfg = TrainConfig.from_config(config.train)
        batch = config.data.batch_size
        group = tcfg.loss_group if tcfg.loss_group and batch % tcfg.loss_group == 0 else batch
        model = context.model
        self._fn = jax.jit(lambda params, b: forward_loss(model, params, b, weights=tcfg.weights, loss_group=group,
                                                          train=False))

    def run(self, params: Any) -> dict[str, float]:
        ctx = self.context
        it = iter(self.dataset)
        sums: dict[str, float] = {}
        batches = 0
        try:
            with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(list(ctx.rules)):
                for host in it:
                    loss, m = jax.device_get(self._fn(params, global_batch(host, ctx.mesh, TRAIN_KEYS)))
                    for key in ('tokens/supervised', 'tokens/correct', 'tokens/ce_sum', 'masks', 'mask/bce_sum',
                                'mask/dice_sum'):
                        sums[key] = sums.get(key, 0.0) + float(np.asarray(m[key]))
                    sums['loss'] = sums.get('loss', 0.0) + float(loss)
                    batches += 1
                    if self.max_batches and batches >= self.max_batches:
                        break
        finally:
            it.close()
        tokens, masks = max(sums.get('tokens/supervised', 0.0), 1.0), sums.get('masks', 0.0)
        out = {'loss': sums.get('loss', 0.0) / max(batches, 1), 'ce': sums.get('tokens/ce_sum', 0.0) / tokens,
               'accuracy': sums.get('tokens/correct', 0.0) / tokens, 'batches': float(batches)}
        if masks:
            out.update({'bce': sums['mask/bce_sum'] / masks, 'dice_loss': sums['mask/dice_sum'] / masks,
                        'masks': masks})
        return out
