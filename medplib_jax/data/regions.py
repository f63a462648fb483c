"""Region prompts (points, boxes, free-form masks) -> the 24x24 grid masks the region encoder consumes.

The released model only ever saw region *masks*; the reference's demo turns a point into a 41x41 square and a box
into a filled rectangle (gradio_web_server.py `generate_mask_for_feature`; we do it without the demo's row/column
mix-up). Every mask then goes through the reference's dataset steps (`LazySupervisedDataset.__getitem__`):
resize-longest-side to 336 (PIL bilinear on the 0/1 uint8 mask), centred zero-pad to 336x336, nearest downsampling by 14
(cv2 INTER_NEAREST picks pixel 14*i), and, behind a switch that is on by default for parity, the
largest-8-connected-component step.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Sequence

import numpy as np
from PIL import Image

from medplib_jax.constants import CLIP_SIZE, GRID

POINT_HALF_SIZE = 20  # the demo's 41x41 square around a point
MIN_COMPONENT_CELLS = 10  # the reference's min_thresh: smaller components are returned unchanged


class RegionError(ValueError):
    """A region prompt that cannot be used (off the image, empty, wrong shape)."""


@dataclasses.dataclass(frozen=True)
class RegionPrompt:
    """One region in original-image pixels. kind: 'point' (x, y) or (x, y, half) with `half` the half-size of
    the square drawn around it (default 20: the demo's 41x41), 'box' (x0, y0, x1, y1, inclusive pixel corners)
    or 'mask' (an (H, W) array, non-zero = inside)."""
    kind: str
    value: tuple[float, ...] | np.ndarray

    def to_mask(self, height: int, width: int) -> np.ndarray:
        if self.kind == 'point':
            return point_to_mask(*self.value, height=height, width=width)
        if self.kind == 'box':
            return box_to_mask(*self.value, height=height, width=width)
        if self.kind == 'mask':
            mask = np.asarray(self.value)
            if mask.shape != (height, width):
                raise RegionError(f'region mask: shape {mask.shape} != image size {(height, width)}')
            return (mask > 0).astype(np.uint8)
        raise RegionError(f'region kind {self.kind!r}: expected point, box or mask')


def point_to_mask(x: float, y: float, half: float = POINT_HALF_SIZE, *, height: int, width: int) -> np.ndarray:
    """A (2*half+1)-pixel square of ones centred on the point, clipped to the image."""
    if half < 0:
        raise RegionError(f'region point ({x}, {y}): negative half-size {half}')
    half = int(round(half))
    if not (0 <= x < width and 0 <= y < height):
        raise RegionError(f'region point ({x}, {y}) is outside the {width}x{height} image')
    cx, cy = int(round(x)), int(round(y))
    mask = np.zeros((height, width), np.uint8)
    mask[max(cy - half, 0):cy + half + 1, max(cx - half, 0):cx + half + 1] = 1
    return mask


def box_to_mask(x0: float, y0: float, x1: float, y1: float, *, height: int, width: int) -> np.ndarray:
    """Filled rectangle: rows y0..y1, columns x0..x1 (inclusive). The box must lie inside the image."""
    if not (x0 <= x1 and y0 <= y1):
        raise RegionError(f'region box ({x0}, {y0}, {x1}, {y1}): need x0 <= x1 and y0 <= y1')
    if x0 < 0 or y0 < 0 or x1 >= width or y1 >= height:
        raise RegionError(f'region box ({x0}, {y0}, {x1}, {y1}) is outside the {width}x{height} image')
    mask = np.zeros((height, width), np.uint8)
    mask[int(round(y0)):int(round(y1)) + 1, int(round(x0)):int(round(x1)) + 1] = 1
    return mask


def resized_size(height: int, width: int, target: int) -> tuple[int, int]:
    """SAM's ResizeLongestSide.get_preprocess_shape: (int(h*s + 0.5), int(w*s + 0.5)), s = target / max(h, w)."""
    scale = target / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def mask_to_grid(mask: np.ndarray, *, largest_component: bool = True,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """(H, W) binary mask -> (24, 24) uint8 grid, as the reference's dataset does.

    `rng` drives the reference's random sub-component step (`generate_mask_with_sub_component`, only with
    `largest_component`); without it the whole largest component is kept, which is what the reference does almost
    always.
    """
    if mask.ndim != 2:
        raise RegionError(f'region mask must be 2-D, got shape {mask.shape}')
    h, w = mask.shape
    nh, nw = resized_size(h, w, CLIP_SIZE)
    resized = np.asarray(Image.fromarray((mask > 0).astype(np.uint8)).resize((nw, nh), Image.BILINEAR))
    padded = np.zeros((CLIP_SIZE, CLIP_SIZE), np.uint8)
    top, left = (CLIP_SIZE - nh) // 2, (CLIP_SIZE - nw) // 2
    padded[top:top + nh, left:left + nw] = resized
    step = CLIP_SIZE // GRID
    grid = (padded[::step, ::step][:GRID, :GRID] > 0).astype(np.uint8)
    if largest_component:
        grid = largest_component_with_sub_region(grid, rng)
    return grid


def _components(grid: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of the non-zero cells, each a list of (row, col), in scan order."""
    seen = np.zeros(grid.shape, bool)
    comps = []
    for r, c in zip(*np.nonzero(grid)):
        if seen[r, c]:
            continue
        comp, queue = [], deque([(r, c)])
        seen[r, c] = True
        while queue:
            y, x = queue.popleft()
            comp.append((int(y), int(x)))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < grid.shape[0] and 0 <= nx < grid.shape[1] and grid[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        comps.append(comp)
    return comps


def largest_component_with_sub_region(grid: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """The reference's `generate_mask_with_sub_component(min_area=0.2, max_area=1, min_thresh=10)`: keep the
    largest component; then a flood-filled sub-region of target area int(A * r), r ~ U(0.2, A) (the reference's
    variable shadowing makes the upper bound the component size A, so r >= 1 and the whole component survives
    with probability (A - 1) / (A - 0.2)). Components under 10 cells are kept whole."""
    comps = _components(grid)
    if not comps:
        return grid.copy()
    largest = max(comps, key=len)
    out = np.zeros_like(grid)
    area = len(largest)
    if rng is None or area < MIN_COMPONENT_CELLS:
        for y, x in largest:
            out[y, x] = 1
        return out
    target = int(area * rng.uniform(0.2, area))
    if target >= area:
        for y, x in largest:
            out[y, x] = 1
        return out
    inside = set(largest)
    start = largest[int(rng.integers(len(largest)))]
    stack, kept = [start], set()
    while stack and len(kept) < max(target, 1):
        cell = stack.pop()
        if cell in kept:
            continue
        kept.add(cell)
        y, x = cell
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                nxt = (y + dy, x + dx)
                if nxt in inside and nxt not in kept:
                    stack.append(nxt)
    for y, x in kept:
        out[y, x] = 1
    return out


def regions_to_grids(regions: Sequence[RegionPrompt], height: int, width: int, max_regions: int, *,
                     largest_component: bool = True, rng: np.random.Generator | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of one image -> (max_regions, 24, 24) uint8 grids and a (max_regions,) validity mask.

    A region whose grid comes out empty (too thin to survive the /14 downsampling) is kept with validity False
    so its slot is filled with zeros, as the reference does; more than `max_regions` prompts is an error.
    """
    if len(regions) > max_regions:
        raise RegionError(f'{len(regions)} region prompts, more than the configured maximum {max_regions}')
    grids = np.zeros((max_regions, GRID, GRID), np.uint8)
    valid = np.zeros((max_regions,), bool)
    for i, region in enumerate(regions):
        grids[i] = mask_to_grid(region.to_mask(height, width), largest_component=largest_component, rng=rng)
        valid[i] = grids[i].any()
    return grids, valid
