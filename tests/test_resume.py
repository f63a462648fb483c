"""Train-state checkpoints through `medplib-jax train` as a user runs it (subprocesses): SIGTERM at any moment
(during start-up, mid-training, while the last checkpoint and `final_params` are written) exits 0 with everything
saved, a resumed run writes the uninterrupted one's metrics.jsonl and parameters bit for bit (after SIGTERMs, a
SIGKILL and a half-written checkpoint), a checkpoint of another config or a damaged one is a one-line error that
leaves the run directory as it was (`config.checkpoint.fallback` resumes from the previous step), an error before
the data exist is one line, and `export` writes the evaluators' params.

Every run is the tiny stage-IV model for 6 steps through the grain pipeline with 2 worker processes, a checkpoint
every 2 steps, on one CPU device.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from support.train_utils import make_data

from medplib_jax import checkpoint
from medplib_jax.tree import flatten

pytestmark = [pytest.mark.heavy_module, pytest.mark.slow, pytest.mark.e2e]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def _command(workdir, data, *extra):
    return [sys.executable, '-m', 'medplib_jax', 'train', '--config=configs/stage4.py:model=tiny,init=random',
            f'--workdir={workdir}', f'--config.data.root={data}', '--config.model.moe.group_size=1',
            f'--config.train.max_steps={STEPS}', '--config.train.log_every=1', '--config.checkpoint.every=2',
            '--config.data.worker_count=2', *extra]


def _env():
    # unbuffered: a killed run's log holds every line it printed
    return dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='--xla_force_host_platform_device_count=1',
                PYTHONUNBUFFERED='1')


def _run(workdir, data, *extra):
    return subprocess.run(_command(workdir, data, *extra), capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=900)


def _start(workdir, data, log):
    """The run in its own process group (with its grain worker processes), as a job scheduler sees it."""
    return subprocess.Popen(_command(workdir, data), stdout=log, stderr=subprocess.STDOUT, text=True, env=_env(),
                            cwd=ROOT, start_new_session=True)


def _wait_for(condition, proc, what, timeout=600):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f'the run ended (exit {proc.returncode}) before {what}'
        assert time.monotonic() < deadline, f'no {what} after {timeout}s'
        time.sleep(0.05)


def _flat_state(workdir, step):
    import jax
    tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, checkpoint.CHECKPOINTS, str(step),
                                                           checkpoint.STATE))
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def _data_state(workdir, step):
    path = os.path.join(workdir, checkpoint.CHECKPOINTS, str(step), checkpoint.DATA, 'process_0-of-1.json')
    with open(path) as f:
        return json.load(f)


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def _snapshot(directory):
    """Every file under `directory` with its size and modification time."""
    out = {}
    for base, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(base, name)
            st = os.stat(path)
            out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def baseline(data, tmp_path_factory):
    """The uninterrupted run. The data counters logged at a step are those of its own batch (4 records a step),
    although its metrics are fetched a step late, after the next batch is drawn."""
    workdir = str(tmp_path_factory.mktemp('baseline') / 'run')
    res = _run(workdir, data)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, checkpoint.CHECKPOINTS))) == ['4', '6']  # keep = 2
    seen = [(r['step'], r['data/records_seen']) for r in _records(workdir) if 'loss' in r]
    assert seen == [(step, 4.0 * step) for step in range(1, STEPS + 1)]
    return workdir


def _log(path):
    with open(path) as f:
        return f.read()


def _records(workdir):
    """metrics.jsonl, every value but the wall-clock timings (perf/*)."""
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith('perf/')} for line in f]


def _assert_same_run(workdir, baseline):
    """Bit for bit the uninterrupted run: every logged value (floats round-trip through JSON exactly), the final
    checkpoint (parameters, Adam moments, counters, data order) and the hand-off."""
    assert _records(workdir) == _records(baseline)
    _assert_identical(_flat_state(workdir, STEPS), _flat_state(baseline, STEPS))
    assert _data_state(workdir, STEPS) == _data_state(baseline, STEPS)
    final = [ocp.StandardCheckpointer().restore(os.path.join(w, checkpoint.FINAL_PARAMS)) for w in (workdir, baseline)]
    _assert_identical(*[{k: np.asarray(v) for k, v in flatten(f).items()} for f in final])


def _interrupt(workdir, data, log_path, condition, what, sig):
    """Starts the run, sends `sig` to it (SIGKILL: with its data workers) once `condition()` holds -> (exit status,
    everything it printed)."""
    with open(log_path, 'w') as log:
        proc = _start(workdir, data, log)
        try:
            _wait_for(condition, proc, what)
            if sig == signal.SIGKILL:
                os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its data workers, at once
            else:
                proc.send_signal(sig)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return rc, _log(log_path)


def _latest(workdir):
    ckpts = checkpoint.RunCheckpoints(workdir, checkpoint.CheckpointConfig())
    try:
        return ckpts.latest_step()
    finally:
        ckpts.close()


def _logged(workdir, predicate):
    """Whether the running run has logged a record that satisfies `predicate`."""
    path = os.path.join(workdir, 'metrics.jsonl')
    try:
        return os.path.exists(path) and any(predicate(r) for r in _records(workdir))
    except ValueError:  # a line being written
        return False


def test_preempted_killed_and_preempted_while_finishing_is_bit_exact(baseline, data, tmp_path):
    """A run's life on preemptible machines, in one run directory:
    1. SIGTERM (preemption) after step 1: the run saves at the next step boundary and exits 0;
    2. the same command resumes at the next step, and is SIGKILLed (with its data workers) once checkpoint 4 exists;
    3. what a kill in the middle of saving step 6 leaves is planted (a half-written checkpoint);
    4. the same command ignores it, resumes from 4, and gets SIGTERM once the last step is evaluated, while its
       checkpoint and `final_params` are written: both are finished and it exits 0;
    and metrics.jsonl, the checkpoint and `final_params` are the uninterrupted run's, bit for bit."""
    workdir = str(tmp_path / 'run')
    ckpts = os.path.join(workdir, checkpoint.CHECKPOINTS)
    # 1. preempted
    rc, out = _interrupt(workdir, data, tmp_path / 'preempted.log', lambda: _logged(workdir, lambda r: 'loss' in r),
                         'step 1', signal.SIGTERM)
    assert rc == 0, out[-3000:]
    saved = _latest(workdir)
    assert saved is not None and 1 <= saved < 4, out[-2000:]  # step 1 is logged one step late: saved is 2 or 3
    assert f'preempted (SIGTERM) at step {saved}' in out
    assert not os.path.exists(os.path.join(workdir, checkpoint.FINAL_PARAMS))

    # 2. resumed at the next step, then killed
    rc, out = _interrupt(workdir, data, tmp_path / 'killed.log', lambda: os.path.isdir(os.path.join(ckpts, '4')),
                         'checkpoint 4', signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert f'resumed from {ckpts}/{saved} (step {saved} of 6)' in out and f'step {saved + 1}/6:' in out, out[-3000:]
    assert f'step {saved}/6:' not in out  # nothing trained twice
    assert '6' not in os.listdir(ckpts) and not os.path.exists(os.path.join(workdir, checkpoint.FINAL_PARAMS))

    # 3. a half-written step 6: Orbax writes under a temporary name, renamed when complete
    half = os.path.join(ckpts, '6.orbax-checkpoint-tmp-1700000000000000')
    shutil.copytree(os.path.join(ckpts, '4', checkpoint.STATE), os.path.join(half, checkpoint.STATE))
    with open(os.path.join(half, checkpoint.STATE, '_METADATA'), 'w') as f:
        f.write('{"tree_metadata": ')  # cut off mid-write

    # 4. resumed to the end, SIGTERM after the last evaluation (logged just before the last save starts)
    rc, out = _interrupt(workdir, data, tmp_path / 'finishing.log',
                         lambda: _logged(workdir, lambda r: r['step'] == STEPS and any('eval/' in k for k in r)),
                         'the last evaluation', signal.SIGTERM)
    assert rc == 0, out[-3000:]
    assert f'resumed from {ckpts}/4 (step 4 of 6)' in out
    assert 'SIGTERM while stage' in out, out[-3000:]
    assert sorted(os.listdir(ckpts)) == ['4', '6']  # the half-written one removed, the last one finished
    _assert_same_run(workdir, baseline)


def test_sigterm_during_start_up_exits_0_with_nothing_written(data, tmp_path):
    """SIGTERM as soon as the run has started: it stops before reading or initialising the state, exit 0."""
    workdir = str(tmp_path / 'run')
    rc, out = _interrupt(workdir, data, tmp_path / 'start.log', lambda: f'-> {workdir}' in _log(tmp_path / 'start.log'),
                         'start-up', signal.SIGTERM)
    assert rc == 0 and 'preempted (SIGTERM) before ' in out, out[-3000:]
    assert not os.listdir(os.path.join(workdir, checkpoint.CHECKPOINTS))
    assert not os.path.exists(os.path.join(workdir, checkpoint.FINAL_PARAMS))


def _cli_error(res):
    """A user error: exit 2 and one line on stderr, nothing else (no traceback, no background thread's output)."""
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('medplib-jax train: '), res.stderr[-3000:]
    return lines[0]


def test_a_checkpoint_of_another_config_is_one_error_listing_the_keys(baseline, data, tmp_path):
    workdir = str(tmp_path / 'run')
    shutil.copytree(baseline, workdir)
    before = _snapshot(workdir)
    # LoRA rank 4 instead of 8: every adapter and its Adam moments are mis-shaped (missing and unexpected arrays:
    # tests/test_checkpoint.py).
    line = _cli_error(_run(workdir, data, '--config.model.lora.rank=4'))
    assert 'does not fit the config' in line and 'Nothing was restored' in line
    assert 'mis-shaped: ' in line and 'opt_state/' in line
    assert 'params/model/layers_0/self_attn/q_proj/lora_A (64, 8) float32 (run: (64, 4) float32)' in line
    assert _snapshot(workdir) == before


def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_fallback_resumes(baseline, data, tmp_path):
    """One truncated data file in the newest checkpoint: one line on stderr naming it and an array it holds, and
    nothing else (no traceback, no TensorStore repr); the run directory is left as it was. With
    --config.checkpoint.fallback=true the run resumes from the previous step (the damaged one moved aside) and ends
    as the uninterrupted run."""
    workdir = str(tmp_path / 'run')
    shutil.copytree(baseline, workdir)
    ckpts = os.path.join(workdir, checkpoint.CHECKPOINTS)
    state = os.path.join(ckpts, str(STEPS), checkpoint.STATE)
    chunks = [os.path.join(b, f) for b, _, fs in os.walk(state) for f in fs if os.sep + 'd' + os.sep in
              os.path.join(b, f)]
    damaged = max(chunks, key=os.path.getsize)  # a data file (the index nodes are small)
    os.truncate(damaged, os.path.getsize(damaged) // 2)
    before = _snapshot(workdir)
    line = _cli_error(_run(workdir, data))
    assert line.startswith(f'medplib-jax train: {damaged}: truncated (') and ', holding array ' in line, line
    assert '--config.checkpoint.fallback=true' in line and 'tensorstore' not in line.lower(), line
    assert _snapshot(workdir) == before

    res = _run(workdir, data, '--config.checkpoint.fallback=true')
    assert res.returncode == 0, res.stderr[-3000:]
    assert f'resumed from {ckpts}/4 (step 4 of 6)' in res.stdout and 'WARNING: ' in res.stdout
    moved = os.path.join(workdir, checkpoint.DAMAGED, str(STEPS))
    assert os.path.getsize(os.path.join(moved, os.path.relpath(damaged, os.path.join(ckpts, str(STEPS))))) \
        == os.path.getsize(damaged.replace(ckpts, os.path.join(baseline, checkpoint.CHECKPOINTS))) // 2
    _assert_same_run(workdir, baseline)


def test_train_before_the_demo_data_exist_is_one_line(tmp_path):
    """In a folder without the demo data: one line saying how to write them, nothing else (no Orbax thread's
    traceback at exit), nothing written."""
    res = subprocess.run([sys.executable, '-m', 'medplib_jax', 'train',
                          f'--config={os.path.join(ROOT, "configs", "demo.py")}', f'--workdir={tmp_path / "run"}'],
                         capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    line = _cli_error(res)
    assert 'medplib-jax make-demo-data' in line and 'medplib-jax demo' in line
    assert not os.path.exists(tmp_path / 'run')


def test_export_writes_the_merged_params_of_the_latest_checkpoint(baseline, tmp_path):
    out = str(tmp_path / 'exported')
    res = subprocess.run([sys.executable, '-m', 'medplib_jax', 'export', f'--workdir={baseline}', f'--out={out}',
                          '--dtype=bfloat16'], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f'export: step 6 of {baseline} -> {out}' in res.stdout
    exported = flatten(ocp.StandardCheckpointer().restore(out))
    final = flatten(ocp.StandardCheckpointer().restore(os.path.join(baseline, 'final_params')))
    assert exported.keys() == final.keys() and not any('lora_' in k for k in exported)
    import jax.numpy as jnp
    for k, v in final.items():  # the run's own hand-off (merged at the end of training), cast
        assert exported[k].dtype == jnp.bfloat16 and np.array_equal(np.asarray(exported[k]),
                                                                     np.asarray(jnp.asarray(v, jnp.bfloat16))), k
    meta = checkpoint.params_meta(out)
    assert meta['step'] == 6 and meta['merged_lora'] and meta['dtype'] == 'bfloat16'


def test_sigterm_between_stages_stops_before_the_next(tmp_path, monkeypatch):
    """The hand-off between the stages of a multi-stage config is covered too: a SIGTERM while a stage finishes
    (here: inside a stand-in stage) lets it finish and stops before the next; SIGTERM's handler is back after."""
    import ml_collections as mlc

    from medplib_jax.train import loop
    ran = []

    def stage(config, workdir, log, preemption, ahead=None, compiled=None):
        ran.append(os.path.basename(workdir))
        os.kill(os.getpid(), signal.SIGTERM)
        return loop.StageResult(workdir, 1, {}, {}, '', [])

    monkeypatch.setattr(loop, 'train_stage', stage)
    config = mlc.ConfigDict({'stages': {name: {'data': {'root': str(tmp_path)}} for name in ('one', 'two')}})
    handler = signal.getsignal(signal.SIGTERM)
    lines = []
    results = loop.train(config, str(tmp_path), lines.append)
    assert ran == ['one'] and list(results) == ['one']
    assert 'preempted (SIGTERM) before stage two' in lines[-1]
    assert signal.getsignal(signal.SIGTERM) is handler


def test_metrics_jsonl_is_replaced_atomically_on_resume(tmp_path, monkeypatch):
    """A resumed run keeps the records up to its checkpoint (a line cut off by a kill dropped); the file is written
    under another name and renamed, so a failure meanwhile leaves it as it was."""
    from medplib_jax.train import writers
    path = tmp_path / 'metrics.jsonl'
    text = ''.join(json.dumps({'step': s, 'loss': 1.0 / s}) + '\n' for s in range(1, 7)) + '{"step": 7, "lo'
    path.write_text(text)

    def interrupted(src, dst):
        raise OSError('killed')  # between writing the new file and the rename

    monkeypatch.setattr(writers.os, 'replace', interrupted)
    with pytest.raises(OSError, match='killed'):
        writers.MetricWriter(str(tmp_path), True, resume_step=4)
    assert path.read_text() == text
    monkeypatch.undo()
    writer = writers.MetricWriter(str(tmp_path), True, resume_step=4)
    writer.write(5, {'loss': 0.5}, line=False)
    writer.close()
    assert [r['step'] for r in writers.read_metrics(str(path))] == [1, 2, 3, 4, 5]
    assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl', 'tensorboard']
