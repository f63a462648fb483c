"""An explicit FLOP count of one MedPLIB train step, for MFU (MaxText's `calculate_tflops_training_per_device`
convention): 2 FLOPs per multiply-add, training = 3 x forward for trained paths through the LLM.

- LLM (per sequence position, padding included): 6 x the matmul parameters a token uses (q, k, v, o; the FFN of
  `top_k` experts, i.e. one for MedPLIB's top-1, plus the router; LoRA adapters; lm_head) + attention
  12 x layers x T x heads x head_dim (QK^T and AV over the full T x T square: causality is not discounted).
- Frozen vision (forward only, 2 x matmul parameters x tokens per image; attention inside the towers is left out,
  the adapters' convolutions approximated per token): CLIP up to its selected layer on 577 tokens, SAM-Med2D's ViT
  on 256 patch tokens.
The mask decoder, losses and optimizer are not counted (well under 1% at 7B).
"""
from __future__ import annotations

import dataclasses

from medplib_jax.models.medplib import MedPLIBConfig

# bf16 dense peak FLOP/s per device, by `device_kind` prefix (vendor figures).
PEAK_FLOPS = {'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v5': 459e12,
              'TPU v6 lite': 918e12, 'TPU v6e': 918e12, 'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12,
              'NVIDIA A100': 312e12}


@dataclasses.dataclass(frozen=True)
class StepFlops:
    llm: float
    vision: float

    @property
    def total(self) -> float:
        return self.llm + self.vision


def _lora(rank: int, targets: tuple[str, ...], shapes: dict[str, tuple[int, int]], experts: int) -> int:
    total = 0
    for name, (i, o) in shapes.items():
        if rank and name in targets:
            total += rank * (i + o) * (experts if name.endswith(('gate_proj', 'up_proj', 'down_proj')) else 1)
    return total


def llm_params_per_token(cfg: MedPLIBConfig) -> int:
    """Matmul parameters one token passes through in the LLM (active experts only)."""
    llm = cfg.llm
    d, f, hd = llm.hidden_size, llm.intermediate_size, llm.head_dim
    q, kv = llm.num_heads * hd, llm.num_kv_heads * hd
    attn = d * q * 2 + d * kv * 2
    shapes = {'q_proj': (d, q), 'k_proj': (d, kv), 'v_proj': (d, kv), 'o_proj': (q, d), 'gate_proj': (d, f),
              'up_proj': (d, f), 'down_proj': (f, d)}
    moe_layers = set(llm.moe_layers)
    total = 0
    for layer in range(llm.num_layers):
        active = llm.moe.top_k if layer in moe_layers else 1
        total += attn + 3 * d * f * active + (d * llm.moe.num_experts if layer in moe_layers else 0)
        total += _lora(llm.lora.rank, llm.lora.targets, shapes, active)
    return total + d * llm.vocab_size


def vision_params(cfg: MedPLIBConfig) -> tuple[int, int]:
    """Matmul parameters per token of the CLIP layers that run and of SAM-Med2D's ViT blocks (+ adapters)."""
    v, s = cfg.vision, cfg.sam_encoder
    clip_layers = v.num_layers + 1 + v.select_layer if v.select_layer < 0 else v.select_layer
    clip = clip_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    d = s.hidden_size
    # Adapter per token: channel MLP (d -> d/4 -> d), 3x3 stride-2 conv (a quarter of the positions), 4x4
    # stride-2 transposed conv (4 taps per output position).
    adapter = 2 * d * (d // 4) + 9 * d * d // 4 + 4 * d * d
    sam = s.depth * (4 * s.hidden_size ** 2 + 2 * s.hidden_size * s.mlp_dim + adapter)
    return clip, sam


def step_flops(cfg: MedPLIBConfig, batch: int, length: int) -> StepFlops:
    """FLOPs of one train step over `batch` sequences of `length` positions (image placeholders included)."""
    llm = cfg.llm
    per_token = 6 * llm_params_per_token(cfg) + 12 * llm.num_layers * length * llm.num_heads * llm.head_dim
    clip, sam = vision_params(cfg)
    patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    sam_tokens = (256 // 16) ** 2  # SAM-Med2D's 256 x 256 input in 16 x 16 patches
    return StepFlops(llm=float(per_token) * batch * length,
                     vision=2.0 * batch * (clip * (patches + 1) + sam * sam_tokens))


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for prefix, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if device_kind.startswith(prefix):
            return peak
    return None
