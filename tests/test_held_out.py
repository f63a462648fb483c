"""The held-out-loss evaluator keeps its pipeline: built once with the evaluator, each evaluation reads the same
records in the same order (the loss is a stand-in that depends on every row and its position)."""
import jax
import jax.numpy as jnp
import pytest
from support.train_utils import devices, make_data, stage_config

from medplib_jax import sharding
from medplib_jax.eval.registry import EvalContext
from medplib_jax.train import held_out

METRICS = ('tokens/supervised', 'tokens/correct', 'tokens/ce_sum', 'masks', 'mask/bce_sum', 'mask/dice_sum')


def _order_sensitive(params, batch):
    ids = batch['input_ids'] * batch['token_mask']
    weights = jnp.arange(1, ids.shape[0] + 1, dtype=jnp.float32)
    per_row = jnp.sum(ids, axis=1).astype(jnp.float32)
    return jnp.sum(weights * per_row), {k: jnp.sum(per_row) + i for i, k in enumerate(METRICS)}


def test_the_pipeline_is_built_once_and_every_evaluation_reads_the_same_records(tmp_path, monkeypatch):
    cfg = stage_config('stage4', make_data(tmp_path), batch_size=2)
    settings = {k: v for k, v in cfg.evals.held_out.items() if k != 'kind'}
    builds = []

    def counting(*args, **kw):
        builds.append(kw)
        return dataset_from_config(*args, **kw)
    dataset_from_config = held_out.dataset_from_config
    monkeypatch.setattr(held_out, 'dataset_from_config', counting)
    context = EvalContext(cfg, None, sharding.make_mesh(cfg.mesh, devices(cfg)), ())
    ev = held_out.HeldOutLoss('held_out', settings, context)
    ev._fn = jax.jit(_order_sensitive)
    first, second = ev.run(None), ev.run(None)
    assert len(builds) == 1 and first == second and first['batches'] >= 2
    rebuilt = held_out.HeldOutLoss('held_out', settings, context)  # a pipeline of its own: the same values
    rebuilt._fn = ev._fn
    assert rebuilt.run(None) == pytest.approx(first) and len(builds) == 2
