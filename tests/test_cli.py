"""The `medplib-jax` entry point, run as a user would (a subprocess)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.heavy_module  # scheduled first (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, devices=1, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    return subprocess.run([sys.executable, '-m', 'medplib_jax.cli', *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


# The main job shortened to what still learns (the same code path; 315 s alone on the 2-core machine, the full
# demo 839 s with its install): 250 stage-II steps answer all four held-out closed questions (100 steps: none) and
# 100 stage-III steps take mDice from the untrained 6.3 to 38.6; open / region recall 33.3 / 25.0 against 0 (answers
# cut to 6 tokens). 20 images hold out one image of each modality.
DEMO_STEPS = '5:250:100:5'
DEMO_IMAGES = 20


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """The demo as a user runs it, shortened (steps, images, answer lengths): the same code path."""
    tmp_path = tmp_path_factory.mktemp('demo')
    res = _run('demo', f'--config=configs/demo.py:root={tmp_path}/data,steps={DEMO_STEPS},images={DEMO_IMAGES}',
               f'--workdir={tmp_path}/runs', *(f'--config.demo.eval.max_new_tokens.{k}={n}' for k, n in
                                               (('mecovqa_c', 6), ('mecovqa_r', 6), ('omnimedvqa', 4))),
               timeout=1200)
    return tmp_path, res


def test_demo_trains_every_stage_logs_it_and_evaluates_the_trained_model_against_the_untrained(demo_run):
    tmp_path, res = demo_run
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert f'synthetic MeCoVQA-like data: 170 records over {DEMO_IMAGES} images' in out
    for stage, steps in zip(('I', 'II', 'III', 'IV'), DEMO_STEPS.split(':')):
        assert re.search(rf'stage {stage} done: loss [\d.]+ -> [\d.]+ over {steps} steps; hand-off', out), stage
    assert re.search(rf'stage3: text CE [\d.]+ -> [\d.]+, mask Dice loss [\d.]+ -> [\d.]+ '
                     rf'\({DEMO_STEPS.split(":")[2]} steps\)', out)
    assert 'init: 6 arrays (98,304 parameters) from init.experts' in out  # stage IV's experts from III and II
    assert 'train step compiled for length' in out and 'memory per device: arguments' in out
    # Evaluated: the trained and the initialised model by the paper's evaluators, side by side, and the routing.
    runs = tmp_path / 'runs'
    summary = json.loads((runs / 'metrics.json').read_text())
    assert set(summary['metrics']) == {'closed-VQA accuracy (chance 25)', 'open-VQA recall (MeCoVQA-C)',
                                       'region-VQA recall (MeCoVQA-R)', 'mDice (MeCoVQA-G)'}
    for which in ('trained', 'init'):
        scores = json.loads((runs / 'eval' / which / 'metrics.json').read_text())['evaluators']
        assert set(scores) == {'omnimedvqa', 'mecovqa_c', 'mecovqa_r', 'mecovqa_g'}
        for row in summary['metrics'].values():
            assert 0.0 <= row[which] <= 100.0
        assert summary['metrics']['mDice (MeCoVQA-G)'][which] == scores['mecovqa_g']['metrics']['mdice']
        assert (runs / 'eval' / which / 'report.md').exists() and (runs / 'eval' / which / 'predictions.jsonl').exists()
    for metric, row in summary['metrics'].items():  # it learns: the trained model beats the untrained on every metric
        assert row['trained'] > row['init'], (metric, row)
    assert summary['metrics']['closed-VQA accuracy (chance 25)']['trained'] >= 90  # the demo's bar (measured: 100)
    assert list((runs / 'eval' / 'trained' / 'pictures').glob('*.png'))
    assert sorted(summary['routing']) == ['grounding', 'grounding_answers', 'vqa', 'vqa_answers']
    assert all(0.0 <= v <= 100.0 for v in summary['routing'].values())
    table = (runs / 'report.md').read_text()
    assert '| held-out metric (%) | untrained | trained | demo bar |' in table and table.count('\n|') >= 7
    assert all(line in out for line in summary['table'])  # the table is printed too
    assert (runs / 'init_params' / 'medplib.json').exists()
    assert 'Traceback' not in res.stderr
    # Every stage's logs: metrics.jsonl and TensorBoard events with the same losses, and its hand-off.
    for k, steps in enumerate(map(int, DEMO_STEPS.split(':')), start=1):
        stage = tmp_path / 'runs' / f'stage{k}'
        lines = [json.loads(line) for line in (stage / 'metrics.jsonl').read_text().splitlines()]
        train = [m for m in lines if 'loss' in m]
        assert train[-1]['step'] == steps and all(np.isfinite(m['loss']) for m in train)
        assert {'loss/ce', 'grad_norm', 'lr', 'accuracy', 'tokens/supervised', 'perf/tokens_per_s',
                'data/records_seen'} <= set(train[-1])
        assert any('eval/held_out/loss' in m for m in lines) or k == 1
        events = _events(next((stage / 'tensorboard').glob('events.out.tfevents.*')))
        assert [s for s, _ in events['loss']] == [m['step'] for m in train]
        assert np.allclose([v for _, v in events['loss']], [m['loss'] for m in train], rtol=1e-6)
        assert (stage / 'final_params' / '_CHECKPOINT_METADATA').exists()
        meta = json.loads((stage / 'final_params' / 'medplib.json').read_text())
        assert meta['synthetic_data'] and (stage / 'final_params' / 'tokenizer' / 'tokenizer.model').exists()
        assert meta['stage'] == ['I', 'II', 'III', 'IV'][k - 1] and 'jax' in meta['versions']
    lines = [json.loads(line) for line in (tmp_path / 'runs' / 'stage4' / 'metrics.jsonl').read_text().splitlines()]
    last = [m for m in lines if 'loss' in m][-1]
    assert {'moe/drop_fraction/layer_0', 'moe/load/layer_1/expert_0', 'mask/dice'} <= set(last)



def _moved_demo(demo_run):
    """The demo's stage-IV run directory copied to a new place, and its test records and images copied elsewhere
    without the demo tokenizer's folder: whatever works from there uses the tokenizer the checkpoint carries."""
    import shutil
    tmp_path, res = demo_run
    assert res.returncode == 0, res.stderr[-3000:]
    moved = tmp_path / 'moved'
    if not moved.exists():
        shutil.copytree(tmp_path / 'runs' / 'stage4', moved / 'stage4')
        shutil.copytree(tmp_path / 'data', moved / 'data', ignore=shutil.ignore_patterns('tokenizer'))
        (moved / 'elsewhere').mkdir()
    return tmp_path, moved


def test_a_copied_demo_run_answers_and_evaluates_from_another_directory(demo_run):
    """chat and eval on the copied stage-IV run, from a third working directory: the same answer as from the
    original run, the demo-weights notice, and the evaluator's numbers equal the demo's own evaluation."""
    tmp_path, moved = _moved_demo(demo_run)
    image = sorted((moved / 'data' / 'images').glob('ct_*.png'))[0]
    question = 'Could you segment out the liver in this image?'
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    answers = []
    for k, (checkpoint, cwd) in enumerate(((tmp_path / 'runs' / 'stage4', ROOT),
                                           (moved / 'stage4', moved / 'elsewhere'))):
        res = subprocess.run([sys.executable, '-m', 'medplib_jax.cli', 'chat', f'--checkpoint={checkpoint}',
                              f'--image={image}', '--max_new_tokens=8', f'--out={moved}/overlay_{k}.png', question],
                             capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        answers.append([line.split('; overlay ')[0] for line in res.stdout.splitlines()])  # paths differ
        assert 'note: synthetic-data demo weights' in res.stderr and 'Traceback' not in res.stderr
    assert answers[0] == answers[1] and answers[0][0].strip()
    out = moved / 'elsewhere' / 'eval'
    res = subprocess.run([sys.executable, '-m', 'medplib_jax.cli', 'eval', f'--checkpoint={moved}/stage4',
                          f'--config.data.root={moved}/data', '--evals=mecovqa_g',
                          '--config.evals.mecovqa_g.max_new_tokens=4', '--config.evals.mecovqa_g.batch_size=8',
                          f'--out={out}'], capture_output=True, text=True, env=env, cwd=moved / 'elsewhere',
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((out / 'metrics.json').read_text())
    demo = json.loads((tmp_path / 'runs' / 'eval' / 'trained' / 'metrics.json').read_text())
    assert got['evaluators']['mecovqa_g']['metrics'] == demo['evaluators']['mecovqa_g']['metrics']
    assert got['synthetic'] and 'synthetic' in (out / 'report.md').read_text().lower()


def test_a_copied_demo_run_serves_the_page_from_another_directory(demo_run):
    """`serve` on the copied stage-IV run, started from a third directory: the page (headless chromium) answers a
    grounding question with the answer `chat` gives on the same image (greedy), and SIGTERM stops it cleanly."""
    from browser import ask_page, serving
    tmp_path, moved = _moved_demo(demo_run)
    image = sorted((moved / 'data' / 'images').glob('ct_*.png'))[0]
    question = 'Could you segment out the liver in this image?'
    log = moved / 'elsewhere' / 'serve.log'
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    with serving(str(moved / 'stage4'), str(log), '--temperature=0', '--shortest_edge=0', '--max_new_tokens=8',
                 cwd=str(moved / 'elsewhere'), env=env) as server:
        answer = ask_page(server.url, str(image), question)
        status = server.stop()
    assert status == 0 and 'Traceback' not in log.read_text(), log.read_text()[-3000:]
    res = subprocess.run([sys.executable, '-m', 'medplib_jax.cli', 'chat', f'--checkpoint={moved}/stage4',
                          f'--image={image}', '--max_new_tokens=8', f'--out={moved}/elsewhere/o.png', question],
                         capture_output=True, text=True, env=dict(env, PYTHONPATH=ROOT), cwd=moved / 'elsewhere',
                         timeout=600)
    assert res.returncode == 0 and not answer.errors, (res.stderr[-2000:], answer.errors)
    said = res.stdout.splitlines()[0]
    if '<SEG>' in said:  # the page shows the mask's size in its place
        assert answer.mask and 'mask: ' in answer.text and '<SEG>' not in answer.text
        assert answer.text.replace(answer.text[answer.text.index('mask: '):].split(' px')[0] + ' px', '<SEG>', 1) \
            == said
    else:
        assert answer.text == said


@pytest.mark.parametrize('name', ['quickstart', 'evaluate_checkpoint'])
def test_notebook_runs_on_the_demos_outputs(demo_run, name, monkeypatch):
    """Both notebooks execute without error on the demo's checkpoint and data (nbclient, a real kernel)."""
    import nbclient
    import nbformat
    tmp_path, res = demo_run
    assert res.returncode == 0, res.stderr[-3000:]
    monkeypatch.setenv('MEDPLIB_DEMO_DIR', str(tmp_path / 'runs'))
    monkeypatch.setenv('MEDPLIB_DEMO_DATA', str(tmp_path / 'data'))
    monkeypatch.setenv('PYTHONPATH', ROOT)
    notebook = nbformat.read(os.path.join(ROOT, 'notebooks', f'{name}.ipynb'), as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': ROOT}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == 'error']
    if name == 'quickstart':  # the overlay and the routing picture are shown inline
        assert sum('image/png' in o.get('data', {}) for o in outputs) >= 2
    else:
        assert (tmp_path / 'runs' / 'notebook_eval' / 'report.md').exists()


def test_notebooks_are_stored_without_outputs():
    import nbformat
    for name in ('quickstart', 'evaluate_checkpoint'):
        notebook = nbformat.read(os.path.join(ROOT, 'notebooks', f'{name}.ipynb'), as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == 'code']
        assert code and all(not cell.outputs and cell.execution_count is None for cell in code), name

def _events(path):
    """Scalar summaries in a TensorBoard event file, read with the TFRecord framing and tensorboardX's protos."""
    import struct
    from tensorboardX.proto import event_pb2
    tags = {}
    with open(path, 'rb') as f:
        data = f.read()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack('<Q', data[offset:offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append((event.step, value.simple_value))
    return tags


def test_sweep_runs_two_points_and_writes_the_table(tmp_path):
    res = _run('make-demo-data', str(tmp_path / 'data'), '--num_images=8')
    assert res.returncode == 0, res.stderr[-2000:]
    args = ('--config=configs/stage4.py:model=tiny,init=random', f'--workdir={tmp_path}/sweep',
            f'--config.data.root={tmp_path}/data', '--config.train.max_steps=2', '--config.model.moe.group_size=1',
            '--config.evals.held_out.max_batches=1')
    res = _run('sweep', *args, '--print-launch')
    assert res.returncode == 0, res.stderr[-2000:]
    launch = res.stdout.strip().splitlines()
    assert len(launch) == 4 and all(line.startswith('medplib-jax train --config=configs/stage4.py') for line in launch)
    assert '--config.model.moe.capacity_factor=1.5' in launch[1] and '--config.model.moe.top_k=2' in launch[3]
    assert '--config.train.max_steps=2' in launch[0]
    # each point trains in sweep/<point>, but {runs} still names the folder holding the sweep (its predecessors)
    assert all(f'--config.train.init.runs={tmp_path}' in line for line in launch)
    # cf1.5_top1 is the stage config's own setting: its programs are test_resume.py's, compiled once per CI run
    res = _run('sweep', *args, '--points=cf1.5_top1,cf2_top2')
    assert res.returncode == 0, res.stderr[-3000:]
    table = (tmp_path / 'sweep' / 'sweep.md').read_text().splitlines()
    assert table[0].startswith('| point | capacity_factor | top_k | steps | loss |') and len(table) == 4
    assert table[2].startswith('| cf1.5_top1 | 1.5 | 1 | 2 |') and table[3].startswith('| cf2_top2 | 2.0 | 2 | 2 |')
    rows = json.loads((tmp_path / 'sweep' / 'sweep.json').read_text())
    assert all({'dropped', 'load expert_0', 'load expert_1', 'held_out/loss'} <= set(r) for r in rows)
    assert rows[0]['dropped'] > 0 and rows[1]['dropped'] == 0  # top-1 at capacity factor 1.5 drops tokens


def test_max_bad_steps_in_a_row_stop_a_run_with_one_line(tmp_path):
    # lr 1e30: the first real update sends the projector to ~1e30; every later step is non-finite and skipped.
    res = _run('make-demo-data', str(tmp_path / 'data'), '--num_images=8')
    assert res.returncode == 0, res.stderr[-2000:]
    res = _run('train', '--config=configs/stage1.py:model=tiny', f'--config.data.root={tmp_path}/data',
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
    (('check-data', '--config.mesh.fsdpp=2'), "--config.mesh.fsdpp: no such config field 'fsdpp'"),
    (('check-data', '--config=configs/common.py', '--config.mesh.fsdpp=2'), "no such config field 'fsdpp'"),
    (('demo', '--config=configs/common.py'), 'demo: --config must be a multi-stage demo config'),
    (('check-data', '--config.data.length_buckets=(900,800)'), 'medplib-jax check-data: config.data.length_buckets'),
    (('train', '--config=configs/stage2.py:model=tiny'), 'medplib-jax train: train: set --workdir=DIR'),
    (('train', '--config=configs/stage2.py:model=tiny,init=maybe'), 'config arg init'),
    (('train', '--config=configs/nothere.py', '--workdir={tmp}/run'), 'configs/nothere.py: cannot be loaded'),
    # before the demo data exist: what to run first
    (('train', '--config=configs/demo.py:root={tmp}/nodata', '--workdir={tmp}/run'), 'make-demo-data'),
    (('eval',), 'medplib-jax eval: set --checkpoint=DIR (a run directory or a params directory) or --rescore='),
    (('eval', '--checkpoint={tmp}/none'), 'no parameters here'),
    (('fly',), 'expected one command of demo, train, sweep, export, eval, chat, serve, convert, compile-check'),
    (('chat', '--checkpoint={tmp}/none', '--image=scan.png', 'What is this?'), 'no parameters here'),
    (('chat', '--workdir={tmp}', '--checkpoint={tmp}/none'), '--workdir does not apply to chat'),
    (('chat', '--config.data.tokenizer={tmp}'), '--config.data.tokenizer does not apply to chat'),
    (('chat', '--temperature=hot'), "--temperature=hot"),
    (('serve', '--checkpoint={tmp}/none'), 'no parameters here'),
    (('convert', 'medplib', '--src={tmp}/none', '--out={tmp}/o'), 'no such directory'),
    (('convert', 'vicuna', '--src={tmp}/none', '--out={tmp}/o'), 'PART must be one of'),
    (('export', '--workdir={tmp}/none', '--out={tmp}/o'), 'no checkpoints/ here'),
    (('compile-check', '--config=configs/stage4.py:model=tiny'), 'set --topology='),
    (('make-demo-data',), 'make-demo-data takes OUT'),
    (('make-demo-data', '{tmp}/d', '--port=1'), '--port does not apply to make-demo-data'),
])
def test_errors_are_one_clear_line(args, message, tmp_path):
    """Every command's error path: exit 2, exactly one line on stderr, no traceback. JAX_PLATFORMS is unset as on a
    user's machine, where the installed libtpu (test extras) would otherwise print its TPU probe on a CPU host."""
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='--xla_force_host_platform_device_count=8')
    env.pop('JAX_PLATFORMS', None)
    res = subprocess.run([sys.executable, '-m', 'medplib_jax.cli', *(a.format(tmp=tmp_path) for a in args)],
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
        res = subprocess.run([sys.executable, '-m', 'medplib_jax.cli', command, '--help'], capture_output=True,
                             text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, timeout=60)
        assert res.returncode == 0 and not res.stderr, res.stderr
        assert res.stdout.startswith(f'usage: medplib-jax {command}')
        assert all(p in res.stdout for p in present) and not any(a in res.stdout for a in absent), res.stdout
    res = subprocess.run([sys.executable, '-X', 'importtime', '-m', 'medplib_jax.cli', 'chat', '--help'],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, timeout=60)
    imported = {line.split('|')[-1].strip() for line in res.stderr.splitlines() if 'import time' in line}
    assert 'absl.flags' in imported and not {'jax', 'flax', 'grain', 'orbax.checkpoint', 'ml_collections'} & imported
