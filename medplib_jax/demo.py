"""The main job's current form: a smoke run of the tiny model on CPU.

Builds the CLIP tower, projector and LLaMA decoder from the config, creates their parameters sharded over the
configured mesh, runs a forward pass over [image tokens ; text] with a next-token loss, then greedy-decodes a few
tokens through the KV cache. Later issues grow this into the end-to-end demo (synthetic MeCoVQA data, training,
masks on screen).
"""
from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from medplib_jax import sharding
from medplib_jax.infer.generate import greedy_generate
from medplib_jax.models.clip import CLIPVisionConfig, CLIPVisionTower, MultimodalProjector
from medplib_jax.models.llama import LlamaConfig, LlamaForCausalLM
from medplib_jax.models.moe import collect_moe_metrics
from medplib_jax.train.losses import IGNORE_INDEX, next_token_cross_entropy


def _count(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _moe_report(llm: LlamaForCausalLM, params: Any, text: jax.Array, seed: int, mesh, rules) -> dict[str, Any]:
    """One training-mode forward (where tokens can be dropped) to show router load and drops."""
    @jax.jit
    def fwd(params, text):
        _, state = llm.apply(params, text, train=True, mutable=['intermediates'],
                             rngs={'moe': jax.random.key(seed), 'dropout': jax.random.key(seed + 1)})
        return collect_moe_metrics(state['intermediates'])

    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        m = jax.device_get(fwd(params, text))
    return dict(aux_loss=float(m['aux_loss']), expert_counts=m['expert_counts'].tolist(),
                drop_fraction=[round(float(v), 3) for v in m['drop_fraction']])


def run_demo(config: mlc.ConfigDict, log=print) -> dict[str, Any]:
    """Runs the smoke job; returns a summary dict (also logged line by line)."""
    llm_cfg = LlamaConfig.from_model_config(config.model)
    vis_cfg = CLIPVisionConfig.from_model_config(config.model)
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
    rng = np.random.default_rng(config.seed)
    pixels = jnp.asarray(rng.normal(size=(b, vis_cfg.image_size, vis_cfg.image_size, 3)), jnp.float32)
    text = jnp.asarray(rng.integers(3, llm_cfg.vocab_size, size=(b, t)), jnp.int32)

    tower = CLIPVisionTower(vis_cfg)
    projector = MultimodalProjector(llm_cfg.hidden_size, config.model.projector.type, config.model.dtype,
                                    config.model.param_dtype)
    llm = LlamaForCausalLM(llm_cfg)
    keys = jax.random.split(jax.random.key(config.seed), 3)
    start = time.perf_counter()
    clip_p, _ = sharding.init_sharded(lambda: tower.init(keys[0], pixels), mesh, rules)
    feats_shape = jax.eval_shape(lambda: tower.apply(clip_p, pixels))
    proj_p, _ = sharding.init_sharded(lambda: projector.init(keys[1], jnp.zeros(feats_shape.shape)), mesh, rules)
    llm_p, _ = sharding.init_sharded(lambda: llm.init(keys[2], text), mesh, rules)
    log(f'params: clip {_count(clip_p):,}  projector {_count(proj_p):,}  llm {_count(llm_p):,}  '
        f'(init {time.perf_counter() - start:.1f}s)')

    @jax.jit
    def forward(clip_p, proj_p, llm_p, pixels, text):
        image_tokens = projector.apply(proj_p, tower.apply(clip_p, pixels))
        embeds = jnp.concatenate([image_tokens, llm.apply(llm_p, text, method=LlamaForCausalLM.embed)], axis=1)
        logits, hidden = llm.apply(llm_p, inputs_embeds=embeds)
        n_img = image_tokens.shape[1]
        labels = jnp.concatenate([jnp.full((b, n_img), IGNORE_INDEX, jnp.int32), text], axis=1)
        loss, count = next_token_cross_entropy(logits, labels)
        return logits, loss, count

    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        start = time.perf_counter()
        logits, loss, count = jax.block_until_ready(forward(clip_p, proj_p, llm_p, pixels, text))
        first = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(forward(clip_p, proj_p, llm_p, pixels, text))
        second = time.perf_counter() - start
        tokens, _ = greedy_generate(llm, llm_p['params'], text, jnp.ones_like(text, bool), 8)
    summary = dict(logits_shape=tuple(logits.shape), loss=float(loss), supervised_tokens=int(count),
                   finite=bool(jnp.isfinite(logits).all()), compile_and_run_s=first, run_s=second,
                   generated=np.asarray(tokens).tolist())
    log(f'forward: image tokens {feats_shape.shape[1]} + text {t} -> logits {summary["logits_shape"]}, '
        f'loss {summary["loss"]:.4f} over {summary["supervised_tokens"]} tokens '
        f'(ln V = {np.log(llm_cfg.vocab_size):.4f}); first call {first:.2f}s, second {second:.3f}s')
    log(f'greedy decode (KV cache), 8 tokens per sample: {summary["generated"]}')
    if llm_cfg.moe_layers:
        summary['moe'] = m = _moe_report(llm, llm_p, text, config.seed, mesh, rules)
        log(f'MoE, training mode (capacity factor {llm_cfg.moe.capacity_factor}, top-{llm_cfg.moe.top_k}): '
            f'aux loss {m["aux_loss"]:.4f} over {len(llm_cfg.moe_layers)} layers; tokens per expert '
            f'by layer {m["expert_counts"]}; dropped {m["drop_fraction"]}')
    if not summary['finite']:
        raise FloatingPointError('demo: non-finite logits')
    return summary
