"""`medplib-jax compile-check`: does a config's train step fit a TPU slice (or a GPU box) before booking it?

The step is lowered and compiled ahead of time for the target on this host, nothing runs (MaxText's
`train_compile`): for TPUs, libtpu compiles for abstract devices of a real topology
(`jax.experimental.topologies.get_topology_desc`); the state and the batch are `ShapeDtypeStruct`s carrying their
shardings (`build_stage` materialises no parameter). GPU targets are estimates: XLA's CPU compiler over fake CPU
devices (`--xla_force_host_platform_device_count`, in a subprocess because the device count is fixed when jax
starts), whose memory plan is close to, not equal to, the GPU compiler's.

Topology names: `v5p-N` / `v4-N` with N = TensorCores as Google names the slices (2 per chip: v5p-8 is 4 chips
2x2x1, v5p-128 is 64 chips 4x4x4), `v5e-N` / `v6e-N` with N = chips (one core each), `gpu:8xH100` (one host of
8) or `gpu:4x8xH100` (hosts x GPUs). The check fails when a device's memory exceeds `max_hbm_fraction` of its HBM
or when more than `max_replicated_fraction` of the parameter bytes are replicated (split over no mesh axis of size
> 1: MaxText's check); its hint names the cause (a mesh that splits no parameter, an axis of size 1 that would split
them, rules that map them to no axis, or a model so small that the replicated bytes are harmless: raise the limit).
A mesh axis that does not divide a parameter's dimension (e.g. `config.mesh.tensor=2` and the 7B vocab of 32267) is
a one-line ValueError.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import ml_collections as mlc

GiB = 2 ** 30
LIBTPU_PIN = 'libtpu==0.0.42.*'  # what jax 0.10.2's [tpu] extra pins
INSTALL_HINT = f"pip install 'medplib-jax[tpu-compile]' (or pip install '{LIBTPU_PIN}', the libtpu jax 0.10.2 wants)"
MAX_HBM_FRACTION = 0.8
MAX_REPLICATED_FRACTION = 0.02
# The CLI flag (cli.py) that sets `max_replicated_fraction` of compile_check / run_compile_check / judge: what the
# hints and errors name.
REPLICATED_FLAG = '--max_replicated'
# Replicated parameter bytes under this share of one device's HBM are harmless whatever their fraction of the
# model (a tiny model's norms and LoRA adapters): the hint then says to raise the limit rather than reshape the mesh.
HARMLESS_HBM_SHARE = 0.01


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: libtpu's topology prefix and chip config, TensorCores per chip in the slice name
    (v4 / v5p count cores, 2 per chip; v5e / v6e count chips), torus rank, HBM per chip."""
    prefix: str
    chip_config: str
    cores_per_chip: int
    rank: int
    hbm_gib: float
    wrap: bool


TPU_GENERATIONS = {
    'v5p': Generation('v5p', 'megacore', 2, 3, 95.0, True),
    'v4': Generation('v4', 'megacore', 2, 3, 32.0, True),
    'v5e': Generation('v5e', 'default', 1, 2, 16.0, False),
    'v6e': Generation('v6e', 'default', 1, 2, 32.0, False),
}
GPU_HBM_GIB = {'H100': 80.0, 'H200': 141.0, 'A100': 80.0}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as the user wrote it
    kind: str  # 'tpu' | 'gpu'
    devices: int  # chips (TPU) or GPUs
    hbm_bytes: int  # per device
    topology: str = ''  # libtpu's, e.g. 'v5p:4x4x4'
    generation: str = ''

    @property
    def label(self) -> str:
        if self.kind == 'tpu':
            return f'{self.name} ({self.devices} chips, {self.topology.split(":")[1]}; real TPU compiler, libtpu)'
        return f'{self.name} ({self.devices} GPUs) ESTIMATE: XLA CPU compiler on {self.devices} fake CPU devices'


def _torus(chips: int, rank: int) -> tuple[int, ...]:
    """Google's slice shapes: 4 chips 2x2x1, then double the last of the smallest dims (2x2x2, 2x2x4, 2x4x4,
    4x4x4, 4x4x8, ...); 2D: 1x1, 2x2, 2x4, 4x4, 4x8, ..."""
    dims = [1] * rank
    while math.prod(dims) < chips:
        if rank == 3 and math.prod(dims) < 4:
            dims[dims.index(1)] *= 2  # 2x1x1, 2x2x1
        else:
            smallest = min(dims)
            dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
    return tuple(dims)


def parse_topology(name: str) -> Target:
    """`v5p-64` | `v4-128` | `v5e-16` | `v6e-256` | `gpu:8xH100` | `gpu:4x8xH100` -> Target (one-line errors)."""
    known = (f'known: {", ".join(f"{g}-N" for g in TPU_GENERATIONS)} (v4 / v5p: N TensorCores = 2 x chips, e.g. '
             f'v5p-8 = 4 chips; v5e / v6e: N chips) or gpu:[HOSTSx]Nx{{{",".join(GPU_HBM_GIB)}}}')
    m = re.fullmatch(r'(v5p|v4|v5e|v6e)-(\d+)', name.strip())
    if m:
        gen = TPU_GENERATIONS[m[1]]
        cores = int(m[2])
        chips, rest = divmod(cores, gen.cores_per_chip)
        smallest = 4 if gen.rank == 3 else 1
        if rest or chips < smallest or chips & (chips - 1):
            raise ValueError(f'--topology={name}: {m[1]} slices have a power-of-two number of chips (at least '
                             f'{smallest}) and {gen.cores_per_chip} TensorCore(s) per chip in the name; {known}')
        dims = _torus(chips, gen.rank)
        return Target(name, 'tpu', chips, int(gen.hbm_gib * GiB), f'{gen.prefix}:{"x".join(map(str, dims))}', m[1])
    m = re.fullmatch(r'gpu:(?:(\d+)x)?(\d+)x(\w+)', name.strip())
    if m and m[3].upper() in GPU_HBM_GIB:
        n = int(m[1] or 1) * int(m[2])
        if n < 1:
            raise ValueError(f'--topology={name}: needs at least one GPU')
        return Target(name, 'gpu', n, int(GPU_HBM_GIB[m[3].upper()] * GiB), generation=m[3].upper())
    raise ValueError(f'--topology={name!r}: unknown; {known}')


def _host_cpu() -> None:
    """This host only compiles: with libtpu installed, jax would otherwise try to bring up a TPU it lacks."""
    import jax
    from jax._src import xla_bridge
    if not os.environ.get('JAX_PLATFORMS') and not xla_bridge.backends_are_initialized():
        jax.config.update('jax_platforms', 'cpu')


def _require_libtpu() -> None:
    if importlib.util.find_spec('libtpu') is None:
        raise ValueError(f'compile-check for a TPU topology needs libtpu (only for this command): {INSTALL_HINT}')


# jax loads the libtpu plugin on the first topology request; two threads doing that at once fail with
# "PJRT_Api already exists for device type tpu" (seen when two topologies compile side by side).
_TOPOLOGY_LOCK = threading.Lock()
_TPU_COMPILE_LOCK = threading.Lock()


def tpu_devices(target: Target) -> list:
    """Abstract TPU devices of the target's topology (libtpu's compiler, no TPU needed)."""
    _require_libtpu()
    from jax.experimental import topologies
    gen = TPU_GENERATIONS[target.generation]
    # libtpu locks /tmp/libtpu_lockfile so that one process owns a real TPU; compiling for abstract devices owns
    # nothing, and two checks (or a check beside a test run) must not fail on that lock.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    hosts = (2, 2, 1) if target.devices >= 4 else (1, 1, 1)
    # libtpu warns on stderr that this host has no TPU accelerator type / worker hostnames: harmless here.
    with _TOPOLOGY_LOCK:
        desc = topologies.get_topology_desc(platform='tpu', topology_name=target.topology,
                                            chip_config_name=gen.chip_config, chips_per_host_bounds=hosts,
                                            num_slices=1, wrap=(gen.wrap,) * 3)
    return list(desc.devices)


def example_batch(config: mlc.ConfigDict) -> dict[str, Any]:
    """ShapeDtypeStructs of one global batch (config.data.batch_size rows) at the longest length bucket, the
    shapes the pipeline's Collator gives a batch of the longest records (built by the Collator itself on one
    padding row, so the two cannot drift)."""
    import jax

    from medplib_jax.data.collate import Collator
    from medplib_jax.data.config import DataConfig, ModelShapes
    from medplib_jax.train.step import TRAIN_KEYS
    data = DataConfig.from_config(config.data)
    longest = dataclasses.replace(data, length_buckets=(max(data.length_buckets),))
    row = Collator(1, longest, ModelShapes.from_config(config.model))([])
    return {k: jax.ShapeDtypeStruct((data.batch_size, *row[k].shape[1:]), row[k].dtype) for k in TRAIN_KEYS}


@dataclasses.dataclass
class Tensor:
    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: str
    bytes: int  # whole tensor
    device_bytes: int  # one device's shard
    axes: tuple[str, ...] = ()  # the mesh axes its spec names, of any size (size 1: they split nothing here)


@dataclasses.dataclass
class CheckResult:
    config: str
    target: str
    label: str
    devices: int
    mesh: dict[str, int]
    batch: int
    grad_accum: int
    length: int
    remat_policy: str
    scan_layers: bool
    hbm_bytes: int
    memory: dict[str, int] | None  # per device: arguments, outputs, aliased, temporaries, code, total (None:
    # not compiled)
    flops_per_device: float  # XLA cost_analysis (a scanned micro-batch body counted once)
    formula_flops: float  # train/flops.py, the whole step over all devices
    param_bytes: int
    replicated_param_bytes: int
    largest: list[Tensor]
    largest_replicated: list[Tensor]
    compile_s: float
    # Replicated parameter bytes by the mesh axis that would split them had it a size > 1 (a tensor naming two
    # counts under both); '': none would, the logical_axis_rules map all their dims to no mesh axis.
    replicated_split_by: dict[str, int] = dataclasses.field(default_factory=dict)
    oom: str = ''  # the compiler's out-of-memory message when it refused the program
    ok: bool = False
    reason: str = ''
    hint: str = ''
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    # Pallas TPU kernels in the compiled program (Mosaic custom calls, e.g. llm.attention='splash'): XLA's
    # cost analysis does not count their FLOPs.
    pallas_calls: int = 0
    pallas_kernels: dict[str, int] = dataclasses.field(default_factory=dict)
    # XLA's cost-model run time of the compiled program on one device (a scanned body counted once; 0: the
    # compiler gave none, e.g. the CPU compiler of a GPU estimate)
    xla_seconds: float = 0.0
    estimate: Any = None  # step_estimate.StepEstimate when asked for (TPU targets)
    moe_group_size: int = 0  # sequences per MoE routing group in training (0: no MoE layers)
    moe_dispatch: str = ''  # config.model.moe.dispatch

    @property
    def hbm_fraction(self) -> float:
        return self.memory['total'] / self.hbm_bytes if self.memory else float('nan')

    @property
    def replicated_fraction(self) -> float:
        return self.replicated_param_bytes / max(self.param_bytes, 1)

    @property
    def routing_note(self) -> str:
        """'' when every batch shard holds whole MoE routing groups, or the grouped dispatch computes each shard's
        own tokens whatever their groups (models/moe.py); else what the split costs the einsum dispatch."""
        g, micro = self.moe_group_size, self.batch // max(self.grad_accum, 1)
        shards = self.mesh.get('data', 1) * self.mesh.get('fsdp', 1)
        if not g or micro % (g * shards) == 0 or (self.moe_dispatch == 'grouped' and micro % shards == 0):
            return ''
        return (f'MoE routing groups of {g} sequences in micro-batches of {micro} rows over {shards} batch shards '
                f'(data x fsdp): {micro // g} groups, so a group spans several devices and only part of them get '
                f'expert work with the einsum dispatch (docs/training.md, "Estimated step time"); whole groups per '
                f'shard need micro-batches of a multiple of {g * shards} rows (config.train.grad_accum), or '
                f'--config.model.moe.dispatch=grouped')

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(hbm_fraction=self.hbm_fraction, replicated_fraction=self.replicated_fraction)
        return d


def _tensors(abstract_state: Any) -> tuple[list[Tensor], int, list[Tensor]]:
    """Every parameter and optimizer moment with its sharding -> (tensors, parameter bytes, the replicated
    parameters). A mesh axis that does not divide a dimension it splits is a one-line ValueError."""
    import jax

    from medplib_jax import sharding
    from medplib_jax.tree import key_path
    out, total = [], 0
    for part in ('params', 'opt_state'):
        for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(abstract_state, part)):
            if not leaf.shape:
                continue  # counters
            name = key_path(path) if part == 'params' else f'{part}/{key_path(path)}'
            _check_divisible(name, leaf)
            size = math.prod(leaf.shape) * leaf.dtype.itemsize
            shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
            axes = tuple(dict.fromkeys(a for e in leaf.sharding.spec if e is not None
                                       for a in (e if isinstance(e, tuple) else (e,))))
            out.append(Tensor(name, tuple(leaf.shape), str(leaf.dtype), str(tuple(leaf.sharding.spec)), size, shard,
                              axes))
            if part == 'params':
                total += size
    by_name = {t.path: t for t in out}
    replicated = [by_name[path] for path, leaf in sharding.unsharded_params(abstract_state.params) if leaf.shape]
    return out, total, replicated


def _check_divisible(name: str, leaf: Any) -> None:
    """jax's own error here is a multi-line IndivisibleError from deep inside; this one names the mesh setting."""
    mesh = leaf.sharding.mesh.shape
    for dim, (n, entry) in enumerate(zip(leaf.shape, leaf.sharding.spec)):
        for axis in (() if entry is None else entry if isinstance(entry, tuple) else (entry,)):
            if n % mesh[axis]:
                keep = math.gcd(n, mesh[axis])
                to = 'fsdp' if axis != 'fsdp' else 'data'
                raise ValueError(
                    f'config.mesh.{axis}={mesh[axis]} does not divide dimension {dim} ({n}) of {name} '
                    f'{tuple(leaf.shape)}, which the logical_axis_rules split over {axis!r}: use a size that divides '
                    f'{n}, e.g. --config.mesh.{axis}={keep} --config.mesh.{to}={mesh[to] * mesh[axis] // keep}, or map '
                    f'that dimension\'s logical axis to None in config.logical_axis_rules')


def _split_by(replicated: list[Tensor]) -> dict[str, int]:
    by: dict[str, int] = {}
    for t in replicated:
        for axis in t.axes or ('',):
            by[axis] = by.get(axis, 0) + t.bytes
    return by


def compile_step(config: mlc.ConfigDict, devices: list, log: Callable[[str], None] = print,
                 max_replicated_fraction: float = 1.0) -> dict[str, Any]:
    """Lowers and compiles the config's train step over `devices` (abstract TPU or CPU) -> figures. When more
    than `max_replicated_fraction` of the parameter bytes are replicated the compile is skipped (memory None):
    that mesh has to change first, and a 7B compile takes minutes."""
    import flax.linen as nn
    import jax

    from medplib_jax import sharding
    from medplib_jax.models.medplib import MedPLIBConfig
    from medplib_jax.train import flops as flops_lib
    from medplib_jax.train.loop import build_stage
    from medplib_jax.train.state import replicated
    example = example_batch(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    setup = build_stage(config, example, total_steps=1000, warmup=10, mesh=mesh)
    tensors, total, replicated_params = _tensors(setup.abstract)
    tensors.sort(key=lambda t: -t.bytes)
    replicated_params.sort(key=lambda t: -t.bytes)
    repl = sum(t.bytes for t in replicated_params)
    rows, length = (int(n) for n in example['input_ids'].shape)
    figures = dict(mesh=dict(mesh.shape), batch=rows, length=length, memory=None, flops_per_device=0.0,
                   formula_flops=flops_lib.step_flops(MedPLIBConfig.from_model_config(config.model), rows,
                                                      length).total,
                   param_bytes=total, replicated_param_bytes=repl, largest=tensors[:10],
                   largest_replicated=replicated_params[:3], compile_s=0.0,
                   replicated_split_by=_split_by(replicated_params))
    if mesh.size > 1 and repl / max(total, 1) > max_replicated_fraction:
        log(f'not compiling: {repl / max(total, 1):.1%} of the parameter bytes would be replicated (limit '
            f'{_pct(max_replicated_fraction)})')
        return figures
    rules = list(config.logical_axis_rules)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.data_sharding(mesh, len(v.shape), rules))
             for k, v in example.items()}
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh))
    log(f'compiling the train step: mesh {dict(mesh.shape)}, global batch {rows} at length {length} (the longest '
        f'bucket), grad_accum {config.train.grad_accum}, remat {config.model.remat_policy!r}, scan_layers '
        f'{config.model.scan_layers} ...')
    start = time.perf_counter()
    # An executable for abstract TPU devices cannot be read back from JAX's persistent cache (no client): skip it.
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update('jax_enable_compilation_cache', cache and devices[0].platform == 'cpu')
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
            lowered = setup.step.lower(setup.abstract, batch, rng)
        # libtpu crashed (SIGSEGV inside backend_compile_and_load) in 1 of 3 runs of the tests' two topologies
        # compiled from two threads at once: TPU compiles take turns; lowering still overlaps.
        with _TPU_COMPILE_LOCK if devices[0].platform != 'cpu' else contextlib.nullcontext():
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if 'RESOURCE_EXHAUSTED' not in str(e):
            raise
        # The TPU compiler refuses a program whose buffers exceed HBM: that is the answer, not a crash.
        figures.update(compile_s=time.perf_counter() - start, oom=' '.join(str(e).split())[:400])
        return figures
    finally:
        jax.config.update('jax_enable_compilation_cache', cache)
    figures['compile_s'] = time.perf_counter() - start
    mem = compiled.memory_analysis()
    memory = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                  aliased=mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes,
                  code=mem.generated_code_size_in_bytes)
    # Outputs aliased to donated arguments (the new state) take no extra memory.
    memory['total'] = memory['arguments'] + memory['outputs'] - memory['aliased'] + memory['temporaries'] + \
        memory['code']
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    hlo = compiled.as_text()
    kernels = pallas_kernels(hlo)
    # libtpu offloads some scatters (embedding and region-feature gradients) to the v5p's SparseCores as async
    # calls, which its cost model prices at -1 s each (seen: a tiny step's -9.9995 s with 10 of them, 0.0005 s
    # once they are taken out): they run beside the TensorCore and count as 0 here.
    offloads = len(re.findall(r'call-start\(.*async_execution_thread="sparsecore"', hlo))
    figures.update(memory=memory, flops_per_device=float(cost.get('flops', 0.0)),
                   xla_seconds=float(cost.get('optimal_seconds', 0.0)) + offloads, pallas_calls=sum(kernels.values()),
                   pallas_kernels=kernels)
    return figures


def pallas_kernels(hlo: str) -> dict[str, int]:
    """Pallas TPU kernels (Mosaic custom calls) in a compiled program's text -> calls by kernel name."""
    counts: dict[str, int] = {}
    for line in hlo.splitlines():
        if 'custom_call_target="tpu_custom_call"' in line:
            name = re.sub(r'\.\d+$', '', line.split('=', 1)[0].strip().lstrip('%').split()[-1])
            counts[name] = counts.get(name, 0) + 1
    return counts


def judge(r: CheckResult, *, max_hbm_fraction: float = MAX_HBM_FRACTION,
          max_replicated_fraction: float = MAX_REPLICATED_FRACTION, hbm_gib: float | None = None) -> CheckResult:
    """The same compiled figures judged again under other limits (or another HBM size) -> a new result."""
    _check_limits(max_hbm_fraction, max_replicated_fraction)
    r = dataclasses.replace(r, hbm_bytes=int(hbm_gib * GiB) if hbm_gib else r.hbm_bytes, ok=False, reason='',
                            hint='', thresholds=dict(max_hbm_fraction=max_hbm_fraction,
                                                     max_replicated_fraction=max_replicated_fraction))
    _verdict(r, max_hbm_fraction, max_replicated_fraction)
    return r


def _check_limits(max_hbm_fraction: float, max_replicated_fraction: float) -> None:
    for name, value in (('max_hbm_fraction', max_hbm_fraction), (REPLICATED_FLAG, max_replicated_fraction)):
        if not 0 <= value <= 1:
            raise ValueError(f'{name}={value}: a fraction from 0 to 1 (e.g. 0.05 for 5%)')


def _pct(x: float) -> str:
    return f'{x * 100:.3g}%'


def _mesh_flags(mesh: dict[str, int], new: dict[str, int]) -> str:
    return ' '.join(f'--config.mesh.{a}={n}' for a, n in new.items() if n != mesh[a])


def _grown(mesh: dict[str, int], axis: str) -> dict[str, int] | None:
    """The same devices with `axis` larger: data's devices go to fsdp whole (the hw= presets' FSDP over every
    device), otherwise the smallest prime factor of data (else of the largest other axis) moves over. None: no
    other axis has devices to give."""
    donors = sorted((a for a in mesh if a != axis and mesh[a] > 1), key=lambda a: (a != 'data', -mesh[a]))
    if not donors:
        return None
    d = donors[0]
    f = mesh[d] if (d, axis) == ('data', 'fsdp') else next(p for p in range(2, mesh[d] + 1) if mesh[d] % p == 0)
    return {**mesh, d: mesh[d] // f, axis: mesh[axis] * f}


def _replicated_hint(r: CheckResult, limit: float) -> str:
    """What would make the replicated share pass, from why the parameters are replicated; never the mesh or limit
    the result already has."""
    by = dict(r.replicated_split_by)
    unsplittable = by.pop('', 0)
    axis = max(by, key=lambda a: (by[a], a == 'fsdp'), default='')  # the axis that would split the most
    grown = _grown(r.mesh, axis) if axis else None
    split = (f'give mesh axis {axis!r} (size 1 here) devices: {_mesh_flags(r.mesh, grown)} would split '
             f'{_pct(by[axis] / max(r.param_bytes, 1))} of the parameter bytes' if grown else '')
    if r.replicated_param_bytes == r.param_bytes and r.param_bytes and split:
        return f'the mesh splits no parameter; {split}'
    raise_limit = (f'raise the limit: {REPLICATED_FLAG}={math.ceil(r.replicated_fraction * 100) / 100:g} '
                   f'(now {limit:g})')
    if r.replicated_param_bytes < HARMLESS_HBM_SHARE * r.hbm_bytes:
        # Splitting is only worth naming when it alone would bring the share under the limit.
        alt = f'; or {split}' if split and (r.replicated_param_bytes - by[axis]) / r.param_bytes <= limit else ''
        return (f'the replicated tensors are {r.replicated_param_bytes / 2 ** 20:.2f} MiB in all '
                f'beside {r.hbm_bytes / GiB:.0f} GiB of HBM per device: a small model\'s share, harmless; '
                f'{raise_limit}{alt}')
    if split and by[axis] >= unsplittable:
        return split
    largest = next((f' (largest: {t.path})' for t in r.largest_replicated if not t.axes), '')
    return (f'{unsplittable / GiB:.2f} GiB of them have no dimension that config.logical_axis_rules map to a mesh '
            f'axis{largest}: map one of their logical axes to \'fsdp\' there' + (f'; or {split}' if split else ''))


def _memory_hint(r: CheckResult) -> str:
    """The memory levers this config has not pulled yet."""
    ways = []
    if r.remat_policy != 'full':
        ways.append(f"rematerialise more: model.remat_policy='full' (now {r.remat_policy!r}; configs arg remat=full)")
    if r.mesh.get('data', 1) > 1:
        ways.append(f'shard the state over more devices: {_mesh_flags(r.mesh, _grown(r.mesh, "fsdp") or r.mesh)}')
    shards = r.mesh.get('data', 1) * r.mesh.get('fsdp', 1)
    micro = r.batch // max(r.grad_accum, 1)
    if micro % (2 * shards) == 0:
        ways.append(f'halve the micro-batch to {micro // 2}: --config.train.grad_accum={2 * r.grad_accum}')
    return '; '.join(ways) or 'a target with more HBM or more devices (every memory lever of this config is pulled)'


def _verdict(r: CheckResult, max_hbm_fraction: float, max_replicated_fraction: float) -> None:
    if r.devices > 1 and r.replicated_fraction > max_replicated_fraction:
        r.reason = (f'{r.replicated_fraction:.1%} of the parameter bytes are replicated on every device (limit '
                    f'{_pct(max_replicated_fraction)}) over the mesh {r.mesh}')
        r.hint = _replicated_hint(r, max_replicated_fraction)
    elif r.oom:
        r.reason = f'the compiler ran out of device memory ({r.oom})'
        r.hint = _memory_hint(r)
    elif r.memory is None:  # judged under a looser replicated limit than the one that skipped the compile
        r.reason = 'the step was not compiled (a stricter replicated-parameter limit stopped it first)'
        r.hint = f'run compile-check again with {REPLICATED_FLAG}={max_replicated_fraction:g}'
    elif r.hbm_fraction > max_hbm_fraction:
        r.reason = (f'{r.memory["total"] / GiB:.1f} GiB per device is {r.hbm_fraction:.0%} of the '
                    f'{r.hbm_bytes / GiB:.0f} GiB HBM (limit {_pct(max_hbm_fraction)})')
        r.hint = _memory_hint(r)
    r.ok = not r.reason


def report(r: CheckResult) -> str:
    """The human-readable summary of a result."""
    lines = [f'compile-check {r.config} on {r.label}',
             f'  mesh {r.mesh}; global batch {r.batch} = {r.grad_accum} micro-batches of {r.batch // r.grad_accum}'
             f', length {r.length}; remat {r.remat_policy!r}'
             + (f'; compiled in {r.compile_s:.0f}s' if r.memory else '')]
    if r.memory:
        m = {k: v / GiB for k, v in r.memory.items()}
        lines += [f'  memory per device: arguments {m["arguments"]:.2f} GiB, outputs {m["outputs"]:.2f} GiB '
                  f'(aliased {m["aliased"]:.2f}), temporaries {m["temporaries"]:.2f} GiB, code {m["code"]:.3f} GiB '
                  f'-> total {m["total"]:.2f} GiB = {r.hbm_fraction:.1%} of {r.hbm_bytes / GiB:.0f} GiB HBM',
                  f'  FLOPs per step: XLA cost_analysis {r.flops_per_device * r.devices / 1e12:.4g} TFLOP over '
                  f'{r.devices} devices ({r.flops_per_device / 1e12:.4g} per device; a scanned micro-batch body '
                  f'is counted once), formula {r.formula_flops / 1e12:.4g} TFLOP (train/flops.py)']
        if r.pallas_calls:
            lines.append(f'  Pallas kernels: {r.pallas_calls} calls in the program '
                         f'{dict(sorted(r.pallas_kernels.items()))} (XLA\'s cost analysis prices libtpu\'s '
                         f'ragged-dot kernels, not the splash attention ones)')
        if r.estimate is not None:
            from medplib_jax.train.step_estimate import describe
            lines += describe(r.estimate)
        if r.routing_note:
            lines.append(f'  note: {r.routing_note}')
    elif r.oom:
        lines.append(f'  memory per device: more than the {r.hbm_bytes / GiB:.0f} GiB HBM (the compiler refused it '
                     f'after {r.compile_s:.0f}s)')
    else:
        lines.append('  memory per device: not compiled (too many parameter bytes replicated: see the hint)')
    biggest = ', '.join(f'{t.path} {t.bytes / 2**20:.1f} MiB' for t in r.largest_replicated)
    lines += [f'  parameters {r.param_bytes / GiB:.2f} GiB, replicated {r.replicated_fraction:.2%}'
              + (f' (largest: {biggest})' if biggest else ''),
              '  ten largest state tensors (whole / per device, sharding):']
    width = max((len(t.path) for t in r.largest), default=0)
    lines += [f'    {t.path:<{width}}  {str(t.shape):<18} {t.dtype:<8} {t.bytes / 2**20:10.1f} MiB / '
              f'{t.device_bytes / 2**20:9.1f} MiB  {t.spec}' for t in r.largest]
    lines.append('FITS' if r.ok else f'DOES NOT FIT: {r.reason}. Hint: {r.hint}')
    return '\n'.join(lines)


def compile_check(config_filename: str, config: mlc.ConfigDict, topology: str, *,
                  max_hbm_fraction: float = MAX_HBM_FRACTION,
                  max_replicated_fraction: float = MAX_REPLICATED_FRACTION, hbm_gib: float | None = None,
                  log: Callable[[str], None] = print, estimate: bool = False) -> CheckResult:
    """Compiles the config's train step for `topology` -> the result with its verdict (`ok`, `reason`, `hint`).
    Limits are fractions: of a device's HBM, and of the parameter bytes that may be replicated on every device
    (`max_replicated_fraction`, the CLI's --max_replicated). `hbm_gib` overrides the device's HBM (tests).
    `estimate` (TPU targets): also XLA's estimate of the step time and the MFU it implies (train/step_estimate.py;
    two more compiles at reduced depth)."""
    _check_limits(max_hbm_fraction, max_replicated_fraction)
    target = parse_topology(topology)
    if estimate and target.kind != 'tpu':
        raise ValueError(f'--estimate needs a TPU topology: {target.name} is compiled by the CPU compiler, which has '
                         f'no cost model of a GPU')
    _host_cpu()
    if target.kind == 'gpu':
        return _gpu_estimate(config_filename, config, target, max_hbm_fraction, max_replicated_fraction, hbm_gib,
                             log)
    devices = tpu_devices(target)
    figures = compile_step(config, devices, log, max_replicated_fraction)
    if estimate and figures['memory'] is not None:
        from medplib_jax.train import step_estimate
        figures['estimate'] = step_estimate.estimate(config, devices, compile_step, log)
    return _finish(config_filename, config, target, figures, max_hbm_fraction, max_replicated_fraction, hbm_gib)


def _finish(config_filename, config, target, figures, max_hbm_fraction, max_replicated_fraction, hbm_gib):
    hbm = int(hbm_gib * GiB) if hbm_gib else target.hbm_bytes
    r = CheckResult(config=config_filename, target=target.name, label=target.label, devices=target.devices,
                    grad_accum=int(config.train.grad_accum), remat_policy=str(config.model.remat_policy),
                    moe_group_size=int(config.model.moe.group_size) if config.model.moe.mode != 'none' else 0,
                    moe_dispatch=str(config.model.moe.dispatch),
                    scan_layers=bool(config.model.scan_layers), hbm_bytes=hbm,
                    thresholds=dict(max_hbm_fraction=max_hbm_fraction,
                                    max_replicated_fraction=max_replicated_fraction), **figures)
    _verdict(r, max_hbm_fraction, max_replicated_fraction)
    return r


def _cpu_devices_now(n: int) -> list | None:
    """n CPU devices of this process if jax already has them (tests run with 8), else None."""
    import jax
    try:
        devices = jax.devices('cpu')
    except RuntimeError:
        return None
    return devices[:n] if len(devices) >= n else None


def _gpu_estimate(config_filename, config, target, max_hbm_fraction, max_replicated_fraction, hbm_gib, log):
    devices = _cpu_devices_now(target.devices)
    if devices is not None:
        figures = compile_step(config, devices, log, max_replicated_fraction)
        return _finish(config_filename, config, target, figures, max_hbm_fraction, max_replicated_fraction,
                       hbm_gib)
    # The CPU device count is fixed when jax starts: compile in a child process that has enough.
    with tempfile.TemporaryDirectory(prefix='compile-check-') as tmp:
        args = os.path.join(tmp, 'args.pkl')
        out = os.path.join(tmp, 'result.pkl')
        with open(args, 'wb') as f:
            pickle.dump(dict(config_filename=config_filename, config=config, topology=target.name,
                             max_hbm_fraction=max_hbm_fraction, max_replicated_fraction=max_replicated_fraction,
                             hbm_gib=hbm_gib), f)
        env = dict(os.environ, JAX_PLATFORMS='cpu',
                   XLA_FLAGS=(re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                                     os.environ.get('XLA_FLAGS', '')) +
                              f' --xla_force_host_platform_device_count={target.devices}').strip())
        done = subprocess.run([sys.executable, '-m', 'medplib_jax.train.compile_check', args, out], env=env)
        if done.returncode or not os.path.exists(out):
            raise RuntimeError(f'compile-check: the CPU estimate for {target.name} failed in its subprocess '
                               f'(exit {done.returncode})')
        with open(out, 'rb') as f:
            return pickle.load(f)


def run_compile_check(config_filename: str, config: mlc.ConfigDict, topology: str, *,
                      max_hbm_fraction: float = MAX_HBM_FRACTION,
                      max_replicated_fraction: float = MAX_REPLICATED_FRACTION, hbm_gib: float | None = None,
                      json_out: str = '', log: Callable[[str], None] = print, estimate: bool = False) -> bool:
    """`medplib-jax compile-check`: prints the report; True when the step fits (see compile_check: the limits are
    fractions, `max_replicated_fraction` the share of parameter bytes that may be replicated on every device)."""
    r = compile_check(config_filename, config, topology, max_hbm_fraction=max_hbm_fraction,
                      max_replicated_fraction=max_replicated_fraction, hbm_gib=hbm_gib, log=log, estimate=estimate)
    log(report(r))
    if json_out:
        with open(json_out, 'w') as f:
            json.dump(r.to_dict(), f, indent=1, default=str)
    return r.ok


def _child(args_path: str, out_path: str) -> None:
    with open(args_path, 'rb') as f:
        a = pickle.load(f)
    target = parse_topology(a['topology'])
    devices = _cpu_devices_now(target.devices)
    if devices is None:
        raise SystemExit(f'compile-check: expected {target.devices} CPU devices in the subprocess')
    r = _gpu_estimate(a['config_filename'], a['config'], target, a['max_hbm_fraction'],
                      a['max_replicated_fraction'], a['hbm_gib'], print)
    with open(out_path, 'wb') as f:
        pickle.dump(r, f)


if __name__ == '__main__':
    # Through the module's real name, so the pickled result's classes are medplib_jax.train.compile_check's.
    from medplib_jax.train.compile_check import _child as child
    child(*sys.argv[1:3])
