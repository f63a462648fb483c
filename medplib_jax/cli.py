"""`medplib-jax` entry point: `medplib-jax COMMAND [--config=configs/common.py:arg] [--config.a.b=value ...]`."""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

import configs

_DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), 'common.py')

# Commands that later issues fill in; each names where it will come from.
_PENDING = {
    'train': 'training (the stage-parametrised train step) is not implemented yet',
    'eval': 'evaluation (OmniMedVQA, MeCoVQA-C/R/G metrics) is not implemented yet',
    'chat': 'interactive inference (VQA, region prompts, grounding) is not implemented yet',
    'convert': 'checkpoint conversion to Orbax is not implemented yet; the HF key tables are in '
               'medplib_jax.convert (llama, clip)',
}
COMMANDS = ('demo', 'make-demo-data', *_PENDING)
flags.DEFINE_integer('num_images', 60, 'make-demo-data: number of synthetic images (each gives 6 records)')


def _main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else None
    n_args = {'make-demo-data': 1}.get(command, 0)
    if command not in COMMANDS or len(argv) != 2 + n_args:
        got = ' '.join(argv[1:]) or 'nothing'
        raise app.UsageError(f'expected one command of {", ".join(COMMANDS)} (make-demo-data takes an output '
                             f'folder); got {got}')
    if command == 'make-demo-data':
        from medplib_jax.data.synthetic import make_demo_data
        counts = make_demo_data(argv[2], num_images=flags.FLAGS.num_images, seed=flags.FLAGS.config.seed)
        for name, n in counts.items():
            print(f'{os.path.join(argv[2], name)}: {n} records')
        return 0
    if command in _PENDING:
        print(f'medplib-jax {command}: {_PENDING[command]}.', file=sys.stderr)
        return 2
    from medplib_jax.demo import run_demo
    try:
        run_demo(flags.FLAGS.config)
    except ValueError as e:  # configuration problems: one line (MEDPLIB_DEBUG=1 for the traceback)
        if os.environ.get('MEDPLIB_DEBUG'):
            raise
        print(f'medplib-jax {command}: {e}', file=sys.stderr)
        return 2
    return 0


def _define_config_flag(argv: list[str]) -> None:
    """Defines --config. ml_collections applies `--config.x=` overrides while defining the flag, so a field that
    does not exist fails here: report it in one line instead of a traceback."""
    try:
        config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Config file[:arg]; fields overridable with '
                                        '--config.field=value.', lock_config=True)
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
