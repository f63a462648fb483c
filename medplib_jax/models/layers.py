"""Building blocks shared by the towers: dtype lookup, logically-partitioned Dense, RMSNorm, attention core."""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medplib_jax.axis_rules import LOGICAL_AXIS_RULES, axis_names
from medplib_jax.models.config import DTYPES as DTYPE_NAMES

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
assert tuple(DTYPES) == DTYPE_NAMES  # the names the config dataclasses accept


def dtype_of(name: str) -> jnp.dtype:
    if name not in DTYPES:
        raise ValueError(f'unknown dtype {name!r}; known: {sorted(DTYPES)}')
    return DTYPES[name]


# PyTorch's default `nn.Linear` kernel init (kaiming_uniform with a = sqrt(5)): U(-1 / sqrt(fan_in), 1 / sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default `nn.Linear` bias: U(-1 / sqrt(fan_in), 1 / sqrt(fan_in)), the kernel's bound."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def dense(features: int, axes: tuple[str, str], *, use_bias: bool = False, dtype: jnp.dtype = jnp.float32,
          param_dtype: jnp.dtype = jnp.float32, name: str | None = None,
          kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal(),
          bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()) -> nn.Dense:
    """nn.Dense whose kernel (in, out) and bias (out,) carry logical axis names."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)))


def layer_norm(eps: float, axis_name: str, *, dtype: jnp.dtype, param_dtype: jnp.dtype, name: str) -> nn.LayerNorm:
    """LayerNorm with logical names on scale/bias; statistics in fp32 whatever the compute dtype."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name, use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis_name,)))


class RMSNorm(nn.Module):
    """LLaMA RMSNorm, HF convention: normalise in fp32, cast back, then scale by `weight`."""
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param('weight', nn.with_logical_partitioning(nn.initializers.ones_init(), ('norm',)),
                            (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * x32.astype(self.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                          bias: jax.Array | None = None) -> jax.Array:
    """Softmax attention with grouped KV heads.

    q: (B, T, H, D); k, v: (B, S, K, D) with H a multiple of K; mask: bool, broadcastable to (B, T, S),
    True = may attend; bias: additive fp32 scores (B, H, T, S) (SAM's relative positions). Scores and softmax in
    fp32; output in q's dtype, (B, T, H, D).
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    if h % kv:
        raise ValueError(f'{h} query heads are not a multiple of {kv} key/value heads')
    g, s = h // kv, k.shape[1]
    # Head-major operands, a query head's group folded into its rows: both products are plain batched matmuls
    # over (B, K) with the contraction last, which XLA's CPU dot runs about 4x faster (forward) than the
    # sequence-major 5-d einsum; the same sums, so the same result up to rounding.
    qh = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    scores = jnp.einsum('bktd,bskd->bkts', qh, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    if bias is not None:
        scores = scores + bias.reshape(b, kv, g * t, s).astype(jnp.float32)
    if mask is not None:
        mask = jnp.broadcast_to(jnp.broadcast_to(mask, (b, t, s))[:, None, None], (b, 1, g, t, s))
        mask = mask.reshape(b, 1, g * t, s)
        # A finite minimum (not -inf) keeps fully-masked rows (padding queries) NaN-free, as HF does.
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    # Softmax normalised after the value product (one division of (T, D) instead of (T, S)); the max is a constant
    # shift of each row, so no gradient flows through it. A fully-masked row gets the uniform average.
    e = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    out = jnp.einsum('bkts,bskd->bktd', e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = (out / e.sum(-1, keepdims=True)).astype(v.dtype)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, token_mask: jax.Array, block: int = 0,
                     kernel: str = 'xla') -> jax.Array:
    """Causal self-attention over one sequence (key s visible to query t iff s <= t and token_mask[:, s]).

    `block` > 0 splits the queries into blocks of `block` rows; block i [a, b) attends only keys [0, b), so the
    fully-masked upper-triangle blocks are never computed (about half the score work and memory at long T). The
    result equals `dot_product_attention` with the full (B, T, T) mask, fully-masked rows included (those get the
    uniform average of all T values, as the full-width softmax over float32-min scores gives). `kernel`: 'xla'
    (the einsums here), 'splash' (`splash_causal_attention`), 'cudnn' (`cudnn_causal_attention`), 'auto' (splash
    on TPU, cudnn on GPU for bf16 / fp16 inputs, else xla); the same function.
    """
    if kernel == 'auto':
        platform = target_platform()
        kernel = ('splash' if platform == 'tpu' else
                  'cudnn' if platform == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16) else 'xla')
    if kernel == 'splash':
        return splash_causal_attention(q, k, v, token_mask)
    if kernel == 'cudnn':
        return cudnn_causal_attention(q, k, v, token_mask)
    b, t, h, d = q.shape
    if block <= 0 or block >= t:
        causal = jnp.tril(jnp.ones((t, t), bool))
        return dot_product_attention(q, k, v, causal[None] & token_mask[:, None, :])
    kv = k.shape[2]
    uniform = _uniform_rows(v, h // kv)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        mask = (jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :])[None] & token_mask[:, None, :end]
        out = dot_product_attention(q[:, start:end], k[:, :end], v[:, :end], mask)
        outs.append(jnp.where(mask.any(-1)[:, :, None, None], out, uniform.astype(out.dtype)))
    return jnp.concatenate(outs, axis=1)


SPLASH_BLOCK = 128  # the splash kernel's query / key tile; sequences are padded up to a multiple of it


def target_platform() -> str:
    """The platform the program being traced is for: the devices of the mesh in context (a TPU topology's when
    compile-check compiles ahead of time on a CPU host), else the default backend's."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform


def splash_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, token_mask: jax.Array) -> jax.Array:
    """`causal_attention` through Pallas's TPU splash attention kernel (flash-style: no (T, T) scores in memory,
    masked tiles skipped), interpreted off TPU (how the CPU tests run it). q (B, T, H, D), k / v (B, T, KV, D).

    Under a mesh the kernel runs per shard (`jax.shard_map`; GSPMD cannot split a Pallas call): the batch split as
    the rules split `activation_batch`, the heads as `activation_heads` / `activation_kv_heads`, the sequence whole.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _splash_local(q, k, v, token_mask)
    rules = nn.get_logical_axis_rules() or LOGICAL_AXIS_RULES  # as sharding.data_sharding: the table by default
    heads = nn.logical_to_mesh_axes(('activation_batch', None, 'activation_heads', None), rules)
    kv_heads = nn.logical_to_mesh_axes(('activation_batch', None, 'activation_kv_heads', None), rules)
    if heads[2] != kv_heads[2]:  # each shard must hold whole query groups with their KV heads
        raise ValueError(f'llm.attention=splash: the rules split activation_heads over {heads[2]!r} but '
                         f'activation_kv_heads over {kv_heads[2]!r}; split both alike or use llm.attention=xla')
    def fits(axes, size):  # a dimension the axes do not divide (the one-row batch of model init) stays whole
        return axes if size % math.prod(mesh.shape[a] for a in axis_names(axes)) == 0 else None

    batch = fits(heads[0], q.shape[0])
    heads = jax.sharding.PartitionSpec(batch, None, fits(heads[2], q.shape[2]), None)
    kv_heads = jax.sharding.PartitionSpec(batch, None, fits(kv_heads[2], k.shape[2]), None)
    if heads[2] != kv_heads[2]:
        heads = jax.sharding.PartitionSpec(batch, None, None, None)
        kv_heads = heads
    rows = jax.sharding.PartitionSpec(batch, None)
    return jax.shard_map(_splash_local, mesh=mesh, in_specs=(heads, kv_heads, kv_heads, rows), out_specs=heads,
                         check_vma=False)(q, k, v, token_mask)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, token_mask: jax.Array) -> jax.Array:
    """One shard's splash attention. The kernel's causal mask does the s <= t part; padding keys are masked through
    its segment ids (every query in segment 1, a key in segment token_mask), so a padding query still sees the real
    keys before it, as in the einsum path. Rows with no visible key (left padding) get the uniform average of all T
    values, as there. Each KV head's query group runs as one multi-query kernel call. The sequence is padded to a
    multiple of SPLASH_BLOCK (keys there in segment 0, rows dropped)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
        splash_attention_mask as splash_mask,
    )
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    tp = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    qh = jnp.pad(q * jnp.asarray(d ** -0.5, q.dtype), pad).reshape(b, tp, kv, g, d).transpose(0, 2, 3, 1, 4)
    kh, vh = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (k, v))  # (B, KV, Tp, D)
    key_segment = jnp.pad(token_mask, ((0, 0), (0, tp - t))).astype(jnp.int32)
    segments = splash.SegmentIds(q=jnp.ones((b, tp), jnp.int32), kv=key_segment)
    blocks = splash.BlockSizes(*(SPLASH_BLOCK,) * 8)
    kernel = splash.make_splash_mqa(splash_mask.MultiHeadMask([splash_mask.CausalMask((tp, tp))] * g),
                                    block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                    interpret=target_platform() != 'tpu')
    out = jax.vmap(jax.vmap(kernel, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, 0))(qh, kh, vh, segments)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)[:, :t]
    seen = jnp.cumsum(token_mask, axis=1) > 0  # a real key at or before t
    return jnp.where(seen[:, :, None, None], out.astype(v.dtype), _uniform_rows(v, g).astype(v.dtype))


def cudnn_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, token_mask: jax.Array,
                           implementation: str | None = 'cudnn') -> jax.Array:
    """`causal_attention` through `jax.nn.dot_product_attention`'s fused cuDNN kernel (flash-style: no (T, T)
    scores in memory; GPU, bf16 / fp16). Padding reaches the kernel as key lengths, so each row must be right-padded
    (its real tokens first, as the Collator and `Predictor.prompt_routing` pad; prompts for decoding are left-padded
    but take the KV-cache path): a padding query then sees the real keys before it, as in the einsum path, and a
    row of padding only gets the uniform average there. A batch with any other mask gets NaN, not a silently wrong
    result. `implementation=None` lets jax pick (its XLA reference off GPU: how the CPU tests check the arguments)."""
    t = q.shape[1]
    lengths = token_mask.sum(axis=1).astype(jnp.int32)
    right_padded = jnp.all(token_mask == (jnp.arange(t)[None, :] < lengths[:, None]))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths,
                                       implementation=implementation)
    uniform = _uniform_rows(v, q.shape[2] // k.shape[2]).astype(out.dtype)
    out = jnp.where((lengths > 0)[:, None, None, None], out, uniform)
    return jnp.where(right_padded, out, jnp.nan).astype(v.dtype)


def _uniform_rows(v: jax.Array, groups: int) -> jax.Array:
    """What a row that sees no key gets from the full-width softmax over float32-min scores: the average of all T
    values, per query head (each KV head's repeated over its `groups` query heads). v (B, T, KV, D) -> (B, 1, H, D)."""
    return jnp.repeat(jnp.mean(v, axis=1), groups, axis=1)[:, None]


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Activation sharding hint by logical names (a no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, tuple(axes))


class ConvTranspose2d(nn.Module):
    """PyTorch `ConvTranspose2d` semantics on NHWC inputs (SAM-Med2D adapter k4/s2/p1, SAM upscaling k2/s2/p0).

    The kernel is stored as the *forward* convolution's HWIO kernel, i.e. torch's [in, out, kh, kw] weight
    transposed to [kh, kw, out, in] (`convert.common.CONV_TRANSPOSE`); `transpose_kernel=True` flips it. Output
    size = (H - 1) * stride - 2 * padding + kernel, as in torch (no output_padding).
    """
    features: int
    kernel_size: int
    stride: int
    padding: int = 0
    use_bias: bool = True
    axes: tuple[str | None, str | None] = (None, None)  # logical names of (out, in) channels
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param('kernel', nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                   (None, None) + tuple(self.axes)),
                            (k, k, self.features, x.shape[-1]), self.param_dtype)
        pad = k - 1 - self.padding
        y = jax.lax.conv_transpose(x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
                                   ((pad, pad), (pad, pad)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   transpose_kernel=True)
        if self.use_bias:
            bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[0],)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y
