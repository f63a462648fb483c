"""The prepared GPU check of the accelerator work, one command for a lent GPU's few minutes (also `--dry` on CPU).

1. The stage-IV train step as the accelerator presets run it, on one GPU (benchmarks/train_step.py --config
   7b-accelerator): 7B width with --llm_layers of the 32 LLM layers (as many as fit; 8 by default for an 80 GB
   H100), bf16, `llm.attention=auto` (jax's fused cuDNN attention on GPU), the grouped MoE dispatch
   (`lax.ragged_dot`), one routing group of 4 sequences at length 1599, no remat: step time, MFU against the
   vendor bf16 peak (989 TFLOP/s for H100 / H200 SXM) and against a measured 8192^3 bf16 matmul, one traced step
   under --out/profile (open with TensorBoard's profile plugin or Perfetto: where the time goes).
2. Batch-1 KV-cache decoding at 7B width and the same depth (benchmarks/decode.py, fp32 weights): tokens/s against
   the HBM roofline (--bandwidth_gbs, 3350 for H100 SXM, 4800 for H200).
Each part writes its JSON under --out (default benchmarks/results) with the machine, versions and command;
nvidia-smi's line is recorded when present. `--dry` runs both parts on CPU at the tiny model's size: it checks the
script, not the speed.

    python benchmarks/gpu_step.py [--llm_layers 8] [--bandwidth_gbs 3350] [--out DIR]
    python benchmarks/gpu_step.py --dry --out /tmp/gpu_dry
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(args: list[str]) -> None:
    print('+', ' '.join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dry', action='store_true', help='on CPU, the tiny model: checks the script only')
    parser.add_argument('--llm_layers', type=int, default=8)
    parser.add_argument('--remat', default='none')
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--bandwidth_gbs', type=float, default=3350.0)
    parser.add_argument('--out', default=os.path.join(HERE, 'results'))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if shutil.which('nvidia-smi'):
        smi = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True).stdout.strip()
        with open(os.path.join(args.out, 'gpu_step_machine.json'), 'w') as f:
            json.dump(dict(nvidia_smi=smi), f, indent=1)
        print('GPU:', smi, flush=True)
    elif not args.dry:
        sys.exit('gpu_step: no nvidia-smi here; on a CPU host pass --dry')
    step = [os.path.join(HERE, 'train_step.py'), '--config', '7b-accelerator', '--remat', args.remat,
            '--steps', str(args.steps), '--profile', os.path.join(args.out, 'profile'),
            '--out', os.path.join(args.out, 'gpu_step_train.json')]
    decode = [os.path.join(HERE, 'decode.py'), '--batches', '1', '--new_tokens', '64' if args.dry else '256',
              '--out', os.path.join(args.out, 'gpu_step_decode.json')]
    if args.dry:
        step.append('--dry')
    else:
        step += ['--llm_layers', str(args.llm_layers)]
        decode += ['--hidden', '4096', '--layers', str(args.llm_layers), '--bandwidth_gbs', str(args.bandwidth_gbs)]
    _run(step)
    _run(decode)


if __name__ == '__main__':
    main()
