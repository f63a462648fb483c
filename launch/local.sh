#!/usr/bin/env bash
# Usage: launch/local.sh [COMMAND] [FLAGS...]
#
# One machine, one JAX process driving all its local devices (the GPUs of one box, the chips of one TPU VM host,
# or the CPU). COMMAND defaults to `train`; FLAGS go to `medplib-jax COMMAND` unchanged. Run from the repository
# root (config paths such as configs/stage2.py are relative to it). Examples:
#
#   launch/local.sh --config=configs/stage2.py --workdir=runs/stage2 --config.data.root=/data/MeCoVQA
#   launch/local.sh --config=configs/stage4.py:model=tiny,init=random --workdir=runs/try \
#       --config.data.root=outputs/demo_data --config.train.max_steps=5
#   launch/local.sh check-data --config=configs/stage4.py:model=tiny --config.data.root=outputs/demo_data
#   CPU_DEVICES=8 launch/local.sh --config=... --config.mesh.fsdp=2   # try a mesh on 8 fake CPU devices
#
# Environment:
#   MEDPLIB_JAX   the entry point (default: the medplib-jax console script if it is on PATH, else
#                 `$PYTHON -m medplib_jax`; PYTHON defaults to python3)
#   CPU_DEVICES   split the CPU into N fake devices (XLA_FLAGS=--xla_force_host_platform_device_count=N)
set -euo pipefail

command=train
if [[ $# -gt 0 && $1 != -* ]]; then
  command=$1
  shift
fi

if [[ -n ${MEDPLIB_JAX:-} ]]; then
  read -r -a entry <<< "$MEDPLIB_JAX"
elif [[ -z ${PYTHON:-} ]] && command -v medplib-jax > /dev/null; then
  entry=(medplib-jax)
else
  entry=("${PYTHON:-python3}" -m medplib_jax)
fi

if [[ -n ${CPU_DEVICES:-} ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES}"
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
fi

# --distributed=off: one process even inside a SLURM allocation or on a TPU pod worker (where `auto` would wait
# for peers that this script never starts). A later --distributed=... in FLAGS still wins.
exec "${entry[@]}" "$command" --distributed=off "$@"
