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


def test_the_readme_is_a_front_page_with_both_commands_first():
    text = _read('README.md')
    lines = text.splitlines()
    assert len(lines) <= 200, f'README.md has {len(lines)} lines: guides belong in docs/'
    starts = [i for i, line in enumerate(lines) if line.strip() == '```bash']
    assert len(starts) >= 2 and starts[1] < 40, f'the two set-up commands start at lines {starts[:2]}'


def test_comments_cite_the_reference_not_a_private_document():
    """Code and docs name the reference's file and function, not section numbers of a document outside the repo."""
    cited = []
    for folder in ('medplib_jax', 'configs', 'docs', 'benchmarks'):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(('.py', '.md')):
                    path = os.path.join(dirpath, name)
                    with open(path) as f:
                        found = re.findall(r'facts? \d+\.\d+', f.read())
                    cited += [f'{os.path.relpath(path, ROOT)}: {m}' for m in found]
    assert not cited, cited
