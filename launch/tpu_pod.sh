#!/usr/bin/env bash
# Usage: TPU_NAME=my-v5p-64 ZONE=us-east5-a [PROJECT=my-project] launch/tpu_pod.sh [COMMAND] [FLAGS...]
#
# Runs the same `medplib-jax COMMAND --distributed=auto FLAGS...` on every worker (host) of a TPU VM pod slice at
# once, through `gcloud compute tpus tpu-vm ssh --worker=all`. COMMAND defaults to `train`. Each worker is one JAX
# process driving its local chips; `--distributed=auto` finds the slice from the TPU VM metadata (jax's own
# cluster detection: coordinator = worker 0, process id = worker number), so no coordinator flags are needed.
# Example: the 7B stage II on a v5p-64 slice (8 hosts x 4 chips = 32 devices; the mesh's axes multiply to the
# slice's device count, -1 = the rest):
#
#   TPU_NAME=medplib ZONE=us-east5-a launch/tpu_pod.sh --config=configs/stage2.py \
#       --workdir=/mnt/shared/runs/stage2 --config.data.root=/mnt/shared/MeCoVQA --config.mesh.fsdp=-1
#
# Needs on every worker: this repository at $REPO_DIR with its venv (`SETUP=1` installs it there first:
# `pip install -e .[tpu]`), and a workdir / data root that every host sees (a Filestore / NFS mount or a
# gcsfuse-mounted bucket): every process writes its own Orbax parameter shards into the same workdir; only
# process 0 writes logs (stdout, TensorBoard, metrics.jsonl). Only worker 0 prints the progress.
#
# Environment:
#   TPU_NAME, ZONE   the TPU VM (required); PROJECT: the gcloud project (default: gcloud's configured one)
#   REPO_DIR         the repository on the workers (default: ~/medplib-jax)
#   SETUP=1          first create $REPO_DIR/.venv and `pip install -e .[tpu]` on every worker (the repository
#                    must already be there, e.g. `gcloud compute tpus tpu-vm scp --recurse --worker=all`)
#   DETACH=1         start the run under nohup (output in $REPO_DIR/medplib-jax.log on each worker) and return,
#                    so a dropped ssh connection does not kill a long run
#   DRY_RUN=1        print the gcloud command instead of running it
#
# Alternative: xpk (GKE TPU clusters; Docker image with the repository installed). The same entry point; GKE's
# TPU_WORKER_HOSTNAMES / MEGASCALE_* variables are what `--distributed=auto` reads there:
#
#   xpk workload create --cluster=CLUSTER --workload=medplib-stage2 --tpu-type=v5p-64 --num-slices=1 \
#       --docker-image=IMAGE --command="medplib-jax train --distributed=auto --config=configs/stage2.py \
#       --workdir=/mnt/shared/runs/stage2 --config.data.root=/mnt/shared/MeCoVQA"
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME (the TPU VM name)}"
: "${ZONE:?set ZONE (the TPU VM zone)}"
REPO_DIR=${REPO_DIR:-'~/medplib-jax'}  # expanded by the workers' shell, not here

command=train
if [[ $# -gt 0 && $1 != -* ]]; then
  command=$1
  shift
fi

# Quote every flag for the remote shell (config args such as model=tiny,init=random survive as they are).
flags=$(printf ' %q' "$@")
run=".venv/bin/medplib-jax ${command} --distributed=auto${flags}"
if [[ ${DETACH:-0} == 1 ]]; then
  run="nohup ${run} > medplib-jax.log 2>&1 < /dev/null &"
fi
remote="cd ${REPO_DIR} && "
if [[ ${SETUP:-0} == 1 ]]; then
  remote+="{ [ -d .venv ] || python3 -m venv .venv; } && .venv/bin/pip install -q -e '.[tpu]' && "
fi
remote+="${run}"

gcloud=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$remote")
if [[ -n ${PROJECT:-} ]]; then
  gcloud+=(--project="$PROJECT")
fi
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${gcloud[@]}"
  echo
  exit 0
fi
exec "${gcloud[@]}"
