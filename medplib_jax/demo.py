"""The main job on the embedded default: the tiny MedPLIB trained through stages I to IV on synthetic MeCoVQA-like
data on CPU, then shown on held-out records.

1. Writes the synthetic set (complex VQA, region VQA with mask / box / point prompts, grounding with `<SEG>`,
   closed questions), train and test splits.
2. Trains configs/demo.py: the four stage configs with `model=tiny`, shortened, each stage starting from the
   previous one's hand-off (stage IV builds its two experts from stages III and II), with progress bars, metrics
   in `workdir/stageN/metrics.jsonl` and TensorBoard events.
3. Restores stage IV's final parameters and runs one held-out batch through the whole model: each answer as the
   model predicts it token by token (teacher-forced), each `<SEG>` mask at its image's original size with its
   Dice against the ground truth, and a picture of it all. Free-running generation and the paper's evaluators
   arrive with the inference and evaluation issues.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from medplib_jax import checkpoint, sharding
from medplib_jax.constants import IGNORE_INDEX
from medplib_jax.data.pipeline import DataConfig, ModelShapes, build_tokenizer, make_iterator
from medplib_jax.data.synthetic import make_demo_data
from medplib_jax.data.visualize import render_batch
from medplib_jax.models.masks import binarize, postprocess_masks
from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM
from medplib_jax.train.loop import train
from medplib_jax.train.step import MODEL_INPUTS


def _dice(pred: np.ndarray, target: np.ndarray) -> float:
    inter = float((pred & (target > 0)).sum())
    return 2 * inter / max(float(pred.sum() + (target > 0).sum()), 1.0)


def run_demo(config: mlc.ConfigDict, workdir: str = '', log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the demo (config: configs/demo.py); returns a summary (also logged)."""
    demo = config.demo
    workdir = workdir or demo.workdir
    if demo.synthetic_images:
        counts = make_demo_data(demo.root, num_images=demo.synthetic_images, seed=config.stages.stage1.seed)
        log(f'synthetic MeCoVQA-like data: {sum(counts.values())} records over {demo.synthetic_images} images in '
            f'{demo.root}')
    start = time.perf_counter()
    results = train(config, workdir, log)
    log(f'trained {len(results)} stages in {time.perf_counter() - start:.0f}s:')
    for name, r in results.items():
        first = {k: r.first.get(k) for k in ('loss/ce', 'mask/dice')}
        last = {k: r.last.get(k) for k in ('loss/ce', 'mask/dice')}
        dice = (f', mask Dice loss {first["mask/dice"]:.3f} -> {last["mask/dice"]:.3f}'
                if first['mask/dice'] is not None and last['mask/dice'] is not None else '')
        log(f'  {name}: text CE {first["loss/ce"]:.3f} -> {last["loss/ce"]:.3f}{dice} ({r.steps} steps)')
    summary: dict[str, Any] = {'stages': {n: {'first': r.first, 'last': r.last, 'steps': r.steps}
                                          for n, r in results.items()}}
    summary.update(_show(config.stages[list(config.stages)[-1]], results[list(results)[-1]].final_params, demo, log))
    return summary


def _show(stage: mlc.ConfigDict, params_dir: str, demo: mlc.ConfigDict, log: Callable[[str], None]) -> dict:
    """The trained model on one held-out batch: teacher-forced answers, masks with Dice, a picture."""
    model_cfg = stage.model.copy_and_resolve_references()
    model_cfg.lora.rank = 0  # the hand-off has its adapters merged
    cfg = MedPLIBConfig.from_model_config(model_cfg)
    model = MedPLIBForCausalLM(cfg.llm, mcfg=cfg)
    mesh = sharding.make_mesh(stage.mesh)
    data = stage.copy_and_resolve_references()
    for spec in data.data.datasets.values():
        spec.path = spec.path.replace('_train.', '_test.')
    it = make_iterator(data, train=True)  # the test split, mixed: one row of each kind
    try:
        host = next(it)
    finally:
        it.close()
    params = checkpoint.restore_params(params_dir, lambda path, shape: jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    params = checkpoint.unflatten(params)
    fwd = jax.jit(lambda p, b: model.apply({'params': p}, **b, method=MedPLIBForCausalLM.forward))
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(stage.logical_axis_rules)):
        out = jax.device_get(fwd(params, {k: jnp.asarray(host[k]) for k in MODEL_INPUTS}))
    tokenizer = build_tokenizer(DataConfig.from_config(data.data), ModelShapes.from_config(data.model))
    said, masks, dice = [], [], {}
    for i in range(len(host['example_valid'])):
        labels = host['labels'][i]
        answer = np.nonzero(labels[1:] != IGNORE_INDEX)[0]  # positions predicting a supervised token
        predicted = out['logits'][i, answer].argmax(-1)
        said.append(tokenizer.decode(predicted.tolist()) if host['example_valid'][i] else None)
        if not host['seg_valid'][i, 0]:
            masks.append(None)
            continue
        h, w = (int(v) for v in host['image_size'][i])
        sam_h, sam_w = (int(v) for v in host['sam_size'][i])
        mask = np.asarray(binarize(postprocess_masks(jnp.asarray(out['mask_logits'][i, 0]), (sam_h, sam_w), (h, w),
                                                     cfg.postprocess), cfg.mask_threshold))
        mh, mw = (int(v) for v in host['mask_size'][i])
        if (mh, mw) == (h, w):
            dice[i] = _dice(mask, host['seg_masks'][i, 0, :h, :w])
        masks.append(mask)
    for i, text in enumerate(said):
        if text is not None:
            truth = tokenizer.decode(host['labels'][i][host['labels'][i] != IGNORE_INDEX].tolist())
            extra = f'; <SEG> mask Dice {dice[i]:.3f}' if i in dice else ''
            log(f'held-out row {i}: answer {truth!r}, model (teacher-forced) {text!r}{extra}')
    summary: dict[str, Any] = {'dice': dice, 'answers': said}
    if demo.picture:
        os.makedirs(os.path.dirname(demo.picture) or '.', exist_ok=True)
        summary['picture'] = render_batch(host, tokenizer, demo.picture, predicted=masks, predicted_text=said)
        log(f'picture of the held-out batch (inputs, regions, ground truth, predictions): {summary["picture"]}')
    return summary
