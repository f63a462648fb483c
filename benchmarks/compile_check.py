"""Compile-checks the 7B stage steps for TPU slices and a GPU estimate -> benchmarks/results/compile_check_*.json.

Nothing runs on an accelerator: `medplib_jax.compile_check` compiles ahead of time on this host (libtpu for TPUs,
XLA's CPU compiler over fake devices for the GPU estimate). Needs libtpu (`pip install -e ".[tpu-compile]"`).

    python benchmarks/compile_check.py                      # every case below
    python benchmarks/compile_check.py stage4-7b-v5p-64     # chosen cases
    python benchmarks/compile_check.py --list
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # this host compiles; it has no accelerator to find

import importlib.util  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from medplib_jax.train.compile_check import compile_check, report  # noqa: E402

# name -> (config file, config arg, topology, overrides as {dotted field: value}). The cases without a suffix are
# pinned to fp32 compute and the einsum attention, as their stored results (2026-12-02) were measured; `-bf16` is
# today's 7B default compute, `-bf16-splash` the v5p presets as they are now.
FP32 = {'model.dtype': 'float32', 'model.llm.attention': 'xla'}
CASES = {
    'stage4-7b-v5p-64-default': ('configs/stage4.py', '', 'v5p-64', {'train.grad_accum': 4, **FP32}),
    'stage4-7b-v5p-64': ('configs/stage4.py', 'hw=v5p-64', 'v5p-64', FP32),
    'stage4-7b-v5p-64-bf16': ('configs/stage4.py', 'hw=v5p-64', 'v5p-64', {'model.llm.attention': 'xla'}),
    'stage4-7b-v5p-64-bf16-splash': ('configs/stage4.py', 'hw=v5p-64', 'v5p-64', {}),
    'stage4-7b-v5p-256': ('configs/stage4.py', 'hw=v5p-256', 'v5p-256', FP32),
    'stage4-7b-v5p-256-bf16-splash': ('configs/stage4.py', 'hw=v5p-256', 'v5p-256', {}),
    'stage4-7b-8xh100': ('configs/stage4.py', 'hw=8xh100', 'gpu:8xH100', FP32),
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


def main(names: list[str]) -> None:
    if names == ['--list']:
        print('\n'.join(CASES))
        return
    os.makedirs(os.path.join(HERE, 'results'), exist_ok=True)
    for name in names or list(CASES):
        path, arg, topology, overrides = CASES[name]
        config = load_config(path, arg, overrides)
        label = f'{path}:{arg}' if arg else path
        r = compile_check(label, config, topology)
        print(report(r), flush=True)
        out = dict(case=name, command=f'medplib-jax compile-check --config={label} --topology={topology}' +
                   ''.join(f' --config.{k}={v}' for k, v in overrides.items()),
                   date=datetime.date.today().isoformat(), host=f'{platform.node()} ({os.cpu_count()} CPUs)',
                   **r.to_dict())
        with open(os.path.join(HERE, 'results', f'compile_check_{name}.json'), 'w') as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == '__main__':
    main(sys.argv[1:])
