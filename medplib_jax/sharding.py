"""Device mesh, logical-axis rules and parameter shardings.

Models only name their axes (`nn.with_logical_partitioning` on parameters, `nn.with_logical_constraint` on
activations); this module turns those names into `NamedSharding`s over a `('data', 'fsdp', 'tensor')` mesh with
one rules table from the config.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from medplib_jax.axis_rules import BATCH, LOGICAL_AXIS_RULES, MESH_AXES, mesh_axes
from medplib_jax.tree import key_path

Rules = Sequence[tuple[str, Any]]


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves the configured axis sizes (one may be -1 = the rest) against the device count."""
    unknown = set(mesh_cfg) - set(MESH_AXES)
    if unknown:
        raise ValueError(f'mesh config: unknown axes {sorted(unknown)}; known: {list(MESH_AXES)}')
    sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f'mesh config {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1')
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f'mesh config {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1')
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f'mesh config {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not '
                             f'divisible by the fixed axes ({known})')
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f'mesh config {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                         f'have {num_devices}')
    return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the mesh with `AxisType.Auto` axes (GSPMD-style propagation, as linen's constraints need)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_sharding(logical_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """Maps a tree of logical `PartitionSpec`s (e.g. from `nn.get_partition_spec`) to `NamedSharding`s."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, list(rules))


def param_shardings(boxed_params: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for a (possibly abstract) tree of `nn.LogicallyPartitioned` params."""
    return logical_to_sharding(nn.get_partition_spec(boxed_params), mesh, rules)


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules, *args: Any) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` under jit so each parameter is created directly in its shard.

    Returns (unboxed params, their shardings). `init_fn` returns boxed variables (linen `init`).
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(abstract, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        variables = jax.jit(init_fn, out_shardings=shardings)(*args)
    return nn.unbox(variables), shardings


def shard_like(tree: Any, shardings: Any) -> Any:
    """Places an existing (host / single-device) tree onto the given shardings."""
    return jax.tree.map(jax.device_put, tree, shardings)


def sharded_axes(sharding: jax.sharding.Sharding) -> set[str]:
    if not isinstance(sharding, NamedSharding):
        return set()
    axes: set[str] = set()
    for entry in sharding.spec:
        if entry is None:
            continue
        for name in (entry if isinstance(entry, tuple) else (entry,)):
            if sharding.mesh.shape[name] > 1:
                axes.add(name)
    return axes


def unsharded_params(params: Any, min_size: int = 0, axes: Sequence[str] | None = None
                     ) -> list[tuple[str, Any]]:
    """(path, leaf) of every parameter with at least `min_size` elements that is split over none of `axes` (None:
    no mesh axis at all) although its mesh has such an axis bigger than 1: the weights every device holds whole."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        sharding = getattr(leaf, 'sharding', None)
        mesh = getattr(sharding, 'mesh', None)
        if mesh is None or math.prod(leaf.shape) < min_size:
            continue
        wanted = set(mesh.axis_names if axes is None else axes)
        if all(mesh.shape.get(a, 1) == 1 for a in wanted):
            continue
        if not sharded_axes(sharding) & wanted:
            out.append((key_path(path), leaf))
    return out


def assert_params_sharded(params: Any, min_size: int = 2 ** 16, axes: Sequence[str] = ('fsdp', 'tensor')) -> None:
    """Fails if any parameter with at least `min_size` elements is not split over one of `axes`.

    Replicating a big weight on every device is how a 7B run silently OOMs; training calls this at start-up. A
    no-op when the mesh has no axis of `axes` bigger than 1.
    """
    offenders = [f'{path} {tuple(leaf.shape)} spec={leaf.sharding.spec}'
                 for path, leaf in unsharded_params(params, min_size, axes)]
    if offenders:
        raise ValueError(f'{len(offenders)} large parameters are not sharded over {list(axes)} (see '
                         f'config.logical_axis_rules and config.mesh): ' + '; '.join(offenders))


def batch_shards(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> int:
    """How many ways the rules table splits the batch over this mesh."""
    return math.prod(mesh.shape[a] for a in mesh_axes(BATCH, rules))


def data_sharding(mesh: Mesh, rank: int, rules: Rules | None = None) -> NamedSharding:
    """Batch-leading arrays: the first axis as the rules table splits `activation_batch` (`rules`, else linen's
    current `logical_axis_rules`, else the project's table), the rest replicated."""
    rules = rules if rules is not None else (nn.get_logical_axis_rules() or LOGICAL_AXIS_RULES)
    return NamedSharding(mesh, PartitionSpec(mesh_axes(BATCH, rules) or None, *([None] * (rank - 1))))


def largest_dim_sharding(mesh: Mesh) -> Callable[[str, tuple[int, ...]], NamedSharding]:
    """For writing or reading arrays without a model (export, conversion): each array is split along its largest
    dimension the devices divide (else kept whole), so no device holds a full copy of a big tree."""
    n = mesh.devices.size

    def sharding_of(_: str, shape: tuple[int, ...]) -> NamedSharding:
        dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % n == 0]
        spec = [None] * len(shape)
        if dims:
            spec[dims[0]] = mesh.axis_names[0]
        return NamedSharding(mesh, PartitionSpec(*spec))

    return sharding_of
