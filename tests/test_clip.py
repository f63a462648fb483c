"""CLIP tower vs HF `CLIPVisionModel` (PyTorch, fp32) at the reference's feature selection; projector shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support.hf_refs import state_dict_numpy, tiny_hf_clip

from configs.common import get_config
from medplib_jax.convert.clip import hf_to_clip_params, hf_to_projector_params
from medplib_jax.models.clip import CLIPVisionConfig, CLIPVisionTower, MultimodalProjector


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.slow
@pytest.mark.parametrize('image_size,patch_size,num_layers', [(56, 14, 3), (336, 14, 3)])
@pytest.mark.parametrize('select_layer,select_feature', [(-2, 'patch'), (-1, 'cls_patch'), (1, 'patch')])
def test_features_match_hf_hidden_states(np_rng, image_size, patch_size, num_layers, select_layer, select_feature):
    hf = tiny_hf_clip(seed=int(np_rng.integers(1 << 30)), image_size=image_size, patch_size=patch_size,
                      num_layers=num_layers)
    cfg = CLIPVisionConfig.from_hf(hf.config, select_layer=select_layer, select_feature=select_feature)
    params = hf_to_clip_params(state_dict_numpy(hf), cfg)
    pixels = np_rng.normal(size=(2, 3, image_size, image_size)).astype(np.float32)
    ours = CLIPVisionTower(cfg).apply({'params': params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    with torch.no_grad():
        ref = hf(torch.tensor(pixels), output_hidden_states=True).hidden_states[select_layer]
    ref = ref[:, 1:] if select_feature == 'patch' else ref
    n = (image_size // patch_size) ** 2
    assert ours.shape == (2, n if select_feature == 'patch' else n + 1, 32)
    assert _rel_err(ours, ref.numpy()) <= 1e-5


def test_reference_selection_is_second_to_last_layer_without_post_norm():
    """MedPLIB uses hidden_states[-2] (output of layer 23 of 24) with CLS dropped."""
    cfg = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=8, intermediate_size=16, num_layers=24,
                           num_heads=2)
    assert cfg.layers_used == 23 and cfg.num_patches == 576
    with pytest.raises(ValueError, match='select_layer'):
        CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=8, intermediate_size=16, num_layers=2,
                         num_heads=2, select_layer=-4)


def test_projector_matches_torch_mlp2x_gelu(np_rng):
    """LLaVA's mlp2x_gelu = Sequential(Linear, GELU(erf), Linear); keys 0.* and 2.*."""
    torch.manual_seed(int(np_rng.integers(1 << 30)))
    ref = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 48))
    params = hf_to_projector_params({k: v.detach().numpy() for k, v in ref.state_dict().items()}, 32, 48)
    x = np_rng.normal(size=(2, 5, 32)).astype(np.float32)
    ours = MultimodalProjector(48).apply({'params': params}, jnp.asarray(x))
    with torch.no_grad():
        expected = ref(torch.tensor(x)).numpy()
    assert _rel_err(ours, expected) <= 1e-6


def test_real_sizes_have_reference_shapes():
    """ViT-L/14-336 + mlp2x_gelu: (B, 576, 1024) features -> (B, 576, 4096) image tokens; checkpoint shapes."""
    model_cfg = get_config('model=7b').model
    cfg = CLIPVisionConfig.from_model_config(model_cfg)
    pixels = jax.ShapeDtypeStruct((2, 336, 336, 3), jnp.float32)
    tower = CLIPVisionTower(cfg)
    variables = jax.eval_shape(tower.init, jax.random.key(0), pixels)
    feats = jax.eval_shape(tower.apply, variables, pixels)
    assert feats.shape == (2, 576, 1024)
    p = variables['params']['vision_model']
    assert p['embeddings']['position_embedding']['embedding'].value.shape == (577, 1024)
    assert p['embeddings']['patch_embedding']['kernel'].value.shape == (14, 14, 3, 1024)
    assert len([k for k in p['encoder'] if k.startswith('layers_')]) == 24
    projector = MultimodalProjector(model_cfg.llm.hidden_size)
    pvars = jax.eval_shape(projector.init, jax.random.key(0), feats)
    assert pvars['params']['0']['kernel'].value.shape == (1024, 4096)
    assert pvars['params']['2']['kernel'].value.shape == (4096, 4096)
    assert jax.eval_shape(projector.apply, pvars, feats).shape == (2, 576, 4096)
    n_params = sum(int(np.prod(x.value.shape)) for x in jax.tree.leaves(
        variables['params'], is_leaf=lambda x: hasattr(x, 'value')))
    assert 303e6 < n_params < 305e6  # ViT-L/14-336 vision tower: ~304M
