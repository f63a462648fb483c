"""`medplib-jax` entry point: `medplib-jax COMMAND [ARGS] [--flag=value ...] [--config=FILE[:arg] --config.a.b=value]`.

`medplib-jax --help` lists the commands, `medplib-jax COMMAND --help` one command's flags with examples (no model,
no JAX: it answers at once). Each command reads only the flags `COMMANDS` names for it; any other flag of this
module given on the command line is an error, so nothing a user types is silently ignored. Commands without a
config (chat, serve, export, ...) refuse `--config`: their model comes from the checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import sys

from absl import app, flags, logging

import configs  # the config files' folder (an empty package: nothing is loaded here)
from medplib_jax.constants import CHAT_MAX_NEW_TOKENS

_CONFIGS = os.path.dirname(configs.__file__)
_BASE = os.path.join(_CONFIGS, 'common.py')
_MULTIHOST = ('distributed', 'coordinator', 'num_processes', 'process_id', 'local_device_ids')
_EVERY = ('compilation_cache',)  # flags every command takes
CONVERT_PARTS = ('medplib', 'llama', 'clip', 'sam-med2d')


@dataclasses.dataclass(frozen=True)
class Command:
    """One command: positional arguments ('[X]': optional), the flags it reads, its default config file (None: it
    takes no --config), whether it can run as several processes (the multi-host flags), and its help."""
    args: tuple[str, ...]
    flags: tuple[str, ...]
    config: str | None
    summary: str
    examples: tuple[str, ...] = ()
    multihost: bool = False
    jax: bool = True  # sets up JAX (platforms, compilation cache) before running


DEMO_QUESTION = 'Could you segment out the liver in this image?'
COMMANDS: dict[str, Command] = {
    'demo': Command((), ('workdir',), os.path.join(_CONFIGS, 'demo.py'),
                    'the main job: synthetic data, the tiny MedPLIB trained through stages I-IV, evaluated against '
                    'its initialisation',
                    ('medplib-jax demo', 'medplib-jax demo --config=configs/demo.py:steps=5:250:100:5,images=20 '
                     '--workdir=runs/short'), multihost=True),
    'train': Command((), ('workdir',), _BASE, 'train one stage, or every stage of a multi-stage config',
                     ('medplib-jax train --config=configs/stage2.py --workdir=runs/stage2 '
                      '--config.data.root=/data/MeCoVQA',
                      'medplib-jax train --config=configs/stage4.py:model=tiny,init=random --workdir=runs/try '
                      '--config.train.max_steps=5'), multihost=True),
    'sweep': Command((), ('workdir', 'print-launch', 'points'), _BASE,
                     'run (or print launch lines for) the points of a config\'s sweep() and compare them',
                     ('medplib-jax sweep --config=configs/stage4.py --workdir=runs/sweep --print-launch',),
                     multihost=True),
    'export': Command((), ('workdir', 'out', 'dtype', 'step'), None,
                      'a training run\'s checkpoint -> a params directory (LoRA merged) for eval / chat / serve',
                      ('medplib-jax export --workdir=runs/stage4 --out=runs/stage4_step500 --step=500 '
                       '--dtype=bfloat16',), multihost=True),
    'eval': Command((), ('checkpoint', 'evals', 'out', 'num_pictures', 'rescore', 'tokenizer'),
                    os.path.join(_CONFIGS, 'eval.py'), 'the paper\'s evaluators on a params directory -> report.md, '
                    'metrics.json, predictions.jsonl, pictures',
                    ('medplib-jax eval --checkpoint=outputs/demo/stage4',
                     'medplib-jax eval --checkpoint=runs/medplib-7b-2e --config=configs/eval.py:data=mecovqa '
                     '--config.data.root=/data/MeCoVQA --config.data.image_folder=/data/SAMed2Dv1 --evals=mecovqa_g',
                     'medplib-jax eval --rescore=runs/eval/predictions.jsonl --out=runs/rescored'), multihost=True),
    'chat': Command(('[QUESTION]',), ('checkpoint', 'image', 'point', 'box', 'mask', 'slice', 'window', 'routing',
                                      'mask_mode', 'max_new_tokens', 'temperature', 'out', 'tokenizer'), None,
                    'ask a params directory\'s model about one image (no QUESTION: one question per stdin line)',
                    (f'medplib-jax chat --checkpoint=outputs/demo/stage4 '
                     f'--image=outputs/demo_data/images/IMAGE.png "{DEMO_QUESTION}"',
                     'medplib-jax chat --checkpoint=DIR --image=ct.dcm --window=40,400 --box=40,30,120,90 '
                     '"Can you describe what is seen at the area <region>?"',
                     'medplib-jax chat --checkpoint=DIR --image=brain.nii.gz --slice=12 --routing')),
    'serve': Command((), ('checkpoint', 'port', 'mask_mode', 'max_new_tokens', 'temperature', 'shortest_edge',
                          'tokenizer'), None,
                     'a web page on 127.0.0.1 to ask about uploaded images with point / box / sketch regions',
                     ('medplib-jax serve --checkpoint=outputs/demo/stage4 --port=7860',)),
    'convert': Command(('PART',), ('src', 'out', 'sam-med2d', 'clip'), _BASE + ':model=7b',
                       f'a PyTorch / HF checkpoint -> a params directory; PART: {", ".join(CONVERT_PARTS)}',
                       ('medplib-jax convert medplib --src=/ckpt/MedPLIB-7b-2e --sam-med2d=/ckpt/sam-med2d_b.pth '
                        '--out=runs/medplib-7b-2e',
                        'medplib-jax convert llama --src=/ckpt/llava-v1.5-7b --clip=/ckpt/clip-vit-large-patch14-336 '
                        '--sam-med2d=/ckpt/sam-med2d_b.pth --out=runs/llava-v1.5-7b')),
    'compile-check': Command((), ('topology', 'max_replicated', 'estimate'), _BASE,
                             'compile the train step ahead of time for a TPU topology (or estimate a GPU box): '
                             'memory, FLOPs, does it fit',
                             ('medplib-jax compile-check --config=configs/stage4.py:hw=v5p-64 --topology=v5p-64',)),
    'make-demo-data': Command(('OUT',), ('num_images', 'seed'), None,
                              'write the synthetic MeCoVQA-like set (images, masks, records, tokenizer)',
                              ('medplib-jax make-demo-data outputs/demo_data --num_images=60',), jax=False),
    'check-data': Command((), ('picture',), _BASE, 'one pass over the configured records: counts, skips by reason, '
                          'a picture of a batch',
                          ('medplib-jax check-data --config=configs/stage2.py --config.data.root=/data/MeCoVQA '
                           '--picture=batch.png',)),
    'build-image-cache': Command((), (), _BASE, 'decode and resize the configured images once into a tensorstore '
                                 'cache (--config.data.image_cache=FOLDER)',
                                 ('medplib-jax build-image-cache --config=configs/stage2.py '
                                  '--config.data.image_cache=/data/cache',), jax=False),
    'to-array-record': Command(('SRC', 'DST'), (), None, 'a JSON / JSON-lines records file -> ArrayRecord',
                               ('medplib-jax to-array-record MeCoVQA_train.json MeCoVQA_train.array_record',),
                               jax=False),
}

flags.DEFINE_integer('num_images', 60, 'make-demo-data: number of synthetic images (each gives 7 to 11 records)')
flags.DEFINE_integer('seed', 0, 'make-demo-data: the random seed of the synthetic set')
flags.DEFINE_string('picture', '', 'check-data: draw the first batch to this PNG')
flags.DEFINE_string('workdir', '', 'train / sweep / demo: the run directory (logs, TensorBoard, final params); '
                    'export: the training run to export from')
flags.DEFINE_bool('print-launch', False, 'sweep: print one launch line per point instead of running them')
flags.DEFINE_list('points', [], 'sweep: run only these points (names from the config\'s sweep())')
flags.DEFINE_string('out', '', 'export / convert: the params directory to write; eval: the output folder (default '
                    '<checkpoint>/eval); chat: the overlay PNG (default <image name>_overlay.png in the current '
                    'directory)')
flags.DEFINE_string('src', '', 'convert: the checkpoint to convert (an HF directory; sam-med2d: the .pth file)')
flags.DEFINE_string('sam-med2d', '', 'convert medplib / llama: sam-med2d_b.pth (medplib: only for what the '
                    'directory lacks; llama: adds SAM-Med2D to the stage starting point)')
flags.DEFINE_string('clip', '', 'convert llama: an HF CLIP directory to add (openai/clip-vit-large-patch14-336)')
flags.DEFINE_string('dtype', '', 'export: cast floating parameters to this dtype (e.g. bfloat16; default: as saved)')
flags.DEFINE_integer('step', 0, 'export: the checkpoint step (default: the latest)')
flags.DEFINE_string('checkpoint', '', 'eval / chat / serve: a run directory (its final_params) or a params directory '
                    '(export, convert), whose model, config and tokenizer are used')
flags.DEFINE_string('tokenizer', '', 'eval / chat / serve: a tokenizer folder (tokenizer.model) instead of the one '
                    'the checkpoint carries')
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
flags.DEFINE_integer('max_new_tokens', None, 'chat / serve: answer length limit (default: the predict API\'s, '
                     f'{CHAT_MAX_NEW_TOKENS})')
flags.DEFINE_float('temperature', None, 'chat / serve: sampling temperature (chat default 0: greedy; serve: the '
                   'reference demo\'s 0.2)')
flags.DEFINE_integer('port', 7860, 'serve: the localhost port')
flags.DEFINE_integer('shortest_edge', None, 'serve: resize uploads to this shortest edge first (default 336, as '
                     'the reference demo; 0 keeps the upload\'s size)')
flags.DEFINE_list('evals', [], 'eval: the evaluators to run, names in config.evals (default: all of them: '
                  'omnimedvqa, mecovqa_c, mecovqa_r, mecovqa_g)')
flags.DEFINE_integer('num_pictures', 8, 'eval: overlay / routing pictures of the first N samples per evaluator')
flags.DEFINE_string('rescore', '', 'eval: recompute the metrics of this predictions.jsonl (no model) into --out')
flags.DEFINE_string('topology', '', 'compile-check: a TPU topology (v5p-64, v5p-256, v4-128, ...) or gpu:8xH100')
flags.DEFINE_bool('estimate', False, 'compile-check: also XLA\'s estimate of the step time and the MFU it implies '
                  '(TPU targets; two more compiles at reduced depth)')
flags.DEFINE_float('max_replicated', None, 'compile-check: the share of parameter bytes that may be replicated on '
                   'every device (default 0.02; a tiny model\'s MoE LoRA adapters and norms are about 0.05)')
flags.DEFINE_string('compilation_cache', '', 'where compiled programs are kept between runs '
                    '(default $XDG_CACHE_HOME/medplib-jax/jit, or $MEDPLIB_JAX_COMPILATION_CACHE; "off": none)')
# Multi-host (medplib_jax/distributed.py, launch/): TPU pods, SLURM and mpirun are detected; the flags are for an
# explicit cluster. Every process runs the same command line.
flags.DEFINE_enum('distributed', 'auto', ['auto', 'off', 'explicit'],
                  'auto: jax.distributed.initialize() with jax\'s cluster '
                  'detection on a TPU pod slice, a SLURM step or an mpirun launch of more than one process, else one '
                  'process; off: one process; explicit: the --coordinator / --num_processes / --process_id flags')
flags.DEFINE_string('coordinator', '', 'explicit multi-host: HOST:PORT of process 0, the same on every process')
flags.DEFINE_integer('num_processes', 0, 'explicit multi-host: the number of processes')
flags.DEFINE_integer('process_id', -1, 'explicit multi-host: this process\'s index, 0 .. num_processes - 1')
flags.DEFINE_list('local_device_ids', [], 'multi-host: the local devices this process drives (e.g. 3 for one GPU '
                  'each; default: auto picks SLURM_LOCALID per GPU task, all GPUs for one task per node)')
_OURS = ('num_images', 'seed', 'picture', 'workdir', 'print-launch', 'points', 'out', 'src', 'sam-med2d', 'clip',
         'dtype', 'step', 'checkpoint', 'tokenizer', 'image', 'point', 'box', 'mask', 'slice', 'window', 'routing',
         'mask_mode', 'max_new_tokens', 'temperature', 'port', 'shortest_edge', 'evals', 'num_pictures', 'rescore',
         'topology', 'max_replicated', 'estimate', 'compilation_cache', *_MULTIHOST)


class UsageError(ValueError):
    """A command line that does not fit the command; printed as one line."""


def _command_of(argv: list[str]) -> str:
    return next((a for a in argv[1:] if not a.startswith('-')), '')


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ['usage: medplib-jax COMMAND [ARGS] [--flag=value ...]   (medplib-jax COMMAND --help: its flags)', '',
             'commands:']
    lines += [f'  {name:<{width}}  {c.summary}' for name, c in COMMANDS.items()]
    return '\n'.join(lines)


def _top_level_parts(text: str) -> list[str]:
    """`text` split at '; ' outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == '(') - (ch == ')')
        if depth == 0 and text.startswith('; ', i):
            parts.append(text[start:i])
            start = i + 2
    return parts + [text[start:]]


def flag_help(text: str, command: str) -> str:
    """A flag's help for one command: the flags shared by several commands say `a / b: what; c: what`; keep the
    part naming `command` (a label word may add a mode, e.g. 'convert medplib / llama'), without its label."""
    labelled = []
    for part in _top_level_parts(text):
        m = re.match(r'([a-z][\w-]*(?: [\w-]+)?(?: / [a-z][\w-]*(?: [\w-]+)?)*): (.*)', part, re.S)
        if not m:
            return text
        labelled.append(([w.split()[0] for w in m[1].split(' / ')], m[2]))
    return next((body for names, body in labelled if command in names), text)


def command_help(name: str) -> str:
    """One command's help: usage, its flags with their help and defaults, --config, examples."""
    c = COMMANDS[name]
    shown = [*c.flags, *_EVERY, *(_MULTIHOST if c.multihost else ())]
    width = max(len(f) for f in shown) + 2
    lines = [f'usage: medplib-jax {name} {" ".join(c.args)}'.rstrip() + ' [flags]', '', c.summary, '', 'flags:']
    for f in shown:
        flag = flags.FLAGS[f]
        text = flag_help(flag.help, name)
        default = '' if flag.default in (None, '', [], False) else f' (default: {flag.default_as_str})'
        lines.append(f'  --{f:<{width}}{text}{default}')
    if c.config:
        lines += ['', f'config: --config=FILE[:arg] (default {os.path.relpath(c.config.split(":")[0])}'
                      f'{":" + c.config.split(":", 1)[1] if ":" in c.config else ""}); any field with '
                      f'--config.a.b=value']
    else:
        lines += ['', 'takes no --config (what it needs comes from its arguments and the checkpoint)']
    if c.examples:
        lines += ['', 'examples:'] + [f'  {e}' for e in c.examples]
    return '\n'.join(lines)


def _help(argv: list[str]) -> str | None:
    """The help text when the command line asks for it (-h / --help / help), else None."""
    asked = any(a in ('-h', '--help', '-help') for a in argv[1:]) or _command_of(argv) == 'help'
    if not asked:
        return None
    words = [a for a in argv[1:] if not a.startswith('-') and a != 'help']
    return command_help(words[0]) if words and words[0] in COMMANDS else _usage()


def _check_command_line(command: str, args: list[str]) -> Command:
    if command not in COMMANDS:
        usage = ', '.join(' '.join((c, *spec.args)) for c, spec in COMMANDS.items())
        raise UsageError(f'expected one command of {", ".join(COMMANDS)} ({usage}); got {command or "nothing"}')
    spec = COMMANDS[command]
    required = [a for a in spec.args if not a.startswith('[')]
    if not len(required) <= len(args) <= len(spec.args):
        raise UsageError(f'{command} takes {" ".join(spec.args) or "no positional arguments"}; got '
                         f'{" ".join(args) or "none"} (medplib-jax {command} --help)')
    allowed = {*spec.flags, *_EVERY, *(_MULTIHOST if spec.multihost else ('distributed',))}
    given = [f for f in _OURS if flags.FLAGS[f].present and f not in allowed]
    if given:
        raise UsageError(f'--{given[0]} does not apply to {command} (its flags: '
                         f'{", ".join("--" + f for f in spec.flags) or "none"}; medplib-jax {command} --help)')
    if not spec.multihost and flags.FLAGS.distributed == 'explicit':
        raise UsageError(f'--distributed=explicit does not apply to {command}: it runs as one process')
    return spec


def _user_errors() -> tuple[type[BaseException], ...]:
    """What the commands raise for bad input (printed as one line); the modules that define the others are
    consulted only when loaded (an error of a module never imported cannot have been raised)."""
    out: list[type[BaseException]] = [ValueError, FileNotFoundError, FileExistsError, NotADirectoryError]
    for module, name in (('medplib_jax.convert.common', 'MissingExtraError'),
                         ('medplib_jax.data.skips', 'TooManySkipsError'),
                         ('medplib_jax.train.loop', 'TrainingError')):
        if module in sys.modules:
            out.append(getattr(sys.modules[module], name))
    return tuple(out)


def _stop_on_sigterm(signum, frame) -> None:
    """SIGTERM (a scheduler, `kill`, systemd) stops a command as Ctrl-C does: cleanly, without a stack dump."""
    raise KeyboardInterrupt


# SIGTERM is a preemption for these: what is trained is saved, exit 0, and the same command resumes
_TRAINING = ('train', 'demo', 'sweep')
_early_sigterm: list[int] = []


def _main(argv: list[str]) -> int:
    command, args = (argv[1] if len(argv) > 1 else ''), argv[2:]  # absl has taken the flags out
    F = flags.FLAGS
    try:
        spec = _check_command_line(command, args)
    except UsageError as e:
        print(f'medplib-jax: {e}', file=sys.stderr)
        return 2
    if not any(a.startswith(('--verbosity', '-v')) for a in sys.argv):
        logging.set_verbosity(logging.WARNING)  # Orbax and grain narrate every save at INFO
    training = command in _TRAINING
    # Training commands note a SIGTERM that comes before train/preemption.py takes over (imports, JAX set-up) and
    # hand it on; the others stop at once.
    signal.signal(signal.SIGTERM, (lambda *_: _early_sigterm.append(1)) if training else _stop_on_sigterm)
    try:
        if spec.jax:
            from medplib_jax import runtime
            runtime.host_platforms()
            runtime.compilation_cache(F.compilation_cache or None)
        if spec.multihost:
            from medplib_jax import distributed
            # first, before anything touches jax devices
            distributed.initialize(F.distributed, coordinator=F.coordinator, num_processes=F.num_processes,
                                   process_id=F.process_id, local_device_ids=F.local_device_ids)
        config = _loaded_config() if spec.config else None
        if training:
            from medplib_jax.train.preemption import Preemption
            with Preemption() as preemption:
                preemption.requested = preemption.requested or bool(_early_sigterm)
                _run(command, args, config, preemption)
        else:
            _run(command, args, config)
    except KeyboardInterrupt:
        print(f'medplib-jax {command}: stopped', file=sys.stderr)
        return 130
    except _user_errors() as e:  # bad config, data or flag: one line
        if os.environ.get('MEDPLIB_DEBUG'):  # MEDPLIB_DEBUG=1 for the traceback
            raise
        print(f'medplib-jax {command}: {str(e).splitlines()[0] if str(e) else type(e).__name__}', file=sys.stderr)
        return 2
    return 0


def _loaded_config():
    """--config's ConfigDict; a file that could not be loaded (ml_collections defers that error to the first
    use) is a one-line FileNotFoundError naming it."""
    config = flags.FLAGS['config'].value
    try:
        config.keys()
    except OSError as e:
        reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        raise FileNotFoundError(f'--config={flags.FLAGS["config"].config_filename}: cannot be loaded ({reason})') \
            from None
    return config


def _run(command: str, args: list[str], config, preemption=None) -> None:
    """Runs one command; `preemption` (train / demo / sweep): the SIGTERM request training honours."""
    F = flags.FLAGS
    if command == 'make-demo-data':
        from medplib_jax.data.synthetic import make_demo_data
        counts = make_demo_data(args[0], num_images=F.num_images, seed=F.seed)
        for name, n in counts.items():
            print(f'{os.path.join(args[0], name)}: {n} records')
    elif command == 'check-data':
        from medplib_jax.data.check import check_data
        check_data(config, picture=F.picture)
    elif command == 'build-image-cache':
        from medplib_jax.data.config import DataConfig
        from medplib_jax.data.image_cache import ImageCache
        from medplib_jax.data.sources import image_paths
        cfg = DataConfig.from_config(config.data)
        if not cfg.image_cache:
            raise ValueError('build-image-cache: set --config.data.image_cache=FOLDER (where to write it)')
        paths = image_paths(cfg)
        failed = ImageCache.build(cfg.image_cache, paths)
        print(f'{cfg.image_cache}: {len(paths) - len(failed)} images cached, {len(failed)} unreadable')
        for path, error in list(failed.items())[:10]:
            print(f'  not cached: {error}')
    elif command in ('train', 'sweep'):
        if not F.workdir:
            raise ValueError(f'{command}: set --workdir=DIR (where logs, TensorBoard events and parameters go)')
        if command == 'train':
            from medplib_jax.train.loop import train
            train(config, F.workdir, preemption=preemption)
        else:
            from medplib_jax.train.sweep import run_sweep
            run_sweep(F['config'].config_filename, config, F.workdir, points=F.points,
                      print_launch=F['print-launch'].value, preemption=preemption)
    elif command == 'export':
        from medplib_jax.train.export import export
        if not (F.workdir and F.out):
            raise ValueError('export: set --workdir=RUN_DIR (a training run) and --out=DIR (the params to write)')
        export(F.workdir, F.out, dtype=F.dtype or None, step=F.step or None)
    elif command == 'compile-check':
        from medplib_jax.train.compile_check import MAX_REPLICATED_FRACTION, run_compile_check
        if not F.topology:
            raise ValueError('compile-check: set --topology= (v5p-64, v5p-256, v4-128, ... or gpu:8xH100)')
        limit = MAX_REPLICATED_FRACTION if F.max_replicated is None else F.max_replicated
        if not run_compile_check(F['config'].config_filename, config, F.topology, max_replicated_fraction=limit,
                                 estimate=F.estimate):
            raise SystemExit(1)
    elif command == 'eval':
        _eval(config)
    elif command == 'convert':
        _convert(args[0], config)
    elif command in ('chat', 'serve'):
        _chat_or_serve(command, args)
    elif command == 'to-array-record':
        from medplib_jax.data.sources import write_array_record
        print(f'{args[1]}: {write_array_record(*args)} records')
    else:
        from medplib_jax.main.demo import run_demo
        if 'stages' not in config or 'demo' not in config:
            raise ValueError('demo: --config must be a multi-stage demo config such as configs/demo.py')
        run_demo(config, F.workdir, preemption=preemption)


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
    if F.tokenizer:
        if config.data.tokenizer and config.data.tokenizer != F.tokenizer:
            raise ValueError(f'--tokenizer={F.tokenizer} and --config.data.tokenizer={config.data.tokenizer}: '
                             f'give one')
        config.data.tokenizer = F.tokenizer
    if F.rescore:
        command.rescore(F.rescore, out=F.out)
    elif not F.checkpoint:
        raise ValueError('set --checkpoint=DIR (a run directory or a params directory) or '
                         '--rescore=predictions.jsonl')
    else:
        command.run_eval(F.checkpoint, config, names=F.evals, out=F.out, num_pictures=F.num_pictures)


def _chat_or_serve(command: str, args: list[str]) -> None:
    """`medplib-jax chat --checkpoint=DIR --image=FILE [QUESTION]` (medplib_jax/main/chat.py) and `medplib-jax serve
    --checkpoint=DIR [--port=7860]` (medplib_jax/main/serve.py)."""
    F = flags.FLAGS
    options = dict(mask_mode=F.mask_mode, max_new_tokens=F.max_new_tokens, temperature=F.temperature,
                   tokenizer=F.tokenizer or None)
    if command == 'chat':
        from medplib_jax.main.chat import run_chat
        status = run_chat(F.checkpoint, F.image, args[0] if args else None, point=F.point, box=F.box, mask=F.mask,
                          slice_index=F.slice, window=F.window, out=F.out or None, routing=F.routing, **options)
        if status:
            raise SystemExit(status)
    else:
        from medplib_jax.main.serve import serve
        serve(F.checkpoint, port=F.port, shortest_edge=F.shortest_edge, **options)


def _define_config_flag(command: str, argv: list[str]) -> None:
    """Defines --config for a command that takes one (default: its own file). A command without a config refuses
    --config in one line."""
    spec = COMMANDS.get(command)
    given = [a.split('=')[0] for a in argv[1:] if a.startswith('--config')]
    if spec is None or spec.config is None:
        if given and spec is not None:
            print(f'medplib-jax: {given[0]} does not apply to {command}: it takes no config (what it needs comes '
                  f'from its flags{" and the checkpoint" if "checkpoint" in spec.flags else ""}; medplib-jax '
                  f'{command} --help)', file=sys.stderr)
            sys.exit(2)
        return
    from ml_collections import config_flags
    try:  # ml_collections loads the default file and applies `--config.x=` overrides here already
        config_flags.DEFINE_config_file('config', spec.config, 'Config file[:arg]; fields overridable with '
                                        '--config.field=value.', lock_config=True)
    except Exception as e:  # noqa: BLE001 - see _parse_flags
        if os.environ.get('MEDPLIB_DEBUG'):
            raise
        print(f'medplib-jax {command}: {_flag_error(command, argv, e)}', file=sys.stderr)
        sys.exit(2)


def _flag_error(command: str, argv: list[str], e: BaseException) -> str:
    """A flag-parsing failure as one line: a misspelt config field (ml_collections' locked-config error, with its
    "did you mean"), an error raised by the config file itself (its last line), or absl's own message."""
    text = str(e).replace('\\', '')
    if isinstance(e, (KeyError, AttributeError)) or 'Did you mean' in text or 'does not exist' in text:
        key = re.search(r"'(\w+)'", text)
        key = key.group(1) if key else text
        hint = re.search(r'Did you mean "(\w+)"', text)
        bad = [a.split('=')[0] for a in argv if a.startswith('--config.') and key in a.split('=')[0].split('.')]
        return (f'{bad[0] if bad else "--config"}: no such config field {key!r}'
                + (f' (did you mean {hint.group(1)!r}?)' if hint else ''))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if 'Traceback' in text:  # the config file raised: its exception is the last line
        return lines[-1]
    return lines[0] if lines else type(e).__name__


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (ml_collections loads --config and applies --config.* overrides here), every failure
    one line on stderr (exit 2) instead of a traceback or absl's usage text."""
    command = _command_of(argv)
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - flags.Error, and whatever a config file raises while loading
        if os.environ.get('MEDPLIB_DEBUG'):
            raise
        print(f'medplib-jax {command or ""}: {_flag_error(command, argv, e)}'.replace(' : ', ': '), file=sys.stderr)
        sys.exit(2)


def main() -> None:
    text = _help(sys.argv)
    if text is not None:
        try:
            print(text)
        except BrokenPipeError:  # `medplib-jax --help | head`
            pass
        sys.exit(0)
    _define_config_flag(_command_of(sys.argv), sys.argv)
    app.run(_main, flags_parser=_parse_flags)


if __name__ == '__main__':
    main()
