"""The paper's evaluators (eval/evaluators.py) and `medplib-jax eval` on a tiny stage IV MoE model over the synthetic
test split: every metric recomputed here from the predictions the evaluator saved (per-item scores from the metrics
module, IoU / Dice / means in NumPy), a 2-way sharded run equal to the unsharded one, and the command as a user runs
it (a subprocess), whose metrics.json equals the in-process result.

The checkpoint is a stage IV hand-off written by `save_params` from a randomly initialised model with the demo's
stage IV config (configs/stage4.py:model=tiny), not a trained one: training even one step compiles the train step
for about 50 s on this machine (89 s for the whole 1-step run), over this file's budget; evaluation reads a
hand-off the same way whatever wrote it (test_predict.py, test_handoff.py cover that path)."""
import json
import math
import os
import re
import shutil
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
from medplib_jax.constants import DEMO_NOTICE
from medplib_jax.data.regions import RegionPrompt
from medplib_jax.data.synthetic import make_demo_data
from medplib_jax.eval import command, evaluators, metrics, report
from medplib_jax.infer.predict import Prediction, Predictor, Request
from medplib_jax.main import demo
from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM
from medplib_jax.tree import flatten, unflatten

pytestmark = [pytest.mark.heavy_module, pytest.mark.slow]

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
    flat = flatten(nn.unbox(shapes)['params'])
    return unflatten({k: (np.ones(s.shape) if k.rsplit('/', 1)[-1] in ('scale', 'weight') else
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
    restored = unflatten(checkpoint.restore_params(path, lambda _k, _s: jax.sharding.SingleDeviceSharding(
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
    # The synthetic records are not the paper's: the demo trains on every modality, so no test / zero-shot split
    # (test_report_on_the_papers_records_shows_the_papers_rows_and_split scores the split on the paper's records)
    assert not [k for k in values if k.startswith(('mecovqa_g/', 'zero_shot/'))]


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
            assert values[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-9, nan_ok=True), (name, key)
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


@pytest.mark.e2e
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
    return subprocess.run([sys.executable, '-m', 'medplib_jax', 'eval', *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


@pytest.mark.e2e
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
            if math.isnan(values[key]):  # nothing behind it: null in metrics.json
                assert got['metrics'][key] is None, (name, key)
            else:
                assert got['metrics'][key] == pytest.approx(values[key], rel=1e-6, abs=1e-6), (name, key)
    rows = [json.loads(line) for line in (out / 'predictions.jsonl').read_text().splitlines()]
    expected = [r for name in summary['evaluators'] for r in env['results'][name][1].rows]
    assert [(r['evaluator'], r['question_id'], r['prediction']) for r in rows] == \
        [(r['evaluator'], r['question_id'], r['prediction']) for r in expected]
    text = (out / 'report.md').read_text()
    for part in ('## Table 1: VQA', '## Table 2: MeCoVQA-G (Dice)', env['path'], summary['date'],
                 '| mecovqa_r | mecovqa_r |', 'this checkpoint', '## Definitions', report.PAPER_RECORDS_RULE):
        assert part in text, part
    _assert_synthetic_report(text, summary, env['root'])
    g = summary['evaluators']['mecovqa_g']['metrics']
    assert f'| this checkpoint | {g["dice/ct"]:.2f} | {g["dice/mr"]:.2f} |' in text
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


@pytest.mark.e2e
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


# --- scoring as the reference's scripts score -------------------------------------------------------------------

def _synthetic_image(env):
    """One of the synthetic images (absolute path): the records below only need a readable picture."""
    folder = os.path.join(env['root'], 'images')
    return os.path.join(folder, sorted(os.listdir(folder))[0])


def _conversation(*turns):
    """(question, answer) pairs -> the records' `conversations`, `<image>` before the first question."""
    out = []
    for k, (q, a) in enumerate(turns):
        out += [{'from': 'human', 'value': ('<image>\n' if k == 0 else '') + q}, {'from': 'gpt', 'value': a}]
    return out


def _build_one(env, kind, records_path, strict=False, **settings):
    """The evaluator `kind` over one records file, built as `eval` builds it over the env's checkpoint."""
    cfg = eval_config()
    cfg.data.root = os.path.dirname(records_path)
    cfg.data.strict = strict
    cfg.evals = {kind: evaluator(kind, os.path.basename(records_path), max_new_tokens=MAX_NEW_TOKENS, **settings)}
    _, evs = command.build(env['path'], cfg, log=lambda _: None)
    return evs[0]


def _answer(monkeypatch, ev, answers):
    """The predictor answers the i-th request with answers[i]; returns the requests it saw."""
    seen = []

    def predict_batch(requests, *, mask, routing):
        seen.extend(requests)
        return [Prediction(answers[len(seen) - len(requests) + k], [1], False) for k in range(len(requests))]
    monkeypatch.setattr(ev.predictor, 'predict_batch', predict_batch)
    return seen


# Multi-turn MeCoVQA-C-like records. vqa_infer.py writes the conversation's FIRST answer as `gt` (gts_list[0][0])
# while the prompt is the conversation up to the last question.
MULTI_TURN = [
    ('m0', 'open', [('What organ is shown?', 'The liver.'), ('Which part of it?', 'The left lobe.')], 'liver lobe'),
    ('m1', 'closed', [('Is it enhanced?', 'Yes.'), ('Is there a lesion?', 'No.')], 'yes'),
    ('m2', 'choice', [('Pick one.', 'B')], 'B'),  # neither open nor closed: cal_metric.py passes it over
    ('m3', 'open', [('Name the organ.', 'Spleen.')], 'spleen spleen'),
]


def test_multi_turn_records_are_scored_against_the_first_answer_as_the_reference(env, tmp_path, monkeypatch):
    records = [{'id': rid, 'image': _synthetic_image(env), 'answer_type': t, 'conversations': _conversation(*turns)}
               for rid, t, turns, _ in MULTI_TURN]
    path = tmp_path / 'multi_turn.json'
    path.write_text(json.dumps(records))
    answers = [pred for _, t, _, pred in MULTI_TURN if t != 'choice']
    # By hand, after normalisation (lower case, periods and articles dropped):
    # first answers (the reference): m0 'liver' vs 'liver lobe': tp 1 (the prediction's count of 'liver'), fp 1
    #   ('lobe'), fn 0 -> P 1/2, R 1, F1 2/3, "exact match" 1 distinct answer word found / 2 prediction tokens = 1/2;
    #   m1 'yes' == 'yes' -> closed hit; m3 'spleen' vs 'spleen spleen': tp 2, fp 0, fn 0 -> P R F1 1, EM 1/2.
    #   Means x100: P (1/2 + 1)/2 = 75, R 100, F1 (2/3 + 1)/2 = 83.33, EM 50, closed 100.
    # last answers: m0 'left lobe' vs 'liver lobe': tp 1, fp 1, fn 1 -> P R F1 1/2; m1 'no' != 'yes' -> miss.
    #   Means: P 75, R 75, F1 75, EM 50 (1/2 and 1/2), closed 0.
    expected = {'first': {'open/precision': 75.0, 'open/recall': 100.0, 'open/f1': 250 / 3,
                          'open/exact_match': 50.0, 'closed/accuracy': 100.0},
                'last': {'open/precision': 75.0, 'open/recall': 75.0, 'open/f1': 75.0, 'open/exact_match': 50.0,
                         'closed/accuracy': 0.0}}
    for turn, want in expected.items():
        settings = {} if turn == 'first' else {'score_turn': 'last'}  # 'first' is the default
        ev = _build_one(env, 'mecovqa_c', str(path), **settings)
        seen = _answer(monkeypatch, ev, answers)
        values = ev.run(env['params'])
        for key, value in want.items():
            assert values[key] == pytest.approx(value, abs=1e-9), (turn, key)
        assert (values['open/count'], values['closed/count'], values['skipped']) == (2, 1, 1)
        # the prompt is the same either way: the earlier turns, then the last question
        assert seen[0].question == 'Which part of it?'
        assert list(seen[0].history) == [('<image>\nWhat organ is shown?', 'The liver.')]
        rows, skips = ev.last.rows, ev.last.skips
        assert [(r['question_id'], r['question'], r['answer'], r['answer_turn']) for r in rows[:2]] == (
            [('m0', 'Which part of it?', 'The liver.', 0), ('m1', 'Is there a lesion?', 'Yes.', 0)] if turn == 'first'
            else [('m0', 'Which part of it?', 'The left lobe.', 1), ('m1', 'Is there a lesion?', 'No.', 1)])
        assert len(skips) == 1 and skips[0]['skipped'] == 'answer_type' and 'multi_turn.json[2] (id m2): field ' \
            'answer_type' in skips[0]['error'] and skips[0]['records_file'] == str(path)
        # --rescore reproduces the numbers from the rows alone, and counts the skip
        out = tmp_path / turn
        report.write_outputs(str(out), [report.EvalResult(ev.name, ev.kind, values, rows, skips, ev.files)],
                             checkpoint=env['path'], date='d')
        again = report.rescore(str(out / 'predictions.jsonl'), evaluators.KINDS)[0]
        assert again.metrics == values and len(again.skips) == 1
        saved = json.loads((out / 'metrics.json').read_text())['evaluators']['mecovqa_c']
        assert saved['skipped'] == 1 and saved['skip_reasons'] == {'answer_type': 1}
        assert '| mecovqa_c | mecovqa_c | ' in (out / 'report.md').read_text() and 'answer_type 1 |' in \
            (out / 'report.md').read_text()
    # an unknown answer_type is an error under config.data.strict, and a typo in the setting always is
    with pytest.raises(ValueError, match=re.escape('multi_turn.json[2] (id m2): field answer_type')):
        _build_one(env, 'mecovqa_c', str(path), strict=True)
    with pytest.raises(ValueError, match=re.escape('config.evals.mecovqa_c.answer_type')):
        _build_one(env, 'mecovqa_c', str(path), answer_type='opne')
    with pytest.raises(ValueError, match=re.escape("config.evals.mecovqa_c.score_turn='middle'")):
        _build_one(env, 'mecovqa_c', str(path), score_turn='middle')


def _qa_tree(root):
    """A QA_information/Open-access folder with a subfolder, as cal_metric_omniMedVQA.py walks it. The top file is
    named z.json and the subfolder a/: os.walk yields the top folder's files before a subfolder's, so 'first' is
    z.json's entry even though a/ sorts first by path."""
    qa = root / 'QA_information' / 'Open-access'
    (qa / 'a').mkdir(parents=True)
    (qa / 'z.json').write_text(json.dumps([
        {'image_path': 'Images/X/1.png', 'modality_type': 'CT(Computed Tomography)'},
        {'image_path': 'Images/X/2.png', 'question': 'no modality_type here'},  # passed over
        {'image_path': 'Images/X/3.png', 'modality_type': 'MR (Mag-netic Resonance Imaging)'},
        {'image_path': 'Images/X/5.png'},  # passed over, and nowhere else: image 5 has no modality
    ]))
    (qa / 'a' / 'b.json').write_text(json.dumps([
        {'image_path': 'Images/X/1.png', 'modality_type': 'X-Ray'},  # repeated, different: the first (CT) wins
        {'image_path': 'Images/X/2.png', 'modality_type': 'Ultrasound'},  # the first entry WITH a modality_type
        {'image_path': 'Images/X/4.png', 'modality_type': 'Fundus Photography'},
        {'image_path': 'Images/X/3.png', 'modality_type': 'MR (Mag-netic Resonance Imaging)'},  # same: no conflict
    ]))
    (qa / 'a' / 'notes.txt').write_text('not JSON, not read')
    return qa


def test_qa_information_lookup_is_cal_metric_omnimedvqas(tmp_path):
    qa = _qa_tree(tmp_path)
    # By hand from get_name_type: walk z.json then a/b.json; keep an image's first entry that has modality_type.
    assert evaluators.qa_modalities(str(qa)) == {
        'Images/X/1.png': 'CT(Computed Tomography)', 'Images/X/2.png': 'Ultrasound',
        'Images/X/3.png': 'MR (Mag-netic Resonance Imaging)', 'Images/X/4.png': 'Fundus Photography'}
    # the stricter switch: one image with two different modalities is an error naming both files
    with pytest.raises(ValueError, match=re.escape(f"{qa / 'a' / 'b.json'}[0]: field modality_type: "
                                                   f"'Images/X/1.png' is 'X-Ray' here but 'CT(Computed Tomography)' "
                                                   f"in {qa / 'z.json'}")):
        evaluators.qa_modalities(str(qa), conflicts='error')
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f'qa_information: {empty}: no QA_information JSON files')):
        evaluators.qa_modalities(str(empty))
    (qa / 'a' / 'bad.json').write_text('{"image_path": 1}')
    with pytest.raises(ValueError, match=re.escape(f"{qa / 'a' / 'bad.json'}: not an OmniMedVQA QA_information "
                                                   'file')):
        evaluators.qa_modalities(str(qa))


def test_omnimedvqa_evaluator_groups_by_the_looked_up_modality(env, tmp_path, monkeypatch):
    qa = _qa_tree(tmp_path)
    images = tmp_path / 'OmniMedVQA' / 'Images' / 'X'
    images.mkdir(parents=True)
    truth = {1: 'glaucoma', 2: 'normal', 3: 'pneumonia', 4: 'cataract', 5: 'tumor'}
    records = []
    for i, answer in truth.items():
        shutil.copyfile(_synthetic_image(env), images / f'{i}.png')
        records.append({'id': f'o{i}', 'image': str(images / f'{i}.png'), 'answer_type': 'closed',
                        'conversations': _conversation(('Which finding?', answer.capitalize() + '.'))})
    path = tmp_path / 'OmniMedVQA_OA.json'
    path.write_text(json.dumps(records))
    ev = _build_one(env, 'omnimedvqa', str(path), qa_information=str(qa))
    _answer(monkeypatch, ev, ['glaucoma', 'normal', 'no finding', 'cataract'])  # image 3 (MR) wrong
    values = ev.run(env['params'])
    # By hand: image 1 CT (z.json's entry, not a/b.json's X-Ray) right, 2 Ultrasound right, 3 MR wrong, 4 Fundus
    # right; image 5 has no modality_type anywhere -> skipped (the reference would stop with a KeyError).
    # Per modality x100: CT 100, US 100, MR 0, Fundus 100; unweighted mean 300 / 4 = 75.
    assert {k: v for k, v in values.items() if k.startswith('accuracy/')} == {
        'accuracy/CT(Computed Tomography)': 100.0, 'accuracy/Ultrasound': 100.0,
        'accuracy/MR (Mag-netic Resonance Imaging)': 0.0, 'accuracy/Fundus Photography': 100.0}
    assert values['mean_accuracy'] == 75.0 and values['count'] == 4 and values['skipped'] == 1
    assert ev.last.skips[0]['skipped'] == 'modality' and "'Images/X/5.png'" in ev.last.skips[0]['error']
    with pytest.raises(ValueError, match=re.escape("OmniMedVQA_OA.json[4] (id o5): field image: 'Images/X/5.png'")):
        _build_one(env, 'omnimedvqa', str(path), strict=True, qa_information=str(qa))
    with pytest.raises(ValueError, match=re.escape('conflicts=error')):
        _build_one(env, 'omnimedvqa', str(path), qa_information=str(qa), qa_conflicts='error')
    # without qa_information a record without modality_type is a counted skip too
    ev = _build_one(env, 'omnimedvqa', str(path))
    assert len(ev.records) == 0 and [s['skipped'] for s in ev.skips] == ['modality'] * 5


# --- honest reports ---------------------------------------------------------------------------------------------

def _defined_terms(text):
    """The terms the report's Definitions section defines (the backticked names of its list)."""
    section = text.split('## Definitions', 1)[1].split('\n## ', 1)[0]
    return {t.strip() for line in re.findall(r'^- `([^`]+)`:', section, re.M) for t in line.split(',')}


def _assert_defined(text, summary):
    """Every metric the report shows is defined (per-modality keys by their pattern)."""
    terms = _defined_terms(text)
    for ev in summary['evaluators'].values():
        for key in ev['metrics']:
            generic = re.sub(r'^(accuracy|count|iou|dice)/.+', r'\1/<modality>', key)
            generic = re.sub(r'^open/bleu_\d$', 'open/bleu_n', generic)
            generic = re.sub(r'^(mecovqa_g|zero_shot)/.+', r'\1/*', generic)
            assert generic in terms, (key, sorted(terms))


def _assert_synthetic_report(text, summary, root):
    """A report on the synthetic records: the notice at the top, no paper rows or zero-shot split, n/a (null)
    for a mean over nothing, every metric shown defined."""
    head = text.split('## Records', 1)[0]
    assert head.startswith('# Evaluation (synthetic)\n') and DEMO_NOTICE in head and root in head
    assert '| MedPLIB (paper) |' not in text and '| zero-shot' not in text and 'zero_shot' not in text
    assert summary['synthetic'] is True and summary['notice'] == DEMO_NOTICE
    assert summary['provenance']['synthetic_records'] == [root]
    assert not any(summary['provenance']['paper_records'].values())
    for name in ('mecovqa_c', 'mecovqa_r'):  # the synthetic C / R files hold no closed question
        got = summary['evaluators'][name]['metrics']
        assert got['closed/count'] == 0 and got['closed/accuracy'] is None
    assert text.count('| closed/accuracy | n/a |') == 2
    _assert_defined(text, summary)


def _grounding_rows(records_file):
    # IoU per sample, by modality: ct 1/2 (Dice 2/3), x 0 (Dice 0), mr 1/3 (Dice 1/2)
    return [{'evaluator': 'mecovqa_g', 'kind': 'mecovqa_g', 'records_file': records_file, 'iou': iou,
             'modality': m, 'question_id': m} for m, iou in (('ct', 0.5), ('x', 0.0), ('mr', 1 / 3))]


def test_report_on_the_papers_records_shows_the_papers_rows_and_split(tmp_path):
    """Named as the reference's test files, in a folder make-demo-data did not write: the paper's rows and Table
    2's split are there; weights trained on synthetic data still carry the notice. The same rows under a
    make-demo-data folder: no paper row, no split, the notice."""
    ckpt = tmp_path / 'ckpt'
    ckpt.mkdir()
    (ckpt / checkpoint.PARAMS_META).write_text(json.dumps({'synthetic_data': True}))
    real, synthetic = tmp_path / 'MeCoVQA', tmp_path / 'demo_data'
    real.mkdir()
    make_demo_data(str(synthetic), num_images=1, seed=0)
    g_cls = evaluators.KINDS['mecovqa_g']
    for folder in (real, synthetic):
        rows = _grounding_rows(str(folder / PAPER_EVAL_FILES['mecovqa']['mecovqa_g']))
        values = g_cls.report(g_cls.score_rows(rows), [])
        vqa = metrics.VQAScores()
        vqa.add_item('liver', 'the liver', 'open')  # P = R = 1, no closed item
        c = report.EvalResult('mecovqa_c', 'mecovqa_c', evaluators.RecordsEvaluator.report(vqa, []), [], [],
                              (str(folder / PAPER_EVAL_FILES['mecovqa']['mecovqa_c']),))
        out = tmp_path / f'out_{folder.name}'
        summary = report.write_outputs(str(out), [c, report.EvalResult('mecovqa_g', 'mecovqa_g', values, rows, [])],
                                       checkpoint=str(ckpt), date='d')
        text = (out / 'report.md').read_text()
        assert json.loads((out / 'metrics.json').read_text()) == summary
        head = text.split('## Records', 1)[0]
        assert DEMO_NOTICE in head and summary['notice'] == DEMO_NOTICE  # the weights are synthetic either way
        assert summary['provenance']['synthetic_weights'] is True
        assert summary['evaluators']['mecovqa_c']['metrics']['closed/accuracy'] is None
        assert '| closed/accuracy | n/a |' in text and 'closed/accuracy | 0.0000' not in text
        _assert_defined(text, summary)
        if folder is real:
            # By hand: test group (Der, CT, PET) has only CT: Dice 2/3 -> 66.67; zero-shot X-Ray 0 and MR 1/2 ->
            # (0 + 50) / 2 = 25.00; mDice over the 3 samples (2/3 + 0 + 1/2) / 3 = 38.89.
            assert values['mecovqa_g/mdice'] == pytest.approx(200 / 3) and values['zero_shot/mdice'] == 25.0
            assert summary['provenance']['paper_records'] == {'mecovqa_c': True, 'mecovqa_g': True}
            assert summary['provenance']['synthetic_records'] == []
            assert ('| MedPLIB (paper) | 79.90 | 59.83 | 64.59 | 68.11 | 28.25 | 44.19 | 27.52 | 35.64 | 25.76 | '
                    '32.27 |') in text
            assert '| this checkpoint | n/a | 66.67 | n/a | 66.67 | 0.00 | n/a | 50.00 | n/a | n/a | 25.00 |' in text
            assert 'zero-shot X-Ray' in text and 'mDice 38.89' in text
            assert '| MedPLIB (paper) | ' in text.split('## Table 1', 1)[1].split('## Table 2', 1)[0]
        else:
            assert not [k for k in values if k.startswith(('mecovqa_g/', 'zero_shot/'))]
            assert summary['provenance']['synthetic_records'] == [str(synthetic)]
            assert summary['provenance']['paper_records'] == {'mecovqa_c': False, 'mecovqa_g': False}
            assert '| MedPLIB (paper) |' not in text and '| zero-shot' not in text and 'zero_shot' not in text
            assert '| this checkpoint | 66.67 | 50.00 | 0.00 |' in text  # CT, MR, X (sorted: ct, mr, x)
    # real weights on records that are not the paper's test files: no notice, no paper rows
    other = tmp_path / 'mine.json'
    summary = report.write_outputs(str(tmp_path / 'out_mine'), [report.EvalResult(
        'mecovqa_g', 'mecovqa_g', values, _grounding_rows(str(other)), [])], checkpoint=str(tmp_path / 'none'),
        date='d')
    text = (tmp_path / 'out_mine' / 'report.md').read_text()
    assert summary['synthetic'] is False and 'notice' not in summary and DEMO_NOTICE not in text
    assert text.startswith('# Evaluation\n') and '| MedPLIB (paper) |' not in text


def test_demo_summary_carries_the_notice_and_na(tmp_path):
    """medplib_jax/main/demo.py `summarize` over two evaluations' metrics.json content (one mean with nothing behind
    it): the notice at the top of report.md and in metrics.json, the figures labelled synthetic held-out, n/a."""
    def scores(offset, recall):
        return {'synthetic': True, 'evaluators': {
            'omnimedvqa': {'metrics': {'mean_accuracy': 25.0 + offset}},
            'mecovqa_c': {'metrics': {'open/recall': recall}},
            'mecovqa_r': {'metrics': {'open/recall': 10.0 + offset}},
            'mecovqa_g': {'metrics': {'mdice': 20.0 + offset}}}}
    routing = {'grounding': 30.0, 'vqa': 20.0, 'grounding_answers': 70.0, 'vqa_answers': 25.0}
    summary = demo.summarize({'trained': scores(70, 40.0), 'init': scores(0, None)}, routing, str(tmp_path))
    text = (tmp_path / 'report.md').read_text()
    head = text.split('| held-out metric (%) |', 1)[0]
    assert 'synthetic held-out split' in head.splitlines()[0] and DEMO_NOTICE in head
    assert '| closed-VQA accuracy (chance 25) | 25.0 | 95.0 | >= 90 |' in text
    assert '| open-VQA recall (MeCoVQA-C) | n/a | 40.0 |  |' in text
    saved = json.loads((tmp_path / 'metrics.json').read_text())
    assert saved == summary and saved['notice'] == DEMO_NOTICE and saved['synthetic'] is True
    assert saved['metrics']['open-VQA recall (MeCoVQA-C)'] == {'init': None, 'trained': 40.0, 'bar': None,
                                                               'met': None}
    assert saved['metrics']['closed-VQA accuracy (chance 25)']['met'] is True
