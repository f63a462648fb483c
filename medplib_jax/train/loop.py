"""`medplib-jax train`: one stage (or every stage of a multi-stage config) from its starting parameters to the
parameters it hands the next.

    config -> data iterator (grain) -> starting params (train/handoff.py) -> trained set -> sharded train state
      -> per length bucket, one compiled train step (memory and FLOPs printed at the first)
      -> steps with a progress bar; metrics every `log_every` steps to stdout, TensorBoard and metrics.jsonl;
         evaluators every `eval_every` steps
      -> LoRA merged -> `final_params` (Orbax) + `final_params.json` in the workdir.

A config with `stages` (an ordered block of whole stage configs, e.g. configs/demo.py) runs them in order, stage
`name` in `workdir/name`; `{runs}` in `config.train.init` paths is the folder holding the stage's workdir.
Only process 0 writes logs; every process writes its own parameter shards.

SIGTERM at any moment of `train` (start-up, steps, saves, the hand-off, between stages) is a request honoured at
the next safe point: the step in progress is saved (or the save in flight finished, and `final_params` written when
training had finished), the run returns with `preempted`, and the same command goes on from there.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import json
import math
import os
import threading
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections as mlc
import numpy as np
from tqdm.auto import tqdm

from medplib_jax import checkpoint, sharding
from medplib_jax.data.config import DataConfig, ModelShapes
from medplib_jax.data.pipeline import build_dataset
from medplib_jax.eval.registry import EvalContext, build_evaluators
from medplib_jax.models.lora import merge
from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM, init_fn
from medplib_jax.train import flops as flops_lib, optimizer as optim
from medplib_jax.train.config import TrainConfig
from medplib_jax.train.handoff import initial_params
from medplib_jax.train.inputs import global_batch
from medplib_jax.train.preemption import Preemption
from medplib_jax.train.state import TrainState, create, replicated, state_bytes, state_shardings
from medplib_jax.train.step import TRAIN_KEYS, build_train_step
from medplib_jax.train.trainable import parameter_table, trained_paths
from medplib_jax.train.writers import MetricWriter, flatten_metrics

# Metrics that are states, not per-step values: the log keeps the latest instead of the interval mean.
LATEST = ('lr', 'bad_steps', 'skipped_steps')


class TrainingError(RuntimeError):
    """A run that cannot go on (too many non-finite steps in a row); the message is one line."""


@dataclasses.dataclass
class StageResult:
    workdir: str
    steps: int
    first: dict[str, float]
    last: dict[str, float]
    final_params: str
    history: list[dict[str, float]]
    # A SIGTERM arrived: the stage stopped at a saved step (or finished, with everything saved); the caller stops
    # too, and the same command goes on from there.
    preempted: bool = False


def train(config: mlc.ConfigDict, workdir: str, log: Callable[[str], None] = print,
          preemption: Preemption | None = None) -> dict[str, StageResult]:
    """Runs the config's stages (or the config itself as one stage) -> {stage name: result}. SIGTERM anywhere in
    here is `preemption`'s request (default: one covering this call): a preempted stage ends the run, and a SIGTERM
    between stages stops before the next (the later stages start when the same command runs again)."""
    if preemption is None:
        with Preemption() as preemption:
            return train(config, workdir, log, preemption)
    if 'stages' not in config:
        stage = config.train.stage or os.path.basename(os.path.normpath(workdir))
        return {stage: train_stage(config, workdir, log, preemption=preemption)}
    _check_data_roots(config)
    results: dict[str, StageResult] = {}
    # The later stages' train steps compile on a background thread while the earlier ones train: a step of the
    # tiny model keeps about one of two CPU cores busy, and each compile takes as long as 50-100 of its steps.
    # They start once the first stage's own step has compiled (`first_compiled`), so as not to slow that compile.
    # One process only (a compile there lowers no collective, but the example batch's length is agreed by one).
    names = list(config.stages)
    first_compiled, stop = threading.Event(), threading.Event()

    def later(stage: mlc.ConfigDict) -> dict[int, Any]:
        first_compiled.wait()
        return {} if stop.is_set() else compile_ahead(stage)

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='precompile') as pool:
        ahead = ({name: pool.submit(later, config.stages[name]) for name in names[1:]}
                 if jax.process_count() == 1 else {})
        try:
            for name, stage in config.stages.items():
                if results and preemption.agreed():
                    log(f'preempted (SIGTERM) before stage {name}: stages {", ".join(results)} are done; run the '
                        f'same command to go on')
                    break
                log(f'=== {name} ===')
                results[name] = train_stage(stage, os.path.join(workdir, name), log, preemption=preemption,
                                            ahead=ahead.get(name), compiled=first_compiled)
                first_compiled.set()
                if results[name].preempted:
                    break
        finally:
            stop.set()
            first_compiled.set()
            for future in ahead.values():
                future.cancel()  # stages not reached (preempted, or an error) are not compiled
    return results


def _check_data_roots(config: mlc.ConfigDict) -> None:
    """Every stage's data folder exists, checked before the first stage starts; a demo config's are written by
    `medplib-jax demo` or `make-demo-data`, which the error says."""
    for name, stage in config.stages.items():
        root = stage.data.get('root')
        if root and not os.path.isdir(root):
            hint = (f': write the demo data with `medplib-jax make-demo-data {root}`, or run `medplib-jax demo` '
                    f'(writes them, trains and evaluates)' if 'demo' in config else '')
            raise FileNotFoundError(f'config.stages.{name}.data.root={root}: no such folder (from {os.getcwd()})'
                                    f'{hint}')


def _check_batch(tcfg: TrainConfig, data_cfg: DataConfig, mcfg: MedPLIBConfig, mesh, rules) -> tuple[int, int]:
    micro, group = tcfg.micro_loss_group(data_cfg.batch_size)
    shards = sharding.batch_shards(mesh, rules)
    if micro % shards:
        raise ValueError(f'the micro-batch of {micro} sequences (config.data.batch_size / config.train.grad_accum) is '
                         f'not divisible by the {shards} batch shards of the mesh (config.logical_axis_rules '
                         f'activation_batch)')
    moe = mcfg.llm.moe
    if mcfg.llm.moe_layers and micro % moe.group_size:
        raise ValueError(f'the micro-batch of {micro} sequences is not a multiple of config.model.moe.group_size='
                         f'{moe.group_size} (MoE routing groups are whole sequences)')
    return micro, group


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


@dataclasses.dataclass(frozen=True)
class _Stage:
    """One stage's settings, read from its config once."""
    config: mlc.ConfigDict
    workdir: str
    say: Callable[[str], None]  # process 0's log (a no-op elsewhere)
    main: bool
    tcfg: TrainConfig
    ccfg: checkpoint.CheckpointConfig
    mcfg: MedPLIBConfig
    data_cfg: DataConfig
    shapes: ModelShapes
    mesh: Any
    runs: str
    preemption: Preemption  # SIGTERM's request, honoured at the next safe point
    ahead: concurrent.futures.Future | None = None  # compile_ahead's {length: executable}
    compiled: threading.Event | None = None  # set once this stage's train step is compiled


def train_stage(config: mlc.ConfigDict, workdir: str, log: Callable[[str], None] = print,
                devices: Any = None, preemption: Preemption | None = None,
                ahead: concurrent.futures.Future | None = None,
                compiled: threading.Event | None = None) -> StageResult:
    """Trains one stage in `workdir` (devices: the mesh's, default all) and saves its hand-off. Resumes from the
    newest checkpoint in `workdir/checkpoints` when there is one (config.checkpoint.resume). SIGTERM is
    `preemption`'s request (default: one covering this call). `ahead`: `compile_ahead(config)` running elsewhere;
    `compiled`: set once this stage's train step is compiled."""
    if preemption is None:
        with Preemption() as preemption:
            return train_stage(config, workdir, log, devices, preemption, ahead, compiled)
    main = jax.process_index() == 0
    tcfg = TrainConfig.from_config(config.train)
    if not tcfg.trainable:
        raise ValueError('config.train.trainable is empty: name the parameters this stage trains')
    st = _Stage(config, workdir, log if main else (lambda _: None), main, tcfg,
                checkpoint.CheckpointConfig.from_config(config.get('checkpoint')),
                MedPLIBConfig.from_model_config(config.model), DataConfig.from_config(config.data),
                ModelShapes.from_config(config.model), sharding.make_mesh(config.mesh, devices),
                tcfg.init.runs or os.path.dirname(os.path.abspath(workdir)), preemption, ahead, compiled)
    micro, group = _check_batch(tcfg, st.data_cfg, st.mcfg, st.mesh, list(config.logical_axis_rules))
    # The config's data (tokenizer, records files) are checked before anything is written or started.
    dataset = build_dataset(st.data_cfg, st.shapes, seed=config.seed)
    os.makedirs(workdir, exist_ok=True)
    ckpts = checkpoint.RunCheckpoints(workdir, st.ccfg)
    try:
        latest = ckpts.latest_step()
        if latest is not None and not st.ccfg.resume:
            raise FileExistsError(f'{ckpts.directory}: holds checkpoints up to step {latest} and '
                                  f'config.checkpoint.resume is False: use another --workdir, or resume')
        st.say(f'stage {tcfg.stage or "?"} -> {workdir}; devices {jax.device_count()} x '
               f'{jax.devices()[0].platform} in {jax.process_count()} process(es), mesh {dict(st.mesh.shape)}; '
               f'global batch {st.data_cfg.batch_size} = {tcfg.grad_accum} micro-batches of {micro}, loss groups '
               f'of {group}')
        return _start(st, ckpts, dataset)
    finally:
        ckpts.close()  # waits for a save in flight (also on errors: no background work outlives the run)


def _start(st: _Stage, ckpts: checkpoint.RunCheckpoints, dataset: Any) -> StageResult:
    """Schedule, program, and the state: restored from the newest checkpoint or fresh."""
    config, tcfg, data_cfg, say = st.config, st.tcfg, st.data_cfg, st.say
    per_epoch, total, steps, warmup = _schedule(tcfg, data_cfg, dataset)
    say(f'schedule: {dataset.epoch_records} records per epoch -> {per_epoch} steps per epoch, {total} in all '
        f'(epochs {tcfg.epochs}), warmup {warmup}, peak lr {tcfg.lr:g}; running {steps}')

    it = iter(dataset)
    try:
        first_host = next(it)  # its shapes build the program; a fresh run trains on it
        first = (first_host, it.metrics())  # a batch and the data counters once it was drawn
        setup = build_stage(config, first_host, total_steps=total, warmup=warmup, mesh=st.mesh)
        # A big weight that every device holds whole is how a 7B run runs out of memory: stop before reading it.
        sharding.assert_params_sharded(setup.abstract.params)
        if _stop_before(st, 'reading or initialising the state'):  # both can take minutes
            return StageResult(st.workdir, steps, {}, {}, _final_params(st.workdir), [], preempted=True)
        rng = jax.random.key(config.seed + 1)
        interval: list[dict[str, float]] = []
        # Checked against the config before anything is read or written: a misfit leaves the run directory as it
        # was. The data iterator continues where the checkpoint left it.
        restored = ckpts.restore_latest(setup.abstract, it if st.ccfg.restore_data else None, say)
        if restored is not None:
            start, state, meta = restored
            rng = jax.random.wrap_key_data(np.asarray(meta['rng'], np.uint32))
            interval = list(meta.get('interval', []))
            say(f'resumed from {ckpts.directory}/{start} (step {start} of {steps})'
                + ('' if st.ccfg.restore_data else '; data order restarted (config.checkpoint.restore_data=False)'))
        else:
            start, state = 0, fresh_state(setup, tcfg.init, st.runs, say)
        return _loop(st, ckpts, it, first, setup, state, rng, interval, start, steps)
    finally:
        _close_data(it)


def _schedule(tcfg: TrainConfig, data_cfg: DataConfig, dataset: Any) -> tuple[int, int, int, int]:
    """(steps per epoch, steps of the whole schedule, steps this run takes, warmup steps)."""
    per_epoch = tcfg.steps_per_epoch or optim.steps_per_epoch(dataset.epoch_records, data_cfg.batch_size,
                                                              tcfg.grad_accum)
    total = max(1, math.ceil(tcfg.epochs * per_epoch))
    steps = min(total, tcfg.max_steps) if tcfg.max_steps else total
    return per_epoch, total, steps, optim.warmup_steps(per_epoch, tcfg.warmup_fraction, tcfg.min_warmup_steps)


def compile_ahead(config: mlc.ConfigDict) -> dict[int, Any]:
    """The stage's train step compiled for the length bucket of its first batch, from shapes alone (no
    parameter is read): the program `_Runner` compiles at the stage's first step, {length: executable}. One
    process only: `global_batch` agrees the length over processes."""
    tcfg, data_cfg = TrainConfig.from_config(config.train), DataConfig.from_config(config.data)
    dataset = build_dataset(data_cfg, ModelShapes.from_config(config.model), seed=config.seed)
    it = iter(dataset)
    try:
        example = next(it)  # the stage's own first batch: same seed, same records
    finally:
        it.close()
    _, total, _, warmup = _schedule(tcfg, data_cfg, dataset)
    setup = build_stage(config, example, total_steps=total, warmup=warmup)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        batch = global_batch(example, setup.mesh, TRAIN_KEYS)
        exe = setup.step.lower(setup.abstract, batch, jax.random.key(config.seed + 1)).compile()
    return {int(batch['input_ids'].shape[1]): exe}


def _close_data(it: Any) -> None:
    """Closes the data iterator, and waits until grain has unlinked the shared memory of the batches it dropped.
    Grain unlinks them from a thread pool that does not run at interpreter exit, so a run that stopped soon after
    (an error, a preemption) printed 'leaked shared_memory objects' warnings after its last line."""
    it.close()
    gc.collect()  # batches no longer referenced: their arrays are unlinked as they are collected
    from grain._src.python.ipc.shared_memory_array import SharedMemoryArray  # no public hook in grain 0.2
    pool = getattr(SharedMemoryArray, '_del_thread_pool', None)
    if pool is not None and hasattr(SharedMemoryArray, '_disable_async_del'):
        SharedMemoryArray._disable_async_del()  # later ones synchronously; the next iterator enables it again
        pool.close()
        pool.join()


def _final_params(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), checkpoint.FINAL_PARAMS)


def _stop_before(st: _Stage, what: str) -> bool:
    """Whether a SIGTERM came during start-up (said when so): nothing new to save, the stage returns at once."""
    if not st.preemption.agreed():
        return False
    st.say(f'preempted (SIGTERM) before {what}: nothing new to save; run the same command to resume')
    return True


def _loop(st: _Stage, ckpts: checkpoint.RunCheckpoints, it: Any, first: tuple[dict, dict[str, int]],
          setup: StageSetup, state: TrainState, rng: jax.Array, interval: list[dict[str, float]], start: int,
          steps: int) -> StageResult:
    """Steps `start + 1` .. `steps`: logs, evaluations, checkpoints, preemption, and the hand-off at the end."""
    config, workdir, say, main, tcfg, ccfg, mcfg, mesh = (st.config, st.workdir, st.say, st.main, st.tcfg, st.ccfg,
                                                          st.mcfg, st.mesh)
    rules = setup.rules
    runner = _Runner(setup.step, mcfg, st.data_cfg.batch_size, tcfg, mesh, say, st.ahead, st.compiled)
    writer = MetricWriter(workdir, main, echo=tqdm.write, total_steps=steps, resume_step=start if start else None)
    history: list[dict[str, float]] = list(writer.kept)
    final = _final_params(workdir)

    def result(preempted: bool) -> StageResult:
        scalars = [h for h in history if 'loss' in h]
        return StageResult(workdir, steps, scalars[0] if scalars else {}, scalars[-1] if scalars else {}, final,
                           history, preempted)

    if start < steps and _stop_before(st, f'step {start + 1}'):
        writer.close()
        return result(True)
    evaluators = build_evaluators(EvalContext(config, setup.model, mesh, rules, say))
    bar = tqdm(total=steps, initial=start, desc=f'train {tcfg.stage or ""}'.strip(), disable=not main,
               dynamic_ncols=True, mininterval=1.0)
    pending = None
    # Step time = between two consecutive finished steps, less what the host spent compiling, evaluating or saving.
    clock = {'last': 0.0, 'pause': 0.0}
    meta = {'stage': tcfg.stage, 'scan_layers': mcfg.llm.scan_layers, 'moe_layers': list(mcfg.llm.moe_layers),
            'lora': dataclasses.asdict(mcfg.llm.lora), 'mesh': dict(mesh.shape), 'process_count': jax.process_count(),
            'rng': np.asarray(jax.random.key_data(rng)).tolist(), 'config': _json(config.to_dict())}

    def finish(done: tuple[int, Any, int, dict[str, int]]):
        """Metrics of a finished step (fetched one step late, so the host never waits on the device) with the data
        counters of its own batch (the iterator has drawn the next one by then)."""
        step, metrics, length, counters = done
        m = flatten_metrics(jax.device_get(metrics))
        now = time.perf_counter()
        m['perf/step_s'] = now - clock['last'] - clock['pause']
        clock.update(last=now, pause=0.0)
        m.update(runner.perf(m, length))
        m.update({k: float(v) for k, v in counters.items()})
        interval.append(m)
        bar.update(1)
        bar.set_postfix(loss=f'{m["loss"]:.4f}', lr=f'{m["lr"]:.2e}', step_s=f'{m["perf/step_s"]:.2f}')
        if m['update_skipped'] and main:
            tqdm.write(f'step {step}: non-finite loss or gradient (loss {m["loss"]}, grad norm {m["grad_norm"]}); '
                       f'update skipped ({int(m["bad_steps"])} in a row, {int(m["skipped_steps"])} in all)')
        if m['bad_steps'] >= tcfg.max_bad_steps:
            raise TrainingError(f'train: {int(m["bad_steps"])} non-finite steps in a row up to step {step} '
                                f'(config.train.max_bad_steps={tcfg.max_bad_steps}); parameters of the last good '
                                f'step saved in {os.path.join(workdir, "stopped_params")}')
        if step == steps or (tcfg.log_every and step % tcfg.log_every == 0):
            mean = {k: interval[-1][k] if k in LATEST or k.startswith('data/') else
                    float(np.mean([i[k] for i in interval if k in i])) for k in interval[-1]}
            writer.write(step, mean)
            history.append({'step': step, **mean})
            interval.clear()

    def save(step: int, metrics: dict[str, float] | None) -> None:
        started = time.perf_counter()
        best = ccfg.best_metric
        ckpts.save(step, state, it, {**meta, 'step': step, 'interval': interval},
                   metrics=metrics if metrics and best in metrics else None)
        clock['pause'] += time.perf_counter() - started

    preempted = False
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for step in range(start + 1, steps + 1):
                host, counters = first if step == 1 else (next(it), it.metrics())
                batch = global_batch(host, mesh, TRAIN_KEYS)
                started = time.perf_counter()
                executable = runner.compiled(state, batch, rng)
                if step == start + 1:
                    clock['last'] = time.perf_counter()
                else:
                    clock['pause'] += time.perf_counter() - started if runner.just_compiled else 0.0
                state, metrics = executable(state, batch, rng)
                if pending is not None:
                    finish(pending)
                pending = (step, metrics, int(batch['input_ids'].shape[1]), counters)
                preempted = step < steps and st.preemption.agreed()
                due = [ev for ev in evaluators if step == steps or (ev.every and step % ev.every == 0)]
                saving = step == steps or preempted or (ccfg.every and step % ccfg.every == 0)
                if due or saving:
                    finish(pending)  # the step's metrics are logged before its evaluation and its checkpoint
                    pending = None
                evaluated = {}
                if due:
                    started = time.perf_counter()
                    evaluated = _evaluate(due, state.params, step, writer, history)
                    clock['pause'] += time.perf_counter() - started
                if saving or ccfg.best_metric in evaluated:  # an evaluated step is a candidate for keep-best
                    save(step, evaluated)
                if preempted:
                    ckpts.wait()
                    say(f'preempted (SIGTERM) at step {step}: checkpoint {ckpts.directory}/{step} saved; run the same '
                        f'command to resume')
                    break
            if pending is not None:
                finish(pending)
    except TrainingError:
        # Non-finite steps leave the parameters as they were: the state holds the last good ones.
        bar.close()
        checkpoint.save_params(os.path.join(workdir, 'stopped_params'), state.params,
                               {'stage': tcfg.stage, 'reason': 'max_bad_steps', 'merged_lora': False})
        raise
    finally:
        bar.close()
        writer.close()

    if preempted:
        return result(True)
    if start >= steps:
        say(f'stage {tcfg.stage or "?"}: already trained ({ckpts.directory}/{start} is step {start} of {steps}); '
            f'a new --workdir trains again')
    if start < steps or not os.path.isdir(final):
        merged = merge(state.params, mcfg.llm.lora)
        checkpoint.save_params(final, merged, {
            'stage': tcfg.stage, 'steps': steps, 'merged_lora': bool(mcfg.llm.lora.rank),
            'scan_layers': mcfg.llm.scan_layers, 'moe_layers': list(mcfg.llm.moe_layers), 'mesh': dict(mesh.shape),
            'config': config.to_dict()})
    done = result(False)
    if done.first and start < steps:
        say(f'stage {tcfg.stage or "?"} done: loss {done.first["loss"]:.4f} -> {done.last["loss"]:.4f} over '
            f'{steps} steps; hand-off (LoRA merged) in {final}')
    ckpts.wait()  # the last checkpoint too, before a SIGTERM that came meanwhile is answered
    if st.preemption.agreed():
        say(f'SIGTERM while stage {tcfg.stage or "?"} finished: its last checkpoint and {final} are saved; run the '
            f'same command to go on')
        done.preempted = True
    return done


@dataclasses.dataclass
class StageSetup:
    """A stage ready to step: the model, its trained set, optimizer and schedule, the state's shardings and abstract
    shapes (`abstract`: ShapeDtypeStructs carrying the shardings, what a checkpoint restores onto), the jitted train
    step (explicit in/out shardings, donated state) and, once created or restored, the state."""
    model: MedPLIBForCausalLM
    trained: frozenset[str]
    tx: Any
    schedule: Any
    boxed: Any
    shardings: TrainState
    abstract: TrainState
    step: Any
    mesh: Any
    rules: list
    init: Callable[[], Any]
    state: TrainState | None = None


def build_stage(config: mlc.ConfigDict, example: dict[str, Any], *, total_steps: int, warmup: int,
                devices: Any = None, mesh: Any = None) -> StageSetup:
    """Everything a stage needs but the state's values, from its config and one batch's shapes (`example`: arrays
    or ShapeDtypeStructs). No parameter is materialised, so this also lowers the 7B step for a topology the host
    does not have (`medplib-jax compile-check`). `mesh` (or `devices`, default all) is where it runs."""
    tcfg = TrainConfig.from_config(config.train)
    mcfg = MedPLIBConfig.from_model_config(config.model)
    model = MedPLIBForCausalLM(mcfg.llm, mcfg=mcfg)
    mesh, rules = mesh or sharding.make_mesh(config.mesh, devices), list(config.logical_axis_rules)
    _, group = _check_batch(tcfg, DataConfig.from_config(config.data), mcfg, mesh, rules)
    schedule = optim.warmup_decay_schedule(tcfg.lr, total_steps, warmup)
    tx = optim.make_optimizer(schedule, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps, weight_decay=tcfg.weight_decay,
                              clip_norm=tcfg.clip_norm)
    init = init_fn(model, example, config.seed)
    boxed = jax.eval_shape(init)['params']
    trained = trained_paths(boxed, tcfg.trainable)
    shardings = state_shardings(boxed, trained, tx, mesh, rules)
    abstract = jax.eval_shape(lambda p: create(p, trained, tx), nn.unbox(boxed))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
    step_fn = build_train_step(model, trained, tx, schedule, weights=tcfg.weights, grad_accum=tcfg.grad_accum,
                               loss_group=group)
    batch_shardings = {k: sharding.data_sharding(mesh, len(example[k].shape), rules) for k in TRAIN_KEYS}
    jitted = jax.jit(step_fn, in_shardings=(shardings, batch_shardings, None),
                     out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
    return StageSetup(model, trained, tx, schedule, boxed, shardings, abstract, jitted, mesh, rules, init)


def fresh_state(setup: StageSetup, init: Any, runs: str, log: Callable[[str], None] = print,
                params: Any = None) -> TrainState:
    """The state at step 0: parameters from `init` (config.train.init, train/handoff.py) or the given `params`
    (tests), sharded; optimizer moments of the trained set at zero."""
    if params is None:
        params, _ = initial_params(setup.init, init, runs, setup.mesh, setup.rules, log)
    else:
        params = sharding.shard_like(params, sharding.param_shardings(setup.boxed, setup.mesh, setup.rules))
    log('parameters (trained / frozen):\n' + parameter_table(params, setup.trained))
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        state = jax.jit(lambda p: create(p, setup.trained, setup.tx), out_shardings=setup.shardings,
                        donate_argnums=0)(params)
    log(f'optimizer state: {state_bytes(state.opt_state) / 2**20:.1f} MiB (moments of the trained parameters only)')
    return state


def setup_stage(config: mlc.ConfigDict, example: dict[str, np.ndarray], *, runs: str, total_steps: int, warmup: int,
                log: Callable[[str], None] = print, params: Any = None, devices: Any = None) -> StageSetup:
    """`build_stage` plus a fresh state. `params`: start from these (tests) instead of config.train.init."""
    setup = build_stage(config, example, total_steps=total_steps, warmup=warmup, devices=devices)
    setup.state = fresh_state(setup, TrainConfig.from_config(config.train).init, runs, log, params)
    return setup


def _evaluate(evaluators, params, step: int, writer: MetricWriter, history) -> dict[str, float]:
    """Runs the evaluators (those due at `step`) -> their metrics, as logged."""
    out: dict[str, float] = {}
    for ev in evaluators:
        values = ev.run(params)
        # A mean over nothing (no closed records, say) is NaN: n/a in the line, left out of the logs (JSON has no NaN).
        metrics = {f'eval/{ev.name}/{k}': v for k, v in values.items() if not math.isnan(v)}
        writer.write(step, metrics, line=False)
        if writer.enabled:
            writer.echo(f'eval {ev.name} at step {step}: ' + ', '.join(
                f'{k} {"n/a" if math.isnan(v) else format(v, ".4f")}' for k, v in values.items()))
        history.append({'step': step, **metrics})
        out.update(metrics)
    return out


class _Runner:
    """One compiled executable per sequence-length bucket (compiled ahead of time, so steps of a bucket never
    recompile); the first compile prints the step's memory and FLOPs."""

    def __init__(self, jitted, mcfg: MedPLIBConfig, batch: int, tcfg: TrainConfig, mesh, log,
                 ahead: concurrent.futures.Future | None = None, compiled: threading.Event | None = None):
        self.jitted, self.mcfg, self.batch, self.tcfg, self.mesh, self.log = jitted, mcfg, batch, tcfg, mesh, log
        self.executables: dict[int, Any] = {}
        self.ahead = ahead  # compile_ahead's {length: executable}, taken at the first compile
        self.first_compiled = compiled  # set after the first compile
        self.just_compiled = False
        self.reported = False  # the first executable's FLOPs and memory are logged
        kind = jax.devices()[0].device_kind
        self.peak = flops_lib.peak_flops(kind, tcfg.peak_tflops)

    def compiled(self, state: TrainState, batch: dict, rng: jax.Array):
        length = int(batch['input_ids'].shape[1])
        self.just_compiled = length not in self.executables
        if self.just_compiled:
            start = time.perf_counter()
            exe = self._take_ahead(length)
            how = 'compiled ahead (waited {:.1f}s)' if exe is not None else 'compiled in {:.1f}s'
            if exe is None:
                exe = self.jitted.lower(state, batch, rng).compile()
            self.executables[length] = exe
            if self.first_compiled is not None:
                self.first_compiled.set()
            how = how.format(time.perf_counter() - start)
            if not self.reported:
                self.reported = True
                self._report(exe, length, how)
            else:
                self.log(f'train step for length {length} {how}')
        return self.executables[length]

    def _take_ahead(self, length: int) -> Any:
        """The executable compiled ahead for `length` (waiting for it), or None: none for that length, or the
        compile failed (the stage's own compile then meets the same error and reports it)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and not ahead.cancelled() and ahead.exception() is None:
            self.executables.update(ahead.result())
        return self.executables.get(length)

    def _report(self, exe, length: int, how: str) -> None:
        f = flops_lib.step_flops(self.mcfg, self.batch, length)
        cost = exe.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla = float(cost.get('flops', 0.0)) if cost else 0.0
        mem = exe.memory_analysis()
        n = jax.device_count()
        lines = [f'train step for length {length} {how}',
                 f'  FLOPs per step: formula {f.total / 1e12:.4g} TFLOP (LLM {f.llm / 1e12:.4g}, frozen vision '
                 f'{f.vision / 1e12:.4g}; train/flops.py), XLA cost_analysis {xla * n / 1e12:.4g} TFLOP over {n} '
                 f'devices (counts a scanned accumulation body once)']
        if mem is not None:
            lines.append(f'  memory per device: arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB, outputs '
                         f'{mem.output_size_in_bytes / 2**20:.1f} MiB (aliased {mem.alias_size_in_bytes / 2**20:.1f}), '
                         f'temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB, code '
                         f'{mem.generated_code_size_in_bytes / 2**20:.1f} MiB')
        lines.append('  MFU: ' + (f'against {self.peak / 1e12:.0f} TFLOP/s per device' if self.peak else
                                  f'n/a (no known peak for {jax.devices()[0].device_kind!r}; set '
                                  f'--config.train.peak_tflops)'))
        self.log('\n'.join(lines))

    def perf(self, m: dict[str, float], length: int) -> dict[str, float]:
        seconds = max(m['perf/step_s'], 1e-9)
        out = {'perf/tokens_per_s': m.get('tokens/total', 0.0) / seconds}
        if self.peak:
            f = flops_lib.step_flops(self.mcfg, self.batch, length).total
            out['perf/mfu'] = f / seconds / (self.peak * jax.device_count())
        return out
