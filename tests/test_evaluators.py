"""The paper's evaluators (eval/evaluators.py) and `medplib-jax eval` on a tiny stage IV MoE model over the synthetic
test split: every metric recomputed here from the predictions the evaluator saved (per-item scores from the metrics
module, IoU / Dice / means in NumPy), a 2-way sharded run equal to the unsharded one, and the command as a user runs
it (a subprocess), whose metrics.json equals the in-process result.

The checkpoint is a stage IV hand-off written by `save_params` from a randomly initialised model with the demo's
stage IV config (configs/stage4.py:model=tiny), not a trained one: training even one step compiles the train step
for about 50 s on this machine (89 s for the whole 1-step run), over this file's budget; evaluation reads a
hand-off the same way whatever wrote it (test_predict.py, test_handoff.py cover that path)."""
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs.common import PAPER_EVAL_FILES, evaluator
from configs.eval import get_config as eval_config
from configs.stage4 import get_config as stage4_config
from medplib_jax import checkpoint
from medplib_jax.data.regions import RegionPrompt
from medplib_jax.data.synthetic import make_demo_data
from medplib_jax.eval import command, evaluators, metrics
from medplib_jax.infer.predict import Prediction, Predictor, Request
from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM

pytestmark = pytest.mark.heavy_module  # scheduled first (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW_TOKENS = 8  # a random tiny model rarely stops on its own
# Records per evaluator: the synthetic test split of 10 images holds a CT and an MR image (2 records of each kind,
# 6 region records); 3 region records = one image's mask, box and point prompts.
MAX_RECORDS = {'omnimedvqa': 0, 'mecovqa_c': 0, 'mecovqa_r': 3, 'mecovqa_g': 0}
REGION = re.compile(r'<region>([^<]*)</region>')
MASK = re.compile(r'<mask>([^<]*)</mask>')


def _random_params(mcfg, rng):
    """Fresh random parameters of the model's shapes (`eval_shape`: no init program to compile, which takes ~40 s
    on this machine): norm scales 1, everything else N(0, 0.02^2), LLaMA's initializer range."""
    model = MedPLIBForCausalLM(mcfg.llm, mcfg=mcfg)
    ids = jnp.zeros((1, 600), jnp.int32).at[0, 10:586].set(-200)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, jnp.zeros((1, 336, 336, 3)),
                                               jnp.zeros((1, 256, 256, 3)), jnp.zeros((1, 1, 24, 24), jnp.uint8),
                                               method=MedPLIBForCausalLM.forward))
    flat = checkpoint.flatten(nn.unbox(shapes)['params'])
    return checkpoint.unflatten({k: (np.ones(s.shape) if k.rsplit('/', 1)[-1] in ('scale', 'weight') else
                                     rng.normal(0, 0.02, s.shape)).astype(s.dtype) for k, s in flat.items()})


def _settings(name):
    return [f'--config.evals.{name}.max_new_tokens={MAX_NEW_TOKENS}', f'--config.evals.{name}.max_records='
            f'{MAX_RECORDS[name]}']


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """Synthetic data, a stage IV hand-off (LoRA merged, as `final_params`), its evaluators built as `eval` builds
    them, and each one's in-process result."""
    root = str(tmp_path_factory.mktemp('data'))
    make_demo_data(root, num_images=10, seed=0)
    config = stage4_config('model=tiny,init=random')
    config.model.lora.rank = 0  # a hand-off's LoRA is folded into the kernels (params_config reads merged_lora)
    seed = int(os.environ.get('MEDPLIB_TEST_SEED') or int.from_bytes(os.urandom(4), 'little'))
    print(f'random seed (parameters): {seed}')  # MEDPLIB_TEST_SEED replays it (tests/conftest.py)
    params = _random_params(MedPLIBConfig.from_model_config(config.model), np.random.default_rng(seed))
    config.model.lora.rank = 8
    path = checkpoint.save_params(str(tmp_path_factory.mktemp('run') / 'final_params'), params,
                                  {'config': config.to_dict(), 'stage': 'IV', 'merged_lora': True})
    cfg = eval_config()
    cfg.data.root = root
    for name in cfg.evals:
        cfg.evals[name].max_new_tokens = MAX_NEW_TOKENS
        cfg.evals[name].max_records = MAX_RECORDS[name]
    _, evs = command.build(path, cfg, log=lambda _: None)
    evs = {ev.name: ev for ev in evs}
    assert sorted(evs) == sorted(MAX_RECORDS)
    restored = checkpoint.unflatten(checkpoint.restore_params(path, lambda _k, _s: jax.sharding.SingleDeviceSharding(
        jax.devices()[0])))
    results = {}
    for name, ev in evs.items():
        ev.keep = 100 if name == 'mecovqa_g' else 0  # every grounding sample's masks, for the IoU check
        results[name] = (ev.run(restored), ev.last)
    return dict(root=root, path=path, evaluators=evs, params=restored, results=results)


def _records(root, name):
    """The evaluator's records, read here from its JSON file: (record, question, answer) with the region and mask
    references taken out of the text as the records parser does."""
    with open(os.path.join(root, PAPER_EVAL_FILES['demo'][name])) as f:
        records = json.load(f)[:MAX_RECORDS[name] or None]
    return [(r, REGION.sub('<region></region>', r['conversations'][0]['value']),
             MASK.sub('', r['conversations'][1]['value'])) for r in records]


def _mean100(values):
    values = list(values)
    return 100 * sum(values) / len(values) if values else 0.0


def test_rows_are_the_records_and_the_vqa_metrics_recompute_from_them(env):
    for name in ('mecovqa_c', 'mecovqa_r', 'omnimedvqa'):
        values, last = env['results'][name]
        records = _records(env['root'], name)
        rows = last.rows
        assert len(rows) == len(records) >= 2 and not last.skips and values['skipped'] == 0
        for row, (rec, question, answer) in zip(rows, records):
            assert (row['evaluator'], row['kind'], row['question_id']) == (name, name, rec['id'])
            assert row['image'] == os.path.join(env['root'], rec['image'])
            assert (row['question'], row['answer']) == (question, answer)
            assert isinstance(row['prediction'], str)
        if name == 'omnimedvqa':  # closed-set accuracy per modality_type, then their unweighted mean
            by_modality = {}
            for row, (rec, _, answer) in zip(rows, records):
                assert row['modality'] == rec['modality_type']
                by_modality.setdefault(rec['modality_type'], []).append(
                    metrics.normalize_answer(row['prediction']) == metrics.normalize_answer(answer))
            assert len(by_modality) == 2  # CT and MR
            accuracy = {m: _mean100(hits) for m, hits in by_modality.items()}
            for m, acc in accuracy.items():
                assert values[f'accuracy/{m}'] == pytest.approx(acc, abs=1e-9)
            assert values['mean_accuracy'] == pytest.approx(sum(accuracy.values()) / len(accuracy), abs=1e-9)
        else:  # every synthetic C / R record is open: precision and recall averaged over items, x100
            scores = [metrics.open_set_scores(row['prediction'], row['answer']) for row in rows]
            assert all(row['answer_type'] == 'open' for row in rows)
            for key in ('precision', 'recall', 'f1', 'bleu'):
                assert values[f'open/{key}'] == pytest.approx(_mean100(s[key] for s in scores), abs=1e-9)
            assert values['open/count'] == len(rows) and values['closed/count'] == 0


def test_grounding_iou_dice_and_groups_recompute_from_the_masks(env):
    values, last = env['results']['mecovqa_g']
    records = _records(env['root'], 'mecovqa_g')
    assert len(last.kept) == len(last.rows) == len(records) == 2
    ious = {}
    for item, (rec, _, _) in zip(last.kept, records):
        row = item['row']
        with Image.open(os.path.join(env['root'], rec['image'])) as im:
            size = (im.height, im.width)
        with Image.open(os.path.join(env['root'], MASK.search(rec['conversations'][1]['value']).group(1))) as im:
            truth = np.asarray(im.convert('L')) > 0
        pred = item['mask']  # one mask per sample at the original size: the first <SEG>'s or the fallback state's
        assert pred.shape == size and pred.dtype == bool
        union = np.logical_or(pred, truth).sum()
        iou = np.logical_and(pred, truth).sum() / union if union else 0.0
        assert row['iou'] == pytest.approx(iou, abs=1e-6) and row['dice'] == pytest.approx(2 * iou / (1 + iou),
                                                                                            abs=1e-6)
        ious.setdefault(os.path.basename(rec['image']).split('_')[0], []).append(iou)
    dice = {m: _mean100(2 * i / (1 + i) for i in v) for m, v in ious.items()}
    assert sorted(dice) == ['ct', 'mr']
    for m in dice:
        assert values[f'dice/{m}'] == pytest.approx(dice[m], abs=1e-4)
        assert values[f'iou/{m}'] == pytest.approx(_mean100(ious[m]), abs=1e-4)
    everything = [i for v in ious.values() for i in v]
    assert values['mdice'] == pytest.approx(_mean100(2 * i / (1 + i) for i in everything), abs=1e-4)
    assert values['miou'] == pytest.approx(_mean100(everything), abs=1e-4)
    # Table 2's split: CT is a MeCoVQA-G test modality, MR a zero-shot one (one modality present in each)
    assert values['mecovqa_g/mdice'] == pytest.approx(dice['ct'], abs=1e-4)
    assert values['zero_shot/mdice'] == pytest.approx(dice['mr'], abs=1e-4)


def test_scores_of_chosen_answers_are_the_hand_worked_values(env, monkeypatch):
    """A random model's answers score 0; here the predictor answers with texts chosen per record (the reference
    answer, nothing, or a wrong option) and `run` must report their hand-worked scores."""
    chosen = {'mecovqa_c': lambda ans, i: ans if i == 0 else '',  # P = R = (1 + 0 + ...) / n
              'mecovqa_r': lambda ans, i: '' if i == 1 else ans.upper() + '.',  # (1 + 0 + 1) / 3 (normalised)
              'omnimedvqa': lambda ans, i: ans if i == 0 else 'none of them'}  # CT right, MR wrong: mean 50
    for name, answer in chosen.items():
        ev, records = env['evaluators'][name], _records(env['root'], name)
        calls = []

        def predict_batch(requests, *, mask, routing, name=name, answer=answer, calls=calls, records=records):
            assert mask == 'never' and len(requests) == 1  # VQA decodes no mask, one record at a time (batch 1)
            i = len(calls)
            calls.append(requests[0].question)
            return [Prediction(answer(records[i][2], i), [1], False)]
        monkeypatch.setattr(ev.predictor, 'predict_batch', predict_batch)
        values = ev.run(env['params'])
        assert calls == [question for _, question, _ in records]
        if name == 'omnimedvqa':
            assert (values['accuracy/ct'], values['accuracy/mr'], values['mean_accuracy']) == (100.0, 0.0, 50.0)
        else:
            # MeCoVQA-C: the first answer right, the other n - 1 (complex and where-questions) empty
            expected = 100 / len(records) if name == 'mecovqa_c' else 200 / 3
            assert values['open/precision'] == pytest.approx(expected) and values['open/recall'] == pytest.approx(
                expected) and values['open/f1'] == pytest.approx(expected)


def test_a_prediction_equals_the_predict_api_on_the_record(env):
    """The evaluator's request (image, last question, regions) against one built here from the records file."""
    rec, question, _ = _records(env['root'], 'mecovqa_r')[1]  # the box prompt
    kind, values = REGION.search(rec['conversations'][0]['value']).group(1).split(':')
    assert kind == 'box'
    ev = env['evaluators']['mecovqa_r']
    predictor = Predictor(ev.mcfg, env['params'], ev.predictor.tokenizer, max_new_tokens=MAX_NEW_TOKENS)
    with Image.open(os.path.join(env['root'], rec['image'])) as im:
        image = np.asarray(im.convert('RGB'))
    box = tuple(int(v) for v in values.split(','))
    p = predictor.predict_batch([Request(image, question, [RegionPrompt('box', box)])])[0]
    assert env['results']['mecovqa_r'][1].rows[1]['prediction'] == p.text


def test_two_shards_summed_equal_the_unsharded_run(env, monkeypatch):
    """Each evaluator's `run` as process 1 then process 0 of 2 (the gather replaced by the two processes' JSON)
    equals the one-process run: the same metrics and rows in record order."""
    gathered = {}

    def allgather(value):
        gathered[jax.process_index()] = json.loads(json.dumps(value))  # what crosses processes: JSON
        return [gathered[p] for p in sorted(gathered)]

    monkeypatch.setattr(evaluators, 'allgather_json', allgather)
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    for name in ('mecovqa_g', 'mecovqa_r'):
        ev = env['evaluators'][name]
        ev.keep = 0
        gathered.clear()
        for process in (1, 0):
            monkeypatch.setattr(jax, 'process_index', lambda p=process: p)
            values = ev.run(env['params'])
        whole, last = env['results'][name]
        assert [r['question_id'] for r in ev.last.rows] == [r['question_id'] for r in last.rows]
        assert [r['prediction'] for r in ev.last.rows] == [r['prediction'] for r in last.rows]
        assert values.keys() == whole.keys()
        for key in whole:
            assert values[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-9), (name, key)
    assert evaluators.shard_bounds(5, 0, 2) == (0, 3) and evaluators.shard_bounds(5, 1, 2) == (3, 5)


def test_a_training_config_schedules_them_and_bad_settings_are_one_line(env):
    """`config.evals.<name> = evaluator(kind, file, ...)` in a stage config builds the evaluator the training loop
    runs every `every` steps (medplib_jax/train/loop.py imports the kinds); settings and records are checked when
    it is built."""
    from medplib_jax.train.loop import EvalContext, build_evaluators  # the loop's registry: held_out_loss too
    cfg = stage4_config('model=tiny,init=random')
    cfg.data.root = env['root']
    cfg.evals.grounding = evaluator('mecovqa_g', PAPER_EVAL_FILES['demo']['mecovqa_g'], every=5, max_new_tokens=8)
    built = {ev.name: ev for ev in build_evaluators(EvalContext(cfg, None, None, (), log=lambda _: None))}
    ground = built['grounding']
    assert isinstance(ground, evaluators.MeCoVQAGrounding) and ground.every == 5 and len(ground.records) == 2
    assert ground.predictor.mcfg.llm.lora.rank == 8  # training's own model (adapters unmerged), not a hand-off's
    bad = [(evaluator('mecovqa_g', PAPER_EVAL_FILES['demo']['mecovqa_c']),
            'MeCoVQA_Complex_VQA_test.json[0] (id c4): field conversations: no <mask>'),
           (evaluator('mecovqa_c', PAPER_EVAL_FILES['demo']['mecovqa_c'], qa_information='/qa'),
            "config.evals.bad.qa_information: not a setting of kind 'mecovqa_c'"),
           (evaluator('mecovqa_c', PAPER_EVAL_FILES['demo']['mecovqa_c'], system='chatty'),
            "config.evals.bad.system='chatty'")]
    for settings, message in bad:
        cfg.evals = {'bad': settings}
        with pytest.raises(ValueError, match=re.escape(message)):
            build_evaluators(EvalContext(cfg, None, None, (), log=lambda _: None))


# One of two real JAX processes: gathers a JSON value of a different size in each (allgather_json pads the bytes).
GATHER_WORKER = """
import json, os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
os.environ['JAX_PLATFORMS'] = 'cpu'
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2, process_id=pid)
from medplib_jax.eval.evaluators import allgather_json
print(json.dumps(allgather_json({'process': pid, 'rows': ['é' * (5 + 40 * pid)]})))
"""


def test_allgather_json_across_two_real_processes():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, '-c', GATHER_WORKER, str(p), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for p in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    expected = [{'process': p, 'rows': ['é' * (5 + 40 * p)]} for p in range(2)]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1]) == expected


def _cli(*args):
    # This process's XLA_FLAGS and JAX compilation cache (tests/conftest.py): the command's programs are the ones
    # the fixture compiled
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, '-m', 'medplib_jax.cli', 'eval', *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def test_eval_command_writes_the_report_whose_numbers_are_the_evaluators(env, tmp_path):
    run_dir = os.path.dirname(env['path'])  # a run directory: eval reads its final_params, writes its eval/
    out = tmp_path / 'eval'
    settings = [s for name in MAX_RECORDS for s in _settings(name)]
    res = _cli(f'--checkpoint={run_dir}', f'--config.data.root={env["root"]}', *settings, '--num_pictures=2')
    assert res.returncode == 0, res.stderr[-3000:]
    os.rename(os.path.join(run_dir, 'eval'), out)
    assert 'Traceback' not in res.stderr
    assert 'eval mecovqa_g: 100%' in res.stderr  # the progress bar
    assert re.search(r'eval mecovqa_g: 2 records \(0 skipped\) in [\d.]+s: mdice [\d.]+, miou [\d.]+', res.stdout)
    summary = json.loads((out / 'metrics.json').read_text())
    assert summary['checkpoint'] == env['path'] and summary['date']
    assert sorted(summary['evaluators']) == sorted(MAX_RECORDS)
    for name, (values, last) in env['results'].items():
        got = summary['evaluators'][name]
        assert got['kind'] == name and got['records'] == len(last.rows) and got['skipped'] == 0
        assert got['metrics'].keys() == values.keys()
        for key in values:
            assert got['metrics'][key] == pytest.approx(values[key], rel=1e-6, abs=1e-6), (name, key)
    rows = [json.loads(line) for line in (out / 'predictions.jsonl').read_text().splitlines()]
    expected = [r for name in summary['evaluators'] for r in env['results'][name][1].rows]
    assert [(r['evaluator'], r['question_id'], r['prediction']) for r in rows] == \
        [(r['evaluator'], r['question_id'], r['prediction']) for r in expected]
    report = (out / 'report.md').read_text()
    for text in ('## Table 1: VQA', '## Table 2: MeCoVQA-G (Dice)', env['path'], summary['date'],
                 '| mecovqa_r | mecovqa_r |', 'this checkpoint', 'MedPLIB (paper)'):
        assert text in report, text
    g = summary['evaluators']['mecovqa_g']['metrics']
    assert 'test CT' in report and f'{g["dice/ct"]:.2f}' in report and f'{g["zero_shot/mdice"]:.2f}' in report
    # overlays of the first 2 grounding samples, routing pictures of the first 2 samples of every evaluator (MoE)
    assert sorted(p.name for p in (out / 'pictures').iterdir()) == ['mecovqa_g_00.png', 'mecovqa_g_01.png']
    assert len(list((out / 'routing').iterdir())) == 2 * len(MAX_RECORDS)
    with Image.open(out / 'pictures' / 'mecovqa_g_00.png') as im:
        assert im.width > 200 and im.height > 200
    # --rescore: the same metrics from predictions.jsonl alone
    res = _cli(f'--rescore={out / "predictions.jsonl"}', f'--out={tmp_path / "rescored"}')
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((tmp_path / 'rescored' / 'metrics.json').read_text())
    for name in MAX_RECORDS:
        assert again['evaluators'][name]['metrics'] == pytest.approx(summary['evaluators'][name]['metrics'])


def test_eval_errors_are_one_line(env, tmp_path):
    cases = [((f'--checkpoint={tmp_path}/nothing',), 'no parameters here'),
             ((f'--checkpoint={env["path"]}', '--evals=mecovqa_g,vqa_rad'),
              "--evals: unknown evaluator 'vqa_rad'; known: mecovqa_c, mecovqa_g, mecovqa_r, omnimedvqa"),
             ((f'--checkpoint={env["path"]}', f'--config.data.root={tmp_path}'),
              'MeCoVQA_Complex_VQA_test.json: records file not found')]
    for args, message in cases:
        res = _cli(*args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith('medplib-jax eval: '), res.stderr
        assert message in lines[0], lines[0]
