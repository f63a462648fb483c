"""Input-pipeline throughput: records per second through the whole grain pipeline (parse, decode, CLIP and SAM
preprocessing, masks, regions, tokenisation, batching) for several worker / thread / image-cache settings.

The synthetic MeCoVQA-like set is written, then its images and masks are scaled up to `--image_size` (SA-Med2D
slices are mostly 256 to 1024 pixels a side) so decoding and resizing cost what they cost on real data. Each
setting iterates `--batches` batches of `--batch_size` once to warm up (worker start-up, cache open), then times
the next `--batches` batches; the median of `--repeats` runs is reported. Results go to
benchmarks/results/pipeline_throughput_<platform>.json with the machine description.

Next to the measured rates it prints the records/s one host must deliver to keep the 7B stage-IV train step fed
(configs/stage4.py: global batch 128): the step time is estimated from train/flops.py's FLOPs per step at the
stated MFU (`--mfu`, default 0.4) of the chips' bf16 peak (train/flops.py PEAK_FLOPS), so
records/s per host = global batch / step time / hosts. Shown for the shortest and the longest length bucket (the
shortest gives the faster step, so the higher demand).

    python benchmarks/pipeline_throughput.py [--image_size 1024] [--batch_size 8] [--batches 6] [--repeats 3]
        [--mfu 0.4] [--requirement_only]   # the latter: recompute the demand, keep the measured rows on file
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time

from absl import flags
from PIL import Image

from configs.common import get_config
from medplib_jax.data.config import DataConfig, ModelShapes
from medplib_jax.data.image_cache import ImageCache
from medplib_jax.data.pipeline import build_dataset
from medplib_jax.data.sources import image_paths
from medplib_jax.data.synthetic import make_demo_data


def _scale_up(root: str, side: int) -> None:
    """Scales every image (bilinear) and mask (nearest) so the longest side is `side`; the records' box and
    point prompts are in original pixels, so only the mask-referenced records are used here."""
    for sub, resample in (('images', Image.BILINEAR), ('masks', Image.NEAREST)):
        for name in os.listdir(os.path.join(root, sub)):
            path = os.path.join(root, sub, name)
            with Image.open(path) as im:
                s = side / max(im.size)
                im.resize((round(im.width * s), round(im.height * s)), resample).save(path)


def _records_per_second(cfg: DataConfig, shapes: ModelShapes, batches: int) -> float:
    it = iter(build_dataset(cfg, shapes, seed=0))
    try:
        for _ in range(batches):  # warm-up: worker start-up, first reads
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * cfg.batch_size / (time.perf_counter() - start)
    finally:
        it.close()


# target -> (device kind for the peak, chips, chips per host)
TARGETS = {'v5p-64': ('TPU v5p', 32, 4), 'v5p-256': ('TPU v5p', 128, 4), '8xH100': ('NVIDIA H100', 8, 8)}


def required_rates(mfu: float) -> list[dict]:
    """Records/s per host the 7B stage-IV step consumes at `mfu`, per target and length bucket."""
    from configs.stage4 import get_config as stage4
    from medplib_jax.models.medplib import MedPLIBConfig
    from medplib_jax.train import flops as flops_lib
    cfg = stage4('model=7b')
    mcfg = MedPLIBConfig.from_model_config(cfg.model)
    batch = cfg.data.batch_size
    rows = []
    for target, (kind, chips, per_host) in TARGETS.items():
        peak = flops_lib.peak_flops(kind)
        for length in (min(cfg.data.length_buckets), max(cfg.data.length_buckets)):
            f = flops_lib.step_flops(mcfg, batch, length).total
            step_s = f / (chips * peak * mfu)
            hosts = max(1, chips // per_host)
            rows.append(dict(target=target, chips=chips, hosts=hosts, peak_flops_per_chip=peak, mfu=mfu,
                             global_batch=batch, length=length, step_flops=f, step_s=step_s,
                             records_per_s_per_host=batch / step_s / hosts))
    return rows


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--image_size', type=int, default=1024)
    parser.add_argument('--batch_size', type=int, default=8)
    parser.add_argument('--batches', type=int, default=6)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--num_images', type=int, default=48)
    parser.add_argument('--mfu', type=float, default=0.4, help='MFU assumed for the 7B step time estimate')
    parser.add_argument('--requirement_only', action='store_true',
                        help='only recompute the required rates; keep the measured rows of the results file')
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    out = os.path.join(os.path.dirname(__file__), 'results', 'pipeline_throughput_cpu.json')
    required = required_rates(args.mfu)
    print('records/s per host the 7B stage-IV step consumes (global batch / estimated step time / hosts):')
    for r in required:
        print(f'  {r["target"]:8s} length {r["length"]:5d}: step {r["step_s"]:6.2f} s at MFU {r["mfu"]:.0%} -> '
              f'{r["records_per_s_per_host"]:6.1f} records/s per host ({r["hosts"]} hosts)')
    if args.requirement_only:
        with open(out) as f:
            result = json.load(f)
        result['required'] = required
        with open(out, 'w') as f:
            json.dump(result, f, indent=2)
        print(f'updated {out}')
        return

    config = get_config()
    shapes = ModelShapes.from_config(config.model)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        make_demo_data(root, num_images=args.num_images, seed=0, test_fraction=0.0)
        _scale_up(root, args.image_size)
        # grounding + free-form region records: both reference mask files, which were scaled with the images
        region = os.path.join(root, 'region_masks.jsonl')
        with open(os.path.join(root, 'MeCoVQA_Region_VQA_train.json')) as f, open(region, 'w') as out:
            for rec in json.load(f):
                if 'box:' not in rec['conversations'][0]['value'] and 'point:' not in rec['conversations'][0]['value']:
                    out.write(json.dumps(rec) + '\n')
        data = dict(config.data, root=root, batch_size=args.batch_size, mask_canvas=args.image_size,
                    datasets={'grounding': {'path': 'MeCoVQA_Grounding_train.json', 'weight': 1.0,
                                            'image_folder': ''},
                              'region': {'path': region, 'weight': 1.0, 'image_folder': ''}})
        base = DataConfig.from_config(data)
        cache = os.path.join(root, 'cache')
        ImageCache.build(cache, image_paths(base), progress=False)
        settings = [('0 workers, 1 thread', dict(worker_count=0, read_threads=1)),
                    ('0 workers, 2 threads', dict(worker_count=0, read_threads=2)),
                    ('2 workers, 1 thread each', dict(worker_count=2, read_threads=1)),
                    ('0 workers, 1 thread, image cache', dict(worker_count=0, read_threads=1, image_cache=cache)),
                    ('2 workers, image cache', dict(worker_count=2, read_threads=1, image_cache=cache))]
        for name, change in settings:
            cfg = dataclasses.replace(base, **change)
            runs = [_records_per_second(cfg, shapes, args.batches) for _ in range(args.repeats)]
            rows.append(dict(setting=name, worker_count=cfg.worker_count, read_threads=cfg.read_threads,
                             image_cache=bool(cfg.image_cache), records_per_s=statistics.median(runs), runs=runs))
            print(f'{name:36s} {rows[-1]["records_per_s"]:7.1f} records/s  (runs {[round(r, 1) for r in runs]})')
    result = dict(benchmark='pipeline_throughput',
                  method=f'median of {args.repeats} runs; each times {args.batches} batches of {args.batch_size} '
                         f'after {args.batches} warm-up batches; grounding + free-form region records of the '
                         f'synthetic set, images and masks scaled to {args.image_size} px longest side',
                  image_size=args.image_size, batch_size=args.batch_size, cpu_count=os.cpu_count(),
                  machine=platform.machine(), processor=_cpu_model(), rows=rows, required=required)
    os.makedirs(os.path.join(os.path.dirname(__file__), 'results'), exist_ok=True)
    with open(out, 'w') as f:
        json.dump(result, f, indent=2)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
