"""The `medplib-jax` entry point, run as a user would (a subprocess)."""
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, devices=1):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    return subprocess.run([sys.executable, '-m', 'medplib_jax.cli', *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def _demo(tmp_path, *args, config='configs/common.py', devices=1):
    return _run('demo', f'--config={config}', f'--config.data.root={tmp_path}/data',
                f'--config.demo.picture={tmp_path}/batch.png', '--config.demo.synthetic_images=8', *args,
                devices=devices)


def test_demo_runs_on_one_device(tmp_path):
    res = _demo(tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1}" in res.stdout
    assert 'synthetic MeCoVQA-like data: 48 records over 8 images' in res.stdout
    assert re.search(r"pipeline: batch \(4, (640|768|1024)\) .* rows \['\w+', '\w+', '\w+', '\w+'\], skipped none",
                     res.stdout)
    assert re.search(r'576 image tokens \+ regions \+ text -> logits \(4, (640|768|1024), 576\)', res.stdout)
    assert re.search(r'row \d mask at its original \d+x\d+: \d+ pixels above sigmoid 0.1, Dice', res.stdout)
    assert 'greedy decode (KV cache)' in res.stdout
    with Image.open(tmp_path / 'batch.png') as im:
        assert im.width > 600 and im.height > 4 * 200


def test_demo_with_moe_reports_router_load(tmp_path):
    res = _demo(tmp_path, config='configs/common.py:moe=dense')
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'MoE, training mode (capacity factor 1.5, top-1): aux loss' in res.stdout
    assert 'tokens per expert by layer' in res.stdout


def test_demo_runs_sharded_on_eight_devices(tmp_path):
    res = _demo(tmp_path, '--config.mesh.fsdp=2', '--config.mesh.tensor=2', devices=8)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in res.stdout
    assert 'Involuntary full rematerialization' not in res.stderr


def test_data_commands(tmp_path):
    """make-demo-data, check-data (report + picture), to-array-record and build-image-cache as a user runs them."""
    data = tmp_path / 'd'
    res = _run('make-demo-data', str(data), '--num_images=4')
    assert res.returncode == 0 and 'MeCoVQA_Grounding_train.json' in res.stdout, res.stderr[-2000:]
    bad = data / 'bad.jsonl'
    bad.write_text('{"id": "x", "image": "images/none.png", "conversations": '
                   '[{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}\n')
    res = _run('check-data', f'--config.data.root={data}', '--config.data.datasets.complex.path=bad.jsonl',
               f'--picture={tmp_path}/first.png')
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'complex (bad.jsonl): 1 records, 0 good; skipped: image 1' in res.stdout
    assert re.search(r'region \(MeCoVQA_Region_VQA_train.json\): (\d+) records, \1 good; skipped: none', res.stdout)
    assert 'first image: ' in res.stdout and (tmp_path / 'first.png').exists()
    res = _run('check-data', f'--config.data.root={data}', '--config.data.datasets.complex.path=bad.jsonl',
               '--config.data.strict=True')
    assert res.returncode == 2 and re.search(r'medplib-jax check-data: .*bad\.jsonl\[0\] \(line 1\) \(id x\): '
                                             r'field image: .*none\.png: image file not found', res.stderr), \
        res.stderr[-2000:]
    res = _run('to-array-record', str(data / 'MeCoVQA_Region_VQA_train.json'), str(tmp_path / 'r.array_record'))
    assert res.returncode == 0 and re.search(r'r\.array_record: \d+ records', res.stdout), res.stderr[-2000:]
    res = _run('build-image-cache', f'--config.data.root={data}', f'--config.data.image_cache={tmp_path}/cache')
    assert res.returncode == 0 and re.search(r'cache: \d+ images cached, 0 unreadable', res.stdout), \
        res.stderr[-2000:]
    res = _run('build-image-cache', f'--config.data.root={data}')
    assert res.returncode == 2 and 'set --config.data.image_cache=FOLDER' in res.stderr


@pytest.mark.parametrize('args,message', [
    (('demo', '--config.mesh.fsdpp=2'), "--config.mesh.fsdpp: no such config field 'fsdpp'"),
    (('demo', '--config.data.batch_size=3'), 'config.data.batch_size=3 is not divisible by mesh data x fsdp = 8'),
    (('demo', '--config=configs/common.py:moe=dense', '--config.data.batch_size=16', '--config.model.moe.group_size=3'),
     'medplib-jax demo: config.data.batch_size=16 is not a multiple of config.model.moe.group_size=3'),
    (('demo', '--config.model.moe.top_k=3'), 'medplib-jax demo: moe.top_k=3: only top-1 and top-2 gating exist'),
    (('check-data', '--config.data.length_buckets=(900,800)'), 'medplib-jax check-data: config.data.length_buckets'),
    (('train',), 'medplib-jax train: training (the stage-parametrised train step) is not implemented yet.'),
    (('fly',), 'expected one command of demo, make-demo-data, check-data'),
])
def test_errors_are_one_clear_line(args, message):
    res = _run(*args, devices=8)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr[-3000:]
