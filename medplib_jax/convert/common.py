"""Checkpoint conversion as tables: (source key template, our path template, layout transform).

Templates use `{i}`-style placeholders for integers, e.g.
`('model.layers.{i}.self_attn.q_proj.weight', 'model/layers_{i}/self_attn/q_proj/kernel', LINEAR)`.
The same table runs both ways (HF -> ours, ours -> HF). Every source key must match a rule or an explicit
ignore pattern and every expected parameter must be filled, else one error lists all missing and unexpected keys.
A target may end in `[{e}]`: the source tensor is entry e of a stacked leading axis (MoE experts, `locate`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class Layout:
    """A tensor layout change and its inverse (source -> ours, ours -> source)."""
    name: str
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]

    def shape(self, source_shape: Sequence[int]) -> tuple[int, ...]:
        """The converted shape of a source tensor of `source_shape`, without allocating it (a zero-stride view)."""
        return tuple(self.forward(np.broadcast_to(np.zeros((), np.int8), tuple(source_shape))).shape)


IDENTITY = Layout('identity', lambda x: x, lambda x: x)
# torch Linear weight [out, in] -> flax Dense kernel [in, out].
LINEAR = Layout('linear', lambda x: x.T, lambda x: x.T)
# torch Conv2d weight [out, in, kh, kw] -> flax Conv kernel [kh, kw, in, out].
CONV = Layout('conv', lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))

# torch ConvTranspose2d weight [in, out, kh, kw] -> the forward conv's HWIO kernel [kh, kw, out, in]
# (models.layers.ConvTranspose2d flips it with transpose_kernel=True).
CONV_TRANSPOSE = Layout('conv_transpose', lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))

Rule = tuple[str, str, Layout]


class ConversionError(ValueError):
    """A checkpoint that does not fit the model: lists every missing / unexpected / mis-shaped key."""


@functools.lru_cache(maxsize=None)
def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r'(\{\w+\})', template)
    out = []
    for p in parts:
        m = re.fullmatch(r'\{(\w+)\}', p)
        out.append(f'(?P<{m.group(1)}>\\d+)' if m else re.escape(p))
    return re.compile(''.join(out) + r'\Z')


@dataclasses.dataclass(frozen=True)
class KeyTable:
    """A bidirectional key table. `ignore`: regexes of source keys that are deliberately dropped
    (buffers such as `rotary_emb.inv_freq` or `position_ids`)."""
    rules: Sequence[Rule]
    ignore: Sequence[str] = ()

    def _match(self, key: str, direction: str) -> tuple[str, Layout] | None:
        for src, dst, layout in self.rules:
            pattern, target = (src, dst) if direction == 'to_ours' else (dst, src)
            m = _template_regex(pattern).match(key)
            if m:
                return target.format(**m.groupdict()), layout
        return None

    def locate(self, key: str) -> tuple[str, tuple[int, ...], Layout] | None:
        """Source key -> (our path, index into its stacked leading axes, layout), or None when no rule matches."""
        hit = self._match(key, 'to_ours')
        if hit is None:
            return None
        target, layout = hit
        path, index = _split_index(target)
        return path, index, layout

    def source_key(self, path: str, index: tuple[int, ...] = ()) -> tuple[str, Layout] | None:
        """Our path (+ stacked index) -> (source key, layout), or None when no rule names it."""
        return self._match(path + ''.join(f'[{i}]' for i in index), 'to_source')

    def ignored(self, key: str) -> bool:
        return any(re.search(p, key) for p in self.ignore)

    def to_ours(self, state_dict: Mapping[str, Any], expected: Mapping[str, Any], *, source: str = 'checkpoint',
                dtype: Any = None) -> dict:
        """Source flat dict -> our nested param tree. `expected`: our (abstract) param tree giving the shapes."""
        want = {'/'.join(k): v for k, v in traverse_util.flatten_dict(_unfreeze(expected)).items()}
        got: dict[str, np.ndarray] = {}
        unexpected, shape_errors = [], []
        for key, value in state_dict.items():
            hit = self._match(key, 'to_ours')
            if hit is None:
                if not self.ignored(key):
                    unexpected.append(key)
                continue
            path, layout = hit
            if path not in want:
                unexpected.append(key)
                continue
            arr = layout.forward(np.asarray(value))
            if tuple(arr.shape) != tuple(want[path].shape):
                shape_errors.append(f'{key} -> {path}: got {tuple(arr.shape)}, model wants {tuple(want[path].shape)}')
                continue
            got[path] = arr.astype(dtype if dtype is not None else want[path].dtype)
        missing = sorted(set(want) - set(got))
        if missing or unexpected or shape_errors:
            raise ConversionError(_report(source, missing, sorted(unexpected), shape_errors))
        return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in got.items()})

    def to_source(self, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Our param tree -> flat source state dict (numpy), the inverse of `to_ours`."""
        out, unmapped = {}, []
        for k, v in traverse_util.flatten_dict(_unfreeze(params)).items():
            path = '/'.join(k)
            hit = self._match(path, 'to_source')
            if hit is None:
                unmapped.append(path)
                continue
            key, layout = hit
            out[key] = np.ascontiguousarray(layout.inverse(np.asarray(v)))
        if unmapped:
            raise ConversionError(f'params: {len(unmapped)} parameters have no source key: {unmapped}')
        return out


def _split_index(target: str) -> tuple[str, tuple[int, ...]]:
    m = re.fullmatch(r'(.*?)((?:\[\d+\])*)', target)
    return m.group(1), tuple(int(i) for i in re.findall(r'\[(\d+)\]', m.group(2)))


def prefixed(table: KeyTable, source_prefix: str, path_prefix: str) -> KeyTable:
    """`table` for a component nested in a bigger checkpoint: every source key under `source_prefix`, every path
    under `path_prefix` (e.g. the CLIP tower inside MedPLIB: `model.vision_tower.vision_tower.vision_model.` ->
    `model/vision_tower/`)."""
    return KeyTable(rules=[(source_prefix + src, path_prefix + dst, layout) for src, dst, layout in table.rules],
                    ignore=table.ignore)


def _report(source: str, missing: list[str], unexpected: list[str], shape_errors: list[str]) -> str:
    lines = [f'{source}: does not fit the model']
    if missing:
        lines.append(f'missing {len(missing)} (our paths): {missing}')
    if unexpected:
        lines.append(f'unexpected {len(unexpected)} (checkpoint keys): {unexpected}')
    if shape_errors:
        lines.append(f'wrong shape {len(shape_errors)}: {shape_errors}')
    return '; '.join(lines)


def _unfreeze(tree: Mapping[str, Any]) -> dict:
    return jax.tree.map(lambda x: x, dict(tree), is_leaf=lambda x: not isinstance(x, Mapping))


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Keeps only keys under `prefix` (e.g. the vision tower inside a MedPLIB checkpoint), without it."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_state_dict(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Reads a local HF directory or file: `*.safetensors` (sharded via its index) or `pytorch_model*.bin`.

    Values come back as numpy (bf16 as `ml_dtypes.bfloat16`). Nothing is downloaded.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path}: checkpoint path does not exist')
    files = [path] if os.path.isfile(path) else _checkpoint_files(path)
    out: dict[str, np.ndarray] = {}
    wanted = set(keys) if keys is not None else None
    for f in files:
        if f.endswith('.safetensors'):
            from safetensors import safe_open
            # framework='flax' because safetensors' numpy reader cannot represent bfloat16.
            with safe_open(f, framework='flax') as st:
                for k in st.keys():
                    if wanted is None or k in wanted:
                        out[k] = np.asarray(st.get_tensor(k))
        else:
            out.update(_load_torch_file(f, wanted))
    return out


def _checkpoint_files(directory: str) -> list[str]:
    for index_name, ext in (('model.safetensors.index.json', '.safetensors'),
                            ('pytorch_model.bin.index.json', '.bin')):
        index = os.path.join(directory, index_name)
        if os.path.exists(index):
            with open(index) as fh:
                shards = sorted(set(json.load(fh)['weight_map'].values()))
            return [os.path.join(directory, s) for s in shards]
    for name in ('model.safetensors', 'pytorch_model.bin'):
        if os.path.exists(os.path.join(directory, name)):
            return [os.path.join(directory, name)]
    raise FileNotFoundError(f'{directory}: no model.safetensors, pytorch_model.bin or shard index found')


CONVERT_EXTRA = 'pip install "medplib-jax[convert]"'


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require_torch(what: str) -> Any:
    """torch, imported only when a PyTorch file is read; without it one line naming the `convert` extra."""
    try:
        import torch
    except ImportError:
        raise MissingExtraError(f'{what}: reading PyTorch .bin / .pth checkpoints needs torch: {CONVERT_EXTRA} '
                                f'(torch==2.13.0, the CPU build)') from None
    return torch


def _load_torch_file(f: str, wanted: set[str] | None) -> dict[str, np.ndarray]:
    torch = require_torch(f)
    import ml_dtypes
    sd = torch.load(f, map_location='cpu', weights_only=True)
    if 'model' in sd and isinstance(sd['model'], Mapping):  # e.g. sam-med2d_b.pth: {'model': state_dict}
        sd = sd['model']
    out = {}
    for k, v in sd.items():
        if wanted is not None and k not in wanted:
            continue
        if v.dtype == torch.bfloat16:
            out[k] = v.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            out[k] = v.numpy()
    return out


def stack_layers(params: Mapping[str, Any], container: str, num_layers: int, prefix: str = 'layers') -> dict:
    """Unscanned `container/{prefix}_{i}/...` -> scanned `container/{prefix}/...` with a leading layer axis."""
    params = _unfreeze(params)
    node = params[container]
    layers = [node.pop(f'{prefix}_{i}') for i in range(num_layers)]
    node[prefix] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
    return params


def unstack_layers(params: Mapping[str, Any], container: str, num_layers: int, prefix: str = 'layers') -> dict:
    """Inverse of `stack_layers`."""
    params = _unfreeze(params)
    node = params[container]
    stacked = node.pop(prefix)
    for i in range(num_layers):
        node[f'{prefix}_{i}'] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked)
    return params
