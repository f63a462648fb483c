"""The grain input pipeline's factories: MeCoVQA / VQA record files -> static-shape batches for MedPLIB (as the
reference's datasets/LazySupervisedDataset.py and DataCollatorForSupervisedDataset.py prepare them).

    RecordSource per file (data/sources.py; JSON list, JSON lines or ArrayRecord; one raw JSON payload per record)
      -> shuffle per dataset (seeded; reshuffled each epoch)  -> mix by weight  -> repeat
      -> random_map(Preprocessor) (data/preprocess.py): parse, load image / masks / regions, tokenise
         -> example or Skipped
      -> EvenShard (data/shard.py; this process's block of every global batch; shards equally long)
      -> batch(Collator) (data/collate.py)
      -> to_iter_dataset (threads)  -> mp_prefetch (worker processes)  -> SkipAccounting (data/skips.py; main process)

Static shapes: sequences are padded to the smallest length bucket that holds the batch's longest one (the last
bucket is the maximum length; longer records are skipped as `too_long`), `max_regions` region grids and `max_seg`
ground-truth masks per row with validity masks. A bad record never stops a run unless `strict`: it becomes an
invalid row (`example_valid` False) whose `skip_reason` names why, so every good record is yielded exactly once,
batch composition does not depend on which records fail, and a global sum of the skip codes over the batch counts
skips over all hosts.

Deliberate differences from the reference's dataset: a region that vanishes on the 24x24 grid is a skip (the
reference keeps the sample with every label ignored, which trains nothing), `<SEG>` tokens must match `<mask>`
references one for one (the reference pairs them by order across the batch), and over-long records are skipped
instead of truncated. A "tokenization mismatch" (data/conversation.py) is kept with every label ignored, as in
the reference, and logged (an error with `strict`; `check-data` counts these rows). With several processes each
picks its length bucket from its own rows; `medplib_jax.train.inputs.global_batch` pads them to the longest before
forming global arrays.
"""
from __future__ import annotations

from typing import Any, Mapping

import grain
import numpy as np

from medplib_jax.data.collate import Collator
from medplib_jax.data.config import DataConfig, ModelShapes
from medplib_jax.data.preprocess import Preprocessor
from medplib_jax.data.shard import EvenShard
from medplib_jax.data.skips import DataIterator, SkipAccounting
from medplib_jax.data.sources import open_sources
from medplib_jax.data.tokenizer import MedPLIBTokenizer, load_tokenizer, tiny_tokenizer


def build_tokenizer(cfg: DataConfig, shapes: ModelShapes) -> MedPLIBTokenizer:
    """The configured tokenizer ('tiny' = the offline test tokenizer), checked against the model's ids."""
    tokenizer = tiny_tokenizer() if cfg.tokenizer == 'tiny' else load_tokenizer(cfg.tokenizer)
    ids = tokenizer.ids
    if (ids.seg, ids.vocab_size) != (shapes.seg_token_id, shapes.vocab_size):
        raise ValueError(f'config.data.tokenizer={cfg.tokenizer!r} gives <SEG> {ids.seg} and vocab {ids.vocab_size}; '
                         f'the model has seg_token_id {shapes.seg_token_id} and vocab_size {shapes.vocab_size}')
    return tokenizer


def _seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def build_dataset(cfg: DataConfig, shapes: ModelShapes, *, seed: int, train: bool = True,
                  shard: grain.sharding.ShardOptions | None = None) -> SkipAccounting:
    """The configured datasets -> an IterDataset of this process's batches (`cfg.batch_size` is global).

    train: shuffled per dataset (reshuffled every epoch), mixed by weight, repeated `num_epochs` times (0 =
    forever). Otherwise one pass in file order (datasets concatenated), the last batch padded. `shard` defaults
    to this JAX process of all (`grain.sharding.ShardByJaxProcess`).
    """
    shard = shard or grain.sharding.ShardByJaxProcess()
    if cfg.batch_size % shard.shard_count:
        raise ValueError(f'config.data.batch_size={cfg.batch_size} is not divisible by the {shard.shard_count} '
                         f'data processes')
    tokenizer = build_tokenizer(cfg, shapes)
    names = list(cfg.datasets)
    sources = open_sources(cfg)
    parts = [grain.MapDataset.source(s) for s in sources]
    if train:
        if cfg.shuffle:
            parts = [p.shuffle(seed=_seed(seed, k)) for k, p in enumerate(parts)]
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [cfg.datasets[n].weight for n in names])
        epoch = len(ds)
        ds = ds.repeat(cfg.num_epochs or None)
    else:
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
        epoch = len(ds)
    cache = None
    if cfg.image_cache:
        from medplib_jax.data.image_cache import ImageCache
        cache = ImageCache(cfg.image_cache)
    ds = ds.random_map(Preprocessor([s.info for s in sources], tokenizer, cfg, shapes, cache),
                       seed=_seed(seed, len(names)))
    local = cfg.batch_size // shard.shard_count
    ds = EvenShard(ds, shard.shard_index, shard.shard_count, local)
    ds = ds.batch(local, drop_remainder=False, batch_fn=Collator(local, cfg, shapes))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch))
    if cfg.worker_count:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                         per_worker_buffer_size=cfg.worker_buffer_size))
    return SkipAccounting(it, cfg.max_skip_fraction, cfg.skip_check_after, sum(len(s) for s in sources), epoch)


def dataset_from_config(config: Mapping[str, Any], *, train: bool = True,
                        shard: grain.sharding.ShardOptions | None = None) -> SkipAccounting:
    """`build_dataset` from the whole config (`config.data`, the model's shapes, `config.seed`)."""
    return build_dataset(DataConfig.from_config(config['data']), ModelShapes.from_config(config['model']),
                         seed=config['seed'], train=train, shard=shard)


def make_iterator(config: Mapping[str, Any], *, train: bool = True,
                  shard: grain.sharding.ShardOptions | None = None) -> DataIterator:
    """From the whole config to a fresh iterator."""
    return iter(dataset_from_config(config, train=train, shard=shard))
