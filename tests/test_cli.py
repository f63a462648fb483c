"""The `medplib-jax` entry point, run as a user would (a subprocess)."""
import json
import os
import re
import subprocess
import sys

import pytest
from support.commands import run_command

pytestmark = [pytest.mark.heavy_module, pytest.mark.slow, pytest.mark.e2e]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_runs_two_points_and_writes_the_table(tmp_path):
    res = run_command('make-demo-data', str(tmp_path / 'data'), '--num_images=8')
    assert res.returncode == 0, res.stderr[-2000:]
    args = ('--config=configs/stage4.py:model=tiny,init=random', f'--workdir={tmp_path}/sweep',
            f'--config.data.root={tmp_path}/data', '--config.train.max_steps=2', '--config.model.moe.group_size=1',
            '--config.evals.held_out.max_batches=1')
    res = run_command('sweep', *args, '--print-launch')
    assert res.returncode == 0, res.stderr[-2000:]
    launch = res.stdout.strip().splitlines()
    assert len(launch) == 4 and all(line.startswith('medplib-jax train --config=configs/stage4.py') for line in launch)
    assert '--config.model.moe.capacity_factor=1.5' in launch[1] and '--config.model.moe.top_k=2' in launch[3]
    assert '--config.train.max_steps=2' in launch[0]
    # each point trains in sweep/<point>, but {runs} still names the folder holding the sweep (its predecessors)
    assert all(f'--config.train.init.runs={tmp_path}' in line for line in launch)
    # cf1.5_top1 is the stage config's own setting: its programs are test_resume.py's, compiled once per CI run
    res = run_command('sweep', *args, '--points=cf1.5_top1,cf2_top2')
    assert res.returncode == 0, res.stderr[-3000:]
    table = (tmp_path / 'sweep' / 'sweep.md').read_text().splitlines()
    assert table[0].startswith('| point | capacity_factor | top_k | steps | loss |') and len(table) == 4
    assert table[2].startswith('| cf1.5_top1 | 1.5 | 1 | 2 |') and table[3].startswith('| cf2_top2 | 2.0 | 2 | 2 |')
    rows = json.loads((tmp_path / 'sweep' / 'sweep.json').read_text())
    assert all({'dropped', 'load expert_0', 'load expert_1', 'held_out/loss'} <= set(r) for r in rows)
    assert rows[0]['dropped'] > 0 and rows[1]['dropped'] == 0  # top-1 at capacity factor 1.5 drops tokens


def test_max_bad_steps_in_a_row_stop_a_run_with_one_line(tmp_path):
    # lr 1e30: the first real update sends the projector to ~1e30; every later step is non-finite and skipped.
    res = run_command('make-demo-data', str(tmp_path / 'data'), '--num_images=8')
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_command('train', '--config=configs/stage1.py:model=tiny', f'--config.data.root={tmp_path}/data',
               '--config.train.lr=1e30', '--config.train.steps_per_epoch=8', '--config.train.max_bad_steps=3',
               f'--workdir={tmp_path}/stage1')
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r'medplib-jax train: train: 3 non-finite steps in a row up to step \d+ '
                        r'\(config.train.max_bad_steps=3\); parameters of the last good step saved in .*stopped_params',
                        last), last
    assert 'update skipped (1 in a row, 1 in all)' in res.stdout
    assert (tmp_path / 'stage1' / 'stopped_params' / '_CHECKPOINT_METADATA').exists()


def test_data_commands(tmp_path):
    """make-demo-data, check-data (report + picture), to-array-record and build-image-cache as a user runs them."""
    data = tmp_path / 'd'
    res = run_command('make-demo-data', str(data), '--num_images=4')
    assert res.returncode == 0 and 'MeCoVQA_Grounding_train.json' in res.stdout, res.stderr[-2000:]
    bad = data / 'bad.jsonl'
    bad.write_text('{"id": "x", "image": "images/none.png", "conversations": '
                   '[{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}\n')
    res = run_command('check-data', f'--config.data.root={data}', '--config.data.datasets.complex.path=bad.jsonl',
               f'--picture={tmp_path}/first.png')
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'complex (bad.jsonl): 1 records, 0 good; skipped: image 1' in res.stdout
    assert re.search(r'region \(MeCoVQA_Region_VQA_train.json\): (\d+) records, \1 good; skipped: none', res.stdout)
    assert 'first image: ' in res.stdout and (tmp_path / 'first.png').exists()
    res = run_command('check-data', f'--config.data.root={data}', '--config.data.datasets.complex.path=bad.jsonl',
               '--config.data.strict=True')
    assert res.returncode == 2 and re.search(r'medplib-jax check-data: .*bad\.jsonl\[0\] \(line 1\) \(id x\): '
                                             r'field image: .*none\.png: image file not found', res.stderr), \
        res.stderr[-2000:]
    res = run_command('to-array-record', str(data / 'MeCoVQA_Region_VQA_train.json'), str(tmp_path / 'r.array_record'))
    assert res.returncode == 0 and re.search(r'r\.array_record: \d+ records', res.stdout), res.stderr[-2000:]
    res = run_command('build-image-cache', f'--config.data.root={data}', f'--config.data.image_cache={tmp_path}/cache')
    assert res.returncode == 0 and re.search(r'cache: \d+ images cached, 0 unreadable', res.stdout), \
        res.stderr[-2000:]
    res = run_command('build-image-cache', f'--config.data.root={data}')
    assert res.returncode == 2 and 'set --config.data.image_cache=FOLDER' in res.stderr


@pytest.mark.parametrize('args,message', [
    (('check-data', '--config.mesh.fsdpp=2'), "--config.mesh.fsdpp: no such config field 'fsdpp'"),
    (('check-data', '--config=configs/common.py', '--config.mesh.fsdpp=2'), "no such config field 'fsdpp'"),
    (('demo', '--config=configs/common.py'), 'demo: --config must be a multi-stage demo config'),
    (('train', '--config=configs/stage2.py:model=tiny'), 'medplib-jax train: train: set --workdir=DIR'),
    (('train', '--config=configs/stage2.py:model=tiny,init=maybe'), 'config arg init'),
    (('train', '--config=configs/nothere.py', '--workdir={tmp}/run'), 'configs/nothere.py: cannot be loaded'),
    # before the demo data exist: what to run first
    (('train', '--config=configs/demo.py:root={tmp}/nodata', '--workdir={tmp}/run'), 'make-demo-data'),
    (('eval',), 'medplib-jax eval: set --checkpoint=DIR (a run directory or a params directory) or --rescore='),
    (('fly',), 'expected one command of demo, train, sweep, export, eval, chat, serve, convert, compile-check'),
    (('chat', '--checkpoint={tmp}/none', '--image=scan.png', 'What is this?'), 'no parameters here'),
    (('chat', '--workdir={tmp}', '--checkpoint={tmp}/none'), '--workdir does not apply to chat'),
    (('chat', '--config.data.tokenizer={tmp}'), '--config.data.tokenizer does not apply to chat'),
    (('chat', '--temperature=hot'), "--temperature=hot"),
    (('serve', '--checkpoint={tmp}/none'), 'no parameters here'),
    (('convert', 'medplib', '--src={tmp}/none', '--out={tmp}/o'), 'no such directory'),
    (('export', '--workdir={tmp}/none', '--out={tmp}/o'), 'no checkpoints/ here'),
    (('compile-check', '--config=configs/stage4.py:model=tiny'), 'set --topology='),
    (('make-demo-data',), 'make-demo-data takes OUT'),
])
def test_errors_are_one_clear_line(args, message, tmp_path):
    """Every command's error path: exit 2, exactly one line on stderr, no traceback. JAX_PLATFORMS is unset as on a
    user's machine, where the installed libtpu (test extras) would otherwise print its TPU probe on a CPU host."""
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='--xla_force_host_platform_device_count=8')
    env.pop('JAX_PLATFORMS', None)
    res = subprocess.run([sys.executable, '-m', 'medplib_jax', *(a.format(tmp=tmp_path) for a in args)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('medplib-jax'), res.stderr[-3000:]
    assert message in lines[0], lines[0]
    assert not os.path.exists(tmp_path / 'o') and not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_help_lists_each_commands_own_flags_at_once():
    """`medplib-jax COMMAND --help`: that command's flags (not every command's) and examples, without loading a
    model or JAX."""
    for command, present, absent in (('chat', ('--checkpoint', '--image', '--tokenizer', 'examples:'), ('--workdir',
                                                                                                         '--topology')),
                                     ('train', ('--workdir', '--distributed', 'config: --config'), ('--image',)),
                                     ('export', ('--workdir', '--out', 'takes no --config'), ('--checkpoint',))):
        res = subprocess.run([sys.executable, '-m', 'medplib_jax', command, '--help'], capture_output=True,
                             text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, timeout=60)
        assert res.returncode == 0 and not res.stderr, res.stderr
        assert res.stdout.startswith(f'usage: medplib-jax {command}')
        assert all(p in res.stdout for p in present) and not any(a in res.stdout for a in absent), res.stdout
    res = subprocess.run([sys.executable, '-X', 'importtime', '-m', 'medplib_jax', 'chat', '--help'],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, timeout=60)
    imported = {line.split('|')[-1].strip() for line in res.stderr.splitlines() if 'import time' in line}
    assert 'absl.flags' in imported and not {'jax', 'flax', 'grain', 'orbax.checkpoint', 'ml_collections'} & imported
