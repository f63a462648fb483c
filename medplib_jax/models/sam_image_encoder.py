"""SAM-Med2D image encoder (facts 5.1): ViT-B at 256x256, windowed + global attention with decomposed relative
positions, an `Adapter_Layer` in every block, conv neck. Frozen in MedPLIB.

NHWC in (B, 256, 256, 3), already normalised and padded; NHWC out (B, 16, 16, 256).
Parameter names mirror `sam-med2d_b.pth` (`image_encoder.blocks.3.Adapter.spatial.2.weight` <->
`blocks_3/Adapter/spatial/2/kernel`), so the converter tables stay one line per tensor. With `adapter=False`
it is the original SAM ViT, which is what HF `SamModel`'s vision encoder computes (used for parity tests).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from medplib_jax.models.layers import (ConvTranspose2d, constrain, dense, dot_product_attention, dtype_of,
                                       known_fields, layer_norm)

# SAM's LayerNorm2d default; HF hard-codes it in the neck too, independent of `layer_norm_eps`.
NECK_LAYER_NORM_EPS = 1e-6
# Conv kernels are HWIO: input channels 'sam_channels', output channels the model dim 'sam_embed'.
CONV_AXES = (None, None, 'sam_channels', 'sam_embed')
BLOCK_ACTIVATION_AXES = ('activation_batch', None, None, 'activation_embed')


@dataclasses.dataclass(frozen=True)
class SamImageEncoderConfig:
    """Defaults: SAM-Med2D ViT-B (`build_sam_vit_b(image_size=256, encoder_adapter=True)`)."""
    image_size: int = 256
    patch_size: int = 16
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    out_chans: int = 256
    window_size: int = 14  # 0: every block attends globally (SAM's convention)
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    use_rel_pos: bool = True
    layer_norm_eps: float = 1e-6
    adapter: bool = True
    adapter_mlp_ratio: float = 0.25  # Adapter_Layer(768, mlp_ratio=0.25): 192 hidden
    adapter_norm_eps: float = 1e-5  # the adapter's nn.LayerNorm keeps torch's default eps
    dtype: str = 'float32'
    param_dtype: str = 'float32'

    def __post_init__(self):
        # Config files give lists; a tuple keeps the (frozen) config hashable.
        object.__setattr__(self, 'global_attn_indexes', tuple(int(i) for i in self.global_attn_indexes))
        if self.image_size % self.patch_size:
            raise ValueError(f'sam_encoder.image_size={self.image_size} is not a multiple of '
                             f'sam_encoder.patch_size={self.patch_size}')
        if self.hidden_size % self.num_heads:
            raise ValueError(f'sam_encoder.hidden_size={self.hidden_size} is not a multiple of '
                             f'sam_encoder.num_heads={self.num_heads}')
        if self.window_size < 0:
            raise ValueError(f'sam_encoder.window_size={self.window_size} must be >= 0 (0 = global attention)')
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if bad or len(set(self.global_attn_indexes)) != len(self.global_attn_indexes):
            raise ValueError(f'sam_encoder.global_attn_indexes={self.global_attn_indexes}: must be distinct block '
                             f'indices in [0, sam_encoder.depth={self.depth})')
        if self.adapter:
            if self.adapter_hidden < 1:
                raise ValueError(f'sam_encoder.adapter_mlp_ratio={self.adapter_mlp_ratio} leaves no adapter hidden '
                                 f'units at hidden_size={self.hidden_size}')
            if self.grid % 2:
                # The adapter's stride-2 conv / transposed conv pair only restores even sizes (16 -> 8 -> 16).
                raise ValueError(f'sam_encoder: the adapter needs an even patch grid, got image_size / patch_size = '
                                 f'{self.image_size} / {self.patch_size} = {self.grid}')
        dtype_of(self.dtype), dtype_of(self.param_dtype)  # fail early on an unknown dtype name

    @property
    def grid(self) -> int:
        """Side of the patch grid (16 for SAM-Med2D)."""
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def adapter_hidden(self) -> int:
        return int(self.hidden_size * self.adapter_mlp_ratio)

    def window_of(self, block: int) -> int:
        """Attention window side of block `block`; 0 = global attention over the whole grid."""
        return 0 if block in self.global_attn_indexes else self.window_size

    @classmethod
    def sam_med2d_b(cls, **overrides: Any) -> 'SamImageEncoderConfig':
        """`sam-med2d_b.pth`'s encoder: ViT-B/16 at 256, global blocks 2/5/8/11, windows of 14, adapters."""
        return cls(**overrides)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> 'SamImageEncoderConfig':
        """From the `model.sam_encoder` config section (a misspelt key is an error naming it)."""
        return cls(**{**known_fields(cls, d, 'sam_encoder'), **overrides})

    @classmethod
    def from_hf(cls, hf: Any, **overrides: Any) -> 'SamImageEncoderConfig':
        """From a transformers `SamVisionConfig` (or its dict): the original SAM ViT, without adapters."""
        d = hf if isinstance(hf, Mapping) else hf.to_dict()
        for key, want in (('hidden_act', 'gelu'), ('qkv_bias', True), ('use_abs_pos', True), ('num_channels', 3)):
            if d.get(key, want) != want:
                raise ValueError(f'SamVisionConfig.{key}={d[key]!r} is not supported (SAM-Med2D uses {want!r})')
        mlp_dim = d.get('mlp_dim') or int(d['hidden_size'] * d['mlp_ratio'])
        return cls(**{**dict(image_size=d['image_size'], patch_size=d['patch_size'], hidden_size=d['hidden_size'],
                             depth=d['num_hidden_layers'], num_heads=d['num_attention_heads'], mlp_dim=mlp_dim,
                             out_chans=d['output_channels'], window_size=d['window_size'],
                             global_attn_indexes=tuple(d['global_attn_indexes']), use_rel_pos=d['use_rel_pos'],
                             layer_norm_eps=d['layer_norm_eps'], adapter=False), **overrides})


def rel_pos_table(rel_pos: jax.Array, size: int) -> jax.Array:
    """(2*size-1, C) -> (size, size, C) with entry [i, j] = rel_pos[i - j + size - 1]: SAM's `get_rel_pos` for
    equal query/key sizes (its interpolation is the identity because checkpoints carry the matching length)."""
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(f'rel_pos has {rel_pos.shape[0]} positions; attention over {size} needs {2 * size - 1}')
    idx = jnp.arange(size)[:, None] - jnp.arange(size)[None, :] + size - 1
    return rel_pos[idx]


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """(B, H, W, C) -> (B * nH * nW, window, window, C), zero-padding H and W at the end to whole windows."""
    b, h, w, c = x.shape
    ph, pw = -h % window, -w % window
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    nh, nw = (h + ph) // window, (w + pw) // window
    x = x.reshape(b, nh, window, nw, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * nh * nw, window, window, c)


def window_unpartition(windows: jax.Array, window: int, size: tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition` for an original (H, W) = `size`: reassemble, then crop the padding."""
    h, w = size
    nh, nw = -(-h // window), -(-w // window)
    c = windows.shape[-1]
    x = windows.reshape(-1, nh, nw, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, nh * window, nw * window, c)[:, :h, :w]


def _conv(features: int, kernel: int, *, stride: int = 1, padding: int = 0, use_bias: bool = False,
          dtype: Any, param_dtype: Any, name: str) -> nn.Conv:
    """torch-style Conv2d (symmetric explicit padding) with HWIO logical names."""
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=((padding, padding), (padding, padding)),
                   use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (CONV_AXES[-1],)))


class PatchEmbed(nn.Module):
    """`patch_embed.proj`: Conv2d(3 -> hidden, k = s = patch, with bias)."""
    cfg: SamImageEncoderConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt = dtype_of(cfg.dtype)
        return _conv(cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, use_bias=True, dtype=dt,
                     param_dtype=dtype_of(cfg.param_dtype), name='proj')(pixels.astype(dt))


class SamVisionAttention(nn.Module):
    """Multi-head attention over a square (size x size) map with SAM's decomposed relative-position bias."""
    cfg: SamImageEncoderConfig
    size: int  # the window side, or the grid side for global blocks: fixes the rel_pos length 2*size-1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        b, h, w, c = x.shape
        nh, hd = cfg.num_heads, cfg.head_dim
        qkv = dense(3 * c, ('sam_embed', 'sam_heads'), use_bias=True, dtype=dt, param_dtype=pdt, name='qkv')(x)
        # Output features are ordered (3, heads, head_dim), as torch's reshape(B, HW, 3, heads, -1).
        q, k, v = (t[:, :, 0] for t in jnp.split(qkv.reshape(b, h * w, 3, nh, hd), 3, axis=2))
        bias = None
        if cfg.use_rel_pos:
            init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ('sam_positions', None))
            rel_h = rel_pos_table(self.param('rel_pos_h', init, (2 * self.size - 1, hd), pdt), h)
            rel_w = rel_pos_table(self.param('rel_pos_w', init, (2 * self.size - 1, hd), pdt), w)
            # From the *unscaled* queries, in fp32: bias[(i, j), (a, b)] = q_ij . Rh[i, a] + q_ij . Rw[j, b].
            rq = q.reshape(b, h, w, nh, hd).astype(jnp.float32)
            bias_h = jnp.einsum('bijnc,iac->bnija', rq, rel_h.astype(jnp.float32))
            bias_w = jnp.einsum('bijnc,jkc->bnijk', rq, rel_w.astype(jnp.float32))
            bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, nh, h * w, h * w)
        out = dot_product_attention(q, k, v, bias=bias).reshape(b, h, w, c)
        return dense(c, ('sam_heads', 'sam_embed'), use_bias=True, dtype=dt, param_dtype=pdt, name='proj')(out)


class SamMLP(nn.Module):
    """`mlp`: lin1 -> exact (erf) GELU -> lin2."""
    cfg: SamImageEncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(use_bias=True, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        x = nn.gelu(dense(cfg.mlp_dim, ('sam_embed', 'sam_mlp'), name='lin1', **kw)(x), approximate=False)
        return dense(cfg.hidden_size, ('sam_mlp', 'sam_embed'), name='lin2', **kw)(x)


class AdapterChannel(nn.Module):
    """`Adapter.channel`: Linear(no bias) -> ReLU -> Linear(no bias) -> Sigmoid, on pooled (B, C) features."""
    cfg: SamImageEncoderConfig

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        g = nn.relu(dense(cfg.adapter_hidden, ('sam_embed', 'sam_mlp'), name='0', **kw)(pooled))
        return jax.nn.sigmoid(dense(cfg.hidden_size, ('sam_mlp', 'sam_embed'), name='2', **kw)(g))


class AdapterSpatial(nn.Module):
    """`Adapter.spatial`: Conv2d(k3, s2, p1) -> ReLU -> ConvTranspose2d(k4, s2, p1) -> ReLU (16 -> 8 -> 16)."""
    cfg: SamImageEncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        c = cfg.hidden_size
        x = nn.relu(_conv(c, 3, stride=2, padding=1, name='0', **kw)(x))
        return nn.relu(ConvTranspose2d(c, 4, 2, 1, use_bias=False, axes=('sam_embed', 'sam_channels'), name='2',
                                       **kw)(x))


class SamAdapter(nn.Module):
    """SAM-Med2D `Adapter_Layer` on x = norm2(h): LayerNorm(x + spatial(x * channel(mean_hw(x)))).
    The skip adds the *ungated* input (skip_connect=True)."""
    cfg: SamImageEncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        pooled = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(x.dtype)  # AdaptiveAvgPool2d(1) per image
        gated = x * AdapterChannel(cfg, name='channel')(pooled)[:, None, None, :]
        spatial = AdapterSpatial(cfg, name='spatial')(gated)
        return layer_norm(cfg.adapter_norm_eps, 'sam_embed', dtype=dtype_of(cfg.dtype),
                          param_dtype=dtype_of(cfg.param_dtype), name='norm')(x + spatial)


class SamVitBlock(nn.Module):
    """x += attn(norm1(x)) (in windows unless global); x += mlp(norm2(x)) [+ Adapter(norm2(x))]."""
    cfg: SamImageEncoderConfig
    window: int  # 0 = global attention

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        ln = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        _, h, w, _ = x.shape
        y = layer_norm(cfg.layer_norm_eps, 'sam_embed', name='norm1', **ln)(x)
        attn = SamVisionAttention(cfg, self.window or h, name='attn')
        # Padding comes after norm1 (zeros, not normalised zeros), as in SAM and HF.
        y = window_unpartition(attn(window_partition(y, self.window)), self.window, (h, w)) if self.window \
            else attn(y)
        x = x + y
        y = layer_norm(cfg.layer_norm_eps, 'sam_embed', name='norm2', **ln)(x)
        out = x + SamMLP(cfg, name='mlp')(y)
        if cfg.adapter:
            out = out + SamAdapter(cfg, name='Adapter')(y)
        return constrain(out, BLOCK_ACTIVATION_AXES)


class SamNeck(nn.Module):
    """`neck`: Conv 1x1 -> LayerNorm2d -> Conv 3x3 (p1) -> LayerNorm2d, no conv bias; submodules `0`..`3`."""
    cfg: SamImageEncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        x = _conv(cfg.out_chans, 1, name='0', **kw)(x)
        x = layer_norm(NECK_LAYER_NORM_EPS, 'sam_embed', name='1', **kw)(x)  # LayerNorm2d = LN over channels (NHWC)
        x = _conv(cfg.out_chans, 3, padding=1, name='2', **kw)(x)
        return layer_norm(NECK_LAYER_NORM_EPS, 'sam_embed', name='3', **kw)(x)


class SamImageEncoder(nn.Module):
    """Pixels (B, S, S, 3), SAM-normalised, S = `cfg.image_size` -> image embedding (B, S/p, S/p, out_chans)."""
    cfg: SamImageEncoderConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        want = (cfg.image_size, cfg.image_size, 3)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise ValueError(f'SamImageEncoder takes NHWC pixels (B, {", ".join(map(str, want))}) '
                             f'(sam_encoder.image_size={cfg.image_size}); got {tuple(pixels.shape)}')
        x = PatchEmbed(cfg, name='patch_embed')(pixels)
        pos = self.param('pos_embed', nn.with_logical_partitioning(
            nn.initializers.zeros_init(), (None, 'sam_positions', None, 'sam_embed')),
            (1, cfg.grid, cfg.grid, cfg.hidden_size), dtype_of(cfg.param_dtype))
        x = constrain(x + pos.astype(x.dtype), BLOCK_ACTIVATION_AXES)
        for i in range(cfg.depth):
            x = SamVitBlock(cfg, cfg.window_of(i), name=f'blocks_{i}')(x)
        return SamNeck(cfg, name='neck')(x)
