"""Train-state checkpoints through `medplib-jax train` as a user runs it (subprocesses): SIGTERM saves and exits 0,
bit-exact resume after it and after a SIGKILL, a half-written checkpoint ignored, a checkpoint of another config or
a corrupted one is a one-line error that leaves the run directory as it was, and `export` writes the evaluators'
params.

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

from medplib_jax import checkpoint
from train_utils import make_data

pytestmark = pytest.mark.heavy_module  # scheduled first (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def _command(workdir, data, *extra):
    return [sys.executable, '-m', 'medplib_jax.cli', 'train', '--config=configs/stage4.py:model=tiny,init=random',
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


def _losses(workdir):
    lines = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    return [(m['step'], m['loss']) for m in lines if 'loss' in m]


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
    """The uninterrupted run."""
    workdir = str(tmp_path_factory.mktemp('baseline') / 'run')
    res = _run(workdir, data)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, checkpoint.CHECKPOINTS))) == ['4', '6']  # keep = 2
    return workdir


def _log(path):
    with open(path) as f:
        return f.read()


def test_preempted_then_killed_then_resumed_is_bit_exact(baseline, data, tmp_path):
    """A run's life on preemptible machines, in one run directory:
    1. SIGTERM (preemption) after step 1: the run saves at the next step boundary and exits 0;
    2. the same command resumes at the next step, and is SIGKILLed (with its data workers) once checkpoint 4 exists;
    3. what a kill in the middle of saving step 6 leaves is planted (a half-written checkpoint);
    4. the same command ignores it, resumes from 4 and reaches step 6 with the losses, parameters, optimizer state
       and data order of the uninterrupted run, bit for bit."""
    workdir = str(tmp_path / 'run')
    ckpts = os.path.join(workdir, checkpoint.CHECKPOINTS)
    # 1. preempted
    with open(tmp_path / 'preempted.log', 'w') as log:
        proc = _start(workdir, data, log)
        try:
            _wait_for(lambda: os.path.exists(os.path.join(workdir, 'metrics.jsonl'))
                      and len(_losses(workdir)) >= 1, proc, 'step 1')
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    out = _log(tmp_path / 'preempted.log')
    assert rc == 0, out[-3000:]
    saved = checkpoint.RunCheckpoints(workdir, checkpoint.CheckpointConfig()).latest_step()
    assert saved is not None and 1 <= saved < 4, out[-2000:]  # step 1 is logged one step late: saved is 2 or 3
    assert f'preempted (SIGTERM) at step {saved}' in out
    assert not os.path.exists(os.path.join(workdir, 'final_params'))

    # 2. resumed at the next step, then killed
    with open(tmp_path / 'killed.log', 'w') as log:
        proc = _start(workdir, data, log)
        try:
            _wait_for(lambda: os.path.isdir(os.path.join(ckpts, '4')), proc, 'checkpoint 4')
            os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its data workers, at once
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    out = _log(tmp_path / 'killed.log')  # unbuffered: everything up to the kill
    assert f'resumed from {ckpts}/{saved} (step {saved} of 6)' in out and f'step {saved + 1}/6:' in out, out[-3000:]
    assert f'step {saved}/6:' not in out  # nothing trained twice
    assert '6' not in os.listdir(ckpts) and not os.path.exists(os.path.join(workdir, 'final_params'))

    # 3. a half-written step 6: Orbax writes under a temporary name, renamed when complete
    half = os.path.join(ckpts, '6.orbax-checkpoint-tmp-1700000000000000')
    shutil.copytree(os.path.join(ckpts, '4', checkpoint.STATE), os.path.join(half, checkpoint.STATE))
    with open(os.path.join(half, checkpoint.STATE, '_METADATA'), 'w') as f:
        f.write('{"tree_metadata": ')  # cut off mid-write

    # 4. resumed to the end
    res = _run(workdir, data)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f'resumed from {ckpts}/4 (step 4 of 6)' in res.stdout
    assert _losses(workdir) == _losses(baseline)  # bit for bit: floats round-trip through JSON exactly
    _assert_identical(_flat_state(workdir, 6), _flat_state(baseline, 6))  # params, Adam moments, counters
    assert _data_state(workdir, 6) == _data_state(baseline, 6)  # the data order
    assert _data_state(workdir, 4) == _data_state(baseline, 4)


def _cli_error(res):
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith('medplib-jax train:')]
    assert len(lines) == 1 and 'Traceback' not in res.stderr, res.stderr[-3000:]
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


def test_a_corrupted_checkpoint_is_a_one_line_error_and_nothing_is_written(baseline, data, tmp_path):
    workdir = str(tmp_path / 'run')
    shutil.copytree(baseline, workdir)
    state = os.path.join(workdir, checkpoint.CHECKPOINTS, '6', checkpoint.STATE)
    chunks = [os.path.join(b, f) for b, _, fs in os.walk(state) for f in fs if os.sep + 'd' + os.sep in
              os.path.join(b, f)]
    assert chunks, os.listdir(state)
    for path in chunks:  # every data file cut to half its length
        with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) // 2)
    before = _snapshot(workdir)
    line = _cli_error(_run(workdir, data))
    assert f'{os.path.join(workdir, checkpoint.CHECKPOINTS, "6")}: unreadable checkpoint' in line
    assert _snapshot(workdir) == before


def test_export_writes_the_merged_params_of_the_latest_checkpoint(baseline, tmp_path):
    out = str(tmp_path / 'exported')
    res = subprocess.run([sys.executable, '-m', 'medplib_jax.cli', 'export', f'--workdir={baseline}', f'--out={out}',
                          '--dtype=bfloat16'], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f'export: step 6 of {baseline} -> {out}' in res.stdout
    exported = checkpoint.flatten(ocp.StandardCheckpointer().restore(out))
    final = checkpoint.flatten(ocp.StandardCheckpointer().restore(os.path.join(baseline, 'final_params')))
    assert exported.keys() == final.keys() and not any('lora_' in k for k in exported)
    import jax.numpy as jnp
    for k, v in final.items():  # the run's own hand-off (merged at the end of training), cast
        assert exported[k].dtype == jnp.bfloat16 and np.array_equal(np.asarray(exported[k]),
                                                                     np.asarray(jnp.asarray(v, jnp.bfloat16))), k
    meta = json.load(open(out + '.json'))
    assert meta['step'] == 6 and meta['merged_lora'] and meta['dtype'] == 'bfloat16'
