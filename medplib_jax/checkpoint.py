"""Checkpoints (Orbax): the train state a run resumes from, and the parameters a stage hands the next.

Two kinds, both sharded (every process writes and reads only its own shards; restoring takes the target's
shardings, so a tree written on a pod restores on one CPU or another mesh):

- params directories: an Orbax StandardCheckpointer directory holding one nested dict of arrays and, inside it,
  `medplib.json` (config, stage, layer layout, provenance, package versions) and `tokenizer/` (a copy of the
  tokenizer's files), so the directory alone is enough to use them, from any working directory or machine. What
  stages hand on and evaluators, `chat` and `serve` read (`final_params`, `medplib-jax export`, the converters).
- `RunCheckpoints`: a run directory's `checkpoints/<step>` (Orbax CheckpointManager): the train state (params,
  optimizer state, step and counters), the grain iterator state of every process, and metadata (config, stage,
  layout, mesh, versions, rng, the log interval in progress). Saves are asynchronous and atomic (written under a
  temporary name and renamed when complete), so after a kill at any moment the newest complete step is used and
  a half-written one is ignored. Kept: the newest `keep`, plus the best `keep_best` by an evaluation metric.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
from collections import Counter
from typing import Any, Callable, Iterable, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers as policies

from medplib_jax.config_fields import known_fields
from medplib_jax.constants import SYNTHETIC_MARKER

FINAL_PARAMS = 'final_params'  # a run directory's hand-off: merged (LoRA folded) parameters
CHECKPOINTS = 'checkpoints'  # a run directory's train-state checkpoints, one folder per step
STATE, DATA, META = 'state', 'data', 'meta'  # the items of one train-state checkpoint


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep='/')


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(dict(flat), sep='/')


def versions() -> dict[str, str]:
    out = {}
    for pkg in ('medplib-jax', 'jax', 'flax', 'optax', 'orbax-checkpoint', 'grain'):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = 'unknown'
    return out


class _FailedReadsLoop(asyncio.SelectorEventLoop):
    """An event loop that drops what arrives after it closed. Orbax runs a restore on a fresh loop
    (orbax/checkpoint/_src/asyncio_utils.py `run_sync`) and closes it as soon as one read fails; the tensorstore
    reads still in flight then complete onto the closed loop, and each printed a traceback ('Event loop is closed',
    'Task exception was never retrieved': hundreds for a truncated checkpoint) around the one error that matters."""

    def call_soon_threadsafe(self, callback, *args, context=None):
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise

    def call_exception_handler(self, context):
        if not self.is_closed():
            super().call_exception_handler(context)


class _FailedReadsPolicy(asyncio.DefaultEventLoopPolicy):
    _loop_factory = _FailedReadsLoop


@contextlib.contextmanager
def _reading():
    """Every checkpoint read runs under this: the loops Orbax makes meanwhile are `_FailedReadsLoop`s, so a failed
    read is its one error."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_FailedReadsPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def save_params(path: str, params: Mapping[str, Any], metadata: Mapping[str, Any],
                log: Callable[[str], None] = print) -> str:
    """Writes `params` to the Orbax directory `path` (every process writes its shards) and, from process 0, what
    inference needs beside the arrays inside it (`describe_params_dir`). Returns the absolute path."""
    path = os.path.abspath(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, params, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        describe_params_dir(path, metadata, log)
    return path


# A params directory carries, besides its arrays, what a later run needs to use them from anywhere (another working
# directory, another machine): its metadata (the config the model is built from, provenance, versions) and a copy
# of its tokenizer's files.
PARAMS_META = 'medplib.json'
PARAMS_TOKENIZER = 'tokenizer'
TOKENIZER_FILES = ('tokenizer.model', 'added_tokens.json', 'special_tokens_map.json', 'tokenizer_config.json')


def describe_params_dir(path: str, metadata: Mapping[str, Any], log: Callable[[str], None] = print) -> None:
    """Writes `path/medplib.json` (`metadata`, package versions, the tokenizer it carries, whether its data were
    synthetic) and copies the tokenizer its config names (`config.data.tokenizer`, relative to the working
    directory as training read it) into `path/tokenizer/`; 'tiny' (built in code) needs no files."""
    meta = dict(metadata)
    data = dict((meta.get('config') or {}).get('data') or {})
    source = meta.pop('tokenizer_source', None) or data.get('tokenizer') or ''
    meta['tokenizer'] = None
    if source == 'tiny':
        meta['tokenizer'] = 'tiny'
    elif source and os.path.isfile(os.path.join(source, TOKENIZER_FILES[0])):
        target = os.path.join(path, PARAMS_TOKENIZER)
        os.makedirs(target, exist_ok=True)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
        meta['tokenizer'] = PARAMS_TOKENIZER
    elif source:
        log(f'warning: {path}: the tokenizer {source} was not found from {os.getcwd()}, so it is not stored with '
            f'the parameters; give --tokenizer=DIR when using them')
    if 'synthetic_data' not in meta:
        root = data.get('root') or ''
        meta['synthetic_data'] = bool(root) and os.path.isfile(os.path.join(root, SYNTHETIC_MARKER))
    with open(os.path.join(path, PARAMS_META), 'w') as f:
        json.dump({**meta, 'versions': versions()}, f, indent=1, default=str)


def params_meta(path: str) -> dict[str, Any]:
    """A params directory's metadata (`medplib.json` inside it; directories written before it carried one have
    `<path>.json` beside them)."""
    candidates = (os.path.join(path, PARAMS_META), path.rstrip('/') + '.json')
    meta_path = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise TypeError(f'expected a JSON object, got {type(meta).__name__}')
    except (OSError, ValueError, TypeError) as e:
        raise FileNotFoundError(f'{meta_path}: the params directory\'s metadata is missing or unreadable '
                                f'({type(e).__name__}: {e})') from None
    return meta


def params_tokenizer(path: str, override: str | None = None) -> str:
    """The tokenizer to use with a params directory: `override` (--tokenizer), else the copy it carries, else
    what its config names ('tiny', or a folder as it was written: absolute, or found from the working directory);
    'tiny' or a folder holding tokenizer.model. One-line error when none is found."""
    if override:
        return override
    meta = params_meta(path)
    if meta.get('tokenizer') == 'tiny':
        return 'tiny'
    if meta.get('tokenizer'):
        return os.path.join(path, meta['tokenizer'])
    named = ((meta.get('config') or {}).get('data') or {}).get('tokenizer') or 'tiny'
    if named == 'tiny' or os.path.isfile(os.path.join(named, TOKENIZER_FILES[0])):
        return named
    raise FileNotFoundError(f'{path}: carries no tokenizer and the one its config names ({named}) is not found from '
                            f'{os.getcwd()}: give --tokenizer=DIR (a folder with tokenizer.model)')


def resolve_params_dir(path: str, field: str) -> str:
    """A run directory (its `final_params`) or an Orbax params directory itself -> the params directory."""
    for candidate in (os.path.join(path, FINAL_PARAMS), path):
        if os.path.isfile(os.path.join(candidate, '_CHECKPOINT_METADATA')):
            return os.path.abspath(candidate)
    raise FileNotFoundError(f'{field}: {path}: no parameters here (neither {os.path.join(path, FINAL_PARAMS)} nor an '
                            f'Orbax params directory); train that stage first or point the field elsewhere')


@_reading()
def params_shapes(path: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    """'/'-joined path -> (shape, dtype) of every array in a params directory, without reading the arrays."""
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    return {k: (tuple(m.shape), m.dtype) for k, m in flatten(tree).items()}


@_reading()
def restore_params(path: str, sharding_of: Callable[[str, tuple[int, ...]], jax.sharding.Sharding]
                   ) -> dict[str, jax.Array]:
    """Reads a params directory with `sharding_of(path, shape)` for each leaf -> flat '/'-joined dict."""
    shapes = params_shapes(path)
    target = unflatten({k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_of(k, shape))
                        for k, (shape, dtype) in shapes.items()})
    return flatten(ocp.StandardCheckpointer().restore(path, target))


# --------------------------------------------------------------------------------------------------------------
# Train-state checkpoints


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, or of another run layout); the message is one line."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """`config.checkpoint`. every: steps between train-state saves (0 = only at the end and on preemption).
    keep: the newest checkpoints kept. best_metric: an evaluation metric as logged (e.g. 'eval/held_out/loss');
    when set, the `keep_best` best checkpoints by it are kept too (best_mode 'min' or 'max'). async_save: write in
    the background while training goes on. resume: continue from the newest checkpoint of the run directory.
    restore_data: resume the data iterator where it was (False: restart the data order, e.g. when the process
    count changed)."""
    every: int = 0
    keep: int = 2
    best_metric: str = ''
    best_mode: str = 'min'
    keep_best: int = 1
    async_save: bool = True
    resume: bool = True
    restore_data: bool = True

    def __post_init__(self):
        for name in ('every', 'keep', 'keep_best'):
            if getattr(self, name) < (1 if name == 'keep' else 0):
                raise ValueError(f'config.checkpoint.{name}={getattr(self, name)}: must be >= '
                                 f'{1 if name == "keep" else 0}')
        if self.best_mode not in ('min', 'max'):
            raise ValueError(f'config.checkpoint.best_mode={self.best_mode!r}: expected min or max')

    @classmethod
    def from_config(cls, d: Mapping[str, Any] | None) -> 'CheckpointConfig':
        return cls(**known_fields(cls, d or {}, 'config.checkpoint'))


def _key_name(entry: Any) -> str:
    for attr in ('key', 'name', 'idx'):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def key_path(path: Iterable[Any]) -> str:
    """A jax key path -> 'params/model/.../kernel' (attribute, dict key and sequence index alike)."""
    return '/'.join(_key_name(k) for k in path)


def tree_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """'/'-joined path -> (shape, dtype name) of every array leaf: a TrainState and the metadata Orbax keeps of one
    give the same paths (attribute, dict key and sequence index all become path parts)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {key_path(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in leaves}


def _grouped(paths: Iterable[str]) -> str:
    """Paths with layer indices folded (`layers_7` -> `layers_*`, with a count): every key, short enough to read."""
    counts = Counter(re.sub(r'(?<=layers_)\d+', '*', p) for p in paths)
    return ', '.join(f'{p} (x{n})' if n > 1 else p for p, n in sorted(counts.items()))


def mismatch(saved: Mapping[str, tuple], wanted: Mapping[str, tuple]) -> list[str]:
    """Every difference between a checkpoint's arrays and the ones the run needs, by kind (empty: it fits)."""
    missing = [p for p in wanted if p not in saved]
    unexpected = [p for p in saved if p not in wanted]
    shaped = [p for p in wanted if p in saved and saved[p] != wanted[p]]
    out = []
    if missing:
        out.append(f'{len(missing)} missing: {_grouped(missing)}')
    if unexpected:
        out.append(f'{len(unexpected)} unexpected: {_grouped(unexpected)}')
    if shaped:
        shown = ', '.join(f'{p} {saved[p][0]} {saved[p][1]} (run: {wanted[p][0]} {wanted[p][1]})'
                          for p in sorted(shaped, key=lambda p: (not p.startswith('params/'), p))[:20])
        more = f', ... {len(shaped) - 20} more ({_grouped(shaped)})' if len(shaped) > 20 else ''
        out.append(f'{len(shaped)} mis-shaped: {shown}{more}')
    return out


def _one_line(e: BaseException) -> str:
    text = ' '.join(str(e).split())
    return f'{type(e).__name__}: {text[:300]}'


class RunCheckpoints:
    """The train-state checkpoints of one run directory (`workdir/checkpoints`). Every process makes one (Orbax
    coordinates the processes); `save` and `restore` are called by all of them at the same steps."""

    def __init__(self, workdir: str, cfg: CheckpointConfig):
        self.cfg = cfg
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
        keep: list[Any] = [policies.LatestN(n=cfg.keep)]
        if cfg.best_metric:
            # BestN keeps the end of the sorted list: sort descending when lower is better.
            keep.append(policies.BestN(get_metric_fn=lambda m: m[cfg.best_metric], reverse=cfg.best_mode == 'min',
                                       n=cfg.keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(preservation_policy=policies.AnyPreservationPolicy(keep),
                                               enable_async_checkpointing=cfg.async_save,
                                               cleanup_tmp_directories=True)
        # Handlers named up front: a fresh manager (a resumed run) then reads the metadata of items it never saved.
        handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
                    META: ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint (half-written ones carry a temporary name and are not steps)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, iterator: grain.DatasetIterator | None, meta: Mapping[str, Any],
             metrics: Mapping[str, float] | None = None) -> None:
        """Starts saving (returns once the arrays are copied off the device when asynchronous). `metrics` rank the
        checkpoint for keep-best; `iterator` None saves no data position."""
        args = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave({**meta, 'versions': versions()})}
        if iterator is not None:
            args[DATA] = grain.checkpoint.CheckpointSave(iterator)
        self.manager.save(step, args=ocp.args.Composite(**args), metrics=dict(metrics) if metrics else None,
                          force=True)

    @_reading()
    def meta(self, step: int) -> dict[str, Any]:
        path = os.path.join(self.directory, str(step), META)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        except Exception as e:  # noqa: BLE001 - any reader error is one line naming the checkpoint
            raise CheckpointError(f'{path}: unreadable checkpoint metadata ({_one_line(e)})') from None

    @_reading()
    def check_fits(self, step: int, abstract_state: Any) -> None:
        """One error listing every missing, unexpected and mis-shaped array, before anything is read."""
        where = os.path.join(self.directory, str(step))
        try:
            saved = tree_shapes(self.manager.item_metadata(step)[STATE])
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f'{where}: unreadable checkpoint ({_one_line(e)})') from None
        if not saved:
            raise CheckpointError(f'{where}: unreadable checkpoint (no array metadata in {STATE}/)')
        problems = mismatch(saved, tree_shapes(abstract_state))
        if problems:
            raise CheckpointError(f'{where}: this checkpoint does not fit the config (another model, trained set or '
                                  f'optimizer): ' + '; '.join(problems) + '. Nothing was restored; use another '
                                  '--workdir, or the config it was written with')

    @_reading()
    def restore(self, step: int, abstract_state: Any, iterator: grain.DatasetIterator | None
                ) -> tuple[Any, dict[str, Any]]:
        """The state onto `abstract_state`'s shardings (each process reads only its shards) and the metadata; the
        data iterator (when given) continues where it was saved."""
        self.check_fits(step, abstract_state)
        meta = self.meta(step)
        where = os.path.join(self.directory, str(step))
        if iterator is not None:
            saved, now = meta.get('process_count', 1), jax.process_count()
            if saved != now:
                raise CheckpointError(f'{where}: the data iterator was saved by {saved} processes, this run has {now}; '
                                      f'resume with {saved}, or set --config.checkpoint.restore_data=False to '
                                      f'restart the data order')
        args = {STATE: ocp.args.StandardRestore(abstract_state)}
        if iterator is not None:
            args[DATA] = grain.checkpoint.CheckpointRestore(iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - a truncated or corrupted file: one line naming the step
            raise CheckpointError(f'{where}: unreadable checkpoint ({_one_line(e)}); nothing was restored') from None
        return restored[STATE], meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _export_sharding(mesh: jax.sharding.Mesh) -> Callable[[str, tuple[int, ...]], jax.sharding.Sharding]:
    """Export needs no model: each array is split along its largest dimension the devices divide (else kept
    whole), so no device holds a full copy of a big tree."""
    n = mesh.devices.size

    def sharding_of(_: str, shape: tuple[int, ...]) -> jax.sharding.Sharding:
        dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % n == 0]
        spec = [None] * len(shape)
        if dims:
            spec[dims[0]] = mesh.axis_names[0]
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    return sharding_of


@_reading()
def export(workdir: str, out: str, *, dtype: str | None = None, step: int | None = None,
           log: Callable[[str], None] = print) -> str:
    """`medplib-jax export`: the parameters of a run's train-state checkpoint (newest, or `step`) as a params
    directory for evaluators, LoRA adapters folded into their kernels, floating arrays cast to `dtype`."""
    from medplib_jax.models.lora import LoRAConfig
    from medplib_jax.train.handoff import merge_lora
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f'export: {workdir}: no {CHECKPOINTS}/ here (train with config.checkpoint.every > 0, '
                                f'or use {os.path.join(workdir, FINAL_PARAMS)}, already a params directory)')
    if dtype is not None:
        try:
            cast = np.dtype(jax.numpy.dtype(dtype))
        except TypeError:
            raise ValueError(f'export: --dtype={dtype!r} is not a dtype (e.g. bfloat16, float32)') from None
    ckpts = RunCheckpoints(workdir, CheckpointConfig(async_save=False))
    try:
        steps = ckpts.all_steps()
        step = step or (steps[-1] if steps else None)
        if step not in steps:
            raise FileNotFoundError(f'export: {directory}: no checkpoint of step {step} (have {steps or "none"})')
        meta = ckpts.meta(step)
        saved = ckpts.manager.item_metadata(step)[STATE]
        mesh = jax.make_mesh((jax.device_count(),), ('fsdp',),
                             axis_types=(jax.sharding.AxisType.Auto,))
        sharding_of = _export_sharding(mesh)
        shapes = {k: v for k, v in tree_shapes(saved).items() if k.startswith('params/')}
        abstract = unflatten({k[len('params/'):]: jax.ShapeDtypeStruct(shape, dtype_, sharding=sharding_of(k, shape))
                              for k, (shape, dtype_) in shapes.items()})
        target = {'params': abstract}
        try:  # the parameters only: the optimizer moments are never read
            restored = ocp.PyTreeCheckpointer().restore(
                os.path.join(directory, str(step), STATE), args=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f'{directory}/{step}: unreadable checkpoint ({_one_line(e)})') from None
    finally:
        ckpts.close()
    params = restored['params']
    saved_lora = dict(meta.get('lora') or {})
    if 'targets' in saved_lora:
        saved_lora['targets'] = tuple(saved_lora['targets'])
    lora = LoRAConfig(**saved_lora)
    params = merge_lora(params, lora)
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(cast) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x,
                              params)
    path = save_params(out, params, {**{k: v for k, v in meta.items() if k not in ('versions', 'interval')},
                                     'step': step, 'merged_lora': bool(lora.rank), 'exported_from': directory,
                                     'dtype': dtype or 'as saved'})
    log(f'export: step {step} of {workdir} -> {path} ({sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / 2**20:.1f} MiB'
        f'{", LoRA merged" if lora.rank else ""}{", " + dtype if dtype else ""})')
    return path
