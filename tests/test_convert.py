"""Converters: HF -> ours -> HF is exact; a checkpoint that does not fit fails naming every offending key."""
import dataclasses

import ml_dtypes
import numpy as np
import pytest
import torch
from support.hf_refs import state_dict_numpy, tiny_hf_clip, tiny_hf_llama

from medplib_jax.convert.clip import (
    clip_params_to_hf,
    hf_to_clip_params,
    hf_to_projector_params,
    projector_params_to_hf,
)
from medplib_jax.convert.common import ConversionError, load_state_dict, stack_layers, strip_prefix, unstack_layers
from medplib_jax.convert.llama import hf_to_params, params_to_hf
from medplib_jax.models.clip import CLIPVisionConfig
from medplib_jax.models.llama import LlamaConfig


def _assert_same_state_dict(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.fixture(scope='module')
def llama():
    hf = tiny_hf_llama(seed=11)
    return hf, state_dict_numpy(hf), LlamaConfig.from_hf(hf.config)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_llama_round_trip_is_exact(llama, scan_layers):
    _, sd, cfg = llama
    cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
    params = hf_to_params(sd, cfg)
    if scan_layers:
        assert params['model']['layers']['mlp']['up_proj']['kernel'].shape == (3, 64, 160)
    _assert_same_state_dict(params_to_hf(params, cfg), sd)


def test_scanned_and_unscanned_layouts_hold_the_same_weights(llama):
    _, sd, cfg = llama
    flat = hf_to_params(sd, cfg)
    stacked = hf_to_params(sd, dataclasses.replace(cfg, scan_layers=True))
    back = unstack_layers(stacked, 'model', cfg.num_layers)
    _assert_same_state_dict(params_to_hf(back, cfg), params_to_hf(flat, cfg))
    restacked = stack_layers(back, 'model', cfg.num_layers)
    np.testing.assert_array_equal(restacked['model']['layers']['self_attn']['q_proj']['kernel'],
                                  stacked['model']['layers']['self_attn']['q_proj']['kernel'])


def test_renamed_key_is_named_in_the_error(llama):
    _, sd, cfg = llama
    bad = dict(sd)
    bad['model.layers.1.mlp.gate_projection.weight'] = bad.pop('model.layers.1.mlp.gate_proj.weight')
    with pytest.raises(ConversionError) as err:
        hf_to_params(bad, cfg, source='ckpt_dir')
    msg = str(err.value)
    assert 'ckpt_dir' in msg
    assert 'model.layers.1.mlp.gate_projection.weight' in msg  # unexpected
    assert 'model/layers_1/mlp/gate_proj/kernel' in msg  # missing
    assert '\n' not in msg


def test_wrong_shape_and_ignored_buffers(llama):
    _, sd, cfg = llama
    bad = dict(sd)
    bad['model.norm.weight'] = np.ones(65, np.float32)
    with pytest.raises(ConversionError, match=r'model\.norm\.weight -> model/norm/weight: got \(65,\)'):
        hf_to_params(bad, cfg)
    # transformers 4.31 checkpoints carry RoPE inv_freq buffers: recomputed, so ignored
    with_buffer = dict(sd, **{'model.layers.0.self_attn.rotary_emb.inv_freq': np.ones(8, np.float32)})
    hf_to_params(with_buffer, cfg)


def test_clip_and_projector_round_trip_is_exact():
    hf = tiny_hf_clip(seed=5)
    sd = state_dict_numpy(hf)
    _assert_same_state_dict(clip_params_to_hf(hf_to_clip_params(sd, CLIPVisionConfig.from_hf(hf.config))), sd)
    # the tower inside a MedPLIB checkpoint, or a full CLIPModel checkpoint (vision_model.* + text_model.*)
    medplib = {f'model.vision_tower.vision_tower.vision_model.{k}': v for k, v in sd.items()}
    inner = strip_prefix(medplib, 'model.vision_tower.vision_tower.')
    full_clip = dict(inner, **{'text_model.embeddings.token_embedding.weight': np.zeros((4, 4), np.float32)})
    _assert_same_state_dict(clip_params_to_hf(hf_to_clip_params(full_clip, CLIPVisionConfig.from_hf(hf.config))), sd)
    proj = {'0.weight': np.random.randn(48, 32).astype(np.float32), '0.bias': np.zeros(48, np.float32),
            '2.weight': np.random.randn(48, 48).astype(np.float32), '2.bias': np.ones(48, np.float32)}
    _assert_same_state_dict(projector_params_to_hf(hf_to_projector_params(proj, 32, 48)), proj)


def test_load_local_checkpoints(tmp_path, llama):
    """save_pretrained directories (safetensors, sharded with an index, bf16) and a torch .bin file."""
    hf, sd, cfg = llama
    hf.save_pretrained(tmp_path / 'single')
    _assert_same_state_dict(load_state_dict(tmp_path / 'single'), sd)
    hf.save_pretrained(tmp_path / 'sharded', max_shard_size='50KB')
    assert (tmp_path / 'sharded' / 'model.safetensors.index.json').exists()
    _assert_same_state_dict(load_state_dict(tmp_path / 'sharded'), sd)
    bf16 = tiny_hf_llama(seed=11).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path / 'bf16')
    loaded = load_state_dict(tmp_path / 'bf16')
    assert loaded['lm_head.weight'].dtype == ml_dtypes.bfloat16
    params = hf_to_params(loaded, cfg)  # cast to the model's param dtype (fp32)
    np.testing.assert_array_equal(params['lm_head']['kernel'],
                                  sd['lm_head.weight'].astype(ml_dtypes.bfloat16).astype(np.float32).T)
    torch.save(hf.state_dict(), tmp_path / 'pytorch_model.bin')
    _assert_same_state_dict(load_state_dict(tmp_path / 'pytorch_model.bin'), sd)
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'weights.npz').write_bytes(b'')
    with pytest.raises(FileNotFoundError, match='empty: no model.safetensors'):
        load_state_dict(tmp_path / 'empty')
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_state_dict(tmp_path / 'nope')
