"""Which parameters a stage trains: `config.train.trainable`, regexes over '/'-joined parameter paths.

A parameter trains iff some pattern matches its whole path (`re.fullmatch`, big_vision style); a pattern that
matches nothing is an error naming it. The train step differentiates only the trained subtree and the optimizer
sees only it, so frozen parameters get neither gradients nor Adam moments (nor a backward pass through them). This
is the one place that says what trains: the layers stop no gradients of their own (a tower named here trains; the
demo trains CLIP and the SAM image encoder so).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from medplib_jax.checkpoint import flatten, unflatten

SEP = '/'


class TrainableError(ValueError):
    """A trainable pattern that is not a regex, or that matches no parameter."""


def trained_paths(params: Mapping[str, Any], patterns: Sequence[str]) -> frozenset[str]:
    """The '/'-joined paths that some pattern matches in full. Every pattern must match at least one."""
    paths = list(flatten(params))
    trained: set[str] = set()
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise TrainableError(f'config.train.trainable: {pattern!r} is not a regular expression ({e})') from None
        hits = [p for p in paths if rx.fullmatch(p)]
        if not hits:
            raise TrainableError(f'config.train.trainable: pattern {pattern!r} matches no parameter (paths look like '
                                 f'{paths[0]!r})')
        trained.update(hits)
    return frozenset(trained)


def split(params: Mapping[str, Any], trained: frozenset[str]) -> tuple[dict, dict]:
    """-> (trained subtree, frozen subtree); `merge` puts them back together."""
    flat = flatten(params)
    return (unflatten({p: v for p, v in flat.items() if p in trained}),
            unflatten({p: v for p, v in flat.items() if p not in trained}))


def merge(trained: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    return unflatten({**flatten(frozen), **flatten(trained)})


def _module(path: str, depth: int) -> str:
    parts = path.split(SEP)[:-1]  # drop the leaf name
    parts = [re.sub(r'_\d+$', '_*', p) for p in parts]  # layers_3 -> layers_*: one row for the stack
    return SEP.join(parts[:depth]) or path


def parameter_table(params: Mapping[str, Any], trained: frozenset[str], depth: int = 3) -> str:
    """A text table of trained / frozen parameter counts per module (paths cut at `depth`)."""
    rows: dict[str, list[int]] = {}
    for path, leaf in flatten(params).items():
        n = int(np.prod(leaf.shape))
        row = rows.setdefault(_module(path, depth), [0, 0])
        row[0 if path in trained else 1] += n
    width = max(len(k) for k in rows) + 2
    lines = [f'{"module":<{width}}{"trained":>14}{"frozen":>14}']
    for name in sorted(rows):
        t, f = rows[name]
        lines.append(f'{name:<{width}}{t:>14,}{f:>14,}')
    t_all, f_all = sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values())
    lines.append(f'{"total":<{width}}{t_all:>14,}{f_all:>14,}')
    return '\n'.join(lines)
