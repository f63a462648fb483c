"""The release converter (`convert medplib`) and the per-part converters (`convert llama | clip | sam-med2d`).

A synthetic release checkpoint is written here with the released key names and layout (as the reference's
merge_lora_weights_and_save_hf_model_moe.py saves them: `.bin` shards + `pytorch_model.bin.index.json` as transformers
4.31 writes them, the `moe` config.json, bf16 LLM tensors, fp32 SAM / T-projector / router), at a tiny width with 2
layers, both MoE. Its conversion must equal, array for array and in the model's logits and masks, the same tensors taken
through the per-part converters (convert/llama.py, clip.py, sam.py) and assembled into the tree here, with the expert
order (0 = grounding) checked by name.
"""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import traverse_util
from support.hf_refs import state_dict_numpy, tiny_hf_clip, tiny_hf_llama
from support.sam_keys import med2d_keys

from configs.common import get_config
from configs.stage1 import get_config as stage1
from configs.stage2 import get_config as stage2
from medplib_jax import checkpoint
from medplib_jax.convert.clip import (
    clip_params_to_hf,
    hf_to_clip_params,
    hf_to_projector_params,
    projector_params_to_hf,
)
from medplib_jax.convert.common import ConversionError, MissingExtraError, require_torch, strip_prefix
from medplib_jax.convert.hf_config import ConfigConflictError
from medplib_jax.convert.llama import hf_to_params, params_to_hf
from medplib_jax.convert.parts import convert_clip, convert_llama, convert_sam_med2d
from medplib_jax.convert.release import check_model_config, convert_release, model_shapes
from medplib_jax.convert.sam import (
    decoder_to_ours,
    decoder_to_source,
    image_encoder_to_ours,
    image_encoder_to_source,
    split_components,
)
from medplib_jax.convert.sources import CheckpointSource, Entry
from medplib_jax.infer.predict import params_config
from medplib_jax.models.clip import CLIPVisionConfig
from medplib_jax.models.llama import LlamaConfig
from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM
from medplib_jax.models.multimodal import IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX
from medplib_jax.models.sam_decoder import SamDecoderConfig
from medplib_jax.models.sam_encoder import SamImageEncoderConfig
from medplib_jax.train.handoff import ADAPTER_LEAF

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The synthetic release: tiny widths; config.json values that differ from the tiny config's defaults, so the
# conversion only fits when they are read from it.
VOCAB, D, FFN, LAYERS, HEADS, KV, HD, OUT = 576, 64, 96, 2, 4, 2, 16, 16
MOE = dict(capacity_factor=1.25, ep_size=1, eval_capacity_factor=2, min_capacity=4, moe_enable=True,
           moe_layers_idx=[0, 1], moe_mode='dense', num_experts=[2, 2], router_aux_loss_coef=0.0, top_k_experts=1,
           use_residual=False)
SAM_ARGS = dict(depth=2, dim=32, mlp=64, out=OUT, grid=16, window=14, global_idx=(1,), emb=OUT, dec_mlp=32)


def tiny_config(**overrides):
    """The tiny config with SAM's encoder at 4 heads (the synthetic sam-med2d keys' head width) and routing groups
    of 2 (the test batch)."""
    config = get_config('model=tiny')
    config.model.sam_encoder.num_heads = 4
    config.model.moe.group_size = 2
    for k, v in overrides.items():
        node = config
        *parents, last = k.split('.')
        for part in parents:
            node = node[part]
        node[last] = v
    return config


def release_config_json():
    """Every field the released MedPLIB-7b-2e's config.json has (the merge script's save_pretrained of a
    MedPLIBForCausalLM under transformers 4.31: LlamaConfig's, LLaVA's multimodal ones, MedPLIB's `moe` block and
    `out_dim`), at the tiny widths."""
    return dict(architectures=['MedPLIBForCausalLM'], model_type='medplib_moe_llama', vocab_size=VOCAB,
                hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV, rms_norm_eps=1e-5, max_position_embeddings=1024, rope_scaling=None,
                rope_theta=10000.0, hidden_act='silu', pretraining_tp=1, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, tie_word_embeddings=False, initializer_range=0.02, torch_dtype='bfloat16',
                transformers_version='4.31.0', use_cache=False, mm_hidden_size=32, mm_projector_type='mlp2x_gelu',
                mm_vision_select_layer=-2, mm_vision_select_feature='patch', mm_use_im_start_end=True,
                mm_use_im_patch_token=False, freeze_mm_mlp_adapter=False, tune_mm_mlp_adapter=False,
                mm_vision_tower='/abs/clip-vit-336', vision_tower='/abs/clip-vit-336', tokenizer_padding_side='right',
                tokenizer_model_max_length=2048, train_mask_decoder=True, out_dim=OUT, max_sample_point=512,
                image_aspect_ratio='square', moe=MOE)


def write_release_tokenizer(directory):
    """The tokenizer files save_pretrained writes beside the weights: LLaMA's layout (here the tiny SentencePiece
    model, base vocab 309 = VOCAB - 267) and added_tokens.json with MedPLIB's tokens after it."""
    from medplib_jax.data.tokenizer import ADDED_TOKENS, tiny_model_proto
    (directory / 'tokenizer.model').write_bytes(tiny_model_proto())
    base = VOCAB - len(ADDED_TOKENS)
    (directory / 'added_tokens.json').write_text(json.dumps({t: base + k for k, t in enumerate(ADDED_TOKENS)}))
    (directory / 'special_tokens_map.json').write_text(json.dumps({'bos_token': '<s>', 'eos_token': '</s>',
                                                                   'unk_token': '<unk>', 'pad_token': '<unk>'}))


def release_tensors(rng):
    """Released key names (the merged `MedPLIBForCausalLM`'s state dict) -> arrays. LLM in bf16, the parts the merge
    rebuilds in fp32."""
    w = lambda *shape: (rng.normal(size=shape) * 0.2).astype(np.float32)  # noqa: E731
    bf16 = lambda *shape: w(*shape).astype(ml_dtypes.bfloat16)  # noqa: E731
    sd = {'model.embed_tokens.weight': bf16(VOCAB, D), 'lm_head.weight': bf16(VOCAB, D),
          'model.norm.weight': bf16(D) + 1}
    for i in range(LAYERS):
        p = f'model.layers.{i}.'
        sd.update({p + 'self_attn.q_proj.weight': bf16(HEADS * HD, D), p + 'self_attn.k_proj.weight': bf16(KV * HD, D),
                   p + 'self_attn.v_proj.weight': bf16(KV * HD, D), p + 'self_attn.o_proj.weight': bf16(D, HEADS * HD),
                   p + 'self_attn.rotary_emb.inv_freq': w(HD // 2),  # a transformers 4.31 buffer: ignored
                   p + 'input_layernorm.weight': bf16(D) + 1, p + 'post_attention_layernorm.weight': bf16(D) + 1,
                   p + 'mlp.deepspeed_moe.gate.wg.weight': w(2, D)})
        for e in range(2):
            x = f'{p}mlp.deepspeed_moe.experts.deepspeed_experts.{e}.'
            sd.update({x + 'gate_proj.weight': bf16(FFN, D), x + 'up_proj.weight': bf16(FFN, D),
                       x + 'down_proj.weight': bf16(D, FFN)})
    clip = state_dict_numpy(tiny_hf_clip(seed=int(rng.integers(1 << 30)), image_size=336))  # keys of a CLIPVisionModel
    sd.update({f'model.vision_tower.vision_tower.vision_model.{k.removeprefix("vision_model.")}':
               v.astype(ml_dtypes.bfloat16) for k, v in clip.items()})
    sd.update({'model.mm_projector.0.weight': bf16(D, 32), 'model.mm_projector.0.bias': bf16(D),
               'model.mm_projector.2.weight': bf16(D, D), 'model.mm_projector.2.bias': bf16(D),
               'model.region_fea_adapter.weight': bf16(D, 32), 'model.region_fea_adapter.bias': bf16(D),
               'model.text_hidden_fcs.0.0.weight': w(D, D), 'model.text_hidden_fcs.0.0.bias': w(D),
               'model.text_hidden_fcs.0.2.weight': w(OUT, D), 'model.text_hidden_fcs.0.2.bias': w(OUT)})
    sam = {k: w(*s) for k, s in med2d_keys(**SAM_ARGS).items()}
    return sd, sam


def save_bin_shards(directory, sd, n_shards=2):
    """transformers 4.31's save_pretrained layout: torch.save of plain state-dict shards + the index."""
    os.makedirs(directory, exist_ok=True)
    keys = list(sd)
    cut = [keys[i * len(keys) // n_shards:(i + 1) * len(keys) // n_shards] for i in range(n_shards)]
    weight_map, total = {}, 0
    for i, names in enumerate(cut):
        name = f'pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin'
        shard = {}
        for k in names:
            v = sd[k]
            t = (torch.from_numpy(v.astype(np.float32)).bfloat16() if v.dtype == ml_dtypes.bfloat16
                 else torch.from_numpy(np.ascontiguousarray(v)))
            shard[k] = t
            total += t.numel() * t.element_size()
            weight_map[k] = name
        torch.save(shard, os.path.join(directory, name))
    with open(os.path.join(directory, 'pytorch_model.bin.index.json'), 'w') as f:
        json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)


def write_release(directory, sd, config_json):
    save_bin_shards(directory, sd)
    with open(os.path.join(directory, 'config.json'), 'w') as f:
        json.dump(config_json, f)


def restored(path):
    """A params directory read back onto one device, as '/'-joined numpy arrays."""
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {k: np.asarray(v) for k, v in checkpoint.restore_params(checkpoint.resolve_params_dir(path, 'test'),
                                                                    lambda *_: dev).items()}


@pytest.fixture(scope='module')
def release(tmp_path_factory):
    seed = int(os.environ.get('MEDPLIB_TEST_SEED') or int.from_bytes(os.urandom(4), 'little'))
    print(f'release seed: {seed}')
    rng = np.random.default_rng(seed)
    root = tmp_path_factory.mktemp('release')
    sd, sam = release_tensors(rng)
    # The release holds the (trained) mask decoder; the frozen image / prompt encoders come from sam-med2d_b.pth,
    # whose own mask decoder (SAM-Med2D's, untrained by MedPLIB) differs: reported, the directory's used.
    in_dir = {**sd, **{f'model.visual_model.{k}': v for k, v in sam.items() if k.startswith('mask_decoder.')}}
    sam_file = {k: (v if not k.startswith('mask_decoder.') else v + 1.0) for k, v in sam.items()}
    write_release(root / 'MedPLIB-7b-2e', in_dir, release_config_json())
    write_release_tokenizer(root / 'MedPLIB-7b-2e')  # not converted: copied into the params directory
    torch.save({'model': {k: torch.from_numpy(v) for k, v in sam_file.items()}}, root / 'sam-med2d_b.pth')
    config = tiny_config()
    out = convert_release(str(root / 'MedPLIB-7b-2e'), str(root / 'converted'), config,
                          sam_med2d=str(root / 'sam-med2d_b.pth'), group_bytes=200_000, progress=False)
    return dict(root=root, sd=sd, sam=sam, in_dir=in_dir, config=config, out=out, params=restored(out),
                meta=checkpoint.params_meta(out))


def per_part_tree(sd, sam, config):
    """The same tensors through the per-part converters, assembled into MedPLIB's tree here (MoE by hand)."""
    model = config.model
    llm_cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_layers=LAYERS, num_heads=HEADS,
                          num_kv_heads=KV, head_dim=HD, max_position_embeddings=1024)
    f32 = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    dense = {k: v for k, v in f32.items() if k.startswith(('model.layers', 'model.embed', 'model.norm', 'lm_head'))
             and 'deepspeed_moe' not in k}
    for i in range(LAYERS):  # per_part: a dense FFN placeholder, replaced by the MoE FFN below
        for p in ('gate_proj', 'up_proj', 'down_proj'):
            dense[f'model.layers.{i}.mlp.{p}.weight'] = f32[f'model.layers.{i}.mlp.deepspeed_moe.experts.'
                                                            f'deepspeed_experts.0.{p}.weight']
    tree = hf_to_params(dense, llm_cfg)
    for i in range(LAYERS):
        moe = f'model.layers.{i}.mlp.deepspeed_moe.'
        tree['model'][f'layers_{i}']['mlp'] = {
            'gate': {'wg': {'kernel': f32[moe + 'gate.wg.weight'].T}},
            'experts': {p: {'kernel': np.stack([f32[f'{moe}experts.deepspeed_experts.{e}.{p}.weight'].T
                                                for e in (0, 1)])} for p in ('gate_proj', 'up_proj', 'down_proj')}}
    vision = CLIPVisionConfig.from_model_config(model)
    tree['model']['vision_tower'] = hf_to_clip_params(strip_prefix(f32, 'model.vision_tower.vision_tower.'), vision)
    tree['model']['mm_projector'] = hf_to_projector_params(strip_prefix(f32, 'model.mm_projector.'), 32, D)
    lin = lambda p: {'kernel': f32[p + '.weight'].T, 'bias': f32[p + '.bias']}  # noqa: E731
    tree['model']['region_fea_adapter'] = lin('model.region_fea_adapter')
    tree['model']['text_hidden_fcs'] = {'0': {'0': lin('model.text_hidden_fcs.0.0'),
                                              '2': lin('model.text_hidden_fcs.0.2')}}
    parts = split_components(sam)
    decoder_sd = strip_prefix(f32, 'model.visual_model.mask_decoder.')
    enc = image_encoder_to_ours(parts['image_encoder'], SamImageEncoderConfig.from_dict(model.sam_encoder))
    pp, dp = decoder_to_ours(parts['prompt_encoder'], decoder_sd, SamDecoderConfig.from_dict(model.sam_decoder))
    tree['model']['visual_model'] = {'image_encoder': enc, 'prompt_encoder': pp, 'mask_decoder': dp}
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


def _inputs(rng, seg_id, n=2):
    text = lambda k: list(rng.integers(3, seg_id, size=k))  # noqa: E731
    im_start, im_end, region, region_end = seg_id + 265, seg_id + 266, seg_id + 3, seg_id + 4
    row = lambda: ([1] + text(5) + [im_start] + [IMAGE_TOKEN_INDEX] * 576 + [im_end] + text(3)  # noqa: E731
                   + [region, REGION_TOKEN_INDEX, region_end] + text(4) + [seg_id, 2])
    return dict(input_ids=jnp.asarray([row() for _ in range(n)], jnp.int32),
                clip_pixels=jnp.asarray(rng.normal(size=(n, 336, 336, 3)), jnp.float32),
                sam_pixels=jnp.asarray(rng.normal(size=(n, 256, 256, 3)), jnp.float32),
                region_grids=jnp.asarray(rng.random((n, 1, 24, 24)) < 0.3, jnp.uint8))


def test_release_converts_as_the_per_part_converters_do(release, np_rng):
    params, config, meta = release['params'], release['config'], release['meta']
    ref = per_part_tree(release['in_dir'], release['sam'], config)
    assert set(params) == set(ref)  # 0 missing, 0 unexpected
    for k in ref:
        assert params[k].dtype == np.float32, k
        np.testing.assert_array_equal(params[k], ref[k], err_msg=k)
    # Expert order by name: expert e of our stacked kernel is DeepSpeed's deepspeed_experts.{e} (0 = grounding).
    for i in range(LAYERS):
        for e in (0, 1):
            src = release['sd'][f'model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.down_proj.weight']
            np.testing.assert_array_equal(params[f'model/layers_{i}/mlp/experts/down_proj/kernel'][e],
                                          np.asarray(src, np.float32).T)
        assert not np.array_equal(*params[f'model/layers_{i}/mlp/experts/up_proj/kernel'])
    # The architecture came from config.json, and the JSON records it.
    model = meta['config']['model']
    assert model['llm']['intermediate_size'] == FFN and model['moe']['mode'] == 'dense'
    assert (model['moe']['capacity_factor'], model['moe']['eval_capacity_factor'], model['moe']['min_capacity']) == \
        (1.25, 2.0, 4)
    assert meta['moe_layers'] == [0, 1] and meta['scan_layers'] is False and meta['kind'] == 'medplib release'
    assert meta['config']['data']['tokenizer'] == str(release['root'] / 'MedPLIB-7b-2e')  # where it came from
    assert meta['tokenizer'] == 'tokenizer' and meta['synthetic_data'] is False  # a copy travels with the params
    for name in ('tokenizer.model', 'added_tokens.json', 'special_tokens_map.json'):
        assert (release['root'] / 'converted' / 'tokenizer' / name).read_bytes() == \
            (release['root'] / 'MedPLIB-7b-2e' / name).read_bytes()
    assert meta['groups'] > 3  # written in several partial saves (group_bytes=200 kB), read back as one tree
    # The directory's mask decoder (trained) is used; SAM-Med2D's differs: reported, not used.
    assert meta['conflicts'] and all(k.startswith('model.visual_model.mask_decoder.') for k in meta['conflicts'])
    assert len(meta['conflicts']) == sum(k.startswith('mask_decoder.') for k in release['sam'])
    check_model_config(release['out'], config.model)
    grouped = config.model.copy_and_resolve_references()
    grouped.moe.dispatch = 'grouped'  # same parameters: the dispatch is free, like the routing settings
    check_model_config(release['out'], grouped)
    with pytest.raises(ValueError, match=r'model\.llm\.intermediate_size: 96 \(converted\) vs 128'):
        check_model_config(release['out'], tiny_config().model)

    # Same logits and masks on fresh random inputs, from the model config the directory's JSON records (what
    # infer/predict.py builds an evaluator's model from).
    mcfg = MedPLIBConfig.from_model_config(params_config(release['out'])['model'])
    assert mcfg == MedPLIBConfig.from_model_config(config.model)
    model = MedPLIBForCausalLM(mcfg.llm, mcfg=mcfg)
    fwd = jax.jit(lambda p, b: model.apply({'params': p}, **b, method=MedPLIBForCausalLM.forward))
    batch = _inputs(np_rng, mcfg.seg_token_id)
    unflat = lambda flat: traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})  # noqa: E731
    got, want = fwd(unflat(params), batch), fwd(unflat(ref), batch)
    for key in ('logits', 'mask_logits', 'iou'):
        assert bool(jnp.isfinite(got[key]).all())
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-5, atol=1e-5, err_msg=key)


def test_scanned_layout_holds_the_same_layers(release, tmp_path):
    config = tiny_config(**{'model.scan_layers': True})
    out = convert_release(str(release['root'] / 'MedPLIB-7b-2e'), str(tmp_path / 'scanned'), config,
                          sam_med2d=str(release['root'] / 'sam-med2d_b.pth'), progress=False)
    scanned, flat = restored(out), release['params']
    assert checkpoint.params_meta(out)['scan_layers'] is True
    stacked = [k for k in scanned if k.startswith('model/layers/')]
    assert 'model/layers/mlp/experts/gate_proj/kernel' in stacked
    assert scanned['model/layers/mlp/experts/gate_proj/kernel'].shape == (LAYERS, 2, D, FFN)
    for k in stacked:
        np.testing.assert_array_equal(scanned[k], np.stack([flat[k.replace('layers/', f'layers_{i}/', 1)]
                                                            for i in range(LAYERS)]), err_msg=k)
    assert {k for k in scanned if k not in stacked} == {k for k in flat if not k.startswith('model/layers_')}


def _edit_release(release, tmp_path, edit):
    sd = dict(release['in_dir'])
    edit(sd)
    write_release(tmp_path / 'bad', sd, release_config_json())
    return str(tmp_path / 'bad')


def test_missing_and_renamed_keys_are_named_and_nothing_is_written(release, tmp_path):
    removed = 'model.layers.0.post_attention_layernorm.weight'
    renamed = 'model.layers.1.mlp.deepspeed_moe.experts.deepspeed_experts.1.up_proj.weight'

    def edit(sd):
        del sd[removed]
        sd[renamed.replace('up_proj', 'upproj')] = sd.pop(renamed)
    src = _edit_release(release, tmp_path, edit)
    with pytest.raises(ConversionError) as err:
        convert_release(src, str(tmp_path / 'out'), tiny_config(), sam_med2d=str(release['root'] / 'sam-med2d_b.pth'),
                        progress=False)
    msg = str(err.value)
    assert '\n' not in msg and 'nothing was written' in msg
    missing, unexpected = msg.split('unexpected')
    assert removed in missing and renamed in missing  # a renamed key: missing under its name ...
    assert renamed.replace('up_proj', 'upproj') in unexpected  # ... and unexpected under the new one
    assert os.listdir(tmp_path) == ['bad']  # no out, no out.json, no temporary sibling

    # a mis-shaped tensor, and a directory with SAM-Med2D's mask decoder only and no --sam-med2d
    src = _edit_release(release, tmp_path / 'b',
                        lambda sd: sd.update({'model.norm.weight': np.ones(D + 1, np.float32)}))
    decoder = sum(k.startswith('mask_decoder.') for k in release['sam'])
    with pytest.raises(ConversionError, match=rf'model\.norm\.weight -> model/norm/weight: \(65,\), the model wants '
                                              rf'\(64,\).*holds {decoder} SAM-Med2D tensors .* pass --sam-med2d'):
        convert_release(src, str(tmp_path / 'out'), tiny_config(), progress=False)
    assert not (tmp_path / 'out').exists()
    # every SAM-Med2D tensor in the directory but one renamed: the hint says the directory holds the others
    whole = {f'model.visual_model.{k}': v for k, v in release['sam'].items() if not k.startswith('mask_decoder.')}
    sam_key = next(iter(whole))
    src = _edit_release(release, tmp_path / 'c', lambda sd: sd.update(
        {**whole, sam_key + '_renamed': whole[sam_key]}) or sd.pop(sam_key))
    with pytest.raises(ConversionError) as err:
        convert_release(src, str(tmp_path / 'out'), tiny_config(), progress=False)
    held = len(whole) + sum(k.startswith('mask_decoder.') for k in release['sam'])  # the renamed one included
    assert f'holds {held} SAM-Med2D tensors' in str(err.value) and sam_key in str(err.value)
    # none at all: said so
    src = _edit_release(release, tmp_path / 'd', lambda sd: [sd.pop(k) for k in list(sd) if '.visual_model.' in k])
    with pytest.raises(ConversionError, match=r'the directory has no SAM-Med2D weights: pass --sam-med2d'):
        convert_release(src, str(tmp_path / 'out'), tiny_config(), progress=False)


def test_config_conflicts_and_the_missing_extra_are_one_line(release, tmp_path, monkeypatch):
    src = str(release['root'] / 'MedPLIB-7b-2e')
    config = tiny_config(**{'model.moe.top_k': 2, 'model.llm.intermediate_size': 128})
    with pytest.raises(ConfigConflictError) as err:
        convert_release(src, str(tmp_path / 'out'), config, explicit={'model.moe.top_k', 'model.llm.intermediate_size'})
    msg = str(err.value)
    assert '\n' not in msg
    assert '--config.model.moe.top_k=2 disagrees with moe.top_k_experts=1' in msg
    assert '--config.model.llm.intermediate_size=128 disagrees with intermediate_size=96' in msg
    # without the flags the same config takes the checkpoint's values (checked in the fixture's conversion)
    # The command's default config (model=7b: CLIP-L sizes, which config.json does not hold) on this tiny release:
    # the vision width config.json implies is the one line, not a KeyError from the 7B's SAM-Med2D blocks.
    with pytest.raises(ConfigConflictError, match=r'mm_hidden_size=32 but config\.model\.vision\.hidden_size=1024'):
        convert_release(src, str(tmp_path / 'out'), get_config('model=7b'))
    assert not (tmp_path / 'out').exists()
    monkeypatch.setitem(sys.modules, 'torch', None)
    with pytest.raises(MissingExtraError, match=r'pip install "medplib-jax\[convert\]"'):
        require_torch('x.bin')
    with pytest.raises(MissingExtraError, match=r'pytorch_model-00001-of-00002\.bin: reading PyTorch .* needs torch'):
        CheckpointSource(src)


@pytest.mark.e2e
def test_cli_convert_reads_flags_and_reports_conflicts_in_one_line(release, tmp_path):
    src, sam = str(release['root'] / 'MedPLIB-7b-2e'), str(release['root'] / 'sam-med2d_b.pth')
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    run = lambda *a: subprocess.run([sys.executable, '-m', 'medplib_jax', 'convert', *a], capture_output=True,  # noqa: E731
                                    text=True, env=env, cwd=ROOT, timeout=300)
    res = run('medplib', f'--src={src}', f'--sam-med2d={sam}', f'--out={tmp_path}/o', '--config=configs/common.py',
              '--config.model.moe.top_k=2')
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith('medplib-jax convert: ')
    assert '--config.model.moe.top_k=2 disagrees with moe.top_k_experts=1' in res.stderr
    res = run('sam-med2d', f'--src={sam}', f'--out={tmp_path}/sam', '--config=configs/common.py',
              '--config.model.sam_encoder.num_heads=4', '--config.model.param_dtype=bfloat16')
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'convert: ' in res.stdout and (tmp_path / 'sam' / '_CHECKPOINT_METADATA').exists()
    got = restored(str(tmp_path / 'sam'))
    kernel = got['model/visual_model/image_encoder/blocks_1/attn/qkv/kernel']
    assert kernel.dtype == ml_dtypes.bfloat16  # --config.model.param_dtype
    want = release['sam']['image_encoder.blocks.1.attn.qkv.weight'].T
    np.testing.assert_array_equal(kernel, want.astype(ml_dtypes.bfloat16))


@pytest.mark.e2e
def test_the_readme_command_converts_a_real_release_and_chat_answers_from_elsewhere(release, tmp_path):
    """`medplib-jax convert medplib` as README.md gives it (the CLI's config is locked, as a user's is), on a release
    whose config.json carries every field MedPLIB-7b-2e's has; the tiny widths need the tiny config (the 7B's CLIP /
    SAM-Med2D sizes are the default, which no config.json holds). Then `chat` answers from another working
    directory, with the tokenizer the directory carries."""
    src, sam = release['root'] / 'MedPLIB-7b-2e', release['root'] / 'sam-med2d_b.pth'
    out = tmp_path / 'medplib-7b-2e'
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    res = subprocess.run([sys.executable, '-m', 'medplib_jax', 'convert', 'medplib', f'--src={src}',
                          f'--sam-med2d={sam}', f'--out={out}', '--config=configs/common.py:model=tiny',
                          '--config.model.sam_encoder.num_heads=4'],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'Traceback' not in res.stderr
    got = restored(str(out))
    assert got.keys() == release['params'].keys()  # 0 missing, 0 unexpected: the whole model, nothing else
    for k, v in release['params'].items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    image = elsewhere / 'scan.png'
    from PIL import Image
    Image.fromarray((np.arange(96 * 128 * 3) % 251).astype(np.uint8).reshape(96, 128, 3)).save(image)
    res = subprocess.run([sys.executable, '-m', 'medplib_jax', 'chat', f'--checkpoint={out}', f'--image={image}',
                          '--max_new_tokens=3', 'What can you interpret from this image?'],
                         capture_output=True, text=True, env=env, cwd=elsewhere, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() and 'Traceback' not in res.stderr


def test_per_part_converters_round_trip(release, tmp_path, np_rng):
    # A LLaVA-style directory: LLaMA + projector + the CLIP tower it holds as a module, in sharded safetensors with
    # an index (vocab 309: MedPLIB adds 267).
    hf = tiny_hf_llama(seed=int(np_rng.integers(1 << 30)), vocab_size=309)
    sd = state_dict_numpy(hf)
    proj = {'model.mm_projector.0.weight': np_rng.normal(size=(64, 32)).astype(np.float32),
            'model.mm_projector.0.bias': np_rng.normal(size=64).astype(np.float32),
            'model.mm_projector.2.weight': np_rng.normal(size=(64, 64)).astype(np.float32),
            'model.mm_projector.2.bias': np_rng.normal(size=64).astype(np.float32)}
    clip_hf = tiny_hf_clip(seed=int(np_rng.integers(1 << 30)), image_size=336, num_layers=2)
    clip_hf.save_pretrained(tmp_path / 'clip')
    clip_sd = {k.removeprefix('vision_model.'): v for k, v in state_dict_numpy(clip_hf).items()}
    tower = {f'model.vision_tower.vision_tower.vision_model.{k}': v for k, v in clip_sd.items()}
    llava = tmp_path / 'llava-v1.5-7b'
    hf.save_pretrained(llava, max_shard_size='40KB')
    from safetensors.numpy import save_file
    save_file({**proj, **tower}, llava / 'mm_projector.safetensors')
    index = json.loads((llava / 'model.safetensors.index.json').read_text())
    index['weight_map'].update({k: 'mm_projector.safetensors' for k in {**proj, **tower}})
    index['metadata']['total_size'] += sum(v.nbytes for v in {**proj, **tower}.values())
    (llava / 'model.safetensors.index.json').write_text(json.dumps(index))
    cfg_json = json.loads((llava / 'config.json').read_text())
    (llava / 'config.json').write_text(json.dumps({**cfg_json, 'mm_hidden_size': 32, 'mm_projector_type': 'mlp2x_gelu',
                                                   'mm_vision_select_layer': -2}))
    sam_path = str(release['root'] / 'sam-med2d_b.pth')

    config = tiny_config()
    out = convert_llama(str(llava), str(tmp_path / 'start'), config, clip=str(tmp_path / 'clip'), sam_med2d=sam_path,
                        progress=False)
    got = restored(out)
    tree = traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in got.items()})
    assert checkpoint.params_meta(out)['conflicts'] == {}  # the directory's CLIP = --clip's
    assert config.model.llm.vocab_size == 576 and config.model.medplib.seg_token_id == 309
    assert config.model.llm.intermediate_size == 160 and config.model.llm.num_layers == 3  # from config.json
    assert config.model.vision.num_layers == 2  # from the CLIP directory's config.json
    # LLM: the checkpoint's rows exactly; MedPLIB's 267 new rows N(0, initializer_range), seeded
    llm = {'model': {k: v for k, v in tree['model'].items() if k in ('embed_tokens', 'norm') or k.startswith('layers')},
           'lm_head': tree['lm_head']}
    new_rows = llm['model']['embed_tokens']['embedding'][309:]
    llm['model']['embed_tokens']['embedding'] = llm['model']['embed_tokens']['embedding'][:309]
    llm['lm_head']['kernel'] = llm['lm_head']['kernel'][:, :309]
    back = params_to_hf(llm, LlamaConfig.from_hf(hf.config))
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    assert new_rows.shape == (267, 64) and abs(new_rows.std() - 0.02) < 0.002 and abs(new_rows.mean()) < 0.002
    # projector, CLIP, SAM-Med2D: exact round trips to their own keys
    projector = projector_params_to_hf(tree['model']['mm_projector'])
    for ours, theirs in ((projector, strip_prefix(proj, 'model.mm_projector.')),
                         (clip_params_to_hf(tree['model']['vision_tower']), clip_sd),
                         (image_encoder_to_source(tree['model']['visual_model']['image_encoder']),
                          split_components(_sam_file(sam_path))['image_encoder'])):
        assert set(ours) == set(theirs)
        for k in theirs:
            np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    # What a stage adds fresh is left out, as its config expects (train/handoff.py): every model parameter the
    # directory lacks matches config.train.init.fresh / init.load of the 7B stage configs, or is an adapter.
    # Stage II starts from this LLaVA-style directory; stage I from a Vicuna one (the same without a projector).
    lacking = set(model_shapes(config.model)) - set(got)
    assert {k.split('/')[1] for k in lacking} == {'region_fea_adapter', 'text_hidden_fcs'}
    for get_stage_config, extra in ((stage2, set()), (stage1, {k for k in got if k.startswith('model/mm_projector/')})):
        init = get_stage_config('model=7b').train.init
        patterns = list(init.fresh) + [entry.split('=', 1)[0] for entry in init.load]
        assert all(any(re.fullmatch(p, k) for p in patterns) or ADAPTER_LEAF.fullmatch(k) for k in lacking | extra)

    # Without --clip the directory's own tower is taken (config.json alone: the CLIP sizes from the config)
    config = tiny_config(**{'model.vision.num_layers': 2})
    alone = restored(convert_llama(str(llava), str(tmp_path / 'alone'), config, progress=False))
    assert {k.split('/')[1] for k in alone if k.startswith('model/')} == \
        {'embed_tokens', 'norm', 'mm_projector', 'vision_tower'} | {f'layers_{i}' for i in range(3)}
    for k in alone:
        np.testing.assert_array_equal(alone[k], got[k], err_msg=k)

    # convert clip: a full CLIPModel directory (its text tower left out); convert sam-med2d
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(int(np_rng.integers(1 << 30)))
    full = CLIPModel(CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=50, bos_token_id=0, eos_token_id=1),
                                vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=336, patch_size=14),
                                projection_dim=8))
    full.save_pretrained(tmp_path / 'clip-full')
    out = convert_clip(str(tmp_path / 'clip-full'), str(tmp_path / 'clip-out'), tiny_config(), progress=False)
    tree = traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in restored(out).items()})
    assert set(tree) == {'model'} and set(tree['model']) == {'vision_tower'}
    vision = strip_prefix(state_dict_numpy(full), 'vision_model.')
    back = clip_params_to_hf(tree['model']['vision_tower'])
    assert set(back) == set(vision)
    for k in vision:
        np.testing.assert_array_equal(back[k], vision[k], err_msg=k)
    out = convert_sam_med2d(sam_path, str(tmp_path / 'sam-out'), tiny_config(), progress=False)
    tree = traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in restored(out).items()})
    parts = split_components(_sam_file(sam_path))
    bp, bd = decoder_to_source(tree['model']['visual_model']['prompt_encoder'],
                               tree['model']['visual_model']['mask_decoder'])
    for ours, theirs in ((image_encoder_to_source(tree['model']['visual_model']['image_encoder']),
                          parts['image_encoder']), (bp, parts['prompt_encoder']), (bd, parts['mask_decoder'])):
        assert set(ours) == set(theirs)
        for k in theirs:
            np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def _sam_file(path):
    return {k: v.numpy() for k, v in torch.load(path, weights_only=True)['model'].items()}


def _release_7b_keys():
    """The released MedPLIB-7b-2e's keys and shapes (the merged `MedPLIBForCausalLM`'s state dict, no values):
    LLaMA-2-7B with 32 two-expert MoE layers, CLIP ViT-L/14-336 (names from transformers' CLIPVisionModel on the meta
    device), the projector, region adapter, T-projector and SAM-Med2D ViT-B (12 heads of 64; windows 14, global
    2, 5, 8, 11 at 16 x 16; mask_downscaling 1 -> 4 -> 16 -> 256)."""
    from transformers import CLIPVisionConfig as HFCLIPVisionConfig, CLIPVisionModel
    L, D, F, V = 32, 4096, 11008, 32267
    keys = {'model.embed_tokens.weight': (V, D), 'lm_head.weight': (V, D), 'model.norm.weight': (D,)}
    for i in range(L):
        p = f'model.layers.{i}.'
        keys.update({p + f'self_attn.{x}_proj.weight': (D, D) for x in 'qkvo'})
        keys.update({p + 'self_attn.rotary_emb.inv_freq': (64,), p + 'input_layernorm.weight': (D,),
                     p + 'post_attention_layernorm.weight': (D,), p + 'mlp.deepspeed_moe.gate.wg.weight': (2, D)})
        for e in (0, 1):
            x = f'{p}mlp.deepspeed_moe.experts.deepspeed_experts.{e}.'
            keys.update({x + 'gate_proj.weight': (F, D), x + 'up_proj.weight': (F, D), x + 'down_proj.weight': (D, F)})
    with torch.device('meta'):
        clip = CLIPVisionModel(HFCLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                  num_attention_heads=16, image_size=336, patch_size=14))
    keys.update({VISION + k.removeprefix('vision_model.'): tuple(v.shape) for k, v in clip.state_dict().items()
                 if 'position_ids' not in k})
    keys.update({'model.mm_projector.0.weight': (D, 1024), 'model.mm_projector.0.bias': (D,),
                 'model.mm_projector.2.weight': (D, D), 'model.mm_projector.2.bias': (D,),
                 'model.region_fea_adapter.weight': (D, 1024), 'model.region_fea_adapter.bias': (D,),
                 'model.text_hidden_fcs.0.0.weight': (D, D), 'model.text_hidden_fcs.0.0.bias': (D,),
                 'model.text_hidden_fcs.0.2.weight': (256, D), 'model.text_hidden_fcs.0.2.bias': (256,)})
    sam = med2d_keys(depth=12, dim=768, mlp=3072, out=256, grid=16, window=14, global_idx=(2, 5, 8, 11), emb=256,
                      dec_mlp=2048)
    sam = {k: ((v[0], 64) if k.endswith(('rel_pos_h', 'rel_pos_w')) else v) for k, v in sam.items()}
    ds = 'prompt_encoder.mask_downscaling.'
    sam.update({ds + '0.weight': (4, 1, 2, 2), ds + '0.bias': (4,), ds + '1.weight': (4,), ds + '1.bias': (4,),
                ds + '3.weight': (16, 4, 2, 2), ds + '3.bias': (16,), ds + '4.weight': (16,), ds + '4.bias': (16,),
                ds + '6.weight': (256, 16, 1, 1), ds + '6.bias': (256,)})
    keys.update({'model.visual_model.' + k: v for k, v in sam.items()})
    return keys


VISION = 'model.vision_tower.vision_tower.vision_model.'


class _HeaderOnlySource(CheckpointSource):
    """Names and shapes without files: what `plan_conversion` reads (it reads no tensor)."""

    def __init__(self, shapes):
        self.path = self.label = 'MedPLIB-7b-2e (released key list)'
        self.prefix, self.notes = '', []
        self.entries = {k: Entry('pytorch_model.bin', k, s, 'bfloat16', i) for i, (k, s) in enumerate(shapes.items())}


def test_the_7b_release_key_list_fits_the_7b_model(tmp_path):
    """The command's default config (`configs/common.py:model=7b`, whose SAM-Med2D blocks hold only overrides)
    takes the released checkpoint's config.json, and every released key plans onto the 7B model (both layouts):
    0 missing, 0 unexpected, 0 mis-shaped, about 11.7 B parameters."""
    import math

    from medplib_jax.convert.hf_config import apply_settings
    from medplib_jax.convert.release import MEDPLIB_TABLE, check_unread_fields, release_settings
    from medplib_jax.convert.stream import plan_conversion
    L = 32
    hf = dict(release_config_json(), vocab_size=32267, hidden_size=4096, intermediate_size=11008, num_hidden_layers=L,
              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, mm_hidden_size=1024,
              out_dim=256, moe=dict(MOE, capacity_factor=1.5, min_capacity=0, moe_layers_idx=list(range(L)),
                                    num_experts=[2] * L))
    source = _HeaderOnlySource(_release_7b_keys())
    for scan in (False, True):
        config = get_config('model=7b')
        config.model.scan_layers = scan
        config.lock()  # as the CLI's --config is: every field written must exist
        apply_settings(config, release_settings(hf, config, 'config.json'), (), 'config.json')
        check_unread_fields(hf, config, 'config.json')
        assert config.model.medplib.seg_token_id == 32000 and config.model.sam_decoder.embed_dim == 256
        assert (config.model.moe.mode, config.model.moe.capacity_factor, config.model.moe.min_capacity) == \
            ('dense', 1.5, 0)
        plan = plan_conversion(model_shapes(config.model), [source], MEDPLIB_TABLE, label=source.label)
        assert {s.key for slots in plan.slots.values() for s in slots} == \
            {k for k in source.keys() if not k.endswith('rotary_emb.inv_freq')}
        n = sum(math.prod(s) for s, _ in plan.targets.values())
        assert 11.6e9 < n < 11.8e9, n
    # A directory converted before params directories carried their metadata inside (`<dir>.json` beside them)
    # and before the SAM-Med2D blocks held every field (model=7b's were `{}`: the same sizes) is no conflict.
    (tmp_path / 'converted.json').write_text(json.dumps({'config': config.to_dict()}, default=list))
    later = config.model.copy_and_resolve_references()
    later.sam_decoder = type(later.sam_decoder)()
    check_model_config(str(tmp_path / 'converted'), later)
    later.sam_encoder.out_chans = 128
    with pytest.raises(ValueError, match=r'model\.sam_encoder\.out_chans: 256 \(converted\) vs 128'):
        check_model_config(str(tmp_path / 'converted'), later)
