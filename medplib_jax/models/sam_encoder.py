"""SAM-Med2D image encoder: ViT-B at 256x256 with decomposed relative positions and an adapter in every block
(the reference's model/segment_anything_med2d/modeling/image_encoder.py). Frozen in MedPLIB. NHWC in (B, 256, 256, 3),
NHWC out (B, 16, 16, 256).

Names mirror `sam-med2d_b.pth` (`image_encoder.blocks.3.attn.qkv.weight` <-> `blocks_3/attn/qkv/kernel`).
With `adapter=False` it is the original SAM ViT (what HF `SamModel`'s vision encoder computes), used for parity.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medplib_jax.models.config import SamImageEncoderConfig
from medplib_jax.models.layers import ConvTranspose2d, dense, dot_product_attention, dtype_of, layer_norm


def rel_pos_table(rel_pos: jax.Array, size: int) -> jax.Array:
    """(2*size-1, C) table -> (size, size, C): entry [i, j] = rel_pos[i - j + size - 1] (SAM's get_rel_pos for
    equal query/key sizes; checkpoints always carry the matching length)."""
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(f'rel_pos has {rel_pos.shape[0]} positions, attention over {size} needs {2 * size - 1}')
    idx = jnp.arange(size)[:, None] - jnp.arange(size)[None, :] + size - 1
    return rel_pos[idx]


class SamVitAttention(nn.Module):
    """Multi-head attention over an (h, w) map with SAM's decomposed relative-position bias."""
    cfg: SamImageEncoderConfig
    size: int  # side of the (square) map this block attends over: the window or the whole grid

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        b, h, w, c = x.shape
        hd = c // cfg.num_heads
        qkv = dense(3 * c, ('sam_embed', 'sam_heads'), use_bias=True, dtype=dt, param_dtype=pdt, name='qkv')(x)
        q, k, v = jnp.split(qkv.reshape(b, h * w, 3, cfg.num_heads, hd), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # (B, HW, heads, hd)
        init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ('sam_positions', None))
        rel_h = rel_pos_table(self.param('rel_pos_h', init, (2 * self.size - 1, hd), pdt), h)
        rel_w = rel_pos_table(self.param('rel_pos_w', init, (2 * self.size - 1, hd), pdt), w)
        # Decomposed bias from the *unscaled* queries: bias[q=(i, j), k=(a, b)] = q . Rh[i, a] + q . Rw[j, b].
        rq = q.reshape(b, h, w, cfg.num_heads, hd).astype(jnp.float32)
        bias_h = jnp.einsum('zijnc,iac->znija', rq, rel_h.astype(jnp.float32))
        bias_w = jnp.einsum('zijnc,jkc->znijk', rq, rel_w.astype(jnp.float32))
        bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, cfg.num_heads, h * w, h * w)
        out = dot_product_attention(q, k, v, bias=bias).reshape(b, h, w, c)
        return dense(c, ('sam_heads', 'sam_embed'), use_bias=True, dtype=dt, param_dtype=pdt, name='proj')(out)


class Adapter(nn.Module):
    """SAM-Med2D `Adapter_Layer`: LayerNorm(x + spatial(x * channel_gate(x))), gate from pooled features."""
    cfg: SamImageEncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        c = x.shape[-1]
        hidden = int(c * cfg.adapter_ratio)
        pooled = x.mean(axis=(1, 2))
        gate = nn.relu(dense(hidden, ('sam_embed', 'sam_mlp'), dtype=dt, param_dtype=pdt, name='channel_0')(pooled))
        gate = jax.nn.sigmoid(dense(c, ('sam_mlp', 'sam_embed'), dtype=dt, param_dtype=pdt, name='channel_2')(gate))
        gated = x * gate[:, None, None, :]
        conv_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 (None, None, 'sam_channels', 'sam_embed'))
        s = nn.relu(nn.Conv(c, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False, dtype=dt,
                            param_dtype=pdt, kernel_init=conv_init, name='spatial_0')(gated))
        s = nn.relu(ConvTranspose2d(c, 4, 2, 1, use_bias=False, axes=('sam_embed', 'sam_channels'), dtype=dt,
                                    param_dtype=pdt, name='spatial_2')(s))
        return layer_norm(cfg.adapter_norm_eps, 'sam_embed', dtype=dt, param_dtype=pdt, name='norm')(x + s)


class SamVitBlock(nn.Module):
    cfg: SamImageEncoderConfig
    window: int  # 0 = global attention

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        b, h, w, c = x.shape
        shortcut = x
        x = layer_norm(cfg.layer_norm_eps, 'sam_embed', dtype=dt, param_dtype=pdt, name='norm1')(x)
        attn = SamVitAttention(cfg, self.window or h, name='attn')
        if self.window:
            ws = self.window
            ph, pw = -h % ws, -w % ws  # zero-pad (after norm1, as SAM does) to whole windows
            xp = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
            nh, nw = (h + ph) // ws, (w + pw) // ws
            win = xp.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, ws, ws, c)
            out = attn(win).reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
            x = out.reshape(b, h + ph, w + pw, c)[:, :h, :w]
        else:
            x = attn(x)
        x = shortcut + x
        normed = layer_norm(cfg.layer_norm_eps, 'sam_embed', dtype=dt, param_dtype=pdt, name='norm2')(x)
        mlp = _SamMLP(cfg.mlp_dim, dt, pdt, name='mlp')(normed)
        if cfg.adapter:
            mlp = mlp + Adapter(cfg, name='Adapter')(normed)
        return x + mlp


class _SamMLP(nn.Module):
    mlp_dim: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.gelu(dense(self.mlp_dim, ('sam_embed', 'sam_mlp'), name='lin1', **kw)(x), approximate=False)
        return dense(x.shape[-1], ('sam_mlp', 'sam_embed'), name='lin2', **kw)(h)


class SamImageEncoder(nn.Module):
    cfg: SamImageEncoderConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        conv_axes = (None, None, 'sam_channels', 'sam_embed')
        x = _Conv(cfg.hidden_size, cfg.patch_size, cfg.patch_size, 0, True, conv_axes, dt, pdt,
                  name='patch_embed')(pixels.astype(dt))
        pos = self.param('pos_embed', nn.with_logical_partitioning(
            nn.initializers.zeros_init(), (None, 'sam_positions', None, 'sam_embed')),
            (1, cfg.grid, cfg.grid, cfg.hidden_size), pdt)
        x = x + pos.astype(dt)
        for i in range(cfg.depth):
            window = 0 if i in cfg.global_attn_indexes else cfg.window_size
            x = SamVitBlock(cfg, window, name=f'blocks_{i}')(x)
        return _Neck(cfg, name='neck')(x)


class _Conv(nn.Module):
    """A Conv2d whose parameters sit under `proj` (SAM's `patch_embed.proj`)."""
    features: int
    kernel: int
    stride: int
    padding: int
    use_bias: bool
    axes: tuple
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                       padding=((self.padding, self.padding),) * 2, use_bias=self.use_bias, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='proj',
                       kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.axes),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[-1],)))(x)


class _Neck(nn.Module):
    """Conv 1x1 -> LayerNorm2d -> Conv 3x3 -> LayerNorm2d, submodules `0`..`3` as in the checkpoint."""
    cfg: SamImageEncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        init = lambda axes: nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)  # noqa: E731
        x = nn.Conv(cfg.out_chans, (1, 1), use_bias=False, dtype=dt, param_dtype=pdt, name='0',
                    kernel_init=init((None, None, 'sam_embed', 'sam_channels')))(x)
        x = layer_norm(cfg.neck_norm_eps, 'sam_channels', dtype=dt, param_dtype=pdt, name='1')(x)
        x = nn.Conv(cfg.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dt, param_dtype=pdt,
                    name='2', kernel_init=init((None, None, 'sam_channels', 'sam_embed')))(x)
        return layer_norm(cfg.neck_norm_eps, 'sam_embed', dtype=dt, param_dtype=pdt, name='3')(x)
