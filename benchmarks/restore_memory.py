"""Peak host memory of restoring a train-state checkpoint onto another mesh, against the checkpoint's size.

Writes a parameter-like tree (`--mib` of float32 in 16 MiB arrays, each split over ('fsdp', 'tensor')) on a
(2, 2, 2) mesh of 8 fake CPU devices with `RunCheckpoints`, then in a fresh process per target restores it onto
1 device and onto a (4, 2) mesh (target shardings from abstract arrays, as a resumed run does) and reports the
growth of the process's peak resident memory (VmHWM) during the restore. On CPU the "devices" live in host
memory, so the restored shards themselves (replicas over the data axis included) are subtracted; what remains is
the restore's transient memory. Results: benchmarks/results/restore_memory_cpu.json.

    python benchmarks/restore_memory.py [--mib 1024]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

ARRAY = (2048, 2048)  # 16 MiB of float32
MESHES = {'written (2, 2, 2)': (2, 2, 2), '1 device': (1, 1, 1), '(4, 2)': (4, 2, 1)}


def _mesh(shape):
    import jax
    from jax.sharding import AxisType
    n = shape[0] * shape[1] * shape[2]
    return jax.make_mesh(shape, ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:n])


def _abstract(count, mesh):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    spec = NamedSharding(mesh, PartitionSpec('fsdp', 'tensor'))
    return {f'layer_{i}': {'kernel': jax.ShapeDtypeStruct(ARRAY, 'float32', sharding=spec)} for i in range(count)}


def _peak_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024  # kB


def write(directory: str, count: int) -> None:
    import jax

    from medplib_jax.checkpoint import CheckpointConfig, RunCheckpoints
    mesh = _mesh(MESHES['written (2, 2, 2)'])
    tree = jax.tree.map(lambda s: jax.jit(lambda: jax.random.normal(jax.random.key(0), s.shape),
                                          out_shardings=s.sharding)(), _abstract(count, mesh))
    ckpts = RunCheckpoints(directory, CheckpointConfig(async_save=False))
    ckpts.save(1, tree, None, {'process_count': 1})
    ckpts.close()


def restore(directory: str, count: int, target: str) -> dict:
    import jax
    import numpy as np

    from medplib_jax.checkpoint import CheckpointConfig, RunCheckpoints
    mesh = _mesh(MESHES[target])
    ckpts = RunCheckpoints(directory, CheckpointConfig(async_save=False))
    before = _peak_mib()
    tree, _ = ckpts.restore(1, _abstract(count, mesh), None)
    jax.block_until_ready(tree)
    after = _peak_mib()
    ckpts.close()
    first = tree['layer_0']['kernel']
    # What the restored arrays themselves hold on the (host-memory) devices: replicas over the data axis included.
    held = sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards) / 2**20
    return {'peak_rss_before_mib': before, 'peak_rss_after_mib': after, 'restore_growth_mib': after - before,
            'restored_arrays_mib': held, 'transient_mib': after - before - held,
            'shards_per_array': len(first.addressable_shards), 'finite': bool(np.isfinite(np.asarray(first)).all())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--mib', type=int, default=1024)
    parser.add_argument('--_restore', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    count = max(1, args.mib // 16)
    if args._restore:
        print(json.dumps(restore(args._restore[0], count, args._restore[1])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        write(tmp, count)
        size = sum(os.path.getsize(os.path.join(b, f)) for b, _, fs in os.walk(tmp) for f in fs)
        results = {'tree_mib': count * 16, 'checkpoint_on_disk_mib': round(size / 2**20, 1), 'targets': {}}
        for target in ('1 device', '(4, 2)'):
            out = subprocess.run([sys.executable, __file__, f'--mib={args.mib}', '--_restore', tmp, target],
                                 check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            r['transient_over_tree'] = round(r['transient_mib'] / results['tree_mib'], 2)
            results['targets'][target] = r
            print(f'{target}: peak RSS grew {r["restore_growth_mib"]:.0f} MiB restoring a {results["tree_mib"]} MiB '
                  f'tree: {r["restored_arrays_mib"]:.0f} MiB the restored shards hold ({r["shards_per_array"]} per '
                  f'array) + {r["transient_mib"]:.0f} MiB transient ({r["transient_over_tree"]}x the tree)')
    results['machine'] = f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}'
    out_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'restore_memory_cpu.json')
    with open(out_path, 'w') as f:
        json.dump(results, f, indent=1)
    print(out_path)


if __name__ == '__main__':
    main()
