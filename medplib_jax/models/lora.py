"""LoRA adapters with peft's semantics (the reference uses peft 0.10): y = x W + (alpha / r) * dropout(x) A B.

A is initialised like torch's kaiming_uniform(a=sqrt(5)) (U(+-1/sqrt(fan_in))), B with zeros, so a fresh adapter
changes nothing. The layer does not freeze its base weight: what trains is the stage's trainable patterns
(config.train.trainable), which leave the base kernels out as peft freezes `base_layer`. Parameters live beside
the base kernel: `q_proj/kernel`, `q_proj/lora_A`, `q_proj/lora_B`; `merge`
folds them into the kernel (W += alpha/r * A B) as the reference does at the end of each stage.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from medplib_jax.models.config import LoRAConfig
from medplib_jax.models.grouped import GroupedLayout, grouped_matmul
from medplib_jax.models.layers import torch_linear_init


class LoRADense(nn.Module):
    """Bias-free Dense with an optional LoRA branch.

    Plain: kernel (in, out), lora_A (in, r), lora_B (r, out). With `stacked=E` every parameter gets a leading
    expert axis (logical name `expert`) and the input is (E, ..., in): one projection per expert, or, with a
    `layout` (the MoE 'grouped' dispatch), (R, in) rows sorted by expert as the layout says. Same parameters.
    """
    features: int
    axes: tuple[str, str]
    lora: LoRAConfig = LoRAConfig()
    stacked: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, layout: GroupedLayout | None = None) -> jax.Array:
        if layout is not None and not self.stacked:
            raise ValueError('LoRADense: a grouped layout needs stacked (per-expert) parameters')
        d_in = x.shape[-1]
        lead, lead_axes = ((self.stacked,), ('expert',)) if self.stacked else ((), ())
        kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, lead_axes + self.axes),
                            lead + (d_in, self.features), self.param_dtype)
        e = 'e' if self.stacked else ''
        x = x.astype(self.dtype)
        base = (jnp.einsum(f'{e}...i,{e}io->{e}...o', x, kernel.astype(self.dtype)) if layout is None
                else grouped_matmul(x, kernel.astype(self.dtype), layout))
        if self.lora.rank == 0:
            return base
        r = self.lora.rank
        a = self.param('lora_A', nn.with_logical_partitioning(torch_linear_init, lead_axes + (self.axes[0], None)),
                       lead + (d_in, r), self.param_dtype)
        b = self.param('lora_B', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                              lead_axes + (None, self.axes[1])),
                       lead + (r, self.features), self.param_dtype)
        xd = x
        if train and self.lora.dropout > 0:
            keep = jax.random.bernoulli(self.make_rng('dropout'), 1.0 - self.lora.dropout, x.shape)
            xd = jnp.where(keep, x / (1.0 - self.lora.dropout), 0).astype(self.dtype)
        if layout is None:
            h = jnp.einsum(f'{e}...i,{e}ir->{e}...r', xd, a.astype(self.dtype))
            branch = jnp.einsum(f'{e}...r,{e}ro->{e}...o', h, b.astype(self.dtype))
        else:  # every expert's adapter on every row, masked to the row's own: E x r columns cost little
            h = jnp.einsum('ni,eir->ner', xd, a.astype(self.dtype)) * layout.row_mask(self.dtype)[:, :, None]
            branch = jnp.einsum('ner,ero->no', h, b.astype(self.dtype))
        return base + (self.lora.scale * branch).astype(self.dtype)


def projection(features: int, axes: tuple[str, str], name: str, lora: LoRAConfig, *, stacked: int = 0,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> LoRADense:
    """A bias-free projection named `name`, LoRA-wrapped only when `name` is one of `lora.targets`."""
    return LoRADense(features, axes, lora if lora.applies_to(name) else LoRAConfig(), stacked=stacked, dtype=dtype,
                     param_dtype=param_dtype, name=name)


def merge(params: Any, lora: LoRAConfig) -> Any:
    """Folds every (kernel, lora_A, lora_B) triple into its kernel and drops the adapters (stage hand-off).

    Works for plain kernels (in, out) and stacked ones (..., in, out), e.g. experts or scanned layers. Without
    adapters (rank 0) the tree is returned as a plain dict, unchanged.
    """
    if not lora.rank:
        return dict(params) if isinstance(params, Mapping) else params
    if isinstance(params, Mapping):
        if 'lora_A' in params and 'lora_B' in params and 'kernel' in params:
            k = params['kernel']
            delta = jnp.matmul(params['lora_A'].astype(jnp.float32), params['lora_B'].astype(jnp.float32))
            merged = {n: v for n, v in params.items() if n not in ('lora_A', 'lora_B')}
            merged['kernel'] = (k.astype(jnp.float32) + lora.scale * delta).astype(k.dtype)
            return merged
        return {n: merge(v, lora) for n, v in params.items()}
    return params
