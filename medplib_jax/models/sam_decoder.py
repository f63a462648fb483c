"""SAM-Med2D prompt encoder and mask decoder, NHWC (the reference's prompt_encoder.py and mask_decoder.py in
model/segment_anything_med2d/modeling/).

MedPLIB prompts the decoder with the T-projected `<SEG>` state alone (`text_embeds`), with `no_mask_embed` as the
dense prompt; points, boxes and masks are implemented too (checkpoint compatibility, HF parity, future use).
Names mirror `sam-med2d_b.pth` (`mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight` <->
`transformer/layers_0/cross_attn_token_to_image/q_proj/kernel`).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medplib_jax.models.config import SamDecoderConfig
from medplib_jax.models.layers import ConvTranspose2d, dense, dot_product_attention, dtype_of, layer_norm


def _kw(cfg: SamDecoderConfig) -> dict:
    return dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))


class _Table(nn.Module):
    rows: int
    dim: int
    param_dtype: Any

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param('embedding', nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                    (None, 'sam_embed')),
                          (self.rows, self.dim), self.param_dtype)


class SamPromptEncoder(nn.Module):
    cfg: SamDecoderConfig

    def setup(self):
        cfg = self.cfg
        pdt = dtype_of(cfg.param_dtype)
        self.gaussian = self.param(
            'pe_layer_positional_encoding_gaussian_matrix',
            nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, 'sam_positions')),
            (2, cfg.embed_dim // 2), pdt)
        self.point_embeddings = [_Table(1, cfg.embed_dim, pdt, name=f'point_embeddings_{i}') for i in range(4)]
        self.not_a_point_embed = _Table(1, cfg.embed_dim, pdt)
        self.no_mask_embed = _Table(1, cfg.embed_dim, pdt)
        self.mask_downscaling = _MaskDownscaling(cfg)

    def _pe(self, coords: jax.Array) -> jax.Array:
        """Random-Fourier encoding of coordinates normalised to [0, 1]: [sin, cos](2 pi (2c - 1) G)."""
        c = (2 * coords.astype(jnp.float32) - 1) @ self.gaussian.astype(jnp.float32)
        c = 2 * math.pi * c
        return jnp.concatenate([jnp.sin(c), jnp.cos(c)], axis=-1)

    def get_dense_pe(self) -> jax.Array:
        """(1, H, W, C) encoding of the embedding grid at cell centres ((j + 0.5) / W, (i + 0.5) / H)."""
        n = self.cfg.image_embedding_size
        centres = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n
        xy = jnp.stack(jnp.meshgrid(centres, centres, indexing='xy'), axis=-1)  # [i, j] = (x_j, y_i)
        return self._pe(xy)[None]

    def _embed_points(self, points: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        points = points + 0.5  # pixel centres
        if pad:
            points = jnp.concatenate([points, jnp.zeros((points.shape[0], 1, 2), points.dtype)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((labels.shape[0], 1), labels.dtype)], axis=1)
        emb = self._pe(points / self.cfg.input_image_size)
        lab = labels[..., None]
        emb = jnp.where(lab == -1, 0.0, emb) + jnp.where(lab == -1, self.not_a_point_embed()[0], 0.0)
        emb = emb + jnp.where(lab == 0, self.point_embeddings[0]()[0], 0.0)
        return emb + jnp.where(lab == 1, self.point_embeddings[1]()[0], 0.0)

    def _embed_boxes(self, boxes: jax.Array) -> jax.Array:
        corners = (boxes + 0.5).reshape(boxes.shape[0], -1, 2, 2) / self.cfg.input_image_size
        emb = self._pe(corners)
        emb = emb.at[:, :, 0].add(self.point_embeddings[2]()[0]).at[:, :, 1].add(self.point_embeddings[3]()[0])
        return emb.reshape(boxes.shape[0], -1, self.cfg.embed_dim)

    def __call__(self, points: tuple[jax.Array, jax.Array] | None = None, boxes: jax.Array | None = None,
                 masks: jax.Array | None = None, text_embeds: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """points: (coords (B, N, 2) in input-image pixels (x, y), labels (B, N)); boxes (B, NB, 4);
        masks (B, 4*H, 4*W, 1); text_embeds (B, T, C) appended as sparse tokens (MedPLIB's <SEG> prompt).
        Returns sparse (B, n, C) and dense (B, H, W, C) embeddings."""
        cfg = self.cfg
        given = [x for x in (points and points[0], boxes, masks, text_embeds) if x is not None]
        if not given:
            raise ValueError('SAM prompt encoder: give at least one of points, boxes, masks, text_embeds')
        b = given[0].shape[0]
        sparse = [jnp.zeros((b, 0, cfg.embed_dim), jnp.float32)]
        if points is not None:
            sparse.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        if text_embeds is not None:
            sparse.append(text_embeds.astype(jnp.float32))
        n = cfg.image_embedding_size
        if masks is not None:
            dense_emb = self.mask_downscaling(masks)
        else:
            dense_emb = jnp.broadcast_to(self.no_mask_embed()[0], (b, n, n, cfg.embed_dim))
        if self.is_initializing():  # create the unused prompt paths' weights too: the checkpoint has them
            for table in (*self.point_embeddings, self.not_a_point_embed):
                table()
            if masks is None:
                self.mask_downscaling(jnp.zeros((1, 4 * n, 4 * n, 1)))
        return jnp.concatenate(sparse, axis=1), dense_emb


class _MaskDownscaling(nn.Module):
    """Conv k2 s2 -> LN2d -> GELU -> Conv k2 s2 -> LN2d -> GELU -> Conv 1x1 (submodules 0, 1, 3, 4, 6)."""
    cfg: SamDecoderConfig

    @nn.compact
    def __call__(self, masks: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = _kw(cfg)
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, 'sam_channels'))
        bias = nn.with_logical_partitioning(nn.initializers.zeros_init(), ('sam_channels',))
        c1, c2 = cfg.mask_in_chans // 4, cfg.mask_in_chans
        x = nn.Conv(c1, (2, 2), strides=2, name='0', kernel_init=init, bias_init=bias, **kw)(masks)
        x = nn.gelu(layer_norm(cfg.layer_norm2d_eps, 'sam_channels', name='1', **kw)(x), approximate=False)
        x = nn.Conv(c2, (2, 2), strides=2, name='3', kernel_init=init, bias_init=bias, **kw)(x)
        x = nn.gelu(layer_norm(cfg.layer_norm2d_eps, 'sam_channels', name='4', **kw)(x), approximate=False)
        return nn.Conv(cfg.embed_dim, (1, 1), name='6', bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ('sam_embed',)), kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, 'sam_channels', 'sam_embed')), **kw)(x)


class SamAttention(nn.Module):
    """SAM's attention with an optional internal downsampling of the q/k/v width."""
    cfg: SamDecoderConfig
    downsample: int = 1

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(use_bias=True, **_kw(cfg))
        inner = cfg.embed_dim // self.downsample
        heads = cfg.num_heads

        def split(x, name):
            x = dense(inner, ('sam_embed', 'sam_heads'), name=name, **kw)(x)
            return x.reshape(*x.shape[:2], heads, inner // heads)

        out = dot_product_attention(split(q, 'q_proj'), split(k, 'k_proj'), split(v, 'v_proj'))
        out = out.reshape(*out.shape[:2], inner)
        return dense(cfg.embed_dim, ('sam_heads', 'sam_embed'), name='out_proj', **kw)(out)


class _TwoWayBlock(nn.Module):
    cfg: SamDecoderConfig
    skip_first_layer_pe: bool

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe):
        cfg = self.cfg
        kw = _kw(cfg)
        ln = lambda name: layer_norm(cfg.layer_norm_eps, 'sam_embed', name=name, **kw)  # noqa: E731
        if self.skip_first_layer_pe:
            # Layer 0: no positional encoding and no residual (the attention output replaces the queries).
            queries = SamAttention(cfg, name='self_attn')(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + SamAttention(cfg, name='self_attn')(q, q, queries)
        queries = ln('norm1')(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = ln('norm2')(queries + SamAttention(cfg, cfg.attention_downsample_rate,
                                                     name='cross_attn_token_to_image')(q, k, keys))
        h = nn.relu(dense(cfg.mlp_dim, ('sam_embed', 'sam_mlp'), use_bias=True, name='mlp_lin1', **kw)(queries))
        queries = ln('norm3')(queries + dense(cfg.embed_dim, ('sam_mlp', 'sam_embed'), use_bias=True,
                                              name='mlp_lin2', **kw)(h))
        q, k = queries + query_pe, keys + key_pe
        keys = ln('norm4')(keys + SamAttention(cfg, cfg.attention_downsample_rate,
                                               name='cross_attn_image_to_token')(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    cfg: SamDecoderConfig

    @nn.compact
    def __call__(self, image: jax.Array, image_pe: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """image, image_pe (B, H, W, C); tokens (B, N, C) -> (tokens (B, N, C), image (B, HW, C))."""
        cfg = self.cfg
        b, h, w, c = image.shape
        keys = image.reshape(b, h * w, c)
        key_pe = jnp.broadcast_to(image_pe, image.shape).reshape(b, h * w, c)
        queries = tokens
        for i in range(cfg.depth):
            queries, keys = _TwoWayBlock(cfg, skip_first_layer_pe=i == 0, name=f'layers_{i}')(
                queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = queries + SamAttention(cfg, cfg.attention_downsample_rate, name='final_attn_token_to_image')(
            q, k, keys)
        return layer_norm(cfg.layer_norm_eps, 'sam_embed', name='norm_final_attn', **_kw(cfg))(queries), keys


class _MLP(nn.Module):
    """SAM's MLP head: `layers_0..n-1`, ReLU between, none after the last."""
    hidden: int
    out: int
    depth: int
    cfg: SamDecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            last = i == self.depth - 1
            axes = ('sam_embed' if i == 0 else None, 'sam_channels' if last else 'sam_mlp')
            x = dense(self.out if last else self.hidden, axes, use_bias=True, name=f'layers_{i}', **_kw(self.cfg))(x)
            if not last:
                x = nn.relu(x)
        return x


class SamMaskDecoder(nn.Module):
    cfg: SamDecoderConfig

    @nn.compact
    def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse: jax.Array, dense_emb: jax.Array,
                 multimask_output: bool = False) -> tuple[jax.Array, jax.Array]:
        """image_embeddings (B, H, W, C) (one per prompt set), image_pe (1, H, W, C), sparse (B, N, C), dense
        (B, H, W, C) -> mask logits (B, M, 4H, 4W) and IoU predictions (B, M); M = 1, or 3 with multimask."""
        cfg = self.cfg
        kw = _kw(cfg)
        dt = kw['dtype']
        c = cfg.embed_dim
        b = sparse.shape[0]
        iou_token = _Table(1, c, kw['param_dtype'], name='iou_token')()
        mask_tokens = _Table(cfg.num_mask_tokens, c, kw['param_dtype'], name='mask_tokens')()
        out_tokens = jnp.concatenate([iou_token, mask_tokens], axis=0).astype(dt)
        tokens = jnp.concatenate([jnp.broadcast_to(out_tokens, (b,) + out_tokens.shape), sparse.astype(dt)], axis=1)
        src = image_embeddings.astype(dt) + dense_emb.astype(dt)
        hs, keys = TwoWayTransformer(cfg, name='transformer')(src, image_pe.astype(dt), tokens)
        iou_out, mask_out = hs[:, 0], hs[:, 1:1 + cfg.num_mask_tokens]
        h = w = src.shape[1]
        up = keys.reshape(b, h, w, c)
        up = ConvTranspose2d(c // 4, 2, 2, 0, axes=('sam_channels', 'sam_embed'), name='output_upscaling_0', **kw)(up)
        up = nn.gelu(layer_norm(cfg.layer_norm2d_eps, 'sam_channels', name='output_upscaling_1', **kw)(up),
                     approximate=False)
        up = nn.gelu(ConvTranspose2d(c // 8, 2, 2, 0, axes=('sam_channels', None), name='output_upscaling_3',
                                     **kw)(up), approximate=False)
        hyper = jnp.stack([_MLP(c, c // 8, 3, cfg, name=f'output_hypernetworks_mlps_{i}')(mask_out[:, i])
                           for i in range(cfg.num_mask_tokens)], axis=1)  # (B, M, C/8)
        masks = jnp.einsum('bmc,bhwc->bmhw', hyper, up)
        iou = _MLP(cfg.iou_head_hidden_dim, cfg.num_mask_tokens, cfg.iou_head_depth, cfg,
                   name='iou_prediction_head')(iou_out)
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou[:, sel]
