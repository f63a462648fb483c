"""Stage hand-offs: a merged-LoRA model equals the unmerged one; stage IV built from saved stage II / III trees
computes the stage-II model with the router forced to expert 1 and the stage-III model forced to expert 0; trees
that do not fit are one error listing every problem."""
import contextlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.train_utils import host_batch, make_data, stage_config

from medplib_jax import checkpoint
from medplib_jax.models.lora import LoRAConfig, merge as merge_lora
from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM, init_fn
from medplib_jax.models.moe import _Router
from medplib_jax.sharding import make_mesh
from medplib_jax.train.config import InitConfig, TrainConfig
from medplib_jax.train.handoff import HandoffError, initial_params
from medplib_jax.train.step import MODEL_INPUTS
from medplib_jax.train.trainable import flatten, unflatten

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    root = make_data(tmp_path_factory.mktemp('data'))
    cfg = stage_config('stage4', root)  # the mixed batch: grounding, region and VQA rows
    host = host_batch(cfg)
    return root, host, make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]), list(cfg.logical_axis_rules)


def _model(cfg):
    m = MedPLIBConfig.from_model_config(cfg.model)
    return MedPLIBForCausalLM(m.llm, mcfg=m)


def _init_fn(model, host):
    return init_fn(model, host, seed=0)


def _forward(model, params, host, intercept=None):
    def fn(p, b):
        with nn.intercept_methods(intercept) if intercept else contextlib.nullcontext():
            return model.apply({'params': p}, **b, method=MedPLIBForCausalLM.forward)
    return jax.device_get(jax.jit(fn)(params, {k: jnp.asarray(host[k]) for k in MODEL_INPUTS}))


def _close(a, b, what):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, float(np.abs(b).max())), err_msg=what)


def _random_tree(model, host, rng, scale=0.05):
    params = nn.unbox(jax.jit(_init_fn(model, host))()['params'])
    return jax.tree.map(lambda p: p + scale * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def test_merged_lora_equals_unmerged(env, np_rng):
    root, host, _, _ = env
    cfg = stage_config('stage2', root)  # LoRA r16 on all seven projections
    model = _model(cfg)
    params = _random_tree(model, host, np_rng)  # non-zero B: the adapters matter
    lora = LoRAConfig.from_dict(cfg.model.lora)
    merged = merge_lora(params, lora)
    assert not any(k.endswith(('lora_A', 'lora_B')) for k in flatten(merged))
    cfg.model.lora.rank = 0
    plain = _model(cfg)
    a, b = _forward(model, params, host), _forward(plain, merged, host)
    for key in ('logits', 'mask_logits', 'iou'):
        _close(b[key], a[key], key)


def test_merged_stacked_expert_lora_equals_unmerged(env, np_rng):
    """Stage IV's hand-off: per-expert LoRA on gate / up / down ((E, in, r) @ (E, r, out)) and LoRA on q / v fold
    into their kernels; the MoE model without adapters computes the same (evaluation capacity: nothing dropped)."""
    root, host, _, _ = env
    cfg = stage_config('stage4', root)
    model = _model(cfg)
    params = _random_tree(model, host, np_rng)
    merged = merge_lora(params, LoRAConfig.from_dict(cfg.model.lora))
    assert flatten(merged)['model/layers_0/mlp/experts/gate_proj/kernel'].shape[0] == 2
    cfg.model.lora.rank = 0
    a, b = _forward(model, params, host), _forward(_model(cfg), merged, host)
    for key in ('logits', 'mask_logits'):
        _close(b[key], a[key], key)


def test_stage4_start_reproduces_stage2_and_stage3_models(env, tmp_path, np_rng):
    """Expert 1 = stage II's FFN, expert 0 = stage III's; with the router forced to one expert (top-1 output scaled
    by a gate probability of 1 - 1e-13, nothing dropped at the evaluation capacity), the MoE model computes that
    stage's dense model (LoRA B = 0 everywhere at the start)."""
    root, host, mesh, rules = env
    dense_cfg = stage_config('stage3', root)
    dense_cfg.model.lora.rank = 0
    dense = _model(dense_cfg)
    stage2 = _random_tree(dense, host, np_rng)
    flat3 = flatten(stage2)
    for path in flat3:  # stage III differs in its FFNs, mask decoder and T-projector (scripts/train_stage3.sh)
        if re.match(r'model/layers_\d+/mlp/', path) or 'mask_decoder' in path or 'text_hidden_fcs' in path:
            flat3[path] = flat3[path] + 0.05 * jnp.asarray(np_rng.normal(size=flat3[path].shape), jnp.float32)
    stage3 = unflatten(flat3)
    checkpoint.save_params(str(tmp_path / 'stage2' / 'final_params'), stage2, {'stage': 'II'})
    checkpoint.save_params(str(tmp_path / 'stage3' / 'final_params'), stage3, {'stage': 'III'})

    cfg4 = stage_config('stage4', root)
    defaults = __import__('configs.stage4', fromlist=['get_config']).get_config('model=tiny')
    cfg4.train.init = defaults.train.init  # {runs}/stage2, experts ({runs}/stage3, {runs}/stage2), loads
    model4 = _model(cfg4)
    icfg = TrainConfig.from_config(cfg4.train).init
    lines = []
    params4, _ = initial_params(_init_fn(model4, host), icfg, str(tmp_path), mesh, rules, lines.append)
    assert any('init.experts' in line for line in lines) and any('initialisation' in line for line in lines)
    f4 = flatten(params4)
    a = np.asarray(f4['model/layers_0/mlp/experts/up_proj/lora_A'])
    np.testing.assert_array_equal(a[0], a[1])  # deep-copied LoRA: both experts start alike
    assert not np.any(np.asarray(f4['model/layers_0/mlp/experts/up_proj/lora_B']))

    def forced(expert):
        logits = jnp.asarray([0.0, 30.0] if expert == 1 else [30.0, 0.0])

        def intercept(next_fn, args, kwargs, context):
            if isinstance(context.module, _Router) and context.method_name == '__call__':
                x = args[0]
                return jnp.broadcast_to(logits, x.shape[:-1] + (2,))
            return next_fn(*args, **kwargs)
        return intercept

    out = {e: _forward(model4, params4, host, forced(e)) for e in (0, 1)}
    ref2, ref3 = _forward(dense, stage2, host), _forward(dense, stage3, host)
    # Real tokens only: the reference does not route bucket padding (route_padding='micro_batch'), so the MoE
    # model's FFN adds nothing there while the dense model's does; no loss reads those positions.
    real = np.asarray(host['token_mask'], bool)
    assert 0 < real.sum() < real.size
    _close(out[1]['logits'][real], ref2['logits'][real], 'expert 1 vs stage II logits')
    _close(out[0]['logits'][real], ref3['logits'][real], 'expert 0 vs stage III logits')
    for key in ('mask_logits', 'iou'):  # mask decoder and T-projector came from stage III
        _close(out[0][key], ref3[key], f'expert 0 vs stage III {key}')
    assert not np.allclose(ref2['logits'], ref3['logits'], atol=1e-3)  # the two experts really differ


def test_a_tree_that_does_not_fit_is_one_error_listing_every_problem(env, tmp_path, np_rng):
    root, host, mesh, rules = env
    cfg = stage_config('stage3', root)
    model = _model(cfg)
    plain = dict(cfg.model.lora)
    cfg.model.lora.rank = 0
    tree = flatten(nn.unbox(jax.eval_shape(_init_fn(_model(cfg), host))['params']))
    tree = {k: jnp.zeros(v.shape, v.dtype) for k, v in tree.items()}
    tree['model/norm/weight'] = jnp.zeros((3,))  # mis-shaped
    tree['model/extra_head/kernel'] = jnp.zeros((2, 2))  # unexpected
    del tree['lm_head/kernel']  # missing
    checkpoint.save_params(str(tmp_path / 'bad' / 'final_params'), unflatten(tree), {})
    assert plain['rank'] == 8
    with pytest.raises(HandoffError) as err:
        initial_params(_init_fn(model, host), InitConfig(params=str(tmp_path / 'bad')), str(tmp_path), mesh, rules,
                       lambda _: None)
    message = str(err.value)
    assert '\n' not in message and message.startswith('config.train.init: 3 problems')
    for part in ('model/norm/weight: init.params', 'has shape (3,), the model (64,)',
                 'model/extra_head/kernel: in init.params', 'lm_head/kernel: missing from init.params'):
        assert part in message, message
    with pytest.raises(FileNotFoundError, match='config.train.init.params: .*nowhere: no parameters here'):
        initial_params(_init_fn(model, host), InitConfig(params='{runs}/nowhere'), str(tmp_path), mesh, rules,
                       lambda _: None)
