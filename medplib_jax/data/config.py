"""`config.data` as a checked dataclass, with each field's default (configs/common.py `data_config` documents the
fields), and `ModelShapes`, what the pipeline reads of `config.model`. Plain Python: a config file loads without
JAX."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from medplib_jax.config_fields import known_fields

# llava_v1: MedPLIB's stages II-IV. plain: LLaVA-1.5's projector pre-training (stage I).
TEMPLATES = ('llava_v1', 'plain')


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One records file (relative to `config.data.root`). `image_folder` '' means `config.data.image_folder`, or
    else the file's own folder."""
    path: str
    weight: float = 1.0
    image_folder: str = ''


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`config.data` (configs/common.py documents each field). Defaults are the 7B recipe's (the reference's global
    batch of 128, its text max_length 2048 + 575 image tokens as the longest bucket); configs/common.py TINY_DATA
    holds the tiny model's."""
    datasets: Mapping[str, DatasetSpec]
    root: str = ''
    image_folder: str = ''
    tokenizer: str = ''  # a local LLaMA tokenizer folder, or 'tiny' (the offline test tokenizer)
    batch_size: int = 128
    length_buckets: tuple[int, ...] = (1024, 1536, 2048, 2623)
    shuffle: bool = True
    num_epochs: int = 0
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 1
    prefetch: int = 2
    strict: bool = False
    max_skip_fraction: float = 0.1
    skip_check_after: int = 200
    mask_canvas: int = 1024
    largest_component: bool = True
    check_duplicate_ids: bool = True
    image_cache: str = ''
    template: str = 'llava_v1'

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f'config.data.template={self.template!r}; known: {TEMPLATES}')
        buckets = tuple(self.length_buckets)
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] <= 0:
            raise ValueError(f'config.data.length_buckets={buckets}: need increasing positive lengths')
        if self.batch_size <= 0 or self.mask_canvas <= 0 or self.num_epochs < 0 or self.worker_count < 0:
            raise ValueError('config.data: batch_size and mask_canvas must be positive, num_epochs and '
                             'worker_count non-negative')
        if not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f'config.data.max_skip_fraction={self.max_skip_fraction}: expected 0..1')
        for name, spec in self.datasets.items():
            if spec.weight <= 0:
                raise ValueError(f'config.data.datasets.{name}.weight={spec.weight}: must be positive')

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> 'DataConfig':
        d = known_fields(cls, data, 'config.data')
        datasets = {name: DatasetSpec(**known_fields(DatasetSpec, spec, f'config.data.datasets.{name}'))
                    for name, spec in dict(d.pop('datasets', {})).items()}
        d['length_buckets'] = tuple(d.get('length_buckets', cls.length_buckets))
        return cls(datasets=datasets, **d)

    @property
    def max_length(self) -> int:
        return self.length_buckets[-1]


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """What the pipeline needs from the model config: fixed counts per sample and the token ids."""
    num_image_tokens: int
    max_regions: int
    max_seg: int
    seg_token_id: int
    vocab_size: int

    @classmethod
    def from_config(cls, model: Mapping[str, Any]) -> 'ModelShapes':
        vision, medplib = model['vision'], model['medplib']
        return cls(num_image_tokens=(vision['image_size'] // vision['patch_size']) ** 2,
                   max_regions=medplib['max_regions'], max_seg=medplib['max_seg'],
                   seg_token_id=medplib['seg_token_id'], vocab_size=model['llm']['vocab_size'])
