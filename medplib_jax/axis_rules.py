"""The mesh axes and the logical-axis rules table (MaxText's `logical_axis_rules`): the one home of which
dimension is split over which mesh axis, for parameters, activations and the batch. `config.logical_axis_rules`
starts from this table (configs/common.py). Plain Python."""
from __future__ import annotations

from typing import Any, Sequence

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH = 'activation_batch'  # the logical name of every batch-leading array's first dimension

# Logical axis -> mesh axis. One table for parameters and activations (MaxText's `logical_axis_rules`).
# Parameters: the model ("embed") dimension is FSDP-sharded, heads / FFN / vocab tensor-parallel.
# Activations: batch over data x fsdp, heads / mlp / vocab over tensor.
LOGICAL_AXIS_RULES = (
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_kv_heads', 'tensor'),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
    ('layers', None),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('norm', None),
    ('expert', None),
    ('vision_embed', 'fsdp'),
    ('vision_heads', 'tensor'),
    ('vision_mlp', 'tensor'),
    ('vision_channels', None),
    ('vision_positions', None),
    # SAM-Med2D (image encoder, prompt encoder, mask decoder)
    ('sam_embed', 'fsdp'),
    ('sam_heads', 'tensor'),
    ('sam_mlp', 'tensor'),
    ('sam_channels', None),
    ('sam_positions', None),
)


def mesh_axes(logical: str, rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
    """The mesh axes a logical axis is split over (first matching rule; none: not split)."""
    for name, axes in rules:
        if name == logical:
            return axis_names(axes)
    return ()


def axis_names(entry: Any) -> tuple[str, ...]:
    """A rule's or a PartitionSpec's entry (None, a name, or names) -> the mesh axis names in it."""
    return () if entry is None else tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)
