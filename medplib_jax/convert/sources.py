"""Checkpoint files read lazily: names, shapes and dtypes from the index and the file headers, values one tensor at
a time (the converters stream; nothing loads a whole checkpoint).

- HF directories: `pytorch_model.bin.index.json` + `pytorch_model-*.bin` shards (transformers 4.31's
  `save_pretrained`, as the released MedPLIB checkpoint is written), `model.safetensors.index.json` + shards, or a
  single `pytorch_model.bin` / `model.safetensors`.
- Single files: `.bin` / `.pth` (`torch.save` of a state dict, or `{'model': state_dict}` as `sam-med2d_b.pth`),
  `.safetensors`.

PyTorch files are opened with `torch.load(weights_only=True, mmap=True)` (never plain pickle): the tensors point
into the mapped file, so listing them reads no tensor data and `get` touches one tensor. Safetensors headers come
from `safe_open`. At most one file is open at a time, so the mapped pages of at most one file stay resident.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medplib_jax.convert.common import ConversionError, require_torch

INDEXES = ('pytorch_model.bin.index.json', 'model.safetensors.index.json')
SINGLE_FILES = ('pytorch_model.bin', 'model.safetensors')
_SAFETENSORS_DTYPES = {'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16', 'I64': 'int64',
                       'I32': 'int32', 'I16': 'int16', 'I8': 'int8', 'U8': 'uint8', 'BOOL': 'bool'}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint: where it is and what it is, without its values."""
    file: str
    name: str  # the key inside the file (the source key minus the source's prefix)
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: 'bfloat16', 'float32', ...
    order: int  # reading order: file by file, in each file's own order

    @property
    def nbytes(self) -> int:
        import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class CheckpointSource:
    """The tensors of one checkpoint (a directory or a file). `prefix` is put before every key (a sam-med2d_b.pth
    read as the `model.visual_model.` part of a MedPLIB checkpoint). `skip`: regexes of file keys that are not part
    of the model (a full CLIPModel's text tower), left out and counted. `notes` collects what a user should hear
    (an index whose total_size disagrees with its shards, top-level entries of a .pth besides `model`)."""

    def __init__(self, path: str | os.PathLike, *, prefix: str = '', label: str | None = None,
                 skip: Sequence[str] = ()):
        self.path = os.path.abspath(os.fspath(path))
        self.label = label or os.fspath(path)
        self.prefix = prefix
        self.notes: list[str] = []
        self.entries: dict[str, Entry] = {}
        self._open_path: str | None = None
        self._open: Any = None
        if not os.path.exists(self.path):
            raise FileNotFoundError(f'{self.label}: no such file or directory')
        files, index_map = self._files()
        skipped = 0
        for f in files:
            for name, shape, dtype in self._list(f):
                if any(re.search(p, name) for p in skip):
                    skipped += 1
                    continue
                key = prefix + name
                if key in self.entries:
                    raise ConversionError(f'{self.label}: {name} appears in both '
                                          f'{os.path.basename(self.entries[key].file)} '
                                          f'and {os.path.basename(f)}')
                self.entries[key] = Entry(f, name, shape, dtype, len(self.entries))
        if index_map is not None:
            self._check_index(*index_map, skip)
        if skipped:
            self.notes.append(f'{self.label}: left out {skipped} tensors that are not part of MedPLIB '
                              f'({", ".join(skip)})')

    # -- listing --------------------------------------------------------------------------------------------------
    def _files(self) -> tuple[list[str], tuple[str, dict[str, str], Any] | None]:
        if os.path.isfile(self.path):
            return [self.path], None
        for name in INDEXES:
            index = os.path.join(self.path, name)
            if os.path.exists(index):
                try:
                    with open(index) as fh:
                        data = json.load(fh)
                    weight_map = dict(data['weight_map'])
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise ConversionError(f'{index}: unreadable shard index (weight_map: {type(e).__name__}: {e})') \
                        from None
                shards = sorted(set(weight_map.values()))
                lacking = [s for s in shards if not os.path.isfile(os.path.join(self.path, s))]
                if lacking:
                    raise FileNotFoundError(f'{index}: weight_map names shards that are not in {self.label}: {lacking}')
                total = (data.get('metadata') or {}).get('total_size')
                return [os.path.join(self.path, s) for s in shards], (index, weight_map, total)
        for name in SINGLE_FILES:
            if os.path.isfile(os.path.join(self.path, name)):
                return [os.path.join(self.path, name)], None
        raise FileNotFoundError(f'{self.label}: no {" / ".join(INDEXES)} and no {" / ".join(SINGLE_FILES)}')

    def _check_index(self, index: str, weight_map: Mapping[str, str], total_size: Any, skip: Sequence[str]) -> None:
        """The index and the shards must agree key by key (a truncated or mixed download shows here)."""
        weight_map = {k: v for k, v in weight_map.items() if not any(re.search(p, k) for p in skip)}
        held = {e.name: os.path.basename(e.file) for e in self.entries.values()}
        wrong = [f'{k} (index: {v}, shards: {held.get(k, "none")})' for k, v in sorted(weight_map.items())
                 if held.get(k) != v]
        wrong += [f'{k} (in {v}, not in the index)' for k, v in sorted(held.items()) if k not in weight_map]
        if wrong:
            raise ConversionError(f'{index}: the index and its shards disagree on {len(wrong)} keys: {wrong[:20]}'
                                  + (f' ... {len(wrong) - 20} more' if len(wrong) > 20 else ''))
        actual = sum(e.nbytes for e in self.entries.values())
        if total_size is not None and int(total_size) != actual and not skip:
            self.notes.append(f'{index}: metadata.total_size is {int(total_size):,} bytes, the shards hold '
                              f'{actual:,}')

    def _list(self, f: str) -> Iterable[tuple[str, tuple[int, ...], str]]:
        if f.endswith('.safetensors'):
            from safetensors import safe_open
            with safe_open(f, framework='numpy') as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    dtype = sl.get_dtype()
                    if dtype not in _SAFETENSORS_DTYPES:
                        raise ConversionError(f'{f}: {k} has dtype {dtype}, which numpy cannot hold')
                    yield k, tuple(sl.get_shape()), _SAFETENSORS_DTYPES[dtype]
            return
        for k, t in self._torch_state_dict(f).items():
            yield k, tuple(t.shape), str(t.dtype).removeprefix('torch.')

    def _torch_state_dict(self, f: str) -> dict[str, Any]:
        torch = require_torch(f)
        try:
            obj = torch.load(f, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError as e:
            if 'zipfile' not in str(e) and 'mmap' not in str(e):
                raise ConversionError(f'{f}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})') from None
            # a legacy (pre-zip) torch.save file cannot be mapped: read whole
            obj = torch.load(f, map_location='cpu', weights_only=True)
            if f'{f}: read whole' not in ' '.join(self.notes):
                self.notes.append(f'{f}: read whole (a legacy, non-zip torch.save file cannot be memory-mapped)')
        except Exception as e:  # noqa: BLE001 - weights_only refuses pickles of other objects: one line
            raise ConversionError(f'{f}: not a readable PyTorch state dict ({type(e).__name__}: '
                                  f'{str(e).splitlines()[0] if str(e) else ""})') from None
        if isinstance(obj, Mapping) and isinstance(obj.get('model'), Mapping):  # sam-med2d_b.pth: {'model': sd}
            others = sorted(k for k in obj if k != 'model')
            if others and not any('ignored top-level' in n for n in self.notes):
                self.notes.append(f'{f}: read its `model` state dict; ignored top-level entries {others}')
            obj = obj['model']
        if not isinstance(obj, Mapping):
            raise ConversionError(f'{f}: holds a {type(obj).__name__}, not a state dict')
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ConversionError(f'{f}: entries that are not tensors: {bad[:20]}')
        return dict(obj)

    def add_prefix(self, prefix: str) -> 'CheckpointSource':
        """Puts `prefix` before every key (chosen after seeing the keys, e.g. CLIP with or without `vision_model.`)."""
        self.prefix = prefix + self.prefix
        self.entries = {prefix + k: e for k, e in self.entries.items()}
        return self

    # -- reading --------------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> np.ndarray:
        """One tensor as numpy (bfloat16 as ml_dtypes.bfloat16). For PyTorch files a view into the mapped file:
        copy what you keep."""
        entry = self.entries[key]
        if self._open_path != entry.file:
            self.close()
            if entry.file.endswith('.safetensors'):
                from safetensors import safe_open
                self._open = safe_open(entry.file, framework='numpy')
            else:
                self._open = self._torch_state_dict(entry.file)
            self._open_path = entry.file
        if entry.file.endswith('.safetensors'):
            return self._open.get_tensor(entry.name)
        torch = require_torch(entry.file)
        t = self._open[entry.name].detach()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: view the bits (no copy)
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def close(self) -> None:
        """Drops the open file (its mapping goes with the last view of it)."""
        self._open, self._open_path = None, None
