"""Two-expert LoRA mixture-of-experts FFN with DeepSpeed's capacity-factor top-k gating (MedPLIB stage IV).

`top_k_gating` reproduces DeepSpeed's `top1gating` / `top2gating` (as used by MedPLIB through deepspeed 0.13.1)
on one group of S tokens. The layer groups `moe.group_size` sequences (not "the tokens on one device", as
DeepSpeed does) so that capacity, dropping and the aux loss do not depend on the device mesh. `moe.dispatch`
picks how tokens reach the experts, from the same routing decisions:
- 'einsum' (default, the reference): one-hot dispatch/combine einsums over (group, expert, capacity) as in
  GShard / MaxText; the experts run on all E x C buffer slots, used or not.
- 'grouped': the kept (token, choice) pairs are gathered into rows sorted by expert, the experts run as a grouped
  matmul over the rows they actually got (models/grouped.py; `moe.grouped_matmul` picks the kernel), and the rows
  are gathered back and scaled by the combine weight. Top-1 and top-2 alike. Same parameters, same outputs (up to
  float rounding). Under a mesh each batch shard lays out and computes the rows of its own sequences.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from medplib_jax import sharding
from medplib_jax.axis_rules import BATCH, LOGICAL_AXIS_RULES, mesh_axes
from medplib_jax.models.config import LoRAConfig, MoEConfig
from medplib_jax.models.grouped import GroupedLayout, make_layout, tile_rows
from medplib_jax.models.layers import constrain, target_platform, torch_linear_init
from medplib_jax.models.lora import projection


def capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's `_capacity`: ceil(S / E * cf * k) in float32 (torch multiplies a float32 tensor), >= min."""
    c = int(np.ceil(np.float32(num_tokens / num_experts) * np.float32(capacity_factor * k)))
    return max(c, min_capacity)


def gate_needs_noise(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> bool:
    """Whether the gate's result can depend on its noise. Top-1: only when tokens can be dropped (the random
    token selection picks who stays). Top-2: the Gumbel second choice matters only with more than 2 experts."""
    if k == 1:
        return capacity(num_tokens, num_experts, 1, capacity_factor, min_capacity) < num_tokens
    return num_experts > 2


def _dynamic_capacity(n_used: jax.Array, num_experts: int, k: int, capacity_factor: float,
                      min_capacity: int) -> jax.Array:
    c = jnp.ceil(n_used.astype(jnp.float32) / num_experts * np.float32(capacity_factor * k)).astype(jnp.int32)
    return jnp.maximum(c, min_capacity)


class Routing(NamedTuple):
    """One group's routing decisions per token and choice j < k (first choice, then second). A choice is kept
    (DeepSpeed's dispatch mask) exactly where its weight is non-zero."""
    aux_loss: jax.Array  # ()
    counts: jax.Array  # (E,) first choices before dropping
    expert: jax.Array  # (S, k) int32: the chosen expert
    slot: jax.Array  # (S, k) int32: its buffer slot (0 when dropped)
    weight: jax.Array  # (S, k) float32: combine weight, 0 when dropped or not routed


def top_k_gating(logits: jax.Array, *, k: int, capacity_factor: float, min_capacity: int,
                 noise: jax.Array | None = None, rng: jax.Array | None = None,
                 used_token: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """DeepSpeed top-1 / top-2 gating over one group of S tokens, as dense (S, E, C) tensors (see `route`).

    Returns (aux_loss, combine_weights (S, E, C), dispatch_mask (S, E, C) bool, expert_counts (E,)).
    """
    r = route(logits, k=k, capacity_factor=capacity_factor, min_capacity=min_capacity, noise=noise, rng=rng,
              used_token=used_token)
    s, e = logits.shape
    combine = dense_combine(r, e, capacity(s, e, k, capacity_factor, min_capacity))
    return r.aux_loss, combine, combine != 0, r.counts


def dense_combine(r: Routing, num_experts: int, cap: int) -> jax.Array:
    """(S, E, C) combine weights: each kept choice's weight at (its expert, its slot)."""
    out = 0.0
    for j in range(r.expert.shape[1]):
        per_expert = r.weight[:, j, None] * jax.nn.one_hot(r.expert[:, j], num_experts, dtype=jnp.float32)
        out = out + per_expert[:, :, None] * jax.nn.one_hot(r.slot[:, j], cap, dtype=jnp.float32)[:, None, :]
    return out


def route(logits: jax.Array, *, k: int, capacity_factor: float, min_capacity: int,
          noise: jax.Array | None = None, rng: jax.Array | None = None,
          used_token: jax.Array | None = None) -> Routing:
    """DeepSpeed top-1 / top-2 gating over one group of S tokens.

    logits: (S, E) router logits (computed in fp32). noise: the (S, E) array DeepSpeed would draw, uniform [0, 1)
    for k=1 (random token selection priorities), standard Gumbel for k=2 (second choice); drawn from `rng` when
    None (and zeros when the result cannot depend on it). used_token: optional (S,) 0/1 mask; tokens with 0 are
    not routed, not counted toward capacity (capacity = ceil(n_used / E * cf * k)) nor in the aux loss means.

    Returns a `Routing` with DeepSpeed's conventions: top-1 combine weights are the unrenormalised gate
    probability; top-2 weights are renormalised over the kept choices; counts are first choices before dropping;
    slots index the static capacity C.
    """
    if k not in (1, 2):
        raise ValueError(f'top_k_gating: k={k}; only 1 and 2 are supported')
    logits = logits.astype(jnp.float32)
    s, e = logits.shape
    cap = capacity(s, e, k, capacity_factor, min_capacity)
    gates = jax.nn.softmax(logits, axis=-1)
    if noise is None:
        if gate_needs_noise(s, e, k, capacity_factor, min_capacity):
            if rng is None:
                raise ValueError(f'top_k_gating: k={k} with {s} tokens, {e} experts and capacity {cap} depends on '
                                 f'random noise: pass `noise` or `rng`')
            noise = (jax.random.uniform(rng, (s, e)) if k == 1 else jax.random.gumbel(rng, (s, e)))
        else:
            noise = jnp.zeros((s, e), jnp.float32)
    noise = noise.astype(jnp.float32)

    used = jnp.ones((s,), jnp.int32) if used_token is None else used_token.astype(jnp.int32)
    n_used = used.sum()
    limit = cap if used_token is None else jnp.minimum(_dynamic_capacity(n_used, e, k, capacity_factor,
                                                                         min_capacity), cap)
    expert1 = jnp.argmax(gates, axis=-1).astype(jnp.int32)
    first = jax.nn.one_hot(expert1, e, dtype=jnp.int32)
    mask1 = first * used[:, None]
    counts = mask1.sum(axis=0)

    # Aux loss from first choices before dropping. DeepSpeed means over all S; with a used-token mask we mean
    # over the used tokens (padding says nothing about balance).
    denom = s if used_token is None else jnp.maximum(n_used, 1)
    me = (gates * used[:, None]).sum(axis=0) / denom
    ce = mask1.astype(jnp.float32).sum(axis=0) / denom

    if k == 1:
        aux = jnp.sum(me * ce) * e
        # Random token selection: an over-full expert keeps the `limit` tokens of highest priority.
        priority = mask1 * noise
        order = jnp.argsort(-priority, axis=0, stable=True)
        rank = jnp.argsort(order, axis=0, stable=True)
        mask1 = mask1 * (rank < limit)
        loc1 = jnp.cumsum(mask1, axis=0) - 1  # buffer slot = order among the kept tokens, in token order
        loc1_s = jnp.sum(loc1 * mask1, axis=1)
        return Routing(aux, counts, expert1[:, None], loc1_s[:, None].astype(jnp.int32),
                       jnp.sum(gates * mask1, axis=1)[:, None])
    else:
        aux = jnp.mean(me * ce) * e * e
        except1 = jnp.where(first > 0, -jnp.inf, logits + noise)  # Gumbel-max over the other experts
        expert2 = jnp.argmax(except1, axis=-1).astype(jnp.int32)
        mask2 = jax.nn.one_hot(expert2, e, dtype=jnp.int32) * used[:, None]
        loc1 = jnp.cumsum(mask1, axis=0) - 1
        # Second choices queue behind every first choice of that expert (dropped ones included).
        loc2 = jnp.cumsum(mask2, axis=0) - 1 + jnp.sum(mask1, axis=0, keepdims=True)
        mask1 = mask1 * (loc1 < limit)
        mask2 = mask2 * (loc2 < limit)
        loc1_s = jnp.sum(loc1 * mask1, axis=1)
        loc2_s = jnp.sum(loc2 * mask2, axis=1)
        g1 = jnp.sum(gates * mask1, axis=1)
        g2 = jnp.sum(gates * mask2, axis=1)
        norm = jnp.maximum(g1 + g2, jnp.finfo(jnp.float32).eps)
        return Routing(aux, counts, jnp.stack([expert1, expert2], axis=1),
                       jnp.stack([loc1_s, loc2_s], axis=1).astype(jnp.int32),
                       jnp.stack([g1 / norm, g2 / norm], axis=1))


class Experts(nn.Module):
    """E SwiGLU FFNs stacked on a leading `expert` axis, each with its own LoRA on gate/up/down."""
    intermediate_size: int
    num_experts: int
    lora: LoRAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, layout: GroupedLayout | None = None) -> jax.Array:
        """x: (E, G, C, D) -> (E, G, C, D); with a grouped `layout`: (R, D) rows sorted by expert -> (R, D)."""
        d = x.shape[-1]

        def proj(features, axes, name):
            return projection(features, axes, name, self.lora, stacked=self.num_experts, dtype=self.dtype,
                              param_dtype=self.param_dtype)

        gate = proj(self.intermediate_size, ('embed', 'mlp'), 'gate_proj')(x, train, layout)
        up = proj(self.intermediate_size, ('embed', 'mlp'), 'up_proj')(x, train, layout)
        h = nn.silu(gate) * up
        if layout is None:
            h = constrain(h, ('expert', 'activation_batch', None, 'activation_mlp'))
        return proj(d, ('mlp', 'embed'), 'down_proj')(h, train, layout)


class MoEFFN(nn.Module):
    """Router (`gate/wg`, fp32, bias-free) + capacity-factor gating + stacked experts.

    Sows per call, into `intermediates`: `moe_aux_loss` (mean over groups), `moe_expert_counts` (E,) first
    choices, `moe_drop_fraction` (share of the k * used-token choices that found no buffer slot).
    """
    moe: MoEConfig
    intermediate_size: int
    lora: LoRAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, token_mask: jax.Array | None, train: bool,
                 noise: jax.Array | None = None) -> jax.Array:
        """x (B, L, D); token_mask (B, L) or None (right padding: real tokens first); noise: optional explicit
        (groups, group * L, E) gate noise (else drawn from the 'moe' rng when the result depends on it).

        Routing groups: `moe.group_size` sequences in training; in evaluation the largest divisor of the batch up
        to it (a batch of 1 decodes alone). With the evaluation capacity factor nothing is dropped (2 experts,
        top-1, factor 2: capacity = the group's tokens), so the grouping then changes no output."""
        moe = self.moe
        b, length, d = x.shape
        group = moe.group_size if train else math.gcd(b, moe.group_size)
        if b % group:
            raise ValueError(f'moe.group_size={moe.group_size} does not divide the batch of {b} sequences; set '
                             f'--config.model.moe.group_size to a divisor (routing groups are whole sequences)')
        groups, s = b // group, group * length
        # The router runs per token where the tokens are (a group may straddle batch shards); only its (.., E)
        # logits are regrouped.
        logits = _Router(moe.num_experts, name='gate')(x).reshape(groups, s, moe.num_experts)
        cf = moe.capacity_factor if train else moe.eval_capacity_factor
        k = moe.top_k
        if noise is None and gate_needs_noise(s, moe.num_experts, k, cf, moe.min_capacity):
            key = self.make_rng('moe')
            shape = (groups, s, moe.num_experts)
            noise = jax.random.uniform(key, shape) if k == 1 else jax.random.gumbel(key, shape)
        used = None if token_mask is None else routed_positions(token_mask, group, moe.route_padding)

        def gate_fn(lg, nz, us):
            return route(lg, k=k, capacity_factor=cf, min_capacity=moe.min_capacity, noise=nz, used_token=us)

        r = jax.vmap(gate_fn, in_axes=(0, None if noise is None else 0, None if used is None else 0))(
            logits, noise, used)
        experts = Experts(self.intermediate_size, moe.num_experts, self.lora, self.dtype, self.param_dtype,
                          name='experts')
        cap = capacity(s, moe.num_experts, k, cf, moe.min_capacity)
        if moe.dispatch == 'grouped':
            y = _grouped_dispatch(experts, x.astype(self.dtype), r, group, cap, train, moe.grouped_matmul)
        else:
            combine = jax.vmap(lambda r_: dense_combine(r_, moe.num_experts, cap))(r)
            xg = constrain(x.reshape(groups, s, d), ('activation_batch', 'activation_length', 'activation_embed'))
            expert_in = jnp.einsum('gsec,gsd->egcd', (combine != 0).astype(self.dtype), xg.astype(self.dtype))
            expert_in = constrain(expert_in, ('expert', 'activation_batch', None, 'activation_embed'))
            y = jnp.einsum('gsec,egcd->gsd', combine.astype(self.dtype), experts(expert_in, train))

        kept = r.weight != 0  # (groups, S, k): DeepSpeed's dispatch mask, per choice
        n_used = s * groups if used is None else used.sum()
        self.sow('intermediates', 'moe_aux_loss', r.aux_loss.mean())
        self.sow('intermediates', 'moe_expert_counts', r.counts.sum(axis=0))
        self.sow('intermediates', 'moe_drop_fraction', 1.0 - kept.sum() / jnp.maximum(k * n_used, 1))
        # Per token, how many of its k choices got a buffer slot: the keep / drop decisions themselves (dead code
        # to XLA unless read).
        self.sow('intermediates', 'moe_token_slots', kept.sum(axis=-1).astype(jnp.int32).reshape(b, length))
        # Per token, its first-choice expert (the one top-1 routing uses when the token is kept).
        self.sow('intermediates', 'moe_token_expert', jnp.argmax(logits, axis=-1).astype(jnp.int32).reshape(b, length))
        return y.reshape(b, length, d)


def _grouped_dispatch(experts: Experts, x: jax.Array, r: Routing, group: int, cap: int, train: bool,
                      kernel: str) -> jax.Array:
    """The 'grouped' dispatch: x (B, L, D) and the routing of its groups of `group` sequences -> (B, L, D).

    Every kept (token, choice) pair becomes one row, rows sorted by expert; dropped choices get no row (their
    gathers read the fill value 0). The keep / drop decisions are the groups'; once made, a token's output needs
    only its own row, so under a mesh each batch shard lays out, computes and gathers back the rows of its own
    sequences (`jax.shard_map`): no token or row crosses a device, whole groups per shard or not (the reference's
    experts see only their GPU's micro-batch). Without a mesh all sequences' rows share one layout."""
    b, length, d = x.shape
    k = r.expert.shape[-1]
    num_experts = experts.num_experts
    axes, shards = _batch_shards(b)
    rows = b // shards  # sequences per shard
    # Kept entries per shard: at most k per token, and E x capacity per group when the shard holds whole groups
    # (a shard that cuts groups may hold parts of one more group than rows / group, so only the first bound).
    max_kept = k * rows * length
    if rows % group == 0:
        max_kept = min(max_kept, rows // group * num_experts * cap)
    kernel = kernel if kernel != 'auto' else 'tiles' if target_platform() == 'cpu' else 'ragged_dot'

    def lay_out(xs, expert, weight):  # one shard's sequences -> its rows
        n = xs.shape[0] * length
        layout, row = make_layout(expert.reshape(-1), weight.reshape(-1) != 0, num_experts, max_kept)
        token = jnp.arange(n * k, dtype=jnp.int32) // k
        src = jnp.full(layout.row_expert.shape, n, jnp.int32).at[row].set(token, mode='drop')  # row -> token
        rows_in = jnp.take(xs.reshape(n, d), src, axis=0, mode='fill', fill_value=0)
        return rows_in, row, layout.tile_bounds, layout.row_expert

    def gather_back(rows_out, row, weight):  # one shard's rows -> its sequences' tokens
        y = jnp.take(rows_out, row, axis=0, mode='fill', fill_value=0)
        return (y * weight.reshape(-1).astype(y.dtype)[:, None]).reshape(-1, length, k, d).sum(axis=2)

    if axes:
        spec = P(axes)
        lay_out = jax.shard_map(lay_out, in_specs=spec, out_specs=spec, axis_names=frozenset(axes), check_vma=False)
        gather_back = jax.shard_map(gather_back, in_specs=spec, out_specs=spec, axis_names=frozenset(axes),
                                    check_vma=False)
    # (groups, group x L, k) -> (B, L x k): a group's tokens are its sequences' tokens in order
    expert, weight = r.expert.reshape(b, length * k), r.weight.reshape(b, length * k)
    rows_in, row, bounds, row_expert = lay_out(x, expert, weight)
    rows_out = experts(rows_in, train, GroupedLayout(tile_rows(max_kept, num_experts), bounds, row_expert, kernel,
                                                      axes))
    return gather_back(rows_out, row, weight)


def _batch_shards(batch: int) -> tuple[tuple[str, ...], int]:
    """(the mesh axes that split the batch as the rules split `activation_batch`, their number of shards) for the
    mesh in context; ((), 1) for no mesh, one shard, or a batch they do not divide (then all sequences' rows share
    one layout)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    rules = nn.get_logical_axis_rules() or LOGICAL_AXIS_RULES  # as sharding.data_sharding: the table by default
    shards = sharding.batch_shards(mesh, rules)
    return (mesh_axes(BATCH, rules), shards) if shards > 1 and batch % shards == 0 else ((), 1)


def routed_positions(token_mask: jax.Array, group: int, route_padding: str) -> jax.Array | None:
    """(B, L) token mask -> (B / group, group * L) positions to route (None: all of them), per ROUTE_PADDING."""
    b, length = token_mask.shape
    if route_padding == 'all':
        return None
    if route_padding == 'micro_batch':
        ends = jnp.max(jnp.where(token_mask, jnp.arange(1, length + 1), 0), axis=-1)  # last real position + 1
        longest = ends.reshape(b // group, group).max(axis=-1)
        used = jnp.arange(length)[None, None, :] < longest[:, None, None]
        return jnp.broadcast_to(used, (b // group, group, length)).reshape(b // group, group * length)
    return token_mask.reshape(b // group, group * length)


class _Router(nn.Module):
    """`gate.wg` of the reference: Linear(D -> E, bias=False), input and weight in fp32 (DeepSpeed casts both),
    PyTorch's default Linear init."""
    num_experts: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.num_experts, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, name='wg',
                        kernel_init=nn.with_logical_partitioning(torch_linear_init, ('embed', None)))(
            x.astype(jnp.float32))


_METRIC_PATH = re.compile(r'layers_(\d+)/mlp/(moe_\w+)$|layers/mlp/(moe_\w+)$')


def collect_moe_metrics(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Gathers the sown MoE metrics of every layer (scanned or not), in layer order.

    Returns `aux_loss` (sum over MoE layers: what the loss adds, times moe.aux_loss_coef),
    `aux_loss_per_layer` (L,), `expert_counts` (L, E), `drop_fraction` (L,), `token_slots` (L, B, T): kept
    choices per token, `token_expert` (L, B, T): each token's first-choice expert. Empty dict for a dense model.
    """
    per_name: dict[str, list[tuple[int, jax.Array]]] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(
            intermediates, is_leaf=lambda x: isinstance(x, tuple))[0]:
        key = '/'.join(str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path)
        m = _METRIC_PATH.search(key)
        if not m:
            continue
        value = value[0] if isinstance(value, tuple) else value
        if m.group(1) is not None:
            per_name.setdefault(m.group(2), []).append((int(m.group(1)), value))
        else:  # scanned: leading layer axis
            per_name.setdefault(m.group(3), []).extend(enumerate(value))
    if not per_name:
        return {}
    stacked = {n: jnp.stack([v for _, v in sorted(items, key=lambda t: t[0])]) for n, items in per_name.items()}
    return {'aux_loss': stacked['moe_aux_loss'].sum(), 'aux_loss_per_layer': stacked['moe_aux_loss'],
            'expert_counts': stacked['moe_expert_counts'], 'drop_fraction': stacked['moe_drop_fraction'],
            'token_slots': stacked['moe_token_slots'], 'token_expert': stacked['moe_token_expert']}
