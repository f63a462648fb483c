"""`medplib-jax` entry point: `medplib-jax COMMAND [--config=configs/common.py:arg] [--config.a.b=value ...]`."""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs

_CONFIGS = os.path.dirname(configs.__file__)
# The demo's default is its own multi-stage config; every other command starts from the base config.
# `convert` reads the architecture from the checkpoint where it can; CLIP / SAM-Med2D sizes default to the 7B's.
_DEFAULT_CONFIG = {'demo': os.path.join(_CONFIGS, 'demo.py'), 'eval': os.path.join(_CONFIGS, 'eval.py'),
                   'convert': os.path.join(_CONFIGS, 'common.py') + ':model=7b'}
_BASE_CONFIG = os.path.join(_CONFIGS, 'common.py')

# Commands that later issues fill in; each names where it will come from.
_PENDING: dict[str, str] = {}
# command -> its positional arguments
ARGS = {'demo': (), 'train': (), 'sweep': (), 'export': (), 'compile-check': (), 'make-demo-data': ('OUT',),
        'check-data': (), 'build-image-cache': (), 'to-array-record': ('SRC', 'DST'), 'convert': ('PART',), 'eval': (),
        'chat': ('[QUESTION]',), 'serve': ()}  # [X]: optional
CONVERT_PARTS = ('medplib', 'llama', 'clip', 'sam-med2d')
COMMANDS = (*ARGS, *_PENDING)
flags.DEFINE_integer('num_images', 60, 'make-demo-data: number of synthetic images (each gives 7 to 11 records)')
flags.DEFINE_string('picture', '', 'check-data: draw the first batch to this PNG')
flags.DEFINE_string('workdir', '', 'train / sweep / demo: the run directory (logs, TensorBoard, final params)')
flags.DEFINE_bool('print-launch', False, 'sweep: print one launch line per point instead of running them')
flags.DEFINE_list('points', [], 'sweep: run only these points (names from the config\'s sweep())')
flags.DEFINE_string('out', '', 'export / convert: the params directory to write; chat: the overlay PNG (default '
                    '<image name>_overlay.png in the current directory)')
flags.DEFINE_string('src', '', 'convert: the checkpoint to convert (an HF directory; sam-med2d: the .pth file)')
flags.DEFINE_string('sam-med2d', '', 'convert medplib / llama: sam-med2d_b.pth (medplib: only for what the '
                    'directory lacks; llama: adds SAM-Med2D to the stage starting point)')
flags.DEFINE_string('clip', '', 'convert llama: an HF CLIP directory to add (openai/clip-vit-large-patch14-336)')
flags.DEFINE_string('dtype', '', 'export: cast floating parameters to this dtype (e.g. bfloat16; default: as saved)')
flags.DEFINE_integer('step', 0, 'export: the checkpoint step (default: the latest)')
# chat / serve (medplib_jax/chat.py, serve.py)
flags.DEFINE_string('checkpoint', '', 'chat / serve: a run directory (its final_params) or a params directory')
flags.DEFINE_string('image', '', 'chat: PNG, JPEG, DICOM (.dcm) or NIfTI (.nii, .nii.gz) image to ask about')
flags.DEFINE_string('point', None, 'chat: region prompt x,y (pixels; a 41x41 square as the reference demo draws)')
flags.DEFINE_string('box', None, 'chat: region prompt x0,y0,x1,y1 (inclusive pixel corners)')
flags.DEFINE_string('mask', None, 'chat: region prompt, a mask PNG of the image\'s size (non-zero = inside)')
flags.DEFINE_integer('slice', None, 'chat: NIfTI slice along the last axis (default: the middle one)')
flags.DEFINE_string('window', None, 'chat: DICOM window centre,width (default: the file\'s, else a preset)')
flags.DEFINE_bool('routing', False, 'chat: print each answer token\'s expert per MoE layer')
# a string checked by chat.py (a bad value is the commands' one-line error, exit 2, not absl's flag-parsing error)
flags.DEFINE_string('mask_mode', 'auto', 'chat / serve: auto (a mask when the answer holds <SEG>), always (the '
                    'reference evaluation\'s fallback state without one) or never')
flags.DEFINE_integer('max_new_tokens', None, 'chat / serve: answer length limit (default: the predict API\'s, 512)')
flags.DEFINE_float('temperature', None, 'chat / serve: sampling temperature (chat default 0: greedy; serve: the '
                   'reference demo\'s 0.2)')
flags.DEFINE_integer('port', 7860, 'serve: the localhost port')
flags.DEFINE_integer('shortest_edge', None, 'serve: resize uploads to this shortest edge first (default 336, as '
                     'the reference demo; 0 keeps the upload\'s size)')
# eval (medplib_jax/eval/command.py); --checkpoint and --out are shared with chat / serve / export
flags.DEFINE_list('evals', [], 'eval: the evaluators to run, names in config.evals (default: all of them: '
                  'omnimedvqa, mecovqa_c, mecovqa_r, mecovqa_g)')
flags.DEFINE_integer('num_pictures', 8, 'eval: overlay / routing pictures of the first N samples per evaluator')
flags.DEFINE_string('rescore', '', 'eval: recompute the metrics of this predictions.jsonl (no model) into --out')
flags.DEFINE_string('topology', '', 'compile-check: a TPU topology (v5p-64, v5p-256, v4-128, ...) or gpu:8xH100')
# Multi-host (medplib_jax/distributed.py, launch/): TPU pods, SLURM and mpirun are detected; the flags are for an
# explicit cluster. Every process runs the same command line.
flags.DEFINE_enum('distributed', 'auto', ['auto', 'off', 'explicit'],
                  'auto: jax.distributed.initialize() with jax\'s cluster detection on a TPU pod slice, a SLURM step '
                  'or an mpirun launch of more than one process, else one process; off: one process; explicit: '
                  'the --coordinator / --num_processes / --process_id flags below')
flags.DEFINE_string('coordinator', '', 'explicit multi-host: HOST:PORT of process 0, the same on every process')
flags.DEFINE_integer('num_processes', 0, 'explicit multi-host: the number of processes')
flags.DEFINE_integer('process_id', -1, 'explicit multi-host: this process\'s index, 0 .. num_processes - 1')
flags.DEFINE_list('local_device_ids', [], 'multi-host: the local devices this process drives (e.g. 3 for one GPU '
                  'each; default: auto picks SLURM_LOCALID per GPU task, all GPUs for one task per node)')


def _main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else None
    args = argv[2:]
    wanted = ARGS.get(command, ())
    if command not in COMMANDS or not len([a for a in wanted if a[0] != '[']) <= len(args) <= len(wanted):
        got = ' '.join(argv[1:]) or 'nothing'
        usage = ', '.join(' '.join((c, *a)) for c, a in ARGS.items())
        raise app.UsageError(f'expected one command of {", ".join(COMMANDS)} ({usage}); got {got}')
    if command in _PENDING:
        print(f'medplib-jax {command}: {_PENDING[command]}.', file=sys.stderr)
        return 2
    if not any(a.startswith(('--verbosity', '-v')) for a in sys.argv):
        logging.set_verbosity(logging.WARNING)  # Orbax and grain narrate every save at INFO
    if command in ('train', 'sweep', 'demo', 'export', 'eval'):
        from medplib_jax import distributed
        F = flags.FLAGS
        try:  # first, before anything touches jax devices
            distributed.initialize(F.distributed, coordinator=F.coordinator, num_processes=F.num_processes,
                                   process_id=F.process_id, local_device_ids=F.local_device_ids)
        except ValueError as e:  # a bad multi-host flag: one line naming it
            print(f'medplib-jax {command}: {e}', file=sys.stderr)
            return 2
    from medplib_jax.convert.common import MissingExtraError
    from medplib_jax.data.pipeline import TooManySkipsError
    from medplib_jax.train.loop import TrainingError
    config = flags.FLAGS.config
    try:
        _run(command, args, config)
    except (ValueError, FileNotFoundError, FileExistsError, TooManySkipsError, TrainingError,
            MissingExtraError) as e:  # bad config or data: one line
        if os.environ.get('MEDPLIB_DEBUG'):  # MEDPLIB_DEBUG=1 for the traceback
            raise
        print(f'medplib-jax {command}: {str(e).splitlines()[0]}', file=sys.stderr)
        return 2
    return 0


def _run(command: str, args: list[str], config) -> None:
    if command == 'make-demo-data':
        from medplib_jax.data.synthetic import make_demo_data
        counts = make_demo_data(args[0], num_images=flags.FLAGS.num_images, seed=config.seed)
        for name, n in counts.items():
            print(f'{os.path.join(args[0], name)}: {n} records')
    elif command == 'check-data':
        from medplib_jax.data.check import check_data
        check_data(config, picture=flags.FLAGS.picture)
    elif command == 'build-image-cache':
        from medplib_jax.data.image_cache import ImageCache
        from medplib_jax.data.pipeline import DataConfig, image_paths
        cfg = DataConfig.from_config(config.data)
        if not cfg.image_cache:
            raise ValueError('build-image-cache: set --config.data.image_cache=FOLDER (where to write it)')
        paths = image_paths(cfg)
        failed = ImageCache.build(cfg.image_cache, paths)
        print(f'{cfg.image_cache}: {len(paths) - len(failed)} images cached, {len(failed)} unreadable')
        for path, error in list(failed.items())[:10]:
            print(f'  not cached: {error}')
    elif command in ('train', 'sweep'):
        workdir = flags.FLAGS.workdir
        if not workdir:
            raise ValueError(f'{command}: set --workdir=DIR (where logs, TensorBoard events and parameters go)')
        if command == 'train':
            from medplib_jax.train.loop import train
            train(config, workdir)
        else:
            from medplib_jax.train.sweep import run_sweep
            run_sweep(flags.FLAGS['config'].config_filename, config, workdir, points=flags.FLAGS.points,
                      print_launch=flags.FLAGS['print-launch'].value)
    elif command == 'export':
        from medplib_jax.checkpoint import export
        if not (flags.FLAGS.workdir and flags.FLAGS.out):
            raise ValueError('export: set --workdir=RUN_DIR (a training run) and --out=DIR (the params to write)')
        export(flags.FLAGS.workdir, flags.FLAGS.out, dtype=flags.FLAGS.dtype or None, step=flags.FLAGS.step or None)
    elif command == 'compile-check':
        from medplib_jax.compile_check import run_compile_check
        if not flags.FLAGS.topology:
            raise ValueError('compile-check: set --topology= (v5p-64, v5p-256, v4-128, ... or gpu:8xH100)')
        if not run_compile_check(flags.FLAGS['config'].config_filename, config, flags.FLAGS.topology):
            raise SystemExit(1)
    elif command == 'eval':
        _eval(config)
    elif command == 'convert':
        _convert(args[0], config)
    elif command in ('chat', 'serve'):
        _chat_or_serve(command, args)
    elif command == 'to-array-record':
        from medplib_jax.data.pipeline import write_array_record
        print(f'{args[1]}: {write_array_record(*args)} records')
    else:
        from medplib_jax.demo import run_demo
        if 'stages' not in config or 'demo' not in config:
            raise ValueError('demo: --config must be a multi-stage demo config such as configs/demo.py')
        run_demo(config, flags.FLAGS.workdir)


def _convert(part: str, config) -> None:
    """`medplib-jax convert PART --src=... --out=...` (medplib_jax/convert/release.py, parts.py)."""
    F = flags.FLAGS
    if part not in CONVERT_PARTS:
        raise ValueError(f'convert: PART must be one of {", ".join(CONVERT_PARTS)}; got {part!r}')
    if not (F.src and F.out):
        raise ValueError(f'convert {part}: set --src=CHECKPOINT and --out=DIR (the params directory to write)')
    sam, clip = F['sam-med2d'].value, F.clip
    if (sam and part not in ('medplib', 'llama')) or (clip and part != 'llama'):
        raise ValueError(f'convert {part}: --sam-med2d goes with medplib / llama, --clip with llama')
    explicit = set(F['config'].override_values)  # --config.* flags: must agree with the checkpoint's config.json
    if part == 'medplib':
        from medplib_jax.convert.release import convert_release
        convert_release(F.src, F.out, config, sam_med2d=sam or None, explicit=explicit)
    elif part == 'llama':
        from medplib_jax.convert.parts import convert_llama
        convert_llama(F.src, F.out, config, clip=clip or None, sam_med2d=sam or None, explicit=explicit)
    elif part == 'clip':
        from medplib_jax.convert.parts import convert_clip
        convert_clip(F.src, F.out, config, explicit=explicit)
    else:
        from medplib_jax.convert.parts import convert_sam_med2d
        convert_sam_med2d(F.src, F.out, config)


def _eval(config) -> None:
    """`medplib-jax eval --checkpoint=DIR [--evals=a,b] [--out=DIR]` or `--rescore=predictions.jsonl`."""
    F = flags.FLAGS
    from medplib_jax.eval import command
    if F.rescore:
        command.rescore(F.rescore, out=F.out)
    elif not F.checkpoint:
        raise ValueError('set --checkpoint=DIR (a run directory or a params directory) or '
                         '--rescore=predictions.jsonl')
    else:
        command.run_eval(F.checkpoint, config, names=F.evals, out=F.out, num_pictures=F.num_pictures)


def _chat_or_serve(command: str, args: list[str]) -> None:
    """`medplib-jax chat --checkpoint=DIR --image=FILE [QUESTION]` (medplib_jax/chat.py) and `medplib-jax serve
    --checkpoint=DIR [--port=7860]` (medplib_jax/serve.py)."""
    F = flags.FLAGS
    options = dict(mask_mode=F.mask_mode, max_new_tokens=F.max_new_tokens, temperature=F.temperature)
    if command == 'chat':
        from medplib_jax.chat import run_chat
        status = run_chat(F.checkpoint, F.image, args[0] if args else None, point=F.point, box=F.box, mask=F.mask,
                          slice_index=F.slice, window=F.window, out=F.out or None, routing=F.routing, **options)
        if status:
            raise SystemExit(status)
    else:
        from medplib_jax.serve import serve
        serve(F.checkpoint, port=F.port, shortest_edge=F.shortest_edge, **options)


def _define_config_flag(argv: list[str]) -> None:
    """Defines --config. ml_collections applies `--config.x=` overrides while defining the flag, so a field that
    does not exist fails here: report it in one line instead of a traceback."""
    try:
        command = next((a for a in argv[1:] if not a.startswith('-')), '')
        config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG.get(command, _BASE_CONFIG),
                                        'Config file[:arg]; fields overridable with --config.field=value.',
                                        lock_config=True)
    except (AttributeError, KeyError) as e:  # ml_collections' locked-config errors
        text = str(e).replace('\\', '')
        key = re.search(r"'(\w+)'", text)
        key = key.group(1) if key else text
        hint = re.search(r'Did you mean "(\w+)"', text)
        bad = [a.split('=')[0] for a in argv if a.startswith('--config.') and key in a.split('=')[0].split('.')]
        sys.exit(f'FATAL Flags parsing error: {bad[0] if bad else "--config"}: no such config field {key!r}'
                 + (f' (did you mean {hint.group(1)!r}?)' if hint else ''))


def main() -> None:
    _define_config_flag(sys.argv)
    app.run(_main)


if __name__ == '__main__':
    main()
