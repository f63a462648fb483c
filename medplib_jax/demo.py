"""The main job on the embedded default: synthetic MeCoVQA-like data through the grain pipeline into the tiny
MedPLIB on CPU.

Writes the synthetic set (complex VQA, region VQA with mask / box / point prompts, grounding with `<SEG>`), mixes
the three training files through the pipeline, and runs one real batch through the whole model (CLIP tower,
projector, region encoder, LLaMA with dense or MoE FFNs, `<SEG>` -> T-projector -> SAM-Med2D), its parameters
sharded over the configured mesh: next-token loss, masks at each image's original size against the ground truth,
KV-cache greedy decoding of a question, and a picture of the batch. Training arrives with the train-step issue.
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

from medplib_jax import sharding
from medplib_jax.constants import IGNORE_INDEX
from medplib_jax.data.pipeline import DataConfig, ModelShapes, build_dataset, build_tokenizer, skip_counts
from medplib_jax.data.regions import resized_size
from medplib_jax.data.synthetic import make_demo_data
from medplib_jax.data.visualize import render_batch
from medplib_jax.infer.generate import greedy_generate
from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM
from medplib_jax.models.moe import collect_moe_metrics
from medplib_jax.models.sam import binarize, postprocess_masks
from medplib_jax.train.losses import next_token_cross_entropy

MODEL_INPUTS = ('input_ids', 'clip_pixels', 'sam_pixels', 'region_grids', 'token_mask')


def _count(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _dice(pred: np.ndarray, target: np.ndarray) -> float:
    inter = float((pred & (target > 0)).sum())
    return 2 * inter / max(float(pred.sum() + (target > 0).sum()), 1.0)


def _first_batch(config: mlc.ConfigDict, data_cfg: DataConfig, shapes: ModelShapes, log: Callable[[str], None]
                 ) -> dict[str, np.ndarray]:
    if config.demo.synthetic_images:
        if not data_cfg.root:
            raise ValueError('config.demo.synthetic_images needs config.data.root (where to write the synthetic set);'
                             ' or set config.demo.synthetic_images=0 to run on config.data as it is')
        counts = make_demo_data(data_cfg.root, num_images=config.demo.synthetic_images, seed=config.seed)
        log(f'synthetic MeCoVQA-like data: {sum(counts.values())} records over {config.demo.synthetic_images} '
            f'images in {data_cfg.root}')
    start = time.perf_counter()
    it = iter(build_dataset(data_cfg, shapes, seed=config.seed))
    try:
        batch = next(it)
    finally:
        it.close()
    kinds = ['grounding' if s.any() else 'region' if r.any() else 'vqa' if v else 'skipped'
             for s, r, v in zip(batch['seg_valid'], batch['region_valid'], batch['example_valid'])]
    skipped = {k: v for k, v in skip_counts(batch['skip_reason']).items() if v}
    log(f'pipeline: batch {tuple(batch["input_ids"].shape)} (length bucket {batch["input_ids"].shape[1]} of '
        f'{data_cfg.length_buckets}) rows {kinds}, skipped {skipped or "none"}; '
        f'{time.perf_counter() - start:.1f}s')
    return batch


def run_demo(config: mlc.ConfigDict, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the demo; returns a summary dict (also logged line by line)."""
    cfg = MedPLIBConfig.from_model_config(config.model)
    llm_cfg = cfg.llm
    data_cfg, shapes = DataConfig.from_config(config.data), ModelShapes.from_config(config.model)
    mesh = sharding.make_mesh(config.mesh)
    rules = config.logical_axis_rules
    log(f'devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}')
    b = data_cfg.batch_size
    batch_shards = mesh.shape['data'] * mesh.shape['fsdp']
    if b % batch_shards:
        raise ValueError(f'config.data.batch_size={b} is not divisible by mesh data x fsdp = {batch_shards}')
    if llm_cfg.moe_layers and b % llm_cfg.moe.group_size:
        raise ValueError(f'config.data.batch_size={b} is not a multiple of config.model.moe.group_size='
                         f'{llm_cfg.moe.group_size} (MoE routing groups are whole sequences)')
    host = _first_batch(config, data_cfg, shapes, log)
    batch = {k: jnp.asarray(host[k]) for k in MODEL_INPUTS}
    labels = jnp.asarray(host['labels'])

    model = MedPLIBForCausalLM(llm_cfg, mcfg=cfg)
    start = time.perf_counter()
    params, _ = sharding.init_sharded(
        lambda: model.init(jax.random.key(config.seed), **batch, method=MedPLIBForCausalLM.forward), mesh, rules)
    sharding.assert_params_sharded(params)
    p = params['params']['model']
    log(f'params: {_count(params):,} (clip {_count(p["vision_tower"]):,}, sam {_count(p["visual_model"]):,}, '
        f'llm+heads {_count(params) - _count(p["vision_tower"]) - _count(p["visual_model"]):,}); '
        f'init {time.perf_counter() - start:.1f}s')

    @jax.jit
    def forward(params, batch, labels):
        out = model.apply(params, **batch, method=MedPLIBForCausalLM.forward)
        loss, count = next_token_cross_entropy(out['logits'], labels)
        return out, loss, count

    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        start = time.perf_counter()
        out, loss, count = jax.block_until_ready(forward(params, batch, labels))
        first = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(forward(params, batch, labels))
        second = time.perf_counter() - start
    summary = dict(logits_shape=tuple(out['logits'].shape), loss=float(loss), supervised_tokens=int(count),
                   finite=bool(jnp.isfinite(out['logits']).all()), compile_and_run_s=first, run_s=second)
    log(f'forward: {shapes.num_image_tokens} image tokens + regions + text -> logits {summary["logits_shape"]}, '
        f'loss {summary["loss"]:.4f} over {summary["supervised_tokens"]} answer tokens '
        f'(ln V = {np.log(llm_cfg.vocab_size):.4f}); first call {first:.2f}s, second {second:.3f}s')

    predicted, dice = _masks(out, host, cfg)
    summary.update(predicted_masks=[None if m is None else m.shape for m in predicted], dice=dice)
    for i, m in enumerate(predicted):
        if m is not None:
            log(f'<SEG> -> SAM-Med2D mask logits {tuple(out["mask_logits"].shape[2:])} -> row {i} mask at its '
                f'original {m.shape[0]}x{m.shape[1]}: {int(m.sum())} pixels above sigmoid {cfg.mask_threshold}, '
                f'Dice {dice[i]:.3f} vs the ground truth (random weights)')

    tokenizer, _ = build_tokenizer(data_cfg, shapes)
    summary['generated'] = _decode(model, params, host, tokenizer, config.demo.decode_tokens, mesh, rules, log)
    if config.demo.picture:
        os.makedirs(os.path.dirname(config.demo.picture) or '.', exist_ok=True)
        summary['picture'] = render_batch(host, tokenizer, config.demo.picture, predicted=predicted)
        log(f'picture of the batch (inputs, regions, ground truth, predictions): {summary["picture"]}')
    if llm_cfg.moe_layers:
        summary['moe'] = m = _moe_report(model, params, batch, config.seed, mesh, rules)
        log(f'MoE, training mode (capacity factor {llm_cfg.moe.capacity_factor}, top-{llm_cfg.moe.top_k}): '
            f'aux loss {m["aux_loss"]:.4f} over {len(llm_cfg.moe_layers)} layers; tokens per expert '
            f'by layer {m["expert_counts"]}; dropped {m["drop_fraction"]}')
    if not summary['finite']:
        raise FloatingPointError('demo: non-finite logits')
    return summary


def _masks(out: dict, host: dict, cfg: MedPLIBConfig) -> tuple[list[np.ndarray | None], dict[int, float]]:
    """Each grounding row's first mask, post-processed to the original image size (outside jit: sizes differ)."""
    predicted, dice = [], {}
    for i in range(len(host['example_valid'])):
        if not host['seg_valid'][i, 0]:
            predicted.append(None)
            continue
        h, w = (int(v) for v in host['image_size'][i])
        logits = postprocess_masks(out['mask_logits'][i, 0], resized_size(h, w, 256), (h, w), cfg.postprocess)
        mask = np.asarray(binarize(logits, cfg.mask_threshold))
        mh, mw = (int(v) for v in host['mask_size'][i])
        if (mh, mw) == (h, w):
            dice[i] = _dice(mask, host['seg_masks'][i, 0, :h, :w])
        predicted.append(mask)
    return predicted, dice


def _decode(model: MedPLIBForCausalLM, params: Any, host: dict, tokenizer: Any, n: int, mesh, rules,
            log: Callable[[str], None]) -> list[list[int]]:
    """Greedy KV-cache decoding of every row's question as text, left-padded (the image needs the multimodal
    prefill of the inference issue); row 0's answer is shown decoded."""
    ids, labels = host['input_ids'], host['labels']
    prompts = [row[(row >= 0) & (lab == IGNORE_INDEX) & mask]
               for row, lab, mask in zip(ids, labels, host['token_mask'])]
    width = max(len(p) for p in prompts)
    prompt = np.zeros((len(prompts), width), np.int32)
    prompt_mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        prompt[i, width - len(p):], prompt_mask[i, width - len(p):] = p, True
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        tokens, _ = greedy_generate(model, params['params'], jnp.asarray(prompt), jnp.asarray(prompt_mask), n)
    tokens = np.asarray(tokens).tolist()
    log(f'greedy decode (KV cache) of each row\'s question, {n} tokens; row 0: {tokens[0]} = '
        f'{tokenizer.decode(tokens[0])!r} (random weights)')
    return tokens


def _moe_report(model: MedPLIBForCausalLM, params: Any, batch: dict, seed: int, mesh, rules) -> dict[str, Any]:
    """One training-mode forward (where tokens can be dropped) to show router load and drops."""
    @jax.jit
    def fwd(params, batch):
        _, state = model.apply(params, **batch, train=True, compute_masks=False, mutable=['intermediates'],
                               rngs={'moe': jax.random.key(seed), 'dropout': jax.random.key(seed + 1)},
                               method=MedPLIBForCausalLM.forward)
        return collect_moe_metrics(state['intermediates'])

    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        m = jax.device_get(fwd(params, batch))
    return dict(aux_loss=float(m['aux_loss']), expert_counts=m['expert_counts'].tolist(),
                drop_fraction=[round(float(v), 3) for v in m['drop_fraction']])
