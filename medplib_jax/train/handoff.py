"""Stage hand-offs: where a stage's parameters come from, and what it hands the next.

A stage ends by folding its LoRA adapters into the base weights (W += alpha / r * A B, models/lora.py `merge`, as
the reference's merge_lora_weights_and_save_hf_model*.py do) and saving a plain tree (`final_params`). The next
stage starts from such trees as `config.train.init` says (train/config.py InitConfig):

- stage I from converted weights (Vicuna-7B-v1.5, CLIP, SAM-Med2D) with a fresh projector (LLaVA-1.5's recipe);
- stage II from LLaVA-v1.5-7B's converted weights with stage I's projector (the reference's scripts/train_stage2.sh;
  `model=tiny` takes the whole stage-I run, there being no tiny LLaVA);
- stage III from stage II's, with a fresh T-projector (the reference re-creates `text_hidden_fcs`);
- stage IV (the reference's `initialize_moe_modules`): everything from stage II, expert 0 of every MoE layer from stage
  III's FFN and expert 1 from stage II's, the mask decoder and T-projector from stage III, the region adapter from stage
  II (the base), a fresh router and fresh LoRA adapters (every expert with expert 0's A, as the reference deep-copies
  one MLP).

Leaves a source does not have are kept from the model's own initialisation only when they are adapters the new
stage adds (LoRA A / B, the MoE router); anything else missing, unexpected or mis-shaped is one error listing it.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medplib_jax import checkpoint
from medplib_jax.sharding import Rules, param_shardings
from medplib_jax.train.config import RANDOM, InitConfig
from medplib_jax.train.trainable import flatten, unflatten

# Leaves a stage adds to its predecessor's tree: they start from the model's initialisation.
ADAPTER_LEAF = re.compile(r'.*/lora_[AB]$|.*/mlp/gate/wg/kernel$')
MAX_LISTED = 20  # problems named in the one-line error (a layout mismatch at 7B would be thousands)
EXPERT_KERNEL = re.compile(r'(?P<prefix>.*)/mlp/experts/(?P<proj>gate_proj|up_proj|down_proj)/kernel$')


class HandoffError(ValueError):
    """A source tree that does not fit the model: every problem listed in one message."""


def resolve(path: str, runs: str) -> str:
    """`{runs}` in a configured path -> the folder holding this run's workdir."""
    return path.replace('{runs}', runs)


def _dense_of(expert_path: str) -> str | None:
    m = EXPERT_KERNEL.fullmatch(expert_path)
    return f'{m["prefix"]}/mlp/{m["proj"]}/kernel' if m else None


class _Sources:
    """Reads each source directory once, onto shardings taken from the model's own parameters."""

    def __init__(self, shardings: Mapping[str, NamedSharding], mesh: Mesh):
        self._shardings, self._mesh, self._cache = shardings, mesh, {}
        # a dense FFN kernel read for an expert gets the expert kernel's sharding without its expert axis
        self._dense = {}
        for path, sh in shardings.items():
            dense = _dense_of(path)
            if dense:
                self._dense[dense] = sh

    def _sharding_of(self, path: str, shape: tuple[int, ...]) -> NamedSharding:
        if path in self._shardings and len(self._shardings[path].spec) <= len(shape):
            return self._shardings[path]
        if path in self._dense:
            spec = list(self._dense[path].spec) + [None] * (len(shape) + 1 - len(self._dense[path].spec))
            axis = len(shape) - 2  # the expert axis sits before (in, out)
            return NamedSharding(self._mesh, PartitionSpec(*(spec[:axis] + spec[axis + 1:])))
        return NamedSharding(self._mesh, PartitionSpec())

    def get(self, path: str, field: str) -> dict[str, jax.Array]:
        directory = checkpoint.resolve_params_dir(path, field)
        if directory not in self._cache:
            self._cache[directory] = checkpoint.restore_params(directory, self._sharding_of)
        return self._cache[directory]


def _matching(pattern: str, paths, field: str) -> list[str]:
    rx = re.compile(pattern)
    hits = [p for p in paths if rx.fullmatch(p)]
    if not hits:
        raise HandoffError(f'{field}: pattern {pattern!r} matches no parameter of the model')
    return hits


def initial_params(init_fn: Callable[[], Any], icfg: InitConfig, runs: str, mesh: Mesh, rules: Rules,
                   log: Callable[[str], None] = print) -> tuple[dict, Any]:
    """The stage's starting parameters, sharded, and the abstract boxed tree (for state shardings).

    init_fn: the model's `init` (returns boxed variables with a 'params' collection). Only the leaves that stay at
    their initialisation are computed (the rest of `init` is dead code to XLA)."""
    boxed = jax.eval_shape(init_fn)['params']
    shardings = flatten(param_shardings(boxed, mesh, rules))
    shapes = {k: tuple(v.shape) for k, v in flatten(nn.unbox(boxed)).items()}
    sources = _Sources(shardings, mesh)
    chosen: dict[str, jax.Array] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []

    def take(path: str, value: jax.Array, label: str):
        if tuple(value.shape) != shapes[path]:
            problems.append(f'{path}: {label} has shape {tuple(value.shape)}, the model {shapes[path]}')
            origin[path] = 'mis-shaped'  # reported once, not again as missing
            return
        chosen[path], origin[path] = value, label

    base_path = icfg.params
    if base_path != RANDOM:
        base = sources.get(resolve(base_path, runs), 'config.train.init.params')
        used_elsewhere = {_dense_of(p) for p in shapes if icfg.experts and _dense_of(p)}
        for path, value in base.items():
            if path in shapes:
                take(path, value, f'init.params ({base_path})')
            elif path not in used_elsewhere:
                problems.append(f'{path}: in init.params ({base_path}) but not in the model')
    if icfg.experts:
        chosen.update(_stack_experts(icfg, runs, sources, shapes, shardings, problems, origin))
    for pattern, src in icfg.load_rules():
        tree = sources.get(resolve(src, runs), f'config.train.init.load ({pattern})')
        for path in _matching(pattern, shapes, 'config.train.init.load'):
            if path in tree:
                take(path, tree[path], f'init.load ({src})')
            else:
                problems.append(f'{path}: init.load {pattern!r} names {src}, which does not have it')
    for pattern in icfg.fresh:
        for path in _matching(pattern, shapes, 'config.train.init.fresh'):
            chosen.pop(path, None)
            origin[path] = 'fresh (init.fresh)'
    if base_path != RANDOM:
        missing = [p for p in shapes if p not in chosen and p not in origin and not ADAPTER_LEAF.fullmatch(p)]
        problems += [f'{p}: missing from init.params ({base_path})' for p in missing]
    if problems:
        shown = problems[:MAX_LISTED]
        more = f'; ... {len(problems) - len(shown)} more' if len(problems) > len(shown) else ''
        raise HandoffError(f'config.train.init: {len(problems)} problems: ' + '; '.join(shown) + more)

    fresh = [p for p in shapes if p not in chosen]
    if fresh:
        chosen.update(_initialise(init_fn, fresh, shardings, mesh, rules))
        for p in fresh:
            origin.setdefault(p, 'initialisation')
    if icfg.experts:  # the reference deep-copies one LoRA-wrapped MLP: every expert starts with expert 0's A
        for path in list(chosen):
            if '/mlp/experts/' in path and path.endswith('/lora_A') and origin.get(path) == 'initialisation':
                a = chosen[path]
                axis = a.ndim - 3
                first = jax.lax.index_in_dim(a, 0, axis, keepdims=True)
                chosen[path] = jax.device_put(jnp.broadcast_to(first, a.shape), shardings[path])
    _report(origin, shapes, log)
    return unflatten({p: chosen[p] for p in shapes}), boxed


def _initialise(init_fn, fresh: list[str], shardings, mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
    """The leaves in `fresh` at their initialisation, each created in its shards under jit (the rest of `init` is
    dead code to XLA). One compiled program, so JAX's persistent compilation cache can keep it: op-by-op
    initialisation compiles hundreds of small random kernels instead, which was slower here."""
    def init_fresh():
        flat = flatten(nn.unbox(init_fn()['params']))
        return {p: flat[p] for p in fresh}
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        return jax.jit(init_fresh, out_shardings={p: shardings[p] for p in fresh})()


def _stack_experts(icfg: InitConfig, runs: str, sources: _Sources, shapes, shardings, problems, origin) -> dict:
    trees = [sources.get(resolve(src, runs), f'config.train.init.experts[{e}]') for e, src in enumerate(icfg.experts)]
    out = {}
    for path, shape in shapes.items():
        dense = _dense_of(path)
        if not dense:
            continue
        lacking = [icfg.experts[e] for e, t in enumerate(trees) if dense not in t]
        if lacking:
            problems.append(f'{dense}: missing from init.experts source {lacking[0]} (expert {path})')
            continue
        axis = len(shape) - 3
        if shape[axis] != len(trees):
            problems.append(f'{path}: the model has {shape[axis]} experts, config.train.init.experts names '
                            f'{len(trees)}')
            continue
        stacked = jax.jit(lambda *xs, a=axis: jnp.stack(xs, axis=a), out_shardings=shardings[path])(
            *[t[dense] for t in trees])
        if tuple(stacked.shape) != shape:
            problems.append(f'{path}: experts stack to {tuple(stacked.shape)}, the model has {shape}')
            continue
        out[path] = stacked
        origin[path] = 'init.experts (' + ', '.join(icfg.experts) + ')'
    return out


def _report(origin: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]], log: Callable[[str], None]) -> None:
    counts: dict[str, list[int]] = {}
    for path, label in origin.items():
        row = counts.setdefault(label, [0, 0])
        row[0] += 1
        row[1] += math.prod(shapes[path])
    for label, (leaves, n) in sorted(counts.items()):
        log(f'init: {leaves} arrays ({n:,} parameters) from {label}')
