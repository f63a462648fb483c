"""Trainable sets: regexes over '/'-joined parameter paths (full match), errors for patterns that match nothing,
the split / merge of the tree, the per-module table, and the stage recipes' patterns against a 7B-shaped tree."""
import re

import jax
import jax.numpy as jnp
import pytest

from configs import stage1, stage2, stage3, stage4
from medplib_jax.train.trainable import TrainableError, merge, parameter_table, split, trained_paths

TREE = {'model': {'layers_0': {'self_attn': {'q_proj': {'kernel': jnp.zeros((4, 4)), 'lora_A': jnp.zeros((4, 2)),
                                                        'lora_B': jnp.zeros((2, 4))}},
                               'input_layernorm': {'weight': jnp.zeros(4)}},
                  'norm': {'weight': jnp.zeros(4)}, 'mm_projector': {'0': {'kernel': jnp.zeros((3, 4))}}},
        'lm_head': {'kernel': jnp.zeros((4, 9))}}


def test_patterns_match_whole_paths_and_unmatched_is_one_line():
    assert trained_paths(TREE, [r'model/layers.*/lora_[AB]']) == {'model/layers_0/self_attn/q_proj/lora_A',
                                                                 'model/layers_0/self_attn/q_proj/lora_B'}
    with pytest.raises(TrainableError) as err:
        trained_paths(TREE, ['lm_head'])  # a prefix is not a full match
    assert str(err.value) == ("config.train.trainable: pattern 'lm_head' matches no parameter (paths look like "
                              "'model/layers_0/self_attn/q_proj/kernel')")
    with pytest.raises(TrainableError, match=r"'\(' is not a regular expression"):
        trained_paths(TREE, ['('])


def test_split_merge_and_table():
    trained = trained_paths(TREE, [r'lm_head/.*', r'model/mm_projector/.*'])
    t, f = split(TREE, trained)
    assert set(t) == {'lm_head', 'model'} and 'norm' in f['model'] and 'mm_projector' not in f['model']
    back = merge(t, f)
    assert jax.tree.structure(back) == jax.tree.structure(TREE)
    table = parameter_table(TREE, trained).splitlines()
    assert table[0].split() == ['module', 'trained', 'frozen']
    assert any(line.split()[:3] == ['lm_head', '36', '0'] for line in table)
    assert any(line.split()[:3] == ['model/layers_*/self_attn', '0', '32'] for line in table)
    assert table[-1].split() == ['total', '48', '40']


def _seven_b_paths():
    import flax.linen as nn
    from flax import traverse_util

    from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM, init_fn
    out = {}
    for name, module in (('stage2', stage2), ('stage3', stage3), ('stage4', stage4)):
        cfg = module.get_config()
        cfg.model.llm.num_layers = 2  # the shapes do not matter: only the paths
        m = MedPLIBConfig.from_model_config(cfg.model)
        model = MedPLIBForCausalLM(m.llm, mcfg=m)
        b, t = 4, 600
        shapes = dict(input_ids=jax.ShapeDtypeStruct((b, t), jnp.int32),
                      clip_pixels=jax.ShapeDtypeStruct((b, 336, 336, 3), jnp.float32),
                      sam_pixels=jax.ShapeDtypeStruct((b, 256, 256, 3), jnp.float32),
                      region_grids=jax.ShapeDtypeStruct((b, 1, 24, 24), jnp.uint8),
                      token_mask=jax.ShapeDtypeStruct((b, t), jnp.bool_))
        tree = jax.eval_shape(init_fn(model, shapes, seed=0))['params']
        out[name] = (cfg, traverse_util.flatten_dict(nn.unbox(tree), sep='/'))
    return out


@pytest.mark.slow
def test_stage_recipes_train_what_the_reference_trains():
    """The reference's scripts/train_stage{2,3,4}.sh on the 7B tree: what each stage trains, and what it must not (final
    norm never; stage II not the region adapter; stage III not lm_head / embed_tokens; the frozen encoders never)."""
    trees = _seven_b_paths()
    never = ('model/norm/', 'model/vision_tower/', 'model/visual_model/image_encoder/',
             'model/visual_model/prompt_encoder/')
    for name, (cfg, flat) in trees.items():
        trained = trained_paths(flat, cfg.train.trainable)
        assert not [p for p in trained if p.startswith(never)], name
        # LoRA bases (every *_proj kernel of the LLM, the experts' included) never train
        assert not [p for p in trained if p.startswith('model/layers_') and re.search(r'_proj/kernel$', p)], name
        if name != 'stage2':  # the layer norms train in stage II only
            assert not [p for p in trained if p.startswith('model/layers_') and 'layernorm' in p], name
        trees[name] = trained
    s2, s3, s4 = trees['stage2'], trees['stage3'], trees['stage4']
    assert {'lm_head/kernel', 'model/embed_tokens/embedding', 'model/layers_0/input_layernorm/weight',
            'model/mm_projector/0/kernel', 'model/layers_1/self_attn/o_proj/lora_B'} <= s2
    assert not [p for p in s2 if 'region_fea_adapter' in p or 'mask_decoder' in p or 'text_hidden_fcs' in p]
    assert not [p for p in s3 if p.startswith(('lm_head', 'model/embed_tokens', 'model/mm_projector'))]
    assert not [p for p in s3 if p.startswith('model/layers_') and 'self_attn' in p]  # stage III: FFN LoRA only
    assert {'model/text_hidden_fcs/0/0/kernel', 'model/layers_0/mlp/down_proj/lora_A'} <= s3
    assert {'model/layers_0/mlp/gate/wg/kernel', 'model/layers_1/mlp/experts/up_proj/lora_A',
            'model/layers_0/self_attn/q_proj/lora_A', 'model/region_fea_adapter/kernel', 'lm_head/kernel',
            'model/visual_model/mask_decoder/iou_token/embedding'} <= s4
    assert not [p for p in s4 if p.startswith('model/mm_projector') or p.startswith('model/layers_0/self_attn/k_proj')]
    stage1_cfg = stage1.get_config()
    assert tuple(stage1_cfg.train.trainable) == ('model/mm_projector/.*',) and stage1_cfg.data.template == 'plain'
