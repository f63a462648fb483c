"""Evaluators: small objects with `run(params) -> metrics`, registered by kind and scheduled by `config.evals`
(big_vision's evaluator pattern). `config.evals.<name> = dict(kind=..., ...)`; the training loop runs each one every
`config.train.eval_every` steps (or its own `every`) and logs its metrics as `eval/<name>/<metric>`. Each evaluator
owns its input pipeline and returns global (all-host) values."""
from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any, Callable, Mapping

from jax.sharding import Mesh

REGISTRY: dict[str, type['Evaluator']] = {}
# kind -> the module that registers it, imported when a config first names the kind (big_vision looks its
# evaluators up by name), so that nothing imports an evaluator's module only for its side effect.
MODULES = {'held_out_loss': 'medplib_jax.train.held_out', 'omnimedvqa': 'medplib_jax.eval.evaluators',
           'mecovqa_c': 'medplib_jax.eval.evaluators', 'mecovqa_r': 'medplib_jax.eval.evaluators',
           'mecovqa_g': 'medplib_jax.eval.evaluators'}


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What an evaluator may use: the whole config, the model, the mesh and rules, a logger."""
    config: Any
    model: Any
    mesh: Mesh
    rules: Any
    log: Callable[[str], None] = print


class Evaluator(abc.ABC):
    def __init__(self, name: str, settings: Mapping[str, Any], context: EvalContext):
        self.name, self.settings, self.context = name, dict(settings), context
        self.every = int(self.settings.pop('every', 0) or context.config.train.eval_every)

    @abc.abstractmethod
    def run(self, params: Any) -> dict[str, float]:
        """Metrics of `params` (plain floats, names without the `eval/<name>/` prefix)."""


def register(kind: str) -> Callable[[type[Evaluator]], type[Evaluator]]:
    def wrap(cls):
        REGISTRY[kind] = cls
        return cls
    return wrap


def lookup(kind: Any, field: str) -> type[Evaluator]:
    """The evaluator class of `kind`, its module imported on first use; an unknown kind is a one-line error."""
    if kind in MODULES and kind not in REGISTRY:
        importlib.import_module(MODULES[kind])
    if kind not in REGISTRY:
        raise ValueError(f'{field}={kind!r}: known kinds {sorted(set(MODULES) | set(REGISTRY))}')
    return REGISTRY[kind]


def build_evaluators(context: EvalContext) -> list[Evaluator]:
    out = []
    for name, spec in context.config.get('evals', {}).items():
        spec = dict(spec)
        out.append(lookup(spec.pop('kind', None), f'config.evals.{name}.kind')(name, spec, context))
    return out
