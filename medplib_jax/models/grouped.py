"""Grouped (per-expert) matmul over rows sorted by expert: the compute of the MoE layer's 'grouped' dispatch.

Rows are laid out expert after expert, each expert's block padded to a whole number of `tile` rows, so every
tile belongs to one expert; rows past the last used tile are zero. Two kernels compute the same product
(GROUPED_MATMUL in models/config.py):
- 'ragged_dot': `jax.lax.ragged_dot` over the experts' row blocks. libtpu compiles it to its own grouped-matmul
  kernel, priced by XLA's cost model at the rows' FLOPs; the choice on TPU and GPU.
- 'tiles': loops over the tiles each expert actually uses (dynamic trip counts), with their own VJP. On CPU this
  jax lowers `ragged_dot` by expanding the rows to one masked copy per expert (E times the compute), so CPU runs
  these loops.
Either way the cost follows the routed rows (plus at most `tile - 1` padding rows per expert), not a capacity.

Under a mesh the rows of each batch shard stay on it: a layout with `axes` holds one block of rows per shard
(rows of shard i at [i R, (i + 1) R), each block laid out as above, `tile_bounds` (shards, E, 2)), and the matmul
runs per shard (`jax.shard_map` over `axes`, the weights gathered whole as FSDP gathers them for any matmul).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

MAX_TILE = 128  # rows per tile: large enough for efficient CPU matmuls, small enough to waste little padding


@dataclasses.dataclass(frozen=True)
class GroupedLayout:
    """Where each expert's rows are. tile_bounds (shards, E, 2) int32: per shard, [first, end) tile of each expert
    in the shard's block of rows; row_expert (R,) int32: each row's expert (E for rows past the last used tile).
    kernel: 'tiles' | 'ragged_dot'; axes: the mesh axes the blocks are split over (empty: one block, no mesh)."""
    tile: int
    tile_bounds: jax.Array
    row_expert: jax.Array
    kernel: str = 'tiles'
    axes: tuple[str, ...] = ()

    @property
    def num_experts(self) -> int:
        return self.tile_bounds.shape[-2]

    def row_mask(self, dtype) -> jax.Array:
        """(R, E) one-hot of each row's expert (all zero for unused rows)."""
        return jax.nn.one_hot(self.row_expert, self.num_experts, dtype=dtype)


def tile_rows(max_rows: int, num_experts: int) -> int:
    """A power of two of at least 8 rows, at most MAX_TILE, about one expert's even share of the rows."""
    share = max(1, -(-max_rows // num_experts))
    return int(min(MAX_TILE, max(8, 1 << (share - 1).bit_length())))


def make_layout(expert: jax.Array, keep: jax.Array, num_experts: int, max_rows: int) -> tuple[GroupedLayout, jax.Array]:
    """expert, keep: (N,) entries (token choices) -> (layout, row (N,) int32: each kept entry's row, R if dropped).

    Kept entries of one expert take consecutive rows in entry order; `max_rows` bounds the number of kept entries
    (statically), which sizes the buffer: R = max_rows + E * (tile - 1), rounded up to whole tiles."""
    tile = tile_rows(max_rows, num_experts)
    num_rows = -(-(max_rows + num_experts * (tile - 1)) // tile) * tile
    key = jnp.where(keep, expert, num_experts)  # dropped entries: a bucket past the experts
    onehot = jax.nn.one_hot(key, num_experts + 1, dtype=jnp.int32)[:, :num_experts]
    counts = onehot.sum(axis=0)
    tiles = -(-counts // tile)
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    rank = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)  # order among the expert's kept entries
    row = jnp.where(keep, tile_start[jnp.minimum(key, num_experts - 1)] * tile + rank, num_rows)
    row_tile = jnp.arange(num_rows, dtype=jnp.int32) // tile
    row_expert = jnp.sum(row_tile[:, None] >= tile_end[None, :], axis=1).astype(jnp.int32)
    bounds = jnp.stack([tile_start, tile_end], axis=1).astype(jnp.int32)
    return GroupedLayout(tile, bounds[None], row_expert), row.astype(jnp.int32)


def grouped_matmul(x: jax.Array, w: jax.Array, layout: GroupedLayout) -> jax.Array:
    """x (R, K) rows sorted as `layout`, w (E, K, N) -> (R, N): each used tile times its expert's matrix; rows of
    unused tiles are 0. Per shard when the layout's rows are split over mesh axes."""
    local = functools.partial(_local_matmul, tile=layout.tile, kernel=layout.kernel)
    if not layout.axes:
        return local(x, w, layout.tile_bounds)
    rows = P(layout.axes)
    return jax.shard_map(local, in_specs=(rows, P(), rows), out_specs=rows, axis_names=frozenset(layout.axes),
                         check_vma=False)(x, w, layout.tile_bounds)


def _local_matmul(x: jax.Array, w: jax.Array, bounds: jax.Array, *, tile: int, kernel: str) -> jax.Array:
    """One block of rows: x (R, K), w (E, K, N), bounds (1, E, 2)."""
    bounds = bounds[0]
    if kernel == 'tiles':
        return _gmm(x, w, bounds, tile)
    # ragged_dot wants group sizes that add up to the rows: the zero rows past the last used tile go to the last
    # expert (zero in, zero out, nothing added to its weight gradient).
    sizes = (bounds[:, 1] - bounds[:, 0]) * tile
    sizes = sizes.at[-1].add(x.shape[0] - sizes.sum())
    return lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32).astype(jnp.result_type(x.dtype, w.dtype))


def _tile_loop(x: jax.Array, w: jax.Array, bounds: jax.Array, tile: int, transpose_w: bool) -> jax.Array:
    """y[tiles of e] = x[tiles of e] @ w[e] (or @ w[e].T), looping only over the tiles each expert uses."""
    out_dim = w.shape[1] if transpose_w else w.shape[2]
    y = jnp.zeros((x.shape[0], out_dim), jnp.result_type(x.dtype, w.dtype))
    dims = (((1,), (1 if transpose_w else 0,)), ((), ()))
    for e in range(w.shape[0]):
        def body(t, y, we=w[e]):
            xt = lax.dynamic_slice_in_dim(x, t * tile, tile)
            yt = lax.dot_general(xt, we, dims, preferred_element_type=jnp.float32)
            return lax.dynamic_update_slice_in_dim(y, yt.astype(y.dtype), t * tile, 0)
        y = lax.fori_loop(bounds[e, 0], bounds[e, 1], body, y)
    return y


def _tile_loop_dw(x: jax.Array, dy: jax.Array, bounds: jax.Array, tile: int) -> jax.Array:
    """dw[e] = x[tiles of e].T @ dy[tiles of e], accumulated in float32 -> (E, K, N)."""
    out = []
    for e in range(bounds.shape[0]):
        def body(t, acc):
            xt = lax.dynamic_slice_in_dim(x, t * tile, tile)
            dyt = lax.dynamic_slice_in_dim(dy, t * tile, tile)
            return acc + lax.dot_general(xt, dyt, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        out.append(lax.fori_loop(bounds[e, 0], bounds[e, 1], body,
                                 jnp.zeros((x.shape[1], dy.shape[1]), jnp.float32)))
    return jnp.stack(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(x: jax.Array, w: jax.Array, bounds: jax.Array, tile: int) -> jax.Array:
    return _tile_loop(x, w, bounds, tile, transpose_w=False)


def _gmm_fwd(x, w, bounds, tile):
    return _tile_loop(x, w, bounds, tile, transpose_w=False), (x, w, bounds)


def _gmm_bwd(tile, residuals, dy):
    # Written out because JAX would differentiate the loops through full (E, K, N) weight cotangents per tile.
    x, w, bounds = residuals
    dx = _tile_loop(dy, w, bounds, tile, transpose_w=True).astype(x.dtype)
    dw = _tile_loop_dw(x, dy, bounds, tile).astype(w.dtype)
    return dx, dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
