"""CLIP ViT vision tower (HF `CLIPVisionModel` layout) and the LLaVA `mlp2x_gelu` projector.

MedPLIB feeds the LLM the output of encoder layer `select_layer` (-2: the 23rd of 24 layers, no post-LayerNorm),
CLS dropped (`select_feature='patch'`): (B, 576, 1024) at 336/14. Images are NHWC here (HF takes NCHW).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medplib_jax.models.config import CLIPVisionConfig
from medplib_jax.models.layers import constrain, dense, dot_product_attention, dtype_of, layer_norm


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(use_bias=True, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        b, t, d = x.shape
        q, k, v = [dense(d, ('vision_embed', 'vision_heads'), name=f'{n}_proj', **kw)(x)
                   .reshape(b, t, cfg.num_heads, d // cfg.num_heads) for n in ('q', 'k', 'v')]
        out = dot_product_attention(q, k, v).reshape(b, t, d)
        return dense(d, ('vision_heads', 'vision_embed'), name='out_proj', **kw)(out)


class CLIPMLP(nn.Module):
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(use_bias=True, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        h = quick_gelu(dense(cfg.intermediate_size, ('vision_embed', 'vision_mlp'), name='fc1', **kw)(x))
        return dense(cfg.hidden_size, ('vision_mlp', 'vision_embed'), name='fc2', **kw)(h)


class CLIPEncoderLayer(nn.Module):
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        ln = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        x = x + CLIPAttention(cfg, name='self_attn')(
            layer_norm(cfg.layer_norm_eps, 'vision_embed', name='layer_norm1', **ln)(x))
        return x + CLIPMLP(cfg, name='mlp')(layer_norm(cfg.layer_norm_eps, 'vision_embed', name='layer_norm2', **ln)(x))


class CLIPVisionEmbeddings(nn.Module):
    """Patch conv (no bias) + CLS + learned positions."""
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        d = cfg.hidden_size
        patches = nn.Conv(d, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size, padding='VALID',
                          use_bias=False, dtype=dt, param_dtype=pdt, name='patch_embedding',
                          kernel_init=nn.with_logical_partitioning(
                              nn.initializers.lecun_normal(),
                              (None, None, 'vision_channels', 'vision_embed')))(pixels.astype(dt))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, d)  # row-major over the patch grid, as HF's flatten(2)
        cls = self.param('class_embedding',
                         nn.with_logical_partitioning(nn.initializers.normal(1.0), ('vision_embed',)), (d,), pdt)
        pos = nn.Embed(cfg.num_patches + 1, d, dtype=dt, param_dtype=pdt, name='position_embedding',
                       embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                   ('vision_positions', 'vision_embed')))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, d)), patches], axis=1)
        return x + pos(jnp.arange(cfg.num_patches + 1))[None]


class CLIPEncoder(nn.Module):
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the output of layer `layers_used` (HF hidden_states[select_layer])."""
        cfg = self.cfg
        # Only the layers up to the selected one run; at init all are built so the param tree holds (and
        # round-trips) the whole checkpoint.
        run = cfg.num_layers if self.is_initializing() else cfg.layers_used
        selected = x
        for i in range(run):
            x = CLIPEncoderLayer(cfg, name=f'layers_{i}')(x)
            if i + 1 == cfg.layers_used:
                selected = x
        return selected


class CLIPVisionTransformer(nn.Module):
    """HF `vision_model`: embeddings, pre_layrnorm (sic), encoder, post_layernorm (kept for the checkpoint only)."""
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        ln = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        x = CLIPVisionEmbeddings(cfg, name='embeddings')(pixels)
        x = layer_norm(cfg.layer_norm_eps, 'vision_embed', name='pre_layrnorm', **ln)(x)
        x = constrain(x, ('activation_batch', 'activation_length', 'activation_embed'))
        x = CLIPEncoder(cfg, name='encoder')(x)
        if self.is_initializing():
            layer_norm(cfg.layer_norm_eps, 'vision_embed', name='post_layernorm', **ln)(x)
        return x


class CLIPVisionTower(nn.Module):
    """Pixels (B, H, W, 3), CLIP-normalised -> selected features (B, 576, 1024) for ViT-L/14-336."""
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        feats = CLIPVisionTransformer(self.cfg, name='vision_model')(pixels)
        if self.cfg.select_feature == 'patch':
            feats = feats[:, 1:]
        return feats


class MultimodalProjector(nn.Module):
    """LLaVA `mlp2x_gelu`: Linear -> GELU (exact erf) -> Linear. Submodules `0` and `2` as in the checkpoint."""
    out_features: int
    projector_type: str = 'mlp2x_gelu'
    dtype: str = 'float32'
    param_dtype: str = 'float32'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.projector_type != 'mlp2x_gelu':
            raise ValueError(f'model.projector.type={self.projector_type!r}; only mlp2x_gelu is implemented')
        dt, pdt = dtype_of(self.dtype), dtype_of(self.param_dtype)
        x = dense(self.out_features, ('vision_embed', 'mlp'), use_bias=True, dtype=dt, param_dtype=pdt, name='0')(x)
        x = nn.gelu(x, approximate=False)
        return dense(self.out_features, ('mlp', 'embed'), use_bias=True, dtype=dt, param_dtype=pdt, name='2')(x)
