"""MedPLIB: CLIP tower + projector + region encoder + LLaMA (dense or MoE FFNs) + `<SEG>` -> SAM-Med2D masks.

Parameter tree mirrors the released checkpoint (the reference's merged `MedPLIBForCausalLM` state dict):
`model/{embed_tokens, layers_i, norm}` (the LLM), `model/vision_tower/vision_model/...`, `model/mm_projector/{0,2}`,
`model/region_fea_adapter`, `model/text_hidden_fcs/0/{0,2}`, `model/visual_model/{image_encoder, prompt_encoder,
mask_decoder}`, `lm_head`.

One forward (the reference's `MedPLIBForCausalLM.model_forward`, model/MedPLIB.py): images -> CLIP layer -2 patch
features (frozen) -> projector -> image tokens; regions -> region embeddings; both merged into the token embeddings at
their placeholders; LLM -> logits and final-norm hidden states; the state *before* each `<SEG>` -> T-projector
(`text_hidden_fcs`) -> SAM prompt (alone: no points, boxes or mask) -> mask decoder on the image's (frozen) SAM
embedding -> 64x64 mask logits + IoU.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from medplib_jax.models.clip import CLIPVisionTower, MultimodalProjector
from medplib_jax.models.config import MedPLIBConfig
from medplib_jax.models.inputs import MODEL_INPUTS
from medplib_jax.models.layers import constrain, dense, dtype_of, torch_linear_bias_init, torch_linear_init
from medplib_jax.models.llama import LlamaForCausalLM, LlamaModel
from medplib_jax.models.multimodal import embeddable_ids, merge_embeddings, seg_positions
from medplib_jax.models.region import RegionEncoder
from medplib_jax.models.sam_decoder import SamMaskDecoder, SamPromptEncoder
from medplib_jax.models.sam_encoder import SamImageEncoder


class TextHiddenFcs(nn.Module):
    """The T-projector: Linear(D, D) -> ReLU -> Linear(D, 256). The reference keeps it as a ModuleList holding
    one Sequential (keys `text_hidden_fcs.0.0.*`, `text_hidden_fcs.0.2.*`), hence the inner module `0`."""
    hidden_size: int
    out_dim: int
    dtype: str = 'float32'
    param_dtype: str = 'float32'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _TwoLayerReLU(self.hidden_size, self.out_dim, self.dtype, self.param_dtype, name='0')(x)


class _TwoLayerReLU(nn.Module):
    hidden_size: int
    out_dim: int
    dtype: str
    param_dtype: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # PyTorch's default Linear init, kernels and biases: the reference creates these fresh at stage III
        # (`initialize_lisa_modules`), and a fresh stage III starts from it.
        kw = dict(use_bias=True, dtype=dtype_of(self.dtype), param_dtype=dtype_of(self.param_dtype),
                  kernel_init=torch_linear_init)
        first = dense(self.hidden_size, ('embed', 'mlp'), name='0', bias_init=torch_linear_bias_init(x.shape[-1]),
                      **kw)
        second = dense(self.out_dim, ('mlp', 'sam_embed'), name='2',
                       bias_init=torch_linear_bias_init(self.hidden_size), **kw)
        return second(nn.relu(first(x)))


class VisualModel(nn.Module):
    """`visual_model`: SAM-Med2D's image encoder, prompt encoder and mask decoder."""
    cfg: MedPLIBConfig

    def setup(self):
        self.image_encoder = SamImageEncoder(self.cfg.sam_encoder)
        self.prompt_encoder = SamPromptEncoder(self.cfg.sam_decoder)
        self.mask_decoder = SamMaskDecoder(self.cfg.sam_decoder)

    def embed_image(self, pixels: jax.Array) -> jax.Array:
        return self.image_encoder(pixels)

    def __call__(self, image_embeddings: jax.Array, prompts: jax.Array) -> tuple[jax.Array, jax.Array]:
        """image_embeddings (B, 16, 16, 256); prompts (B, S, 256) -> mask logits (B, S, 64, 64), IoU (B, S)."""
        b, s, c = prompts.shape
        sparse, dense_emb = self.prompt_encoder(text_embeds=prompts.reshape(b * s, 1, c))
        pe = self.prompt_encoder.get_dense_pe()  # the prompt encoder is frozen by config.train.trainable
        images = jnp.repeat(image_embeddings, s, axis=0)  # one image embedding per prompt, in batch order
        masks, iou = self.mask_decoder(images, pe, sparse, dense_emb, multimask_output=False)
        return masks.reshape(b, s, *masks.shape[-2:]), iou.reshape(b, s)


class MedPLIBModel(LlamaModel):
    """The LLM stack (embed_tokens, layers_i, norm) plus MedPLIB's vision / region / mask modules, in one scope
    named `model` as in the reference checkpoint."""
    mcfg: MedPLIBConfig = None

    def setup(self):
        super().setup()
        m = self.mcfg
        self.vision_tower = CLIPVisionTower(m.vision)
        self.mm_projector = MultimodalProjector(m.llm.hidden_size, m.projector_type, m.llm.dtype, m.llm.param_dtype)
        self.region_fea_adapter = RegionEncoder(m.llm.hidden_size, m.max_region_points, m.llm.dtype,
                                                m.llm.param_dtype)
        self.text_hidden_fcs = TextHiddenFcs(m.llm.hidden_size, m.sam_decoder.embed_dim, m.llm.dtype,
                                             m.llm.param_dtype)
        self.visual_model = VisualModel(m)

    def encode_images(self, clip_pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (projected image tokens (B, 576, D), raw layer -2 patch features (B, 576, 1024)). The recipe freezes
        CLIP by leaving it out of `config.train.trainable` (the train step differentiates only what that names, so a
        frozen tower costs no backward pass); a stop_gradient here would make naming it there silently train
        nothing."""
        feats = self.vision_tower(clip_pixels)
        return self.mm_projector(feats), feats


class MedPLIBForCausalLM(LlamaForCausalLM):
    """`__call__` (inherited) is the text-only LLM; `forward` is the multimodal MedPLIB pass."""
    mcfg: MedPLIBConfig = None

    def setup(self):
        self.model = MedPLIBModel(self.cfg, mcfg=self.mcfg)
        self.lm_head = dense(self.cfg.vocab_size, ('embed', 'vocab'), dtype=dtype_of(self.cfg.dtype),
                             param_dtype=dtype_of(self.cfg.param_dtype), name='lm_head',
                             kernel_init=nn.initializers.normal(0.02))

    def forward(self, input_ids: jax.Array, clip_pixels: jax.Array, sam_pixels: jax.Array | None = None,
                region_grids: jax.Array | None = None, token_mask: jax.Array | None = None,
                train: bool = False, compute_masks: bool = True) -> dict[str, jax.Array]:
        """input_ids (B, T) with image / region placeholders (models/multimodal.py); clip_pixels (B, 336, 336, 3);
        sam_pixels (B, 256, 256, 3); region_grids (B, R, 24, 24).

        Returns logits (B, T, V) fp32, hidden (B, T, D) final-norm states, and with `compute_masks`:
        seg_valid (B, S), mask_logits (B, S, 64, 64), iou (B, S) for the first S = max_seg `<SEG>` tokens.
        """
        embeds = self.embed_multimodal(input_ids, clip_pixels, region_grids)
        logits, hidden = self(inputs_embeds=embeds, token_mask=token_mask, train=train)
        out = {'logits': logits, 'hidden': hidden}
        if compute_masks:
            if sam_pixels is None:
                raise ValueError('MedPLIB forward: compute_masks needs sam_pixels')
            positions, valid = seg_positions(input_ids, self.mcfg.seg_token_id, self.mcfg.max_seg)
            seg_hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # (B, S, D)
            masks, iou = self.seg_masks(seg_hidden, sam_pixels)
            out.update(seg_valid=valid, mask_logits=masks, iou=iou)
        return out

    def embed_multimodal(self, input_ids: jax.Array, clip_pixels: jax.Array,
                         region_grids: jax.Array | None = None) -> jax.Array:
        """The LLM's input embeddings (B, T, D): token embeddings with the projected CLIP tokens at the image
        placeholders and the region features at the region placeholders (training and decoding's prefill)."""
        image_tokens, raw_feats = self.model.encode_images(clip_pixels)
        regions = None
        if region_grids is not None and region_grids.shape[1] > 0:
            regions = self.model.region_fea_adapter(raw_feats, region_grids)
        # Batch-sharded like the token embeddings: gathering from feature-sharded values makes XLA replicate them.
        act = ('activation_batch', 'activation_length', 'activation_embed')
        image_tokens = constrain(image_tokens, act)
        regions = None if regions is None else constrain(regions, act)
        return constrain(merge_embeddings(self.model.embed(embeddable_ids(input_ids)), input_ids, image_tokens,
                                          regions), act)

    def seg_masks(self, seg_hidden: jax.Array, sam_pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Final-norm states before `<SEG>` (B, S, D) + SAM inputs (B, 256, 256, 3) -> (64x64 mask logits
        (B, S, 64, 64), IoU predictions (B, S)), fp32: T-projector, SAM image encoder (frozen by the recipe through
        `config.train.trainable`, as CLIP in `encode_images`), mask decoder."""
        prompts = self.model.text_hidden_fcs(seg_hidden)
        image_embeddings = self.model.visual_model.embed_image(sam_pixels)
        masks, iou = self.model.visual_model(image_embeddings, prompts)
        return masks.astype(jnp.float32), iou.astype(jnp.float32)


def init_fn(model: Any, example: Mapping[str, Any], seed: int) -> Callable[[], Any]:
    """The model's `init` from shapes only: `lazy_init` on shape structs of one routing group of `example`'s rows
    (anything with .shape / .dtype) traces the forward and keeps just the parameters' initialisers."""
    llm = model.mcfg.llm
    rows = llm.moe.group_size if llm.moe_layers else 1
    inputs = {k: jax.ShapeDtypeStruct((rows, *example[k].shape[1:]), example[k].dtype) for k in MODEL_INPUTS}
    return lambda: model.lazy_init(jax.random.key(seed), **inputs, method=MedPLIBForCausalLM.forward)
