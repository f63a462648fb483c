"""MoE FFN (2 experts, top-1, capacity factor 1.5, training mode) vs a dense SwiGLU FFN of the same width.

Times the jitted forward and forward+backward of each on the same (batch, length, hidden) input and prints the
ratio MoE / dense. The MoE pays for the router, the gate (argsort for random token selection), the
dispatch/combine einsums and E * C = cf * S buffer slots of expert compute. Results go to
benchmarks/results/moe_overhead_<platform>.json with the machine description.

    python benchmarks/moe_overhead.py [--sizes 256x688,512x1376] [--batch 8] [--length 256] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from medplib_jax.models.llama import LlamaConfig, LlamaMLP
from medplib_jax.models.lora import LoRAConfig
from medplib_jax.models.moe import MoEConfig, MoEFFN


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(hidden: int, ffn: int, batch: int, length: int, repeats: int) -> dict:
    x = jax.random.normal(jax.random.key(0), (batch, length, hidden), jnp.float32)
    cfg = LlamaConfig(vocab_size=8, hidden_size=hidden, intermediate_size=ffn, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=hidden)
    dense = LlamaMLP(cfg)
    moe = MoEFFN(MoEConfig(mode='dense', capacity_factor=1.5), ffn,
                 LoRAConfig(rank=8, alpha=16.0, dropout=0.0, targets=('gate_proj', 'up_proj', 'down_proj')))
    rngs = {'params': jax.random.key(1), 'moe': jax.random.key(2)}
    dense_p = nn.unbox(dense.init(rngs, x))
    moe_p = nn.unbox(moe.init(rngs, x, None, True))

    dense_fwd = jax.jit(lambda p, x: dense.apply(p, x))
    moe_fwd = jax.jit(lambda p, x: moe.apply(p, x, None, True, rngs={'moe': jax.random.key(3)},
                                             mutable=['intermediates'])[0])
    dense_grad = jax.jit(jax.grad(lambda p, x: jnp.sum(dense.apply(p, x) ** 2)))
    moe_grad = jax.jit(jax.grad(lambda p, x: jnp.sum(moe.apply(p, x, None, True, rngs={'moe': jax.random.key(3)},
                                                              mutable=['intermediates'])[0] ** 2)))
    row = dict(hidden=hidden, ffn=ffn, batch=batch, length=length, tokens=batch * length)
    row['dense_fwd_ms'] = 1e3 * _time(dense_fwd, dense_p, x, repeats=repeats)
    row['moe_fwd_ms'] = 1e3 * _time(moe_fwd, moe_p, x, repeats=repeats)
    row['dense_fwd_bwd_ms'] = 1e3 * _time(dense_grad, dense_p, x, repeats=repeats)
    row['moe_fwd_bwd_ms'] = 1e3 * _time(moe_grad, moe_p, x, repeats=repeats)
    row['fwd_ratio'] = row['moe_fwd_ms'] / row['dense_fwd_ms']
    row['fwd_bwd_ratio'] = row['moe_fwd_bwd_ms'] / row['dense_fwd_bwd_ms']
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', default='256x688,512x1376,1024x2752', help='hidden x ffn, comma-separated')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--length', type=int, default=256)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--out', default=None, help='JSON path (default benchmarks/results/moe_overhead_<platform>.json)')
    args = parser.parse_args()
    device = jax.devices()[0]
    rows = []
    print(f'{"hidden x ffn":>14} {"tokens":>7} {"dense fwd":>10} {"moe fwd":>9} {"ratio":>6} '
          f'{"dense f+b":>10} {"moe f+b":>9} {"ratio":>6}')
    for size in args.sizes.split(','):
        hidden, ffn = (int(v) for v in size.split('x'))
        row = bench(hidden, ffn, args.batch, args.length, args.repeats)
        rows.append(row)
        print(f'{size:>14} {row["tokens"]:>7} {row["dense_fwd_ms"]:>8.1f}ms {row["moe_fwd_ms"]:>7.1f}ms '
              f'{row["fwd_ratio"]:>6.2f} {row["dense_fwd_bwd_ms"]:>8.1f}ms {row["moe_fwd_bwd_ms"]:>7.1f}ms '
              f'{row["fwd_bwd_ratio"]:>6.2f}', flush=True)
    result = dict(benchmark='moe_overhead', method='median of jitted calls after one warm-up call; MoE: 2 experts, '
                  'top-1, capacity factor 1.5 (training), group of 4 sequences, LoRA r8 on gate/up/down; dense: '
                  'SwiGLU FFN, no LoRA; fp32', platform=device.platform, device=str(device.device_kind),
                  device_count=jax.device_count(), cpu_count=os.cpu_count(), machine=platform.machine(),
                  jax=jax.__version__, rows=rows)
    out = args.out or os.path.join(os.path.dirname(__file__), 'results', f'moe_overhead_{device.platform}.json')
    with open(out, 'w') as f:
        json.dump(result, f, indent=2)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
