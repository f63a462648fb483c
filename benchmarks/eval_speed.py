"""How long `medplib-jax eval` takes over the demo's held-out set: whole processes, as a user starts them, with the
seconds each evaluator reports (its records, decoding, masks and routing pictures; compiling included).

The data is the synthetic demo set (`make-demo-data`, --num_images) and the checkpoint the demo's stage-IV model at
initialisation (random weights: the same programs and shapes as the trained demo; an untrained model rarely emits
`<SEG>`, but the grounding evaluator asks for every mask, `mask='always'`, so the mask programs run all the same).
The evaluators decode as the demo does (its max_new_tokens per evaluator, batches of 8, pictures of the first 4
samples: their routing). No compilation cache (`--compilation_cache=off`): every run compiles, as the first on a
machine. With --baseline (another checkout of the project, e.g. the commit before a change), its runs alternate with
this tree's (A B A B ...), so a drift of the shared machine's speed hits both alike.

    python benchmarks/eval_speed.py [--baseline /tmp/base-checkout] [--runs 3] [--num_images 20]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from results_file import write_result  # noqa: E402  (benchmarks/results_file.py)

_REPORTED = re.compile(r'eval (\w+): (\d+) records .* in ([\d.]+)s')


def demo_checkpoint(folder: str, num_images: int) -> tuple[str, str, dict]:
    """(params directory, data root, the demo's eval settings): the demo's stage-IV model at initialisation over
    freshly written demo data."""
    import importlib

    from medplib_jax import runtime
    from medplib_jax.data.synthetic import make_demo_data
    runtime.host_platforms()
    from medplib_jax.main.demo import init_params_dir
    data = os.path.join(folder, 'data')
    make_demo_data(data, num_images=num_images, seed=0)
    config = importlib.import_module('configs.demo').get_config(f'root={data}')
    path = init_params_dir(config.stages.stage4, os.path.join(folder, 'params'), log=lambda _: None)
    return path, data, config.demo.eval.to_dict()


def eval_flags(checkpoint: str, data: str, settings: dict, out: str) -> list[str]:
    flags = [f'--checkpoint={checkpoint}', f'--config.data.root={data}', f'--out={out}', '--compilation_cache=off',
             f'--num_pictures={settings["pictures"]}']
    for name, tokens in settings['max_new_tokens'].items():
        flags += [f'--config.evals.{name}.max_new_tokens={tokens}', f'--config.evals.{name}.batch_size='
                  f'{settings["batch_size"]}', f'--config.evals.{name}.max_records={settings["max_records"]}']
    return flags


def timed_run(tree: str, flags: list[str]) -> dict[str, float]:
    """One `medplib-jax eval` process of the checkout `tree`: its wall seconds and each evaluator's own."""
    env = dict(os.environ, PYTHONPATH=tree)
    env.pop('JAX_COMPILATION_CACHE_DIR', None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, '-m', 'medplib_jax', 'eval', *flags], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=1800)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f'eval in {tree} exited with {proc.returncode}: {proc.stderr[-2000:]}')
    found = {m.group(1): float(m.group(3)) for m in _REPORTED.finditer(proc.stdout + proc.stderr)}
    return dict(total_s=total, evaluators_s=sum(found.values()), **{f'{k}_s': v for k, v in sorted(found.items())})


def summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: dict(min=min(r[k] for r in runs), median=sorted(r[k] for r in runs)[len(runs) // 2],
                    max=max(r[k] for r in runs)) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--baseline', default='', help='another checkout of the project to time alongside')
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--num_images', type=int, default=20)
    parser.add_argument('--out', default='')
    a = parser.parse_args()
    trees = {'this': ROOT, **({'baseline': os.path.abspath(a.baseline)} if a.baseline else {})}
    with tempfile.TemporaryDirectory(prefix='eval-speed-') as tmp:
        checkpoint, data, settings = demo_checkpoint(tmp, a.num_images)
        flags = eval_flags(checkpoint, data, settings, os.path.join(tmp, 'eval'))
        load = os.getloadavg()[0]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for k in range(a.runs):
            for name, tree in trees.items():
                runs[name].append(timed_run(tree, flags))
                print(f'run {k} {name}: {runs[name][-1]}', flush=True)
    result = dict(
        benchmark='eval_speed', date=datetime.date.today().isoformat(), machine=platform.platform(),
        cpus=os.cpu_count(), load_average_at_start=load, python=platform.python_version(),
        jax=importlib.metadata.version('jax'), num_images=a.num_images, settings=settings,
        method='whole `medplib-jax eval` processes over the demo held-out set, no compilation cache; '
               'evaluators_s: the sum of the seconds each evaluator reports; trees alternate run by run',
        **{name: summary(r) for name, r in runs.items()}, runs=runs)
    if a.baseline:
        result['speedup_total'] = result['baseline']['total_s']['median'] / result['this']['total_s']['median']
    write_result(result, 'eval_speed_cpu.json', a.out or None)
    for name in trees:
        s = result[name]
        print(f'{name}: {s["total_s"]["median"]:.1f} s a run (median of {a.runs}; min {s["total_s"]["min"]:.1f}, '
              f'max {s["total_s"]["max"]:.1f}); evaluators {s["evaluators_s"]["median"]:.1f} s')


if __name__ == '__main__':
    main()
