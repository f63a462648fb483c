"""The README's two set-up commands are the ones the project really runs."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_ci_runs_exactly_the_readme_test_command():
    blocks = re.findall(r'```bash\n(.*?)```', _read('README.md'), re.S)
    main_cmd, test_cmd = blocks[0].strip(), blocks[1].strip()
    assert main_cmd.startswith('python3.11 -m venv') and main_cmd.endswith('medplib-jax demo')
    assert 'pytest' in test_cmd
    ci_lines = [line.strip() for line in _read('.ci', 'run').splitlines()]
    assert test_cmd in ci_lines
