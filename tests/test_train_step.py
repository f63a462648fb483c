"""The one train step, stage by stage: exactly the stage's trainable set changes, optimizer state exists only for
it, the tiny model overfits a fixed batch, non-finite steps are skipped and counted, gradient accumulation is the
reference's averaging, and the step is mesh-independent (8 fake CPU devices vs 1)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support.train_utils import NO_GRADIENT, STAGES, devices, host_batch, leaves, make_data, stage_config

from configs.demo import SAM_ENCODER, VISION_TOWER
from medplib_jax import sharding
from medplib_jax.models.medplib import MedPLIBForCausalLM
from medplib_jax.models.moe import collect_moe_metrics
from medplib_jax.train import loop, optimizer as optim, trainable
from medplib_jax.train.config import TrainConfig
from medplib_jax.train.inputs import global_batch
from medplib_jax.train.loop import setup_stage
from medplib_jax.train.state import create, state_bytes
from medplib_jax.train.step import MODEL_INPUTS, TRAIN_KEYS, build_train_step, forward_loss

pytestmark = [pytest.mark.heavy_module, pytest.mark.slow]

# Overfitting one batch: steps, lr, and the factor by which each loss must fall (measured on this machine: stage I
# trains the projector alone under a random LLM, so its CE can only move a little; stage IV's Dice weight is 0.5
# next to BCE 2, so its Dice starts to fall after about 40 steps; stage III needs about 50 here).
OVERFIT = {'stage1': (30, dict(ce=1.02)), 'stage2': (30, dict(ce=10.0)),
           'stage3': (80, dict(ce=1.15, dice=1.5)), 'stage4': (80, dict(ce=10.0, dice=1.5))}


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp('data'))


_SETUPS = {}


def _stage(name, root):
    """One setup per stage for the module (compiled once): lr 1e-2, a long flat schedule."""
    if name not in _SETUPS:
        cfg = stage_config(name, root, lr=1e-2)
        host = host_batch(cfg)
        setup = setup_stage(cfg, host, runs=root, total_steps=1000, warmup=2, log=lambda _: None,
                            devices=devices(cfg))
        _SETUPS[name] = (cfg, host, setup, leaves(setup.state.params))
    cfg, host, setup, params0 = _SETUPS[name]
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        state = jax.jit(lambda p: create(p, setup.trained, setup.tx), out_shardings=setup.shardings)(
            jax.tree.map(jnp.asarray, trainable.unflatten(params0)))
        batch = global_batch(host, setup.mesh, TRAIN_KEYS)
    return setup, state, batch, params0


def _run(setup, state, batch, n):
    history = []
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        for _ in range(n):
            state, metrics = setup.step(state, batch, jax.random.key(0))
            history.append(jax.device_get(metrics))
    return state, history


@pytest.mark.parametrize('name', STAGES)
def test_exactly_the_trainable_set_changes_and_owns_the_optimizer_state(name, root):
    setup, state, batch, before = _stage(name, root)
    trained = setup.trained
    # Adam moments (mu, nu) for the trained leaves only: the optimizer state's bytes are 2 x theirs + counters.
    trained_bytes = sum(v.nbytes for k, v in before.items() if k in trained)
    assert trained_bytes < sum(v.nbytes for v in before.values()) / 2
    assert trained_bytes * 2 <= state_bytes(state.opt_state) <= trained_bytes * 2 + 64
    mu_paths = {k for k in trainable.flatten(state.opt_state[1][0].mu)}
    assert mu_paths == set(trained)
    # Three steps: the first runs at lr 0 (DeepSpeed's warmup), LoRA A moves once B is non-zero.
    state, _ = _run(setup, state, batch, 3)
    after = leaves(state.params)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed <= trained, sorted(changed - trained)[:5]
    unchanged_trained = {k for k in trained - changed if not k.startswith(NO_GRADIENT)}
    assert not unchanged_trained, sorted(unchanged_trained)[:5]


def test_a_tower_named_trainable_trains(root):
    """The towers the recipe freezes (CLIP, the SAM image encoder) are frozen by config.train.trainable alone: named
    there (as the demo does), every one of their leaves that reaches a loss moves. A stop_gradient in the model
    once left them unchanged while the demo reported training them."""
    cfg = stage_config('stage3', root, lr=1e-2)
    cfg.train.trainable = (*cfg.train.trainable, VISION_TOWER, SAM_ENCODER)  # the demo's patterns
    host = host_batch(cfg)
    setup = setup_stage(cfg, host, runs=root, total_steps=1000, warmup=2, log=lambda _: None, devices=devices(cfg))
    before = leaves(setup.state.params)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        batch = global_batch(host, setup.mesh, TRAIN_KEYS)
    state, _ = _run(setup, setup.state, batch, 3)
    after = leaves(state.params)
    for prefix in ('model/vision_tower/', 'model/visual_model/image_encoder/'):
        tower = [k for k in before if k.startswith(prefix)]
        moved = [k for k in tower if not np.array_equal(before[k], after[k])]
        # CLIP's last layer (and post-LayerNorm) come after the selected layer -2: no path to any loss.
        unused = rf'vision_model/(encoder/layers_{cfg.model.vision.num_layers - 1}/|post_layernorm/)'
        still = [k for k in tower if k not in moved and not re.search(unused, k)]
        assert tower and moved and not still, (prefix, still[:5])


@pytest.mark.parametrize('name', STAGES)
def test_tiny_model_overfits_one_batch(name, root):
    setup, state, batch, _ = _stage(name, root)
    steps, factors = OVERFIT[name]
    _, history = _run(setup, state, batch, steps)
    first, last = history[0], history[-1]
    assert last['loss/ce'] * factors['ce'] <= first['loss/ce'], (first['loss/ce'], last['loss/ce'])
    if 'dice' in factors:
        dice = [h['mask/dice_sum'] / h['masks'] for h in (first, last)]
        assert first['masks'] > 0 and dice[1] * factors['dice'] <= dice[0], dice


# bf16 compute against fp32, three stage-IV steps from the same parameters on the same batch (lr 1e-2, the first
# step at lr 0): the losses differ by bf16 rounding (measured here: at most 0.5 % relative), well inside this bound.
BF16_LOSS_RTOL = 2e-2


def test_bf16_compute_keeps_fp32_master_state_and_tracks_the_fp32_step(root):
    """Mixed precision as the reference trains (DeepSpeed bf16): stage IV (MoE, LoRA, masks) computes in bf16 while
    parameters, Adam moments and the logged metrics stay fp32; the step's losses stay within BF16_LOSS_RTOL of the
    fp32 step's, its gradients finite, and it really computes in bf16 (bf16 matmuls in the program, a loss that is
    not the fp32 one)."""
    setup32, state32, batch, params0 = _stage('stage4', root)
    cfg = stage_config('stage4', root, lr=1e-2)
    cfg.model.dtype = 'bfloat16'
    host = _SETUPS['stage4'][1]
    setup16 = setup_stage(cfg, host, runs=root, total_steps=1000, warmup=2, log=lambda _: None,
                          devices=devices(cfg))
    assert all(np.array_equal(v, params0[k]) for k, v in leaves(setup16.state.params).items())  # the same start
    with jax.set_mesh(setup16.mesh), nn.logical_axis_rules(setup16.rules):
        hlo = setup16.step.lower(setup16.state, batch, jax.random.key(0)).as_text()
    assert re.search(r'dot_general[^\n]*bf16', hlo) or re.search(r'bf16\[[^\n]*dot_general', hlo)
    state16, history16 = _run(setup16, setup16.state, batch, 3)
    _, history32 = _run(setup32, state32, batch, 3)
    worst = 0.0
    for a, b in zip(history16, history32):
        assert np.isfinite(a['grad_norm']) and a['grad_norm'] > 0 and a['update_skipped'] == 0
        for k in ('loss', 'loss/ce', 'loss/dice', 'loss/bce'):
            assert a[k].dtype == np.float32, k
            np.testing.assert_allclose(a[k], b[k], rtol=BF16_LOSS_RTOL, err_msg=k)
            worst = max(worst, abs(float(a[k]) / float(b[k]) - 1))
    losses = [[round(float(h['loss']), 4) for h in history] for history in (history16, history32)]
    print(f'bf16 against fp32: largest relative difference of a loss {worst:.2g}; losses {losses[0]} against '
          f'{losses[1]}')
    assert history16[0]['loss'] != history32[0]['loss']  # bf16 rounding shows: the compute dtype took effect
    for tree in (state16.params, state16.opt_state):
        assert {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)} == {'float32'}


def test_non_finite_batch_is_skipped_counted_and_the_next_step_trains(root):
    setup, state, batch, _ = _stage('stage2', root)
    state, _ = _run(setup, state, batch, 2)  # past the lr-0 step
    before, opt_before = leaves(state.params), leaves(state.opt_state[1][0].mu)
    host = _SETUPS['stage2'][1]
    poisoned = dict(host, clip_pixels=host['clip_pixels'].copy())
    poisoned['clip_pixels'][0, 0, 0, 0] = np.nan
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        state, m = setup.step(state, global_batch(poisoned, setup.mesh, TRAIN_KEYS), jax.random.key(0))
    m = jax.device_get(m)
    assert not np.isfinite(m['loss']) and m['update_skipped'] == 1 and m['bad_steps'] == 1
    assert m['skipped_steps'] == 1
    after = leaves(state.params)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(np.array_equal(v, leaves(state.opt_state[1][0].mu)[k]) for k, v in opt_before.items())
    state, (m,) = _run(setup, state, batch, 1)
    assert m['update_skipped'] == 0 and m['bad_steps'] == 0 and m['skipped_steps'] == 1
    assert any(not np.array_equal(after[k], v) for k, v in leaves(state.params).items())


@pytest.mark.parametrize('mesh', [dict(data=1, fsdp=1, tensor=1), dict(data=2, fsdp=1, tensor=4)],
                         ids=['1-device', '8-devices'])
def test_accumulation_is_the_reference_average(mesh, root):
    """4 micro-batches of 2 in one step equal the mean of the 4 micro-batch losses and gradients taken separately
    (micro-batch m = rows m, m + 4: the strided split). Stage III on grounding and VQA rows with loss groups of one
    row, so groups with and without masks mix. SGD with lr 1 makes the update the gradient."""
    cfg = stage_config('stage3', root, batch_size=8, grad_accum=4, loss_group=1)
    cfg.data.datasets.complex = dict(path='MeCoVQA_Complex_VQA_train.json', weight=1.0, image_folder='')
    cfg.model.lora.dropout = 0.0  # no randomness: the reference below needs no rng
    cfg.mesh = mesh
    host = host_batch(cfg)
    assert 0 < host['seg_valid'].sum() < 8  # rows with and without masks
    setup = setup_stage(cfg, host, runs=root, total_steps=10, warmup=2, log=lambda _: None, devices=devices(cfg))
    tx = optax.sgd(lambda count: 1.0)
    tcfg = TrainConfig.from_config(cfg.train)
    step = jax.jit(build_train_step(setup.model, setup.trained, tx, lambda count: 1.0, weights=tcfg.weights,
                                    grad_accum=4, loss_group=1))
    params = setup.state.params
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        state = create(params, setup.trained, tx)
        new_state, metrics = step(state, global_batch(host, setup.mesh, TRAIN_KEYS), jax.random.key(0))

    single = jax.tree.map(lambda x: jnp.asarray(np.asarray(jax.device_get(x))), params)  # one device
    trained, frozen = trainable.split(single, setup.trained)
    grad_fn = jax.jit(jax.value_and_grad(lambda t, b: forward_loss(
        setup.model, trainable.merge(t, frozen), b, weights=tcfg.weights, loss_group=1, train=True,
        rngs={'dropout': jax.random.key(0), 'moe': jax.random.key(0), 'region': jax.random.key(0)})[0]))
    grads, losses = [], []
    for m in range(4):
        loss, g = grad_fn(trained, {k: jnp.asarray(host[k][m::4]) for k in TRAIN_KEYS})
        grads.append(g)
        losses.append(float(loss))
    mean = jax.tree.map(lambda *g: np.mean(np.stack(g), axis=0), *grads)
    expected = jax.tree.map(lambda p, g: p - g, trainable.flatten(trained), trainable.flatten(mean))
    got = leaves(new_state.params)
    assert any(np.abs(trainable.flatten(mean)[k]).max() > 0 for k in expected if 'mask_decoder' in k)
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, rtol=0, atol=1e-6, err_msg=k)
    assert float(metrics['loss']) == pytest.approx(np.mean(losses), rel=1e-6)


def test_stage4_steps_on_eight_devices_equal_one_device(root):
    """3 stage-IV steps (MoE, LoRA dropout, random token selection, 2 micro-batches) on a (data 2, fsdp 2,
    tensor 2) mesh of 8 fake CPU devices with the TPU presets' MoE dispatch (grouped, per shard) give the
    parameters (1e-5), loss and gradient norm of the reference's einsum dispatch on 1 device, and the same keep /
    drop decision for every token of every layer. LoRA sits on q / v only here: the grouped dispatch draws
    expert-LoRA dropout masks on its rows, not per token (tests/test_moe.py compares the dispatches with expert
    LoRA, dropout off). The splash kernel's whole-model parity is tests/test_medplib.py's, per shard
    tests/test_layers.py's (interpreted on CPU, it would double this test's time)."""
    results = []
    for mesh in (dict(data=1, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2)):
        # Adam divides by |g| + eps: where the true gradient is 0 (e.g. key biases, softmax-invariant) float noise
        # of ~1e-9 would move a parameter by ~lr / 10 with eps 1e-8, differently per mesh. eps 1e-6 keeps noise
        # at ~1e-3 lr while real gradients (>> 1e-6) still take full Adam steps.
        cfg = stage_config('stage4', root, batch_size=8, grad_accum=2, lr=1e-3, eps=1e-6)
        cfg.model.moe.capacity_factor = 1.0  # capacity below demand: tokens are dropped
        cfg.model.lora.targets = ('q_proj', 'v_proj')
        cfg.mesh = mesh
        if mesh['data'] > 1:
            cfg.model.moe.dispatch = 'grouped'
        host = host_batch(cfg)
        setup = setup_stage(cfg, host, runs=root, total_steps=100, warmup=2, log=lambda _: None,
                            devices=devices(cfg))
        if mesh['fsdp'] > 1:
            sharding.assert_params_sharded(setup.state.params, min_size=2 ** 12)
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            batch = global_batch(host, setup.mesh, TRAIN_KEYS)
        state, history = _run(setup, setup.state, batch, 3)

        def slots(params, b):  # the decisions of a training-mode forward on the trained parameters
            _, inter = setup.model.apply({'params': params}, **{k: b[k] for k in MODEL_INPUTS}, train=True,
                                         rngs={'dropout': jax.random.key(1), 'moe': jax.random.key(2)},
                                         mutable=['intermediates'], method=MedPLIBForCausalLM.forward)
            return collect_moe_metrics(inter['intermediates'])['token_slots']
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            decisions = np.asarray(jax.device_get(jax.jit(slots)(state.params, batch)))
        results.append((leaves(state.params), history, decisions))
    (p1, h1, d1), (p8, h8, d8) = results
    for k in p1:
        np.testing.assert_allclose(p8[k], p1[k], rtol=0, atol=1e-5, err_msg=k)
    for a, b in zip(h1, h8):
        np.testing.assert_array_equal(a['moe/expert_counts'], b['moe/expert_counts'])
        np.testing.assert_array_equal(a['moe/drop_fraction'], b['moe/drop_fraction'])
        assert np.all(a['moe/drop_fraction'] > 0)
        assert float(a['loss']) == pytest.approx(float(b['loss']), rel=1e-5)
        assert float(a['grad_norm']) == pytest.approx(float(b['grad_norm']), rel=1e-4)
    np.testing.assert_array_equal(d8, d1)  # token by token, layer by layer
    assert (d1 == 0).any() and (d1 == 1).any()


def test_a_stage_compiled_ahead_is_the_program_the_stage_compiles_itself(root):
    """A multi-stage config compiles its later stages on a background thread (loop.compile_ahead, from the stage's
    first batch and the abstract state): it is compiled for the length of the stage's first batch, and four steps
    through it and through the program the stage's own first step compiles give the same parameters and metrics,
    bit for bit. On all 8 devices, as a stage runs by default."""
    cfg = stage_config('stage1', root, batch_size=8)
    cfg.mesh = dict(data=8, fsdp=1, tensor=1)
    cfg.train.steps_per_epoch, cfg.train.epochs = 5, 1.0
    (length, ahead), = loop.compile_ahead(cfg).items()
    tcfg = TrainConfig.from_config(cfg.train)
    warmup = optim.warmup_steps(5, tcfg.warmup_fraction, tcfg.min_warmup_steps)
    host = host_batch(cfg)
    setup = setup_stage(cfg, host, runs=root, total_steps=5, warmup=warmup, log=lambda _: None)
    outs = []
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        batch = global_batch(host, setup.mesh, TRAIN_KEYS)
        assert batch['input_ids'].shape[1] == length
        rng = jax.random.key(cfg.seed + 1)
        own = setup.step.lower(setup.state, batch, rng).compile()
        before = leaves(setup.state.params)
        for exe in (ahead, own):
            state = jax.tree.map(jnp.copy, setup.state)  # each step donates its state
            for _ in range(4):  # lr 0 at the first step; warmup, then the decay over the schedule
                state, metrics = exe(state, batch, rng)
            outs.append((leaves(state.params), jax.device_get(metrics)))
    (p1, m1), (p2, m2) = outs
    assert any(not np.array_equal(p1[k], before[k]) for k in p1)
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)
    assert all(np.array_equal(m1[k], m2[k]) for k in m1) and m1['lr'] > 0
