"""MoE FFN (2 experts, top-1, capacity factor 1.5, training mode) vs a dense SwiGLU FFN of the same width.

Times the jitted forward and forward+backward of the dense FFN, the MoE FFN with the einsum dispatch (the
reference) and the MoE FFN with the grouped dispatch on the same (batch, length, hidden) input, interleaved
(dense, einsum, grouped, dense, ...) so that load on a shared machine hits all three alike, and prints each MoE
over dense. The einsum MoE pays for the router, the gate (argsort for random token selection), the one-hot
dispatch/combine einsums and E * C = cf * S buffer slots of expert compute; the grouped MoE computes the routed
tokens only (plus tile padding) and gathers instead of one-hot einsums. Results go to
benchmarks/results/moe_overhead_<platform>.json with the machine description.

    python benchmarks/moe_overhead.py [--sizes 256x688,512x1376] [--batch 8] [--length 256] [--repeats 15]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import platform
import statistics
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from results_file import write_result  # benchmarks/results_file.py

from medplib_jax.models.llama import LlamaConfig, LlamaMLP
from medplib_jax.models.lora import LoRAConfig
from medplib_jax.models.moe import MoEConfig, MoEFFN

VARIANTS = ('dense', 'einsum', 'grouped')


def _time_interleaved(fns: dict[str, Callable[[], jax.Array]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each fn (`repeats` calls), after one warm-up call each, calls interleaved round-robin."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile + warm up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def bench(hidden: int, ffn: int, batch: int, length: int, repeats: int) -> dict:
    x = jax.random.normal(jax.random.key(0), (batch, length, hidden), jnp.float32)
    cfg = LlamaConfig(vocab_size=8, hidden_size=hidden, intermediate_size=ffn, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=hidden)
    rngs = {'params': jax.random.key(1), 'moe': jax.random.key(2)}
    lora = LoRAConfig(rank=8, alpha=16.0, dropout=0.0, targets=('gate_proj', 'up_proj', 'down_proj'))
    moe_cfg = MoEConfig(mode='dense', capacity_factor=1.5)
    dense = LlamaMLP(cfg)
    moe = MoEFFN(moe_cfg, ffn, lora)
    def moe_apply(dispatch: str, p, x_):
        layer = moe.clone(moe=dataclasses.replace(moe_cfg, dispatch=dispatch))
        return layer.apply(p, x_, None, True, rngs={'moe': jax.random.key(3)}, mutable=['intermediates'])[0]

    def sum_sq(apply_fn: Callable, p, x_):
        return jnp.sum(apply_fn(p, x_) ** 2)

    apply = {'dense': dense.apply, **{n: functools.partial(moe_apply, n) for n in VARIANTS[1:]}}
    params = {'dense': nn.unbox(dense.init(rngs, x))}
    params['einsum'] = params['grouped'] = nn.unbox(moe.init(rngs, x, None, True))  # same parameters
    fwd = {n: functools.partial(jax.jit(apply[n]), params[n], x) for n in VARIANTS}
    grad = {n: functools.partial(jax.jit(jax.grad(functools.partial(sum_sq, apply[n]))), params[n], x)
            for n in VARIANTS}
    t_fwd = _time_interleaved(fwd, repeats)
    t_grad = _time_interleaved(grad, repeats)
    _, state = moe.apply(params['einsum'], x, None, True, rngs={'moe': jax.random.key(3)}, mutable=['intermediates'])
    row = dict(hidden=hidden, ffn=ffn, batch=batch, length=length, tokens=batch * length,
               drop_fraction=float(state['intermediates']['moe_drop_fraction'][0]))  # dropped tokens cost nothing
    # median: the usual figure; min: the least disturbed call, steadier on a machine shared with other jobs
    for stat, fn in (('', statistics.median), ('_min', min)):
        for pas, t in (('fwd', t_fwd), ('fwd_bwd', t_grad)):
            for n in VARIANTS:
                row[f'{n}_{pas}{stat}_ms'] = 1e3 * fn(t[n])
            for n in VARIANTS[1:]:
                row[f'{n}_{pas}{stat}_ratio'] = fn(t[n]) / fn(t['dense'])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', default='256x688,512x1376,1024x2752', help='hidden x ffn, comma-separated')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--length', type=int, default=256)
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--out', default=None,
                        help='JSON path (default benchmarks/results/moe_overhead_<platform>.json)')
    args = parser.parse_args()
    device = jax.devices()[0]
    rows = []
    print(f'{"hidden x ffn":>14} {"":>6} {"dense":>9} {"einsum":>9} {"ratio":>6} {"grouped":>9} {"ratio":>6} '
          f'{"min-ratios":>12}')
    for size in args.sizes.split(','):
        hidden, ffn = (int(v) for v in size.split('x'))
        row = bench(hidden, ffn, args.batch, args.length, args.repeats)
        rows.append(row)
        for pas, key in (('fwd', 'fwd'), ('f+b', 'fwd_bwd')):
            print(f'{size:>14} {pas:>6} {row[f"dense_{key}_ms"]:>7.1f}ms {row[f"einsum_{key}_ms"]:>7.1f}ms '
                  f'{row[f"einsum_{key}_ratio"]:>6.2f} {row[f"grouped_{key}_ms"]:>7.1f}ms '
                  f'{row[f"grouped_{key}_ratio"]:>6.2f} {row[f"einsum_{key}_min_ratio"]:>6.2f} '
                  f'{row[f"grouped_{key}_min_ratio"]:>5.2f}', flush=True)
    result = dict(benchmark='moe_overhead',
                  method='median (and min) of jitted calls after one warm-up call, dense / einsum / grouped calls '
                  'interleaved; MoE: 2 experts, top-1, capacity factor 1.5 (training), group of 4 sequences, LoRA r8 '
                  'on gate/up/down, einsum or grouped dispatch; dense: SwiGLU FFN, no LoRA; fp32',
                  date=datetime.date.today().isoformat(), repeats=args.repeats, platform=device.platform,
                  device=str(device.device_kind), device_count=jax.device_count(), cpu_count=os.cpu_count(),
                  machine=platform.machine(), jax=jax.__version__, rows=rows)
    write_result(result, f'moe_overhead_{device.platform}.json', args.out)


if __name__ == '__main__':
    main()
