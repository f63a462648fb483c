"""Where a benchmark's JSON result goes: the script's --out, else benchmarks/results/NAME (one home for the layout
and format that the README's performance table reads)."""
from __future__ import annotations

import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def write_result(result: dict, name: str, out: str | None = None) -> str:
    """Writes `result` as indented JSON to `out` or RESULTS/name; prints and returns the path."""
    path = out or os.path.join(RESULTS, name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(result, f, indent=2)
    print(f'wrote {path}')
    return path
