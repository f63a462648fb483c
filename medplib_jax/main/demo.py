"""The main job on the embedded default: the tiny MedPLIB trained through stages I to IV on synthetic MeCoVQA-like
data on CPU, then evaluated on held-out records against the same model at initialisation.

1. Writes the synthetic set (complex VQA, region VQA with mask / box / point prompts, grounding with `<SEG>`,
   closed questions), train and test splits.
2. Trains configs/demo.py: the four stage configs with `model=tiny`, shortened, each stage starting from the
   previous one's hand-off (stage IV builds its two experts from stages III and II), with progress bars, metrics
   in `workdir/stageN/metrics.jsonl` and TensorBoard events.
3. Restores stage IV's final parameters and runs the paper's evaluators (eval/evaluators.py, as `medplib-jax eval`
   does) on the test split, and the same on the stage-IV model at initialisation (its own initialisers, the
   config's seed, saved as `workdir/init_params`): `workdir/eval/{trained,init}/` hold each one's report.md,
   metrics.json, predictions and pictures.
4. Measures stage IV's routing: the share of grounding questions' tokens sent to the grounding expert (expert 0)
   against VQA questions' tokens, and the same for their reference answers' tokens (teacher-forced).
5. Prints one table (trained beside untrained) and writes it with the routing to `workdir/report.md` and
   `workdir/metrics.json`.
"""
from __future__ import annotations

import importlib
import json
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections as mlc
import numpy as np

from medplib_jax import checkpoint
from medplib_jax.constants import DEMO_NOTICE, IMAGE_TOKEN_INDEX
from medplib_jax.data.pipeline import make_iterator
from medplib_jax.data.records import read_records
from medplib_jax.data.synthetic import FILES, make_demo_data
from medplib_jax.eval.command import run_eval
from medplib_jax.eval.metrics import is_na
from medplib_jax.infer.predict import Predictor, Request
from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM, init_fn
from medplib_jax.train.loop import train
from medplib_jax.train.preemption import Preemption

# The table: (label, evaluator, metric, what the demo must reach (None: no bar)); metrics in percent.
TABLE = (('closed-VQA accuracy (chance 25)', 'omnimedvqa', 'mean_accuracy', 90.0),
         ('open-VQA recall (MeCoVQA-C)', 'mecovqa_c', 'open/recall', None),
         ('region-VQA recall (MeCoVQA-R)', 'mecovqa_r', 'open/recall', None),
         ('mDice (MeCoVQA-G)', 'mecovqa_g', 'mdice', 60.0))
GROUNDING_EXPERT = 0  # expert 0 = stage III's FFN (the reference's `initialize_moe_modules`)


def run_demo(config: mlc.ConfigDict, workdir: str = '', log: Callable[[str], None] = print,
             preemption: Preemption | None = None) -> dict[str, Any]:
    """Runs the demo (config: configs/demo.py); returns metrics.json's content (also written and printed), or {}
    when training was preempted (SIGTERM: `preemption`'s request; the same command resumes)."""
    demo = config.demo
    workdir = workdir or demo.workdir
    if demo.synthetic_images:
        counts = make_demo_data(demo.root, num_images=demo.synthetic_images, seed=config.stages.stage1.seed)
        log(f'synthetic MeCoVQA-like data: {sum(counts.values())} records over {demo.synthetic_images} images in '
            f'{demo.root}')
    start = time.perf_counter()
    results = train(config, workdir, log, preemption=preemption)
    log(f'trained {len(results)} stages in {time.perf_counter() - start:.0f}s:')
    for name, r in results.items():
        if not r.first:  # preempted before its first logged step
            continue
        first = {k: r.first.get(k) for k in ('loss/ce', 'mask/dice')}
        last = {k: r.last.get(k) for k in ('loss/ce', 'mask/dice')}
        dice = (f', mask Dice loss {first["mask/dice"]:.3f} -> {last["mask/dice"]:.3f}'
                if first['mask/dice'] is not None and last['mask/dice'] is not None else '')
        log(f'  {name}: text CE {first["loss/ce"]:.3f} -> {last["loss/ce"]:.3f}{dice} ({r.steps} steps)')
    last_name = list(config.stages)[-1]
    if len(results) < len(config.stages) or results[last_name].preempted:
        log('demo: training was interrupted; run the same command again to resume it')
        return {}
    return evaluate(config, workdir, results[last_name].final_params, log)


def evaluate(config: mlc.ConfigDict, workdir: str, trained: str, log: Callable[[str], None] = print
             ) -> dict[str, Any]:
    """Steps 3 to 5 on the last stage's hand-off `trained`; returns metrics.json's content."""
    demo = config.demo
    untrained = init_params_dir(config.stages[list(config.stages)[-1]], os.path.join(workdir, 'init_params'), log)
    ecfg = eval_config(demo)
    start = time.perf_counter()
    scores = {}
    for which, path in (('trained', trained), ('init', untrained)):
        log(f'=== evaluating the {"trained" if which == "trained" else "untrained (initialised)"} model ===')
        scores[which] = run_eval(path, ecfg, out=os.path.join(workdir, 'eval', which),
                                 num_pictures=demo.eval.pictures, log=log)
    routing = routing_fractions(trained, demo.root, demo.eval.routing_records)
    log(f'evaluated in {time.perf_counter() - start:.0f}s')
    summary = summarize(scores, routing, workdir)
    for line in summary['table']:
        log(line)
    return summary


def init_params_dir(stage: mlc.ConfigDict, path: str, log: Callable[[str], None] = print) -> str:
    """The stage's model (adapters merged away, as its hand-off) at initialisation: its own initialisers and the
    config's seed, written as a params directory `medplib-jax eval` reads."""
    cfg = stage.copy_and_resolve_references()
    cfg.model.lora.rank = 0
    mcfg = MedPLIBConfig.from_model_config(cfg.model)
    model = MedPLIBForCausalLM(mcfg.llm, mcfg=mcfg)
    it = make_iterator(cfg, train=False)  # one batch: the input shapes the initialisers are traced with
    try:
        example = next(it)
    finally:
        it.close()
    params = nn.unbox(jax.jit(init_fn(model, example, cfg.seed))()['params'])
    meta = {'config': cfg.to_dict(), 'stage': 'init', 'merged_lora': False}
    out = checkpoint.save_params(path, params, meta)
    log(f'the stage-IV model at initialisation (seed {cfg.seed}): {out}')
    return out


def eval_config(demo: mlc.ConfigDict) -> mlc.ConfigDict:
    """configs/eval.py over the demo's test split, with the demo's decoding limits."""
    ecfg = importlib.import_module('configs.eval').get_config('data=demo')
    ecfg.data.root = demo.root
    for name, ev in ecfg.evals.items():
        ev.max_new_tokens = int(demo.eval.max_new_tokens[name])
        ev.batch_size = int(demo.eval.batch_size)
        ev.max_records = int(demo.eval.max_records)
    return ecfg


def routing_fractions(params_dir: str, root: str, max_records: int = 0) -> dict[str, float]:
    """Stage IV's routing of held-out records: the share of tokens (every MoE layer) that go to the grounding
    expert, for grounding records and for VQA records (closed and complex); `grounding` / `vqa`: the question's
    tokens (text after the image, up to `ASSISTANT:`), `*_answers`: the reference answer's, teacher-forced."""
    predictor = Predictor.from_params_dir(params_dir)
    out = {}
    for group, kinds in (('grounding', ('grounding',)), ('vqa', ('closed', 'complex'))):
        hits, total = np.zeros(2, np.int64), np.zeros(2, np.int64)  # question, answer
        for kind in kinds:
            records, _ = read_records(os.path.join(root, FILES[kind].format(split='test')), root)
            for rec in records[:max_records or None]:
                question, answer = rec.turns[-1]
                answer_ids = predictor.tokenizer.encode(answer, bos=False)
                ids, experts = predictor.prompt_routing(Request(rec.image, question), answer_ids)
                start, end = np.nonzero(ids == IMAGE_TOKEN_INDEX)[0].max() + 1, len(ids) - len(answer_ids)
                for k, chosen in enumerate((experts[:, start:end], experts[:, end:])):
                    hits[k] += int((chosen == GROUNDING_EXPERT).sum())
                    total[k] += int((chosen >= 0).sum())
        share = 100.0 * hits / np.maximum(total, 1)
        out[group], out[f'{group}_answers'] = float(share[0]), float(share[1])
    return out


def summarize(scores: dict[str, dict], routing: dict[str, float], workdir: str) -> dict[str, Any]:
    """The side-by-side table (markdown lines) -> workdir/report.md and metrics.json. Both carry DEMO_NOTICE when
    the evaluations were synthetic (their metrics.json's `synthetic`: the demo's records always are) and label the
    figures synthetic held-out results; a metric with nothing behind it (null) is n/a in the table, None in JSON."""
    def value(which, evaluator, metric):
        v = scores[which]['evaluators'][evaluator]['metrics'][metric]
        return None if is_na(v) else float(v)

    def fmt(v):
        return 'n/a' if v is None else f'{v:.1f}'
    synthetic = any(s.get('synthetic') for s in scores.values())
    checks = {}
    table = ['| held-out metric (%) | untrained | trained | demo bar |', '|---|---|---|---|']
    for label, evaluator, metric, bar in TABLE:
        init, trained = value('init', evaluator, metric), value('trained', evaluator, metric)
        checks[label] = {'init': init, 'trained': trained, 'bar': bar,
                         'met': (trained is not None and trained >= bar) if bar is not None else None}
        table.append(f'| {label} | {fmt(init)} | {fmt(trained)} | {">= %g" % bar if bar is not None else ""} |')
    for who, key, bar in (('grounding-question', 'grounding', "> VQA's"), ('VQA-question', 'vqa', ''),
                          ('grounding-answer', 'grounding_answers', ''), ('VQA-answer', 'vqa_answers', '')):
        table.append(f'| stage IV: {who} tokens to the grounding expert | | {routing[key]:.1f} | {bar} |')
    summary = {'synthetic': synthetic, **({'notice': DEMO_NOTICE} if synthetic else {}), 'metrics': checks,
               'routing': routing, 'routing_separates': bool(routing['grounding'] > routing['vqa']), 'table': table,
               'eval': {w: os.path.join(workdir, 'eval', w) for w in scores}}
    held_out = 'synthetic held-out' if synthetic else 'held-out'
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'report.md'), 'w') as f:
        f.write(f'# medplib-jax demo: the tiny MedPLIB after stages I-IV, on the {held_out} split\n\n')
        if synthetic:
            f.write(f'> **Synthetic results.** {DEMO_NOTICE}.\n>\n> Every figure below is a synthetic held-out '
                    f'result (the test split `make-demo-data` wrote, of the same synthetic shapes and modalities '
                    f'the model trained on): it shows that training works, not how well a model reads medical '
                    f'images, and is not comparable with the paper\'s.\n\n')
        f.write('\n'.join(table) + '\n\n')
        f.write('Each evaluator\'s own report (with the definition of each metric), predictions and pictures: '
                '`eval/trained/`, `eval/init/`.\n')
    with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    return summary
