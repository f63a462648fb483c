"""The main job's current form: a smoke run of the tiny MedPLIB on CPU.

Builds the whole model from the config (CLIP tower, projector, region encoder, LLaMA with dense or MoE FFNs,
T-projector, SAM-Med2D), creates its parameters sharded over the configured mesh, runs one multimodal forward
(an image, a box region prompt, a `<SEG>` answer) with the next-token loss, turns the `<SEG>` mask into a mask
at the original image size, and greedy-decodes a few tokens through the KV cache. Later issues grow this into
the end-to-end demo (synthetic MeCoVQA data, training, masks on screen).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from medplib_jax import sharding
from medplib_jax.data.regions import RegionPrompt, regions_to_grids, resized_size
from medplib_jax.infer.generate import greedy_generate
from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM
from medplib_jax.models.moe import collect_moe_metrics
from medplib_jax.models.multimodal import IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX
from medplib_jax.models.sam import binarize, postprocess_masks
from medplib_jax.train.losses import IGNORE_INDEX, next_token_cross_entropy

ORIGINAL_SIZE = (300, 484)  # a non-square "original image", to show the mask coming back at its size


def _count(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _batch(cfg: MedPLIBConfig, batch_size: int, text_len: int, num_image_tokens: int,
           rng: np.random.Generator) -> dict[str, Any]:
    """[BOS, prompt, <im_start>, image x N, <im_end>, <region> R </region>, answer ..., <SEG>, </s>] per sample.
    Added-token ids follow the reference's order after the base vocab (facts 1.1)."""
    base = cfg.seg_token_id
    rows = []
    for _ in range(batch_size):
        text = list(rng.integers(3, base, size=text_len))
        rows.append([1] + text[:text_len // 2] + [base + 265] + [IMAGE_TOKEN_INDEX] * num_image_tokens
                    + [base + 266, base + 3, REGION_TOKEN_INDEX, base + 4] + text[text_len // 2:] + [base, 2])
    ids = np.array(rows, np.int32)
    h, w = ORIGINAL_SIZE
    grids, _ = regions_to_grids([RegionPrompt('box', (60, 40, 300, 200))], h, w, max(cfg.max_regions, 1))
    return dict(input_ids=jnp.asarray(ids),
                clip_pixels=jnp.asarray(rng.normal(size=(batch_size, 336, 336, 3)), jnp.float32),
                sam_pixels=jnp.asarray(rng.normal(size=(batch_size, 256, 256, 3)), jnp.float32),
                region_grids=jnp.asarray(np.broadcast_to(grids, (batch_size,) + grids.shape)))


def run_demo(config: mlc.ConfigDict, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the smoke job; returns a summary dict (also logged line by line)."""
    cfg = MedPLIBConfig.from_model_config(config.model)
    llm_cfg = cfg.llm
    mesh = sharding.make_mesh(config.mesh)
    rules = config.logical_axis_rules
    log(f'devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}')

    b, t = config.smoke.batch_size, config.smoke.seq_len
    batch_shards = mesh.shape['data'] * mesh.shape['fsdp']
    if b % batch_shards:
        raise ValueError(f'config.smoke.batch_size={b} is not divisible by mesh data x fsdp = {batch_shards}')
    if llm_cfg.moe_layers and b % llm_cfg.moe.group_size:
        raise ValueError(f'config.smoke.batch_size={b} is not a multiple of config.model.moe.group_size='
                         f'{llm_cfg.moe.group_size} (MoE routing groups are whole sequences)')
    batch = _batch(cfg, b, t, cfg.vision.num_patches, np.random.default_rng(config.seed))
    ids = batch['input_ids']
    labels = jnp.where((ids < 0) | (jnp.arange(ids.shape[1]) < cfg.vision.num_patches + 2 + t // 2), IGNORE_INDEX,
                       ids)

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
    def forward(params, batch):
        out = model.apply(params, **batch, method=MedPLIBForCausalLM.forward)
        loss, count = next_token_cross_entropy(out['logits'], labels)
        return out, loss, count

    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        start = time.perf_counter()
        out, loss, count = jax.block_until_ready(forward(params, batch))
        first = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(forward(params, batch))
        second = time.perf_counter() - start
        prompt = jnp.asarray(np.random.default_rng(config.seed).integers(3, cfg.seg_token_id, size=(b, t)))
        tokens, _ = greedy_generate(model, params['params'], prompt, jnp.ones_like(prompt, bool), 8)
    h, w = ORIGINAL_SIZE
    mask = binarize(postprocess_masks(out['mask_logits'][0, 0], resized_size(h, w, 256), (h, w), cfg.postprocess),
                    cfg.mask_threshold)
    summary = dict(logits_shape=tuple(out['logits'].shape), loss=float(loss), supervised_tokens=int(count),
                   finite=bool(jnp.isfinite(out['logits']).all()), mask_shape=tuple(mask.shape),
                   mask_pixels=int(mask.sum()), compile_and_run_s=first, run_s=second,
                   generated=np.asarray(tokens).tolist())
    log(f'forward: {cfg.vision.num_patches} image tokens + region + text -> logits {summary["logits_shape"]}, '
        f'loss {summary["loss"]:.4f} over {summary["supervised_tokens"]} tokens '
        f'(ln V = {np.log(llm_cfg.vocab_size):.4f}); first call {first:.2f}s, second {second:.3f}s')
    log(f'<SEG> -> SAM-Med2D mask logits {tuple(out["mask_logits"].shape[2:])} -> mask at the original '
        f'{h}x{w}: {summary["mask_pixels"]} pixels above sigmoid {cfg.mask_threshold} (random weights)')
    log(f'greedy decode (KV cache), 8 tokens per sample: {summary["generated"]}')
    if llm_cfg.moe_layers:
        summary['moe'] = m = _moe_report(model, params, batch, config.seed, mesh, rules)
        log(f'MoE, training mode (capacity factor {llm_cfg.moe.capacity_factor}, top-{llm_cfg.moe.top_k}): '
            f'aux loss {m["aux_loss"]:.4f} over {len(llm_cfg.moe_layers)} layers; tokens per expert '
            f'by layer {m["expert_counts"]}; dropped {m["drop_fraction"]}')
    if not summary['finite']:
        raise FloatingPointError('demo: non-finite logits')
    return summary


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
