"""Multi-host start-up: `jax.distributed.initialize` on TPU pods, multi-task SLURM (or mpirun) jobs and explicit
clusters, before anything touches jax devices (the CLI calls `initialize` first for train / sweep / demo / export).

    --distributed=off       one process; nothing is called
    --distributed=auto      jax's own cluster detection (jax._src.clusters): a TPU VM pod slice (GCE metadata or
                            GKE's TPU_WORKER_HOSTNAMES / MEGASCALE_*), a SLURM step or an Open MPI launch with more
                            than one process -> jax.distributed.initialize() fills in the coordinator and process
                            ids; anything else (a laptop, one TPU VM host, one SLURM task) -> one process
    --distributed=explicit  --coordinator=HOST:PORT --num_processes=N --process_id=I [--local_device_ids=0,1]

After it, every process runs the same program over the global mesh; the input pipeline shards by
`jax.process_index()`, only process 0 writes logs and every process writes its own Orbax shards.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import jax

MODES = ('auto', 'off', 'explicit')
# The jax cluster detectors `auto` consults, in jax's own order. Kubernetes is left out on purpose: its detector
# queries the cluster API from any pod (CI runners included) and GKE TPU jobs are found by 'gketpu' first.
AUTO_CLUSTERS = ('ompi', 'slurm', 'gketpu', 'gcetpu')
_TPU_CLUSTERS = ('gketpu', 'gcetpu')


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A multi-process launch found by `detect`: jax's detector name and the number of processes."""
    name: str
    num_processes: int


def detect() -> Cluster | None:
    """The multi-process cluster this process runs in (by jax's detectors), or None for a single process."""
    from jax._src import clusters  # jax's detectors; private, but the same code jax.distributed.initialize runs
    envs = {env.name: env for env in clusters.ClusterEnv._cluster_types}
    for name in AUTO_CLUSTERS:
        env = envs.get(name)
        if env is None or not env.is_env_present():
            continue
        # SLURM: the step's task count, not the allocation's: a bare `python` inside an sbatch script with
        # --ntasks=8 is the batch step (1 task) and must not wait for 7 peers that never start.
        count = _slurm_step_tasks() if name == 'slurm' else int(env.get_process_count())
        return Cluster(name, count) if count > 1 else None
    return None


def initialize(mode: str, *, coordinator: str = '', num_processes: int = 0, process_id: int = -1,
               local_device_ids: Sequence[int | str] = ()) -> None:
    """Starts jax.distributed as `mode` says (see the module docstring). A bad explicit value is a one-line
    ValueError naming its flag. A second call (or one after jax.distributed was started elsewhere) does nothing."""
    if mode not in MODES:
        raise ValueError(f'--distributed={mode!r}: expected one of {", ".join(MODES)}')
    if mode == 'off' or _started():
        return
    local = _device_ids(local_device_ids)
    if mode == 'explicit':
        kwargs = _explicit(coordinator, num_processes, process_id, local)
        name = 'explicit'
    else:
        cluster = detect()
        if cluster is None:
            return
        # Coordinator, process count and id come from jax's detector of the same name.
        kwargs = dict(cluster_detection_method=cluster.name, local_device_ids=_auto_local_ids(cluster, local))
        name = cluster.name
    # Cross-process collectives of the CPU backend (CPU runs and tests); it does not affect GPU or TPU clients.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(**kwargs)
    if jax.process_index() == 0:
        print(f'jax.distributed ({name}): process {jax.process_index()} of {jax.process_count()}, '
              f'{jax.local_device_count()} local / {jax.device_count()} global devices '
              f'({jax.devices()[0].platform})', flush=True)


def _started() -> bool:
    from jax._src import distributed as jax_distributed
    return getattr(jax_distributed.global_state, 'client', None) is not None


def _device_ids(ids: Sequence[int | str]) -> list[int]:
    out = []
    for i in ids:
        try:
            value = int(i)
        except (TypeError, ValueError):
            value = -1
        if value < 0:
            raise ValueError(f'--local_device_ids={",".join(map(str, ids))}: expected device indices >= 0, got {i!r}')
        out.append(value)
    if len(set(out)) != len(out):
        raise ValueError(f'--local_device_ids={",".join(map(str, ids))}: an index appears twice')
    return out


def _explicit(coordinator: str, num_processes: int, process_id: int, local: list[int]) -> dict:
    host, _, port = coordinator.rpartition(':')
    if not coordinator:
        raise ValueError('--distributed=explicit needs --coordinator=HOST:PORT (process 0\'s address, the same '
                         'on every process)')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'--coordinator={coordinator}: expected HOST:PORT with a port in 1..65535')
    if num_processes < 1:
        raise ValueError(f'--distributed=explicit needs --num_processes=N >= 1 (got {num_processes})')
    if not 0 <= process_id < num_processes:
        raise ValueError(f'--distributed=explicit needs --process_id in 0..{num_processes - 1} (got {process_id})')
    # 'deactivate': the flags are the whole truth, even inside a SLURM job (whose detector would pick the ids).
    return dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                local_device_ids=local or None, cluster_detection_method='deactivate')


def _auto_local_ids(cluster: Cluster, given: list[int]) -> list[int] | None:
    """The devices this process drives. TPU: None (each host process owns its chips; jax never restricts them).
    GPU launches: one process per GPU -> [local rank], what jax itself would pick; but one process per node ->
    [] = every visible GPU (jax would otherwise keep only GPU 0), and a task SLURM already bound to one GPU
    (CUDA_VISIBLE_DEVICES=3 shows it as device 0) -> [] as well."""
    if given:
        return given
    if cluster.name in _TPU_CLUSTERS:
        return None
    if cluster.name == 'slurm':
        per_node, rank = _slurm_tasks_on_node(), int(os.environ.get('SLURM_LOCALID', 0))
    else:
        per_node = int(os.environ.get('OMPI_COMM_WORLD_LOCAL_SIZE', 0))
        rank = int(os.environ.get('OMPI_COMM_WORLD_LOCAL_RANK', 0))
    visible = [d for d in os.environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
    if per_node == 1 or len(visible) == 1:
        return []
    return [rank]


def _slurm_step_tasks() -> int:
    return int(os.environ.get('SLURM_STEP_NUM_TASKS') or os.environ.get('SLURM_NTASKS') or 1)


def _slurm_tasks_on_node() -> int:
    """Tasks of this step on this node from SLURM's compressed list ('4(x2),1' = 4, 4, 1); 0 if unknown."""
    spec = os.environ.get('SLURM_STEP_TASKS_PER_NODE') or os.environ.get('SLURM_TASKS_PER_NODE') or ''
    counts: list[int] = []
    for part in spec.split(','):
        m = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
        if m:
            counts += [int(m[1])] * int(m[2] or 1)
    node = int(os.environ.get('SLURM_NODEID', 0))
    return counts[node] if node < len(counts) else max(counts, default=0)
