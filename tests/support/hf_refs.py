"""Tiny HF PyTorch reference models built offline with random weights (the independent parity references)."""
from __future__ import annotations

import numpy as np
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM


def tiny_hf_llama(seed: int, **overrides) -> LlamaForCausalLM:
    """GQA on (4 query heads, 2 KV heads), non-default rope_theta so a wrong theta shows."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, rope_theta=5000.0, max_position_embeddings=256, rms_norm_eps=1e-5,
               attn_implementation='eager')
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    # HF initialises norms to 1: randomise them so a norm-weight mix-up cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('layernorm.weight') or name == 'model.norm.weight':
                p.uniform_(0.5, 1.5)
    return model


def tiny_hf_clip(seed: int, image_size: int = 56, patch_size: int = 14, num_layers: int = 3) -> CLIPVisionModel:
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                           image_size=image_size, patch_size=patch_size, layer_norm_eps=1e-5,
                           attn_implementation='eager')
    model = CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name or 'layrnorm' in name:  # LayerNorms start at (1, 0): randomise
                p.normal_(1.0 if name.endswith('weight') else 0.0, 0.2)
    return model


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
