"""The model's config dataclasses: what `config.model` holds, checked, with each field's default (configs/common.py
builds its blocks from these). Plain Python: no JAX or Flax here, so a config file loads without the library."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from medplib_jax.config_fields import known_fields
from medplib_jax.constants import MASK_THRESHOLD

DTYPES = ('float32', 'bfloat16', 'float16')  # models/layers.py DTYPES maps them to jnp dtypes
ATTENTION = ('xla', 'splash', 'cudnn', 'auto')  # LlamaConfig.attention; models/layers.py causal_attention runs them
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch')  # models/llama.py REMAT_POLICIES: the jax policies
LORA_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
MOE_MODES = ('none', 'dense', 'first_half', 'second_half', 'sparse')
# Which padding positions are routed (and count toward capacity and the aux loss means):
# micro_batch: the reference's. It pads a micro-batch (a routing group) only to its own longest sequence and routes
#   every position of that; length-bucket padding beyond the group's longest sequence is not routed, so a batch
#   padded to a longer bucket routes exactly as the reference would.
# all: every position, bucket padding included. none: no padding at all (real tokens only).
ROUTE_PADDING = ('micro_batch', 'all', 'none')
DISPATCH = ('einsum', 'grouped')  # see the module docstring
# The grouped dispatch's expert matmul (models/grouped.py): 'ragged_dot' (TPU / GPU), 'tiles' (CPU), 'auto' by
# the platform the program is for.
GROUPED_MATMUL = ('auto', 'ragged_dot', 'tiles')
SELECT_FEATURES = ('patch', 'cls_patch')
POSTPROCESS_MODES = ('reference', 'aligned')



@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 0  # 0 = no adapters
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f'lora.targets: unknown {sorted(unknown)}; known: {list(LORA_TARGETS)}')
        if self.rank < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f'lora: rank={self.rank} must be >= 0 and dropout={self.dropout} in [0, 1)')

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def applies_to(self, name: str) -> bool:
        return self.rank > 0 and name in self.targets

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> 'LoRAConfig':
        d = known_fields(cls, d or {}, 'config.model.lora')
        if 'targets' in d:
            d['targets'] = tuple(d['targets'])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Defaults are the reference's stage-IV recipe (scripts/train_stage4.sh)."""
    mode: str = 'none'  # which layers are MoE: the reference's moe_mode ('dense' = all layers)
    num_experts: int = 2
    top_k: int = 1
    capacity_factor: float = 1.5  # training
    eval_capacity_factor: float = 2.0  # evaluation: with 2 experts and top-1, nothing is dropped
    min_capacity: int = 0
    group_size: int = 4  # sequences per routing group in training (the reference's stage-IV per-GPU micro-batch)
    route_padding: str = 'micro_batch'  # ROUTE_PADDING
    aux_loss_coef: float = 0.0  # stage-IV recipe; the reference's CLI default is 0.01
    dispatch: str = 'einsum'  # DISPATCH: how routed tokens reach the experts (same routing, same parameters)
    grouped_matmul: str = 'auto'  # GROUPED_MATMUL: the 'grouped' dispatch's expert matmul kernel

    def __post_init__(self):
        if self.mode not in MOE_MODES:
            raise ValueError(f'moe.mode={self.mode!r}; known: {MOE_MODES}')
        if self.top_k not in (1, 2):
            raise ValueError(f'moe.top_k={self.top_k}: only top-1 and top-2 gating exist')
        if self.num_experts < self.top_k or self.num_experts < 1:
            raise ValueError(f'moe.num_experts={self.num_experts} must be >= moe.top_k={self.top_k}')
        if self.group_size < 1 or self.min_capacity < 0:
            raise ValueError(f'moe.group_size={self.group_size} must be >= 1, '
                             f'moe.min_capacity={self.min_capacity} >= 0')
        if self.route_padding not in ROUTE_PADDING:
            raise ValueError(f'moe.route_padding={self.route_padding!r}; known: {ROUTE_PADDING}')
        if self.dispatch not in DISPATCH:
            raise ValueError(f'moe.dispatch={self.dispatch!r}; known: {DISPATCH}')
        if self.grouped_matmul not in GROUPED_MATMUL:
            raise ValueError(f'moe.grouped_matmul={self.grouped_matmul!r}; known: {GROUPED_MATMUL}')
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            raise ValueError('moe.capacity_factor and moe.eval_capacity_factor must be > 0')

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        """The reference's moe_mode: sparse = every other layer from 0."""
        half = num_layers // 2
        return {'none': (), 'dense': tuple(range(num_layers)), 'first_half': tuple(range(half)),
                'second_half': tuple(range(half, num_layers)),
                'sparse': tuple(range(0, num_layers, 2))}[self.mode]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> 'MoEConfig':
        d = known_fields(cls, d or {}, 'config.model.moe')
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    dtype: str = 'float32'
    param_dtype: str = 'float32'
    scan_layers: bool = False
    remat_policy: str = 'none'
    # Query block of the causal self-attention (layers.causal_attention): 0 = one (T, T) block; > 0 skips the
    # masked upper-triangle blocks (same result; faster on CPU, see docs/performance.md).
    attention_block: int = 0
    # The causal self-attention's kernel (ATTENTION): 'xla' the einsum core above (the reference's function),
    # 'splash' Pallas's TPU splash attention (interpreted off TPU), 'cudnn' jax's fused cuDNN attention (GPU,
    # bf16 / fp16, right-padded rows), 'auto' splash on TPU, cudnn on GPU in bf16 / fp16, xla elsewhere.
    attention: str = 'xla'
    lora: LoRAConfig = LoRAConfig()
    moe: MoEConfig = MoEConfig()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f'llm.num_heads={self.num_heads} is not a multiple of '
                             f'llm.num_kv_heads={self.num_kv_heads}')
        if self.head_dim % 2:
            raise ValueError(f'llm.head_dim={self.head_dim} must be even for RoPE')
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f'model.remat_policy={self.remat_policy!r}; known: {list(REMAT_POLICIES)}')
        if self.attention not in ATTENTION:
            raise ValueError(f'model.llm.attention={self.attention!r}; known: {list(ATTENTION)}')
        for name in (self.dtype, self.param_dtype):
            if name not in DTYPES:
                raise ValueError(f'unknown dtype {name!r}; known: {list(DTYPES)}')
        if self.scan_layers and self.moe.mode not in ('none', 'dense'):
            raise ValueError(f'model.moe.mode={self.moe.mode!r} makes layers differ; nn.scan needs identical layers '
                             f'(use moe.mode dense or none, or scan_layers=False)')

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self.moe.layer_indices(self.num_layers)

    @classmethod
    def from_model_config(cls, model_cfg: Mapping[str, Any]) -> 'LlamaConfig':
        """From `config.model` (its `llm` block plus the shared dtype / layout fields)."""
        llm = known_fields(cls, model_cfg['llm'], 'config.model.llm')
        shared = {k: model_cfg[k] for k in ('dtype', 'param_dtype', 'scan_layers', 'remat_policy') if k in model_cfg}
        return cls(**llm, **shared, lora=LoRAConfig.from_dict(model_cfg.get('lora')),
                   moe=MoEConfig.from_dict(model_cfg.get('moe')))

    @classmethod
    def from_hf(cls, hf: Any, **overrides: Any) -> 'LlamaConfig':
        """From a transformers `LlamaConfig` (or its dict). RoPE theta lives in `rope_parameters` in 5.x."""
        d = hf if isinstance(hf, Mapping) else hf.to_dict()
        rope = d.get('rope_parameters') or {}
        if rope.get('rope_type', 'default') != 'default':
            raise ValueError(f'rope_parameters.rope_type={rope["rope_type"]!r} is not supported (only default)')
        return cls(vocab_size=d['vocab_size'], hidden_size=d['hidden_size'],
                   intermediate_size=d['intermediate_size'], num_layers=d['num_hidden_layers'],
                   num_heads=d['num_attention_heads'],
                   num_kv_heads=d.get('num_key_value_heads') or d['num_attention_heads'],
                   head_dim=d.get('head_dim') or d['hidden_size'] // d['num_attention_heads'],
                   rms_norm_eps=d['rms_norm_eps'], rope_theta=rope.get('rope_theta', d.get('rope_theta', 10000.0)),
                   max_position_embeddings=d['max_position_embeddings'], **overrides)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float = 1e-5
    select_layer: int = -2
    select_feature: str = 'patch'
    dtype: str = 'float32'
    param_dtype: str = 'float32'

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f'vision.image_size={self.image_size} is not a multiple of '
                             f'vision.patch_size={self.patch_size}')
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(f'vision.select_feature={self.select_feature!r}; known: {SELECT_FEATURES}')
        if not 1 <= self.layers_used <= self.num_layers:
            raise ValueError(f'vision.select_layer={self.select_layer} is outside the '
                             f'{self.num_layers}-layer tower')

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_used(self) -> int:
        """Encoder layers to run: HF's hidden_states has num_layers + 1 entries (entry 0 = embeddings)."""
        return self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer

    @classmethod
    def from_model_config(cls, model_cfg: Mapping[str, Any]) -> 'CLIPVisionConfig':
        vision = known_fields(cls, model_cfg['vision'], 'config.model.vision')
        return cls(**vision, dtype=model_cfg.get('dtype', 'float32'),
                   param_dtype=model_cfg.get('param_dtype', 'float32'))

    @classmethod
    def from_hf(cls, hf: Any, **overrides: Any) -> 'CLIPVisionConfig':
        d = hf if isinstance(hf, Mapping) else hf.to_dict()
        if d.get('hidden_act', 'quick_gelu') != 'quick_gelu':
            raise ValueError(f'hidden_act={d["hidden_act"]!r} is not supported (CLIP uses quick_gelu)')
        return cls(image_size=d['image_size'], patch_size=d['patch_size'], hidden_size=d['hidden_size'],
                   intermediate_size=d['intermediate_size'], num_layers=d['num_hidden_layers'],
                   num_heads=d['num_attention_heads'], layer_norm_eps=d['layer_norm_eps'], **overrides)


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
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    layer_norm_eps: float = 1e-6
    adapter: bool = True
    adapter_ratio: float = 0.25
    adapter_norm_eps: float = 1e-5  # the adapter's nn.LayerNorm keeps torch's default eps
    neck_norm_eps: float = 1e-6  # SAM's LayerNorm2d (and HF's neck) always use 1e-6
    dtype: str = 'float32'
    param_dtype: str = 'float32'

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f'sam_encoder.image_size={self.image_size} is not a multiple of '
                             f'sam_encoder.patch_size={self.patch_size}')
        if self.hidden_size % self.num_heads:
            raise ValueError(f'sam_encoder.hidden_size={self.hidden_size} is not a multiple of num_heads')
        if any(not 0 <= i < self.depth for i in self.global_attn_indexes):
            raise ValueError(f'sam_encoder.global_attn_indexes={self.global_attn_indexes} outside depth {self.depth}')

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> 'SamImageEncoderConfig':
        d = known_fields(cls, d, 'config.model.sam_encoder')
        if 'global_attn_indexes' in d:
            d['global_attn_indexes'] = tuple(d['global_attn_indexes'])
        return cls(**{**d, **overrides})

    @classmethod
    def from_hf(cls, hf: Any, **overrides: Any) -> 'SamImageEncoderConfig':
        """From a transformers `SamVisionConfig` (original SAM: no adapters)."""
        d = hf if isinstance(hf, Mapping) else hf.to_dict()
        wanted = (('hidden_act', 'gelu'), ('qkv_bias', True), ('use_abs_pos', True), ('use_rel_pos', True),
                  ('num_channels', 3))
        unsupported = {k: d.get(k) for k, want in wanted if d.get(k, want) != want}
        if unsupported:
            raise ValueError(f'SamVisionConfig: unsupported settings {unsupported}')
        mlp_dim = d.get('mlp_dim') or int(d['hidden_size'] * d['mlp_ratio'])
        return cls(image_size=d['image_size'], patch_size=d['patch_size'], hidden_size=d['hidden_size'],
                   depth=d['num_hidden_layers'], num_heads=d['num_attention_heads'], mlp_dim=mlp_dim,
                   out_chans=d['output_channels'], window_size=d['window_size'],
                   global_attn_indexes=tuple(d['global_attn_indexes']), layer_norm_eps=d['layer_norm_eps'],
                   adapter=False, **overrides)


@dataclasses.dataclass(frozen=True)
class SamDecoderConfig:
    """Defaults: SAM-Med2D ViT-B at 256 (prompt dim 256, 16x16 embedding, 64x64 low-res masks)."""
    embed_dim: int = 256
    image_embedding_size: int = 16
    input_image_size: int = 256
    mask_in_chans: int = 16
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    layer_norm_eps: float = 1e-5  # the two-way transformer's nn.LayerNorm
    layer_norm2d_eps: float = 1e-6
    dtype: str = 'float32'
    param_dtype: str = 'float32'

    def __post_init__(self):
        if self.embed_dim % 2 or self.embed_dim % self.num_heads:
            raise ValueError(f'sam_decoder.embed_dim={self.embed_dim} must be even and divisible by num_heads')

    @property
    def num_mask_tokens(self) -> int:
        return self.num_multimask_outputs + 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> 'SamDecoderConfig':
        d = known_fields(cls, d, 'config.model.sam_decoder')
        return cls(**{**d, **overrides})

    @classmethod
    def from_hf(cls, hf: Any, **overrides: Any) -> 'SamDecoderConfig':
        """From a transformers `SamConfig`."""
        d = hf if isinstance(hf, Mapping) else hf.to_dict()
        pe, md = d['prompt_encoder_config'], d['mask_decoder_config']
        return cls(embed_dim=pe['hidden_size'], image_embedding_size=pe['image_embedding_size'],
                   input_image_size=pe['image_size'], mask_in_chans=pe['mask_input_channels'],
                   depth=md['num_hidden_layers'], num_heads=md['num_attention_heads'], mlp_dim=md['mlp_dim'],
                   attention_downsample_rate=md['attention_downsample_rate'],
                   num_multimask_outputs=md['num_multimask_outputs'], iou_head_depth=md['iou_head_depth'],
                   iou_head_hidden_dim=md['iou_head_hidden_dim'], layer_norm_eps=md['layer_norm_eps'], **overrides)


@dataclasses.dataclass(frozen=True)
class MedPLIBConfig:
    llm: LlamaConfig
    vision: CLIPVisionConfig
    sam_encoder: SamImageEncoderConfig
    sam_decoder: SamDecoderConfig
    seg_token_id: int  # the first added token after the base vocab: configs/common.py `set_vocab`, the one rule
    projector_type: str = 'mlp2x_gelu'
    max_seg: int = 1  # <SEG> tokens per sample that get a mask (static); validity says which are real
    max_regions: int = 1
    max_region_points: int = 512
    postprocess: str = 'reference'  # or 'aligned' (see models/masks.py)
    mask_threshold: float = MASK_THRESHOLD

    def __post_init__(self):
        if self.postprocess not in POSTPROCESS_MODES:
            raise ValueError(f'medplib.postprocess={self.postprocess!r}; known: {POSTPROCESS_MODES}')
        if self.max_seg < 1 or self.max_regions < 0:
            raise ValueError(f'medplib.max_seg={self.max_seg} must be >= 1, max_regions={self.max_regions} >= 0')

    @property
    def num_image_tokens(self) -> int:
        """CLIP patch tokens per image (576 at 336 / 14)."""
        return (self.vision.image_size // self.vision.patch_size) ** 2

    @classmethod
    def from_model_config(cls, model_cfg: Mapping[str, Any]) -> 'MedPLIBConfig':
        mp = known_fields(cls, model_cfg['medplib'], 'config.model.medplib',
                          exclude=('llm', 'vision', 'sam_encoder', 'sam_decoder'))
        dtypes = {k: model_cfg[k] for k in ('dtype', 'param_dtype') if k in model_cfg}
        return cls(llm=LlamaConfig.from_model_config(model_cfg), vision=CLIPVisionConfig.from_model_config(model_cfg),
                   sam_encoder=SamImageEncoderConfig.from_dict(model_cfg['sam_encoder'], **dtypes),
                   sam_decoder=SamDecoderConfig.from_dict(model_cfg['sam_decoder'], **dtypes),
                   projector_type=model_cfg['projector']['type'], **mp)
