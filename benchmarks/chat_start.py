"""How long `medplib-jax chat` makes a user wait: seconds from the command's start to its first line (progress, on
stderr) and to the answer (stdout), for a first run on a machine (an empty compilation cache) and for the runs after
it (JAX's persistent compilation cache, on by default: runtime.compilation_cache).

The checkpoint is the demo's (outputs/demo/stage4 after `medplib-jax demo`, or --checkpoint); without one, the
demo's stage-IV model at initialisation is written to a temporary folder (the same programs: same config, random
weights). Each measurement is a whole process, as a user starts it; the cold runs get a fresh cache folder each.
`--mask_mode=always`: every answer is decoded and its mask computed, as for a grounding answer of the trained demo
(an untrained model rarely emits `<SEG>`), so the mask program is part of what is compiled and timed.

    python benchmarks/chat_start.py [--checkpoint outputs/demo/stage4] [--runs 3]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from results_file import write_result  # noqa: E402  (benchmarks/results_file.py)

QUESTION = 'Could you segment out the liver in this image?'


def demo_checkpoint(folder: str) -> tuple[str, str]:
    """(params directory, image): the demo's stage-IV model at initialisation over freshly written demo data."""
    import importlib

    from medplib_jax import runtime
    from medplib_jax.data.synthetic import make_demo_data
    runtime.host_platforms()
    from medplib_jax.main.demo import init_params_dir
    data = os.path.join(folder, 'data')
    make_demo_data(data, num_images=4, seed=0)
    config = importlib.import_module('configs.demo').get_config(f'root={data}')
    path = init_params_dir(config.stages.stage4, os.path.join(folder, 'params'), log=lambda _: None)
    return path, first_image(data)


def first_image(data: str) -> str:
    images = sorted(os.listdir(os.path.join(data, 'images')))
    return os.path.join(data, 'images', next(n for n in images if n.startswith('ct_')))


def timed_run(checkpoint: str, image: str, cache: str, cwd: str) -> dict[str, float]:
    """One `medplib-jax chat` process: seconds to its first output line (either stream) and to its answer."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop('JAX_COMPILATION_CACHE_DIR', None)
    command = [sys.executable, '-m', 'medplib_jax', 'chat', f'--checkpoint={checkpoint}', f'--image={image}',
               f'--compilation_cache={cache}', '--max_new_tokens=8', '--mask_mode=always', f'--out={cwd}/overlay.png',
               QUESTION]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    seen: dict[str, float] = {}

    def watch(stream, name):
        for _ in stream:
            seen.setdefault(name, time.perf_counter() - start)
    threads = [threading.Thread(target=watch, args=(proc.stdout, 'answer')),
               threading.Thread(target=watch, args=(proc.stderr, 'progress'))]
    for t in threads:
        t.start()
    rc = proc.wait(timeout=900)
    for t in threads:
        t.join()
    total = time.perf_counter() - start
    if rc != 0 or 'answer' not in seen:
        raise RuntimeError(f'chat exited with {rc}: {" ".join(command)}')
    return dict(first_line_s=min(seen.values()), answer_s=seen['answer'], total_s=total)


def summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = runs[0]
    return {k: dict(min=min(r[k] for r in runs), median=sorted(r[k] for r in runs)[len(runs) // 2],
                    max=max(r[k] for r in runs)) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', default='', help='a params / run directory (default: outputs/demo/stage4 '
                        'if it exists, else the demo model at initialisation)')
    parser.add_argument('--image', default='', help='the image to ask about (default: a demo CT image)')
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--out', default='')
    a = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix='chat-start-') as tmp:
        checkpoint, image = a.checkpoint, a.image
        if not checkpoint and os.path.isdir(os.path.join(ROOT, 'outputs', 'demo', 'stage4')):
            checkpoint = os.path.join(ROOT, 'outputs', 'demo', 'stage4')
            image = image or first_image(os.path.join(ROOT, 'outputs', 'demo_data'))
        source = checkpoint or 'the demo stage-IV model at initialisation (random weights, same programs)'
        if not checkpoint:
            checkpoint, made = demo_checkpoint(tmp)
            image = image or made
        load = os.getloadavg()[0]
        cold, warm = [], []
        for k in range(a.runs):
            cache = os.path.join(tmp, f'cache{k}')
            cold.append(timed_run(checkpoint, image, cache, tmp))
            warm.append(timed_run(checkpoint, image, cache, tmp))
            print(f'run {k}: first run {cold[-1]}, second run {warm[-1]}', flush=True)
    result = dict(
        benchmark='chat_start', date=datetime.date.today().isoformat(), machine=platform.platform(),
        cpus=os.cpu_count(), load_average_at_start=load, python=platform.python_version(),
        jax=importlib.metadata.version('jax'), checkpoint=source, question=QUESTION, max_new_tokens=8,
        mask_mode='always',
        method='whole `medplib-jax chat` processes; each pair: a fresh compilation cache (first run), then the same '
               'cache (second run); times from process start',
        first_run=summary(cold), second_run=summary(warm), runs=dict(first=cold, second=warm))
    write_result(result, 'chat_start_cpu.json', a.out or None)
    for name in ('first_run', 'second_run'):
        s = result[name]
        print(f'{name}: first line {s["first_line_s"]["median"]:.1f} s, answer {s["answer_s"]["median"]:.1f} s '
              f'(median of {a.runs}; min {s["answer_s"]["min"]:.1f}, max {s["answer_s"]["max"]:.1f})')


if __name__ == '__main__':
    main()
