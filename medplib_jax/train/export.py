"""`medplib-jax export`: a training run's train-state checkpoint -> a params directory (what `eval`, `chat` and
`serve` read), LoRA adapters folded in as the reference's merge_lora_weights_and_save_hf_model.py folds them."""
from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from medplib_jax.checkpoint import (
    CHECKPOINTS,
    FINAL_PARAMS,
    STATE,
    CheckpointError,
    RunCheckpoints,
    one_line,
    reading,
    save_params,
)
from medplib_jax.models.config import LoRAConfig
from medplib_jax.models.lora import merge
from medplib_jax.sharding import largest_dim_sharding
from medplib_jax.train.config import CheckpointConfig
from medplib_jax.tree import tree_shapes, unflatten


@reading()
def export(workdir: str, out: str, *, dtype: str | None = None, step: int | None = None,
           log: Callable[[str], None] = print) -> str:
    """`medplib-jax export`: the parameters of a run's train-state checkpoint (newest, or `step`) as a params
    directory for evaluators, LoRA adapters folded into their kernels, floating arrays cast to `dtype`."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f'export: {workdir}: no {CHECKPOINTS}/ here (train with config.checkpoint.every > 0, '
                                f'or use {os.path.join(workdir, FINAL_PARAMS)}, already a params directory)')
    if dtype is not None:
        try:
            cast = np.dtype(jax.numpy.dtype(dtype))
        except TypeError:
            raise ValueError(f'export: --dtype={dtype!r} is not a dtype (e.g. bfloat16, float32)') from None
    ckpts = RunCheckpoints(workdir, CheckpointConfig(async_save=False))
    try:
        steps = ckpts.all_steps()
        step = step or (steps[-1] if steps else None)
        if step not in steps:
            raise FileNotFoundError(f'export: {directory}: no checkpoint of step {step} (have {steps or "none"})')
        meta = ckpts.meta(step)
        saved = ckpts.manager.item_metadata(step)[STATE]
        mesh = jax.make_mesh((jax.device_count(),), ('fsdp',),
                             axis_types=(jax.sharding.AxisType.Auto,))
        sharding_of = largest_dim_sharding(mesh)
        shapes = {k: v for k, v in tree_shapes(saved).items() if k.startswith('params/')}
        abstract = unflatten({k[len('params/'):]: jax.ShapeDtypeStruct(shape, dtype_, sharding=sharding_of(k, shape))
                              for k, (shape, dtype_) in shapes.items()})
        target = {'params': abstract}
        try:  # the parameters only: the optimizer moments are never read
            restored = ocp.PyTreeCheckpointer().restore(
                os.path.join(directory, str(step), STATE), args=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f'{directory}/{step}: unreadable checkpoint ({one_line(e)})') from None
    finally:
        ckpts.close()
    params = restored['params']
    saved_lora = dict(meta.get('lora') or {})
    if 'targets' in saved_lora:
        saved_lora['targets'] = tuple(saved_lora['targets'])
    lora = LoRAConfig(**saved_lora)
    params = merge(params, lora)
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(cast) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x,
                              params)
    path = save_params(out, params, {**{k: v for k, v in meta.items() if k not in ('versions', 'interval')},
                                     'step': step, 'merged_lora': bool(lora.rank), 'exported_from': directory,
                                     'dtype': dtype or 'as saved'})
    mib = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / 2**20
    log(f'export: step {step} of {workdir} -> {path} ({mib:.1f} MiB'
        f'{", LoRA merged" if lora.rank else ""}{", " + dtype if dtype else ""})')
    return path
