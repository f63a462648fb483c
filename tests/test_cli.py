"""The `medplib-jax` entry point, run as a user would (a subprocess)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, devices=1):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    return subprocess.run([sys.executable, '-m', 'medplib_jax.cli', *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def test_demo_runs_on_one_device():
    res = _run('demo', '--config.smoke.seq_len=8')
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1}" in res.stdout
    assert re.search(r'576 image tokens \+ region \+ text -> logits \(4, 592, 576\)', res.stdout)
    assert 'mask at the original 300x484' in res.stdout
    assert 'greedy decode (KV cache)' in res.stdout


def test_demo_with_moe_reports_router_load():
    res = _run('demo', '--config=configs/common.py:moe=dense', '--config.smoke.seq_len=8')
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'MoE, training mode (capacity factor 1.5, top-1): aux loss' in res.stdout
    assert 'tokens per expert by layer' in res.stdout


def test_demo_runs_sharded_on_eight_devices():
    res = _run('demo', '--config.mesh.fsdp=2', '--config.mesh.tensor=2', '--config.smoke.batch_size=4',
               '--config.smoke.seq_len=8', devices=8)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in res.stdout
    assert 'Involuntary full rematerialization' not in res.stderr


@pytest.mark.parametrize('args,message', [
    (('demo', '--config.mesh.fsdpp=2'), "--config.mesh.fsdpp: no such config field 'fsdpp'"),
    (('demo', '--config.smoke.batch_size=3'), 'config.smoke.batch_size=3 is not divisible by mesh data x fsdp = 8'),
    (('demo', '--config=configs/common.py:moe=dense', '--config.smoke.batch_size=16', '--config.model.moe.group_size=3'),
     'medplib-jax demo: config.smoke.batch_size=16 is not a multiple of config.model.moe.group_size=3'),
    (('demo', '--config.model.moe.top_k=3'), 'medplib-jax demo: moe.top_k=3: only top-1 and top-2 gating exist'),
    (('train',), 'medplib-jax train: training (the stage-parametrised train step) is not implemented yet.'),
    (('fly',), 'expected one command of demo, make-demo-data, train'),
])
def test_errors_are_one_clear_line(args, message):
    res = _run(*args, devices=8)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr[-3000:]
