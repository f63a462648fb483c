"""Config-key checking shared by every config dataclass (model and data)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence


def known_fields(cls: type, values: Mapping[str, Any], section: str, exclude: Sequence[str] = ()) -> dict:
    """`values` as a dict, after checking every key is a field of the config dataclass `cls` (minus `exclude`):
    a misspelt config key is an error naming the section (e.g. `config.data`), not a silently ignored setting."""
    known = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    unknown = set(values) - known
    if unknown:
        raise ValueError(f'{section}: unknown keys {sorted(unknown)}')
    return dict(values)
