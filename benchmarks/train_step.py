"""The stage-IV train step (train/loop.py's jitted step: whole MedPLIB forward, losses, AdamW) on this host:
step time, tokens/s, achieved FLOP/s and MFU, peak memory.

FLOPs per step come from train/flops.py's explicit formula (the one the training loop logs MFU with); the peak is
measured in the same run, as the best of a few jitted fp32 matmuls (n x n, FLOPs 2 n^3) on the same devices, so
MFU here means "share of what this host's XLA matmul reaches", not of a vendor figure. Peak memory: the compiled
step's memory_analysis (arguments + temporaries + outputs not aliased) and the process's peak resident set.

  --config tiny                    configs/stage4.py:model=tiny,init=random (batch 4, the 640 bucket)
  --config demo [--stage N]       one of the demo's stages (configs/demo.py; default IV: tiny, MoE routing groups of 1)
  --config 7b-width-reduced-depth  configs/stage4.py:model=7b,init=random,dtype=float32 at full width (LLM hidden
                                   4096, FFN 11008, vocab 32267; CLIP-L width; SAM-Med2D ViT-B width) with the
                                   depths cut to --llm_layers / --vision_layers (default 1 / 1), batch 1, one
                                   length bucket (--length, default 640). Needs `--dry` (a CPU stand-in for the
                                   7B step).
  --config 7b-accelerator          the 7B stage-IV step as the accelerator presets run it, on one device: bf16,
                                   llm.attention=auto (cuDNN on GPU, splash on TPU), the grouped MoE dispatch,
                                   one routing group (batch 4) at the longest bucket (1599), remat --remat
                                   (default none), the vision towers whole, --llm_layers of the 32 LLM layers
                                   (as many as fit). MFU also against the device's vendor bf16 peak
                                   (train/flops.py PEAK_FLOPS) and a measured bf16 matmul. benchmarks/gpu_step.py
                                   runs it; with --dry on CPU it runs the tiny model the same way.

    python benchmarks/train_step.py [--config tiny] [--steps 5] [--length N] [--batch N]
    python benchmarks/train_step.py --config 7b-width-reduced-depth --dry [--llm_layers 1] [--steps 2]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import resource
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from results_file import write_result  # noqa: E402  (benchmarks/results_file.py)


def _load(path: str, arg: str | None):
    spec = importlib.util.spec_from_file_location('bench_config', os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def build_config(args):
    if args.config == 'tiny':
        cfg, label = _load('configs/stage4.py', 'model=tiny,init=random'), 'configs/stage4.py:model=tiny,init=random'
    elif args.config == 'demo':
        # One of the demo's stages (configs/demo.py: its model -- demo vocab, 64-wide SAM, routing groups of one
        # sequence -- trainable set and lr; --stage, default IV) with random initial parameters.
        name = f'stage{args.stage}'
        demo = _load('configs/demo.py', None).stages[name]
        cfg = _load(f'configs/{name}.py', 'model=tiny,init=random')
        cfg.model = demo.model
        cfg.train.trainable = demo.train.trainable
        cfg.train.lr = demo.train.lr
        label = f'configs/demo.py {name} (init=random)'
    elif args.config == '7b-width-reduced-depth':
        if not args.dry:
            sys.exit('--config 7b-width-reduced-depth runs a cut-down 7B step on this host: pass --dry')
        # fp32 compute, as its recorded CPU figures (benchmarks/results) were measured; the 7B default is bf16.
        cfg = _load('configs/stage4.py', 'model=7b,init=random,dtype=float32')
        cfg.model.llm.num_layers = args.llm_layers
        cfg.model.vision.num_layers = args.vision_layers + 1  # select_layer -2: the last layer is not run
        cfg.model.sam_encoder.depth = args.vision_layers
        cfg.model.sam_encoder.global_attn_indexes = tuple(range(args.vision_layers - 1, args.vision_layers))
        cfg.data.batch_size = args.batch or 1
        cfg.data.length_buckets = (args.length or 640,)
        cfg.train.grad_accum = 1
        cfg.train.loss_group = 1
        cfg.model.moe.group_size = 1
        label = (f'configs/stage4.py:model=7b,init=random,dtype=float32 with llm.num_layers={args.llm_layers}, '
                 f'vision.num_layers={args.vision_layers + 1} (select_layer -2), sam_encoder.depth='
                 f'{args.vision_layers}, batch {cfg.data.batch_size}, length {cfg.data.length_buckets[0]}')
    elif args.config == '7b-accelerator':
        model = 'tiny' if args.dry else '7b'
        cfg = _load('configs/stage4.py', f'model={model},init=random,remat={args.remat}')
        if not args.dry:
            cfg.model.llm.num_layers = args.llm_layers
        cfg.model.llm.attention = 'auto'
        cfg.model.moe.dispatch = 'grouped'
        cfg.data.batch_size = args.batch or int(cfg.model.moe.group_size)
        cfg.data.length_buckets = (args.length or max(cfg.data.length_buckets),)
        cfg.train.grad_accum = 1
        label = (f'configs/stage4.py:model={model},init=random,remat={args.remat} with llm.num_layers='
                 f'{cfg.model.llm.num_layers}, attention auto, grouped MoE dispatch, batch {cfg.data.batch_size}, '
                 f'length {cfg.data.length_buckets[0]}')
        return _one_device(cfg), label
    else:
        sys.exit(f'unknown --config {args.config!r}')
    if args.config != '7b-width-reduced-depth':
        if args.batch:
            cfg.data.batch_size = args.batch
        cfg.data.length_buckets = (args.length or min(cfg.data.length_buckets),)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1
    return cfg, label


def _one_device(cfg):
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    return cfg


def measured_peak_flops(n: int = 2048, repeats: int = 5, dtype: str = 'float32') -> float:
    import jax
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def synthetic_batch(example: dict, vocab: int, seed: int = 0) -> dict:
    """Arrays of the example batch's shapes: random ids (all supervised), random pixels, empty masks except one
    valid target per row (so every loss has something to act on)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in example.items():
        if k in ('input_ids', 'labels'):
            out[k] = rng.integers(0, vocab, size=s.shape).astype(s.dtype)
        elif k == 'token_mask':
            out[k] = np.ones(s.shape, s.dtype)
        elif np.issubdtype(s.dtype, np.floating):
            out[k] = rng.standard_normal(s.shape).astype(s.dtype) if 'pixels' in k else np.zeros(s.shape, s.dtype)
        else:
            out[k] = np.zeros(s.shape, s.dtype)
    out['labels'] = out['input_ids'].copy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default='tiny', choices=('tiny', 'demo', '7b-width-reduced-depth',
                                                             '7b-accelerator'))
    parser.add_argument('--remat', default='none', help='--config 7b-accelerator: model.remat_policy')
    parser.add_argument('--profile', default='', help='a folder: one traced step (jax.profiler) is written there')
    parser.add_argument('--stage', type=int, default=4, choices=(1, 2, 3, 4), help='--config demo: which stage')
    parser.add_argument('--dry', action='store_true', help='allow the cut-down 7B-width step on a CPU host')
    parser.add_argument('--llm_layers', type=int, default=1)
    parser.add_argument('--vision_layers', type=int, default=1)
    parser.add_argument('--batch', type=int, default=0, help='global batch (default: the config\'s)')
    parser.add_argument('--length', type=int, default=0, help='sequence length (default: the smallest bucket)')
    parser.add_argument('--steps', type=int, default=5, help='timed steps after one warm-up step')
    parser.add_argument('--out', default=None)
    args = parser.parse_args()

    import flax.linen as nn
    import jax

    from medplib_jax.models.medplib import MedPLIBConfig
    from medplib_jax.train import flops as flops_lib
    from medplib_jax.train.compile_check import example_batch
    from medplib_jax.train.inputs import global_batch
    from medplib_jax.train.loop import setup_stage
    from medplib_jax.train.step import TRAIN_KEYS

    cfg, label = build_config(args)
    mcfg = MedPLIBConfig.from_model_config(cfg.model)
    example = example_batch(cfg)
    host = synthetic_batch(example, mcfg.llm.vocab_size)
    batch_size, length = host['input_ids'].shape
    accelerator = jax.devices()[0].platform != 'cpu'
    peak_dtype = 'bfloat16' if accelerator else 'float32'
    peak = measured_peak_flops(8192 if accelerator else 2048, dtype=peak_dtype)
    vendor_peak = flops_lib.peak_flops(jax.devices()[0].device_kind)
    print(f'{label}: batch {batch_size} x {length} tokens; measured {peak_dtype} matmul peak {peak / 1e9:.1f} '
          f'GFLOP/s ({jax.device_count()} {jax.devices()[0].platform} device(s), {jax.devices()[0].device_kind})',
          flush=True)

    start = time.perf_counter()
    setup = setup_stage(cfg, host, runs='/nonexistent', total_steps=1000, warmup=2, log=lambda _: None)
    init_s = time.perf_counter() - start
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        batch = global_batch(host, setup.mesh, TRAIN_KEYS)
        rng = jax.random.key(0)
        start = time.perf_counter()
        exe = setup.step.lower(setup.state, batch, rng).compile()
        compile_s = time.perf_counter() - start
        state = setup.state
        times = []
        for i in range(1 + args.steps):
            start = time.perf_counter()
            state, metrics = exe(state, batch, rng)
            jax.block_until_ready(metrics['loss'])
            if i:
                times.append(time.perf_counter() - start)
        loss = float(metrics['loss'])
        if args.profile:  # one more step, traced (open with TensorBoard's profile plugin or Perfetto)
            with jax.profiler.trace(args.profile):
                state, metrics = exe(state, batch, rng)
                jax.block_until_ready(metrics['loss'])
    mem = exe.memory_analysis()
    step_s = statistics.median(times)
    f = flops_lib.step_flops(mcfg, batch_size, length)
    achieved = f.total / step_s
    tokens = batch_size * length
    row = dict(config=args.config, label=label, batch=batch_size, length=length, steps=args.steps,
               step_s=step_s, step_times_s=times, tokens_per_s=tokens / step_s, formula_flops=f.total,
               formula_llm_flops=f.llm, formula_vision_flops=f.vision, achieved_flops_per_s=achieved,
               measured_peak_flops_per_s=peak, peak_dtype=peak_dtype, mfu=achieved / (peak * jax.device_count()),
               vendor_peak_flops_per_s=vendor_peak,
               mfu_vendor=None if vendor_peak is None else achieved / (vendor_peak * jax.device_count()), loss=loss,
               device_kind=jax.devices()[0].device_kind,
               init_s=init_s, compile_s=compile_s,
               memory_analysis_mib=None if mem is None else dict(
                   arguments=mem.argument_size_in_bytes / 2**20, outputs=mem.output_size_in_bytes / 2**20,
                   aliased=mem.alias_size_in_bytes / 2**20, temporaries=mem.temp_size_in_bytes / 2**20,
                   peak=(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                         - mem.alias_size_in_bytes) / 2**20),
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f'step {step_s:.3f} s (median of {args.steps}), {row["tokens_per_s"]:.0f} tokens/s, formula '
          f'{f.total / 1e9:.2f} GFLOP/step -> {achieved / 1e9:.2f} GFLOP/s, MFU {row["mfu"]:.1%} of the measured '
          f'matmul peak' + ('' if vendor_peak is None else f', {row["mfu_vendor"]:.1%} of the vendor bf16 peak') +
          f'; step memory {row["memory_analysis_mib"]["peak"]:.0f} MiB (XLA), peak RSS '
          f'{row["peak_rss_mib"]:.0f} MiB; compile {compile_s:.1f} s', flush=True)
    result = dict(benchmark='train_step', date=datetime.date.today().isoformat(), command=' '.join(sys.argv),
                  platform=jax.devices()[0].platform, device_count=jax.device_count(), cpu_count=os.cpu_count(),
                  machine=platform.machine(), jax=jax.__version__, **row)
    write_result(result, f'train_step_{args.config}_{jax.devices()[0].platform}.json', args.out)


if __name__ == '__main__':
    main()
