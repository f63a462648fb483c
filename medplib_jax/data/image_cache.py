"""A tensorstore (zarr) cache of decoded and resized images, for datasets read many times.

Decoding a PNG / DICOM and two PIL resizes are most of the pipeline's per-record cost; the cache keeps their uint8
results, the CLIP canvas (336, 336, 3) and the SAM canvas (256, 256, 3), one zarr chunk per image, with the sizes
(H, W, h', w'). Normalisation stays in the pipeline, so a cached image gives exactly the arrays of an uncached one.
`index.json` maps each image's real path to its row, file size and modification time, and records the format,
checked on open. An image that is not in the cache, or whose file changed since, is read from its file (the first
such miss in each process is logged). Images that cannot be read are left out (and listed by `build`), so the
pipeline reports them as usual when it meets them.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

import numpy as np
from absl import logging

from medplib_jax.data.images import CLIP_SIZE, SAM_SIZE, ImageError, clip_canvas, load_image, sam_canvas

# version 3: images decoded as the reference does (images.decode_like_cv2); older caches hold clipped 16-bit PNGs.
FORMAT = {'version': 3, 'clip': [CLIP_SIZE, CLIP_SIZE, 3], 'sam': [SAM_SIZE, SAM_SIZE, 3]}


def _spec(folder: str, name: str, shape: list[int] | None = None) -> dict[str, Any]:
    spec = {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': os.path.join(folder, name)}}
    if shape is not None:
        spec['metadata'] = {'shape': shape, 'chunks': [1, *shape[1:]], 'dtype': '|u1'}
    return spec


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class ImageCache:
    """Read side: `get(path)` -> (clip canvas, sam canvas, (h', w'), (H, W)) or None if the image is not cached.
    Picklable (grain workers): the stores open lazily in each process."""

    def __init__(self, folder: str):
        index_path = os.path.join(folder, 'index.json')
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f'{folder}: not an image cache (no index.json); build it with '
                                    f'`medplib-jax build-image-cache`')
        with open(index_path) as f:
            index = json.load(f)
        if index.get('format') != FORMAT:
            raise ValueError(f'{index_path}: cache format {index.get("format")} differs from this version\'s '
                             f'{FORMAT}; rebuild it')
        self.folder = folder
        self.rows: dict[str, int] = index['rows']
        self.sizes = np.asarray(index['sizes'], np.int32).reshape(-1, 4)
        self.stats = [tuple(s) for s in index['stats']]  # (size in bytes, mtime in ns) per row
        self._stores: tuple[Any, Any] | None = None
        self._missed = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, '_stores': None}

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self) -> tuple[Any, Any]:
        if self._stores is None:
            import tensorstore as ts
            self._stores = tuple(ts.open(_spec(self.folder, n), read=True).result() for n in ('clip', 'sam'))
        return self._stores

    def get(self, path: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int], tuple[int, int]] | None:
        real = os.path.realpath(path)
        row = self.rows.get(real)
        if row is None or not os.path.isfile(real) or _stat(real) != self.stats[row]:
            if not self._missed:
                self._missed = True
                logging.warning('image cache %s: %s %s; reading the file (later misses are not logged)', self.folder,
                                real, 'is not cached' if row is None else 'changed since it was cached')
            return None
        clip, sam = self._open()
        h, w, sh, sw = (int(v) for v in self.sizes[row])
        return clip[row].read().result(), sam[row].read().result(), (sh, sw), (h, w)

    @staticmethod
    def build(folder: str, image_paths: Iterable[str], *, progress: bool = True) -> dict[str, str]:
        """Writes the cache for the given images (resolved paths; duplicates are stored once). Returns
        {path: error} for the images that could not be read (they are not cached)."""
        import tensorstore as ts
        from tqdm import tqdm
        paths = list(dict.fromkeys(os.path.realpath(p) for p in image_paths))
        os.makedirs(folder, exist_ok=True)
        index_path = os.path.join(folder, 'index.json')
        if os.path.exists(index_path):  # rebuilding: the old index must not outlive the data it points at
            os.remove(index_path)
        n = max(len(paths), 1)
        clip = ts.open(_spec(folder, 'clip', [n, *FORMAT['clip']]), create=True, delete_existing=True).result()
        sam = ts.open(_spec(folder, 'sam', [n, *FORMAT['sam']]), create=True, delete_existing=True).result()
        rows, sizes, stats, failed = {}, [], [], {}
        for path in tqdm(paths, desc='image cache', unit='img', disable=not progress):
            try:
                image = load_image(path)
            except ImageError as e:
                failed[path] = str(e)
                continue
            row = len(rows)
            canvas, (sh, sw) = sam_canvas(image)
            clip[row].write(clip_canvas(image)).result()
            sam[row].write(canvas).result()
            real = os.path.realpath(path)
            rows[real] = row
            sizes.append([*image.shape[:2], sh, sw])
            stats.append(list(_stat(real)))
        # index.json last: a cache interrupted while writing has none and is rejected on open.
        with open(index_path, 'w') as f:
            json.dump({'format': FORMAT, 'rows': rows, 'sizes': sizes, 'stats': stats}, f)
        return failed
