"""LLaMA decoder (LLaVA-v1.5-7B / LLaMA-2 architecture) in Flax linen.

Parameter names mirror HF `LlamaForCausalLM` (`model/layers_3/self_attn/q_proj/kernel` <->
`model.layers.3.self_attn.q_proj.weight`) so the converter is a short table. Decoding uses a `cache` collection:
call with `decode=True` once on a (batch, max_len) dummy to create it, then prefill and step with
`mutable=['cache']`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medplib_jax.models.config import REMAT_POLICIES as REMAT_POLICY_NAMES, LlamaConfig
from medplib_jax.models.layers import RMSNorm, causal_attention, constrain, dense, dot_product_attention, dtype_of
from medplib_jax.models.lora import LoRADense, projection
from medplib_jax.models.moe import MoEFFN

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
assert tuple(REMAT_POLICIES) == REMAT_POLICY_NAMES  # the names LlamaConfig accepts

BATCH, LENGTH, EMBED = 'activation_batch', 'activation_length', 'activation_embed'


def proj(cfg: LlamaConfig, features: int, axes: tuple[str, str], name: str, stacked: int = 0) -> LoRADense:
    """A bias-free projection, LoRA-wrapped when `name` is a configured LoRA target."""
    return projection(features, axes, name, cfg.lora, stacked=stacked, dtype=dtype_of(cfg.dtype),
                      param_dtype=dtype_of(cfg.param_dtype))


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """HF rotary tables: frequencies over the first half, duplicated (not interleaved); fp32. -> (B, L, D)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, L, H, D). HF casts the tables to x's dtype before rotating."""
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class LlamaAttention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, token_mask: jax.Array | None, decode: bool,
                 train: bool = False) -> jax.Array:
        cfg = self.cfg
        b, t, _ = x.shape
        q = proj(cfg, cfg.num_heads * cfg.head_dim, ('embed', 'heads'), 'q_proj')(x, train)
        k = proj(cfg, cfg.num_kv_heads * cfg.head_dim, ('embed', 'kv_heads'), 'k_proj')(x, train)
        v = proj(cfg, cfg.num_kv_heads * cfg.head_dim, ('embed', 'kv_heads'), 'v_proj')(x, train)
        q = constrain(q.reshape(b, t, cfg.num_heads, cfg.head_dim), (BATCH, LENGTH, 'activation_heads', None))
        k = constrain(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), (BATCH, LENGTH, 'activation_kv_heads', None))
        v = constrain(v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), (BATCH, LENGTH, 'activation_kv_heads', None))
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if token_mask is None:
            token_mask = jnp.ones((b, t), bool)
        if decode:
            k, v, mask = self._update_cache(k, v, token_mask)
            out = dot_product_attention(q, k, v, mask)
        else:
            out = causal_attention(q, k, v, token_mask, cfg.attention_block, cfg.attention)
        out = constrain(out, (BATCH, LENGTH, 'activation_heads', None)).reshape(b, t, cfg.num_heads * cfg.head_dim)
        return proj(cfg, cfg.hidden_size, ('heads', 'embed'), 'o_proj')(out, train)

    def _update_cache(self, k: jax.Array, v: jax.Array, token_mask: jax.Array):
        """Writes this chunk (prefill or one step) at `cache_index`; returns full cached K/V and the mask.

        The first call (at init) only sizes the cache from its dummy input: (batch, max_len).
        """
        initialized = self.has_variable('cache', 'cached_key')
        ck = self.variable('cache', 'cached_key', jnp.zeros, k.shape, k.dtype)
        cv = self.variable('cache', 'cached_value', jnp.zeros, v.shape, v.dtype)
        cm = self.variable('cache', 'cached_mask', jnp.zeros, k.shape[:2], bool)
        idx = self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
        t = k.shape[1]
        if not initialized:
            q_slot = jnp.arange(t)
            return k, v, (q_slot[:, None] >= q_slot[None, :])[None] & token_mask[:, None, :]
        start = idx.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, start, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, start, 0, 0))
        cm.value = jax.lax.dynamic_update_slice(cm.value, token_mask, (0, start))
        idx.value = start + t
        q_slot = start + jnp.arange(t)
        k_slot = jnp.arange(ck.value.shape[1])
        mask = (k_slot[None, :] <= q_slot[:, None])[None] & cm.value[:, None, :]
        return ck.value, cv.value, mask


class LlamaMLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x))."""
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        gate = proj(cfg, cfg.intermediate_size, ('embed', 'mlp'), 'gate_proj')(x, train)
        up = proj(cfg, cfg.intermediate_size, ('embed', 'mlp'), 'up_proj')(x, train)
        h = constrain(nn.silu(gate) * up, (BATCH, LENGTH, 'activation_mlp'))
        return proj(cfg, cfg.hidden_size, ('mlp', 'embed'), 'down_proj')(h, train)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; its FFN is the two-expert MoE when `is_moe`. With `scanned=True` it returns
    (carry, None) as `nn.scan` wants."""
    cfg: LlamaConfig
    scanned: bool = False
    is_moe: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, token_mask: jax.Array | None, decode: bool = False,
                 train: bool = False):
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        x = constrain(x, (BATCH, LENGTH, EMBED))
        h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name='input_layernorm')(x)
        x = x + LlamaAttention(cfg, name='self_attn')(h, positions, token_mask, decode, train)
        h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name='post_attention_layernorm')(x)
        if self.is_moe:
            # Dropped tokens get a zero FFN output: the residual carries them through unchanged.
            x = x + MoEFFN(cfg.moe, cfg.intermediate_size, cfg.lora, dt, pdt, name='mlp')(h, token_mask, train)
        else:
            x = x + LlamaMLP(cfg, name='mlp')(h, train)
        x = constrain(x, (BATCH, LENGTH, EMBED))
        return (x, None) if self.scanned else x


class LlamaModel(nn.Module):
    """Embeddings, decoder stack, final norm. Accepts ids or ready embeddings (the multimodal merge)."""
    cfg: LlamaConfig

    def setup(self):
        cfg = self.cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ('vocab', 'embed')))
        policy = REMAT_POLICIES[cfg.remat_policy]
        layer_cls = LlamaDecoderLayer
        if cfg.remat_policy != 'none':
            # argnums 4, 5 = `decode`, `train` (self is 0); prevent_cse is only needed outside scan.
            layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not cfg.scan_layers, static_argnums=(4, 5))
        moe_layers = cfg.moe_layers
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer_cls, variable_axes={'params': 0, 'cache': 0, 'intermediates': 0},
                split_rngs={'params': True, 'dropout': True, 'moe': True},
                in_axes=(nn.broadcast,) * 4, length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: 'layers'})(
                    cfg, scanned=True, is_moe=bool(moe_layers), name='layers')
        else:
            self.layers = [layer_cls(cfg, is_moe=i in moe_layers, name=f'layers_{i}') for i in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, dt, pdt, name='norm')

    def embed(self, input_ids: jax.Array) -> jax.Array:
        # Gather from a table whose hidden dim is not sharded: with the FSDP-sharded table XLA can only
        # re-layout the batch-sharded result by replicating it ("involuntary full rematerialization").
        table = nn.with_logical_constraint(self.embed_tokens.embedding, ('vocab', None))
        out = jnp.take(table, input_ids, axis=0).astype(dtype_of(self.cfg.dtype))
        return constrain(out, (BATCH, LENGTH, EMBED))

    def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, token_mask: jax.Array | None = None,
                 decode: bool = False, train: bool = False) -> jax.Array:
        x = inputs_embeds.astype(dtype_of(self.cfg.dtype))
        if self.cfg.scan_layers:
            x, _ = self.layers(x, positions, token_mask, decode, train)
        else:
            for layer in self.layers:
                x = layer(x, positions, token_mask, decode, train)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Returns (fp32 logits (B, L, V), final-norm hidden states (B, L, D)).

    `train=True` selects training behaviour: LoRA dropout (rng 'dropout') and the MoE training capacity factor
    (rng 'moe' for the gate's noise). MoE metrics are sown into `intermediates` (see moe.collect_moe_metrics).
    """
    cfg: LlamaConfig

    def setup(self):
        cfg = self.cfg
        self.model = LlamaModel(cfg)
        self.lm_head = dense(cfg.vocab_size, ('embed', 'vocab'), dtype=dtype_of(cfg.dtype),
                             param_dtype=dtype_of(cfg.param_dtype), name='lm_head',
                             kernel_init=nn.initializers.normal(0.02))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.model.embed(input_ids)

    def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 positions: jax.Array | None = None, token_mask: jax.Array | None = None,
                 decode: bool = False, train: bool = False) -> tuple[jax.Array, jax.Array]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError('pass exactly one of input_ids and inputs_embeds')
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        b, t = inputs_embeds.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        hidden = self.model(inputs_embeds, positions, token_mask, decode, train)
        logits = self.lm_head(hidden).astype(jnp.float32)
        return constrain(logits, (BATCH, LENGTH, 'activation_vocab')), hidden
