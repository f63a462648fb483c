"""The package's layers: every import, lazy ones included, points to the same layer or one below, no module
imports itself back through others, and a config file loads without JAX (big_vision's configs import only
ml_collections)."""
from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Bottom first. A module belongs to the layer of its longest matching name (relative to medplib_jax).
LAYERS = (
    # facts and config dataclasses: plain Python, importable without JAX
    ('constants', 'config_fields', 'axis_rules', 'models.config', 'models.inputs', 'data.config', 'train.config',
     'eval.config'),
    ('tree', 'runtime', 'distributed', 'sharding'),  # infrastructure that knows no model
    ('models',),
    ('data',),
    ('checkpoint',),
    ('infer',),
    ('eval',),
    ('train', 'convert'),
    ('main', '__main__'),  # the entry points: cli, demo, chat, serve
)


def layer_of(module: str) -> int:
    name = module.removeprefix('medplib_jax').lstrip('.')
    best = max(((len(entry), i) for i, entries in enumerate(LAYERS) for entry in entries
                if name == entry or name.startswith(entry + '.')), default=None)
    if best is None:
        raise AssertionError(f'{module}: in no layer of LAYERS (add it where it belongs)')
    return best[1]


def module_name(path: pathlib.Path, package: pathlib.Path) -> str:
    parts = path.relative_to(package.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph(package: pathlib.Path) -> dict[str, set[str]]:
    """module -> the package modules it imports (at the top or inside functions)."""
    modules = {module_name(p, package): p for p in package.rglob('*.py')}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules else node.module
                           for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def problems(package: pathlib.Path) -> list[str]:
    graph = import_graph(package)
    out = [f'{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)}): an arrow up'
           for a, deps in sorted(graph.items()) for b in sorted(deps) if layer_of(b) > layer_of(a)]
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                out.append('cycle: ' + ' -> '.join(path[path.index(dep):] + [node, dep]))
            elif dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return out


def test_imports_run_down_the_layers_without_cycles():
    assert problems(ROOT / 'medplib_jax') == []


@pytest.mark.parametrize('planted, expected', [
    ('from medplib_jax.main import cli\n', 'medplib_jax.models.layers (layer 2) imports medplib_jax.main.cli'),
    ('from medplib_jax.models import llama\n', 'cycle: medplib_jax.models.layers -> medplib_jax.models.llama'),
])
def test_a_planted_upward_import_or_cycle_is_found(tmp_path, planted, expected):
    package = tmp_path / 'medplib_jax'
    shutil.copytree(ROOT / 'medplib_jax', package, ignore=shutil.ignore_patterns('__pycache__'))
    layers = package / 'models' / 'layers.py'
    layers.write_text(layers.read_text() + '\n\ndef _planted():\n    ' + planted)
    assert any(p.startswith(expected) for p in problems(package)), problems(package)


def test_the_entry_points_live_in_main():
    assert {p.stem for p in (ROOT / 'medplib_jax' / 'main').glob('*.py')} >= {'cli', 'demo', 'chat', 'serve'}
    assert not [p.name for p in (ROOT / 'medplib_jax').glob('*.py')
                if p.stem in ('cli', 'demo', 'chat', 'serve', 'compile_check')]


# every config file (a test below checks none is missed), with the args that reach its 7B and tiny branches
CONFIG_ARGS = {'common': ('', 'model=7b'), 'demo': ('',), 'eval': ('',),
               **{f'stage{i}': ('', 'model=tiny', 'model=7b,hw=v5p-64') for i in range(1, 5)}}


def test_every_config_file_is_checked():
    assert set(CONFIG_ARGS) == {p.stem for p in (ROOT / 'configs').glob('*.py')} - {'__init__'}


def test_config_files_load_without_jax():
    """Each config built with JAX, Flax, Orbax, optax and grain never imported."""
    code = ('import importlib, sys\n'
            f'for name, args in {CONFIG_ARGS!r}.items():\n'
            '    for arg in args:\n'
            '        importlib.import_module(f"configs.{name}").get_config(arg or None)\n'
            'heavy = sorted(m for m in ("jax", "flax", "orbax", "optax", "grain") if m in sys.modules)\n'
            'assert not heavy, heavy\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
