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
import functools
import importlib.metadata
import json
import os
import re
import shutil
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from medplib_jax.constants import SYNTHETIC_MARKER
from medplib_jax.train.config import CheckpointConfig
from medplib_jax.tree import flatten, tree_shapes, unflatten

if TYPE_CHECKING:  # grain is imported where a run's data position is saved: reading params does not need it
    import grain

FINAL_PARAMS = 'final_params'  # a run directory's hand-off: merged (LoRA folded) parameters
CHECKPOINTS = 'checkpoints'  # a run directory's train-state checkpoints, one folder per step
STATE, DATA, META = 'state', 'data', 'meta'  # the items of one train-state checkpoint


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


def _quiet_discarded_reads(unraisable: Any, previous: Callable[[Any], None]) -> None:
    """sys.unraisablehook: drops what a discarded coroutine raised on being closed. Orbax's array read
    (`_read_array_index_and_device_put`) catches BaseException, GeneratorExit included, so each read a failed restore
    left behind raised again when the garbage collector closed it, whenever that happened (during the restore, later,
    at exit): one 'Exception ignored in: <coroutine ...>' with a TensorStore repr each, hundreds in all."""
    exc = unraisable.exc_value
    closing = isinstance(exc, GeneratorExit) or isinstance(getattr(exc, '__cause__', None), GeneratorExit)
    if not (asyncio.iscoroutine(unraisable.object) and closing):
        previous(unraisable)


@contextlib.contextmanager
def reading():
    """Every checkpoint read runs under this: the loops Orbax makes meanwhile are `_FailedReadsLoop`s, and
    coroutines discarded after a failed read stay quiet (`_quiet_discarded_reads`, from then on: they are
    collected at any time), so a failed read is its one error."""
    hook = sys.unraisablehook
    if getattr(hook, 'func', None) is not _quiet_discarded_reads:
        sys.unraisablehook = functools.partial(_quiet_discarded_reads, previous=hook)
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


@reading()
def params_shapes(path: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    """'/'-joined path -> (shape, dtype) of every array in a params directory, without reading the arrays."""
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    return {k: (tuple(m.shape), m.dtype) for k, m in flatten(tree).items()}


@reading()
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


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files cannot be read (truncated, missing, cut off): `config.checkpoint.fallback` may pass
    over it to an older step, unlike a checkpoint of another config, which every older step would repeat."""


DAMAGED = 'damaged_checkpoints'  # where `config.checkpoint.fallback` moves a run directory's damaged steps


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


def one_line(e: BaseException) -> str:
    """The innermost cause of a reader error, without the TensorStore spec Orbax and TensorStore append."""
    seen = {id(e)}
    while (e.__cause__ or e.__context__) is not None and id(e.__cause__ or e.__context__) not in seen:
        e = e.__cause__ or e.__context__
        seen.add(id(e))
    text = ' '.join(str(e).split())
    text = re.split(r' \[tensorstore_spec|\. See full TensorStore details', text)[0]
    return f'{type(e).__name__}: {text[:300]}'


def _ocdbt_file(folder: str, location: str) -> tuple[str, int]:
    """An OCDBT location ('<kind>:<base>:<file>:<offset>:<length>') -> (the file's path, where its bytes end)."""
    head, offset, length = location.rsplit(':', 2)
    _, base, name = head.split(':', 2)
    return os.path.join(folder, base, name), int(offset) + int(length)


def _short(path: str, end: int) -> str | None:
    """What is wrong with a file that must hold `end` bytes (None: nothing)."""
    if not os.path.isfile(path):
        return 'missing'
    size = os.path.getsize(path)
    return f'truncated ({size} bytes, data up to byte {end} expected)' if size < end else None


def damaged_file(folder: str) -> str | None:
    """The first missing or truncated file of an Orbax array folder (OCDBT: an index of B+tree nodes pointing into
    data files), as '<file>: <what>, holding array <path>' (None: all whole, or not OCDBT). Reads the index only,
    no array: a truncated file found this way is named, where Orbax's own read fails with a TensorStore repr that
    does not name it (and with every concurrent read still in flight)."""
    import tensorstore as ts
    if not os.path.isfile(os.path.join(folder, 'manifest.ocdbt')):
        return None
    try:
        base = ts.KvStore.open({'driver': 'file', 'path': folder.rstrip('/') + '/'}).result()
        versions = ts.ocdbt.dump(base).result().get('versions') or []
    except Exception as e:  # noqa: BLE001 - any reader error: the manifest is what is damaged
        return f'{os.path.join(folder, "manifest.ocdbt")}: unreadable ({one_line(e)})'
    root = versions[-1].get('root', {}).get('location') if versions else None
    nodes = [(root, b'')] if root else []  # (node, the key prefix its keys continue)
    while nodes:
        location, prefix = nodes.pop()
        path, end = _ocdbt_file(folder, location)
        try:
            problem = _short(path, end)
            node = None if problem else ts.ocdbt.dump(base, location).result()
        except Exception as e:  # noqa: BLE001
            problem = f'unreadable ({one_line(e)})'
        if problem:
            held = f'arrays {prefix.decode(errors="replace")}*' if prefix else 'every array'
            return f'{path}: {problem}, holding the index of {held}'
        for entry in node.get('entries', []):
            key = prefix + entry.get('key', b'')
            if 'location' in entry:  # a subtree: its keys continue this one's common prefix
                nodes.append((entry['location'], prefix + entry.get('subtree_common_prefix', b'')))
            elif 'indirect_value' in entry:
                path, end = _ocdbt_file(folder, entry['indirect_value'])
                problem = _short(path, end)
                if problem:  # Orbax names an array's chunks '<a.b.c>/<chunk>'
                    array = key.decode(errors='replace').rsplit('/', 1)[0].replace('.', '/')
                    return f'{path}: {problem}, holding array {array}'
    return None


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
        import grain
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
            import grain
            args[DATA] = grain.checkpoint.CheckpointSave(iterator)
        self.manager.save(step, args=ocp.args.Composite(**args), metrics=dict(metrics) if metrics else None,
                          force=True)

    @reading()
    def meta(self, step: int) -> dict[str, Any]:
        path = os.path.join(self.directory, str(step), META)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        except Exception as e:  # noqa: BLE001 - any reader error is one line naming the checkpoint
            raise DamagedCheckpointError(f'{path}: unreadable checkpoint metadata ({one_line(e)})') from None

    @reading()
    def check_fits(self, step: int, abstract_state: Any) -> None:
        """One error listing every missing, unexpected and mis-shaped array, before anything is read."""
        where = os.path.join(self.directory, str(step))
        try:
            saved = tree_shapes(self.manager.item_metadata(step)[STATE])
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpointError(f'{where}: unreadable checkpoint ({one_line(e)})') from None
        if not saved:
            raise DamagedCheckpointError(f'{where}: unreadable checkpoint (no array metadata in {STATE}/)')
        problems = mismatch(saved, tree_shapes(abstract_state))
        if problems:
            raise CheckpointError(f'{where}: this checkpoint does not fit the config (another model, trained set or '
                                  f'optimizer): ' + '; '.join(problems) + '. Nothing was restored; use another '
                                  '--workdir, or the config it was written with')

    @reading()
    def restore(self, step: int, abstract_state: Any, iterator: grain.DatasetIterator | None
                ) -> tuple[Any, dict[str, Any]]:
        """The state onto `abstract_state`'s shardings (each process reads only its shards) and the metadata; the
        data iterator (when given) continues where it was saved. Checked first, before any array is read: no file
        the arrays' index points into is missing or truncated (DamagedCheckpointError naming it), and the config
        fits."""
        where = os.path.join(self.directory, str(step))
        damage = damaged_file(os.path.join(where, STATE))
        if damage:
            raise DamagedCheckpointError(f'{damage} (checkpoint {where})')
        self.check_fits(step, abstract_state)
        meta = self.meta(step)
        if iterator is not None:
            saved, now = meta.get('process_count', 1), jax.process_count()
            if saved != now:
                raise CheckpointError(f'{where}: the data iterator was saved by {saved} processes, this run has {now}; '
                                      f'resume with {saved}, or set --config.checkpoint.restore_data=False to '
                                      f'restart the data order')
        args = {STATE: ocp.args.StandardRestore(abstract_state)}
        if iterator is not None:
            import grain
            args[DATA] = grain.checkpoint.CheckpointRestore(iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - a corrupted file: one line naming the step
            raise DamagedCheckpointError(f'{where}: unreadable checkpoint ({one_line(e)})') from None
        return restored[STATE], meta

    def restore_latest(self, abstract_state: Any, iterator: grain.DatasetIterator | None,
                       log: Callable[[str], None] = print) -> tuple[int, Any, dict[str, Any]] | None:
        """`restore` of the newest step -> (step, state, metadata); None when there is no checkpoint. A damaged
        newest step is an error naming the file; with `fallback`, the newest readable step is restored instead and
        the damaged newer ones are moved to `workdir/damaged_checkpoints/` (a warning says so). Nothing is moved
        when no step is readable."""
        damaged: list[tuple[int, DamagedCheckpointError]] = []
        steps = self.all_steps()
        for k in range(len(steps) - 1, -1, -1):
            try:
                state, meta = self.restore(steps[k], abstract_state, iterator)
            except DamagedCheckpointError as e:
                if not self.cfg.fallback:
                    hint = (f'--config.checkpoint.fallback=true resumes from the newest readable older step '
                            f'(steps {", ".join(map(str, steps[:k]))})' if k else
                            f'no older checkpoint: move {os.path.join(self.directory, str(steps[k]))} aside to start '
                            f'again')
                    raise DamagedCheckpointError(f'{e}; nothing was restored: {hint}') from None
                damaged.append((steps[k], e))
                continue
            if damaged:
                moved = self._set_aside([s for s, _ in damaged])
                for s, e in damaged:
                    log(f'WARNING: checkpoint {s} is damaged: {e}')
                log(f'WARNING: config.checkpoint.fallback: resuming from step {steps[k]}, the newest readable; '
                    f'damaged step(s) {", ".join(str(s) for s, _ in damaged)} moved to {moved}')
            return steps[k], state, meta
        if damaged:
            raise DamagedCheckpointError(f'{self.directory}: no readable checkpoint (steps '
                                         f'{", ".join(str(s) for s, _ in damaged)}; newest: {damaged[0][1]}); nothing '
                                         f'was restored or moved')
        return None

    def _set_aside(self, steps: list[int]) -> str:
        """Moves damaged steps out of the manager's folder (kept for inspection, and so that the run can save those
        steps again) -> where they went."""
        target = os.path.join(os.path.dirname(self.directory), DAMAGED)
        if jax.process_index() == 0:
            os.makedirs(target, exist_ok=True)
            for step in steps:
                dest, k = os.path.join(target, str(step)), 1
                while os.path.exists(dest):
                    dest, k = os.path.join(target, f'{step}.{k}'), k + 1
                shutil.move(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices('medplib_jax.checkpoint.damaged')
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the save in flight and for Orbax's start-up removal of half-written steps, then closes: that
        removal runs in a background thread which, still running at interpreter exit (a run stopped by an error
        right after start), printed a 30-line traceback. Orbax itself awaits it only before its first save."""
        await_cleanup = getattr(self.manager, '_maybe_await_cleanup_tmp_directory', None)  # private in Orbax 0.12
        try:
            if await_cleanup is not None:
                await_cleanup()
        except Exception as e:  # noqa: BLE001 - a leftover temporary folder is harmless; do not hide the run's error
            logging.warning('%s: removing half-written checkpoints failed: %s', self.directory, one_line(e))
        self.manager.close()
