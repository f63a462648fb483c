"""Compile-checks the 7B stage steps for TPU slices and a GPU estimate -> benchmarks/results/compile_check_*.json.

Nothing runs on an accelerator: `medplib_jax.compile_check` compiles ahead of time on this host (libtpu for TPUs,
XLA's CPU compiler over fake devices for the GPU estimate). Needs libtpu (`pip install -e ".[tpu-compile]"`).

    python benchmarks/compile_check.py                      # every case below
    python benchmarks/compile_check.py stage4-7b-v5p-64     # chosen cases
    python benchmarks/compile_check.py --list
    python benchmarks/compile_check.py --estimate stage4-7b-v5p-64-bf16-splash   # -> step_estimate_<case>.json
    python benchmarks/compile_check.py --confirm stage4-7b-v5p-64-bf16-splash 4  # -> step_confirm_<case>_4.json

`--estimate` compiles only the two reduced-depth programs of train/step_estimate.py (XLA's cost-model step time and
the MFU it implies, an ESTIMATE) for TPU cases; the memory figures stay those of the full compile. `--confirm CASE L`
compiles the case's micro-batch with L unrolled layers and compares its cost-model time with the estimate's
extrapolation (needs the case's step_estimate JSON).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # this host compiles; it has no accelerator to find

import importlib.util  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from medplib_jax.train.compile_check import compile_check, compile_step, parse_topology, report, tpu_devices  # noqa: E402
from medplib_jax.train.step_estimate import describe, estimate  # noqa: E402

# name -> (config file, config arg, topology, overrides as {dotted field: value}). Each case pins what its stored
# result was measured with where the preset has moved since: the cases without a suffix fp32 compute and the einsum
# attention (2026-12-02); `-bf16` today's 7B default compute; `-bf16-splash` the v5p-64 preset until 2026-12-07
# (micro-batches of 32: routing groups of 4 sequences spread over 4 chips); `-accum1` one micro-batch of 128 (one
# routing group per chip), `-accum1-dots` with it the lighter remat policy; `-grouped` the grouped MoE dispatch per
# shard (the TPU presets' since 2026-12-08; every earlier case pins the einsum dispatch it was measured with).
FP32 = {'model.dtype': 'float32', 'model.llm.attention': 'xla'}
ACCUM4 = {'train.grad_accum': 4, 'model.remat_policy': 'full'}
FULL = {'model.remat_policy': 'full'}
EINSUM = {'model.moe.dispatch': 'einsum'}  # the TPU presets' dispatch until 2026-12-08
CASES = {
    'stage4-7b-v5p-64-default': ('configs/stage4.py', '', 'v5p-64', {'train.grad_accum': 4, **FP32, **EINSUM}),
    'stage4-7b-v5p-64': ('configs/stage4.py', 'hw=v5p-64', 'v5p-64', {**FP32, **ACCUM4, **EINSUM}),
    'stage4-7b-v5p-64-bf16': ('configs/stage4.py', 'hw=v5p-64', 'v5p-64',
                              {'model.llm.attention': 'xla', **ACCUM4, **EINSUM}),
    'stage4-7b-v5p-64-bf16-splash': ('configs/stage4.py', 'hw=v5p-64', 'v5p-64', {**ACCUM4, **EINSUM}),
    # A diagnostic, not a recipe: routing groups of one sequence (one per chip) instead of the reference's 4.
    'stage4-7b-v5p-64-bf16-splash-group1': ('configs/stage4.py', 'hw=v5p-64', 'v5p-64',
                                            {'model.moe.group_size': 1, **ACCUM4, **EINSUM}),
    # The whole global batch as one micro-batch: 4 rows and one routing group per chip; full remat ...
    'stage4-7b-v5p-64-accum1': ('configs/stage4.py', 'hw=v5p-64', 'v5p-64', {**FP32, **FULL, **EINSUM}),
    'stage4-7b-v5p-64-bf16-accum1': ('configs/stage4.py', 'hw=v5p-64', 'v5p-64',
                                     {'model.llm.attention': 'xla', **FULL, **EINSUM}),
    'stage4-7b-v5p-64-bf16-splash-accum1': ('configs/stage4.py', 'hw=v5p-64', 'v5p-64', {**FULL, **EINSUM}),
    # ... and the stage-IV preset now: matmul outputs saved (dots_no_batch) instead of full recompute
    'stage4-7b-v5p-64-bf16-splash-accum1-dots': ('configs/stage4.py', 'hw=v5p-64', 'v5p-64',
                                                 {'model.remat_policy': 'dots_no_batch', **EINSUM}),
    'stage4-7b-v5p-64-bf16-splash-accum1-none': ('configs/stage4.py', 'hw=v5p-64', 'v5p-64',
                                                 {'model.remat_policy': 'none', **EINSUM}),
    # ... and with the grouped dispatch per shard (ragged_dot), the TPU presets' dispatch since 2026-12-08: with
    # dots_no_batch, and with no remat (the v5p-64 and v5p-256 stage-IV presets since that day)
    'stage4-7b-v5p-64-bf16-splash-accum1-dots-grouped': ('configs/stage4.py', 'hw=v5p-64', 'v5p-64',
                                                         {'model.remat_policy': 'dots_no_batch'}),
    'stage4-7b-v5p-64-bf16-splash-accum1-none-grouped': ('configs/stage4.py', 'hw=v5p-64', 'v5p-64',
                                                         {'model.remat_policy': 'none'}),
    'stage4-7b-v5p-256': ('configs/stage4.py', 'hw=v5p-256', 'v5p-256', {**FP32, **FULL, **EINSUM}),
    'stage4-7b-v5p-256-bf16-splash': ('configs/stage4.py', 'hw=v5p-256', 'v5p-256', {**FULL, **EINSUM}),
    'stage4-7b-v5p-256-bf16-splash-grouped': ('configs/stage4.py', 'hw=v5p-256', 'v5p-256',
                                              {'model.remat_policy': 'full'}),
    'stage4-7b-v5p-256-bf16-splash-grouped-none': ('configs/stage4.py', 'hw=v5p-256', 'v5p-256',
                                                   {'model.remat_policy': 'none'}),
    'stage4-7b-v5p-256-bf16-splash-grouped-dots': ('configs/stage4.py', 'hw=v5p-256', 'v5p-256',
                                                   {'model.remat_policy': 'dots_no_batch'}),
    'stage4-7b-8xh100': ('configs/stage4.py', 'hw=8xh100', 'gpu:8xH100', {**FP32, 'train.grad_accum': 8}),
    # the stage-IV preset since 2026-12-07: micro-batches of 32, one routing group of 4 per GPU
    'stage4-7b-8xh100-bf16-accum4': ('configs/stage4.py', 'hw=8xh100', 'gpu:8xH100', {'train.grad_accum': 4}),
    'stage2-7b-v5p-64': ('configs/stage2.py', 'hw=v5p-64', 'v5p-64', FP32),
    'stage3-7b-v5p-64': ('configs/stage3.py', 'hw=v5p-64', 'v5p-64', FP32),
}


def load_config(path: str, arg: str, overrides: dict):
    spec = importlib.util.spec_from_file_location('stage_config', os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for field, value in overrides.items():
        *parents, leaf = field.split('.')
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _versions() -> str:
    from importlib.metadata import version
    return f'jax {version("jax")}, libtpu {version("libtpu")}'


def main(names: list[str]) -> None:
    if names == ['--list']:
        print('\n'.join(CASES))
        return
    if names[:1] == ['--confirm']:
        confirm(names[1], int(names[2]))
        return
    only_estimate = '--estimate' in names
    names = [n for n in names if n != '--estimate']
    os.makedirs(os.path.join(HERE, 'results'), exist_ok=True)
    for name in names or list(CASES):
        path, arg, topology, overrides = CASES[name]
        config = load_config(path, arg, overrides)
        label = f'{path}:{arg}' if arg else path
        command = f'medplib-jax compile-check --config={label} --topology={topology}' + ''.join(
            f' --config.{k}={v}' for k, v in overrides.items())
        meta = dict(case=name, date=datetime.date.today().isoformat(),
                    host=f'{platform.node()} ({os.cpu_count()} CPUs), {_versions()}')
        if only_estimate:
            start = time.perf_counter()
            e = estimate(config, tpu_devices(parse_topology(topology)), compile_step)
            print('\n'.join(describe(e)), flush=True)
            out = dict(meta, command=command + ' --estimate (only the two reduced-depth compiles)',
                       compile_s=round(time.perf_counter() - start), lines=describe(e), **dataclasses.asdict(e))
            with open(os.path.join(HERE, 'results', f'step_estimate_{name}.json'), 'w') as f:
                json.dump(out, f, indent=1)
            continue
        r = compile_check(label, config, topology)
        print(report(r), flush=True)
        out = dict(meta, command=command, **r.to_dict())
        with open(os.path.join(HERE, 'results', f'compile_check_{name}.json'), 'w') as f:
            json.dump(out, f, indent=1, default=str)


def confirm(name: str, layers: int) -> None:
    """The case's micro-batch compiled with `layers` unrolled LLM layers, its cost-model time (kernels priced as
    the estimate prices them) against the estimate's extrapolation from 1 and 2 layers (step_estimate_CASE.json):
    how far the per-layer extrapolation holds at a depth nearer the model's -> step_confirm_CASE_L.json."""
    from medplib_jax.train.step_estimate import kernel_flops, reduced
    path, arg, topology, overrides = CASES[name]
    config = load_config(path, arg, overrides)
    with open(os.path.join(HERE, 'results', f'step_estimate_{name}.json')) as f:
        e = json.load(f)
    devices = tpu_devices(parse_topology(topology))
    start = time.perf_counter()
    fig = compile_step(reduced(config, layers), devices, print)
    kernels = kernel_flops(fig['pallas_kernels'], config, fig['batch'], fig['length'], len(devices))
    direct = fig['xla_seconds'] + kernels / e['peak_flops']
    one = e['xla_seconds'][0] + e['kernel_seconds'][0]
    per_layer = e['xla_seconds'][1] + e['kernel_seconds'][1] - one
    extrapolated = one + (layers - 1) * per_layer
    out = dict(case=name, date=datetime.date.today().isoformat(), layers=layers,
               host=f'{platform.node()} ({os.cpu_count()} CPUs), {_versions()}',
               command=f'python benchmarks/compile_check.py --confirm {name} {layers}',
               compile_s=round(time.perf_counter() - start), direct_seconds=direct, extrapolated_seconds=extrapolated,
               relative_difference=extrapolated / direct - 1, pallas_kernels=fig['pallas_kernels'])
    print(f'{name}: {layers} unrolled layers, cost-model time {direct:.4g} s; extrapolated from 1 and 2 layers '
          f'{extrapolated:.4g} s ({out["relative_difference"]:+.1%})', flush=True)
    with open(os.path.join(HERE, 'results', f'step_confirm_{name}_{layers}.json'), 'w') as f:
        json.dump(out, f, indent=1)


if __name__ == '__main__':
    main(sys.argv[1:])
