"""One of two JAX processes for tests/test_train_inputs.py: this process's pipeline shard -> global arrays.

argv: process_id port records_file image_folder. Prints one JSON line with what this process saw.
"""
import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    pid, port, records, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2, process_id=pid)
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    import ml_collections as mlc
    from jax.experimental import multihost_utils

    from medplib_jax.data.config import DataConfig, DatasetSpec, ModelShapes
    from medplib_jax.data.pipeline import build_dataset
    from medplib_jax.sharding import make_mesh
    from medplib_jax.train.inputs import global_batch

    cfg = DataConfig(datasets={'s': DatasetSpec(records, image_folder=folder)}, tokenizer='tiny', batch_size=8,
                     length_buckets=(640, 768, 1024), mask_canvas=256)
    shapes = ModelShapes(num_image_tokens=576, max_regions=1, max_seg=1, seg_token_id=309, vocab_size=576)
    it = iter(build_dataset(cfg, shapes, seed=0, train=False))  # shards by jax.process_index() / process_count()
    mesh = make_mesh(mlc.ConfigDict(dict(data=-1, fsdp=2, tensor=1)))
    count = jax.jit(lambda v, c: (v.sum(), jnp_bincount(c)))
    out = dict(process=pid, devices=jax.device_count(), local_lengths=[], global_shapes=[], valid=[], skips=[],
               rows=[])
    for host in it:
        out['local_lengths'].append(int(host['input_ids'].shape[1]))
        arrays = global_batch(host, mesh)
        out['global_shapes'].append(list(arrays['input_ids'].shape))
        valid, skips = count(arrays['example_valid'], arrays['skip_reason'])
        out['valid'].append(int(valid))
        out['skips'].append(np.asarray(skips).tolist())
        rows = multihost_utils.process_allgather(np.stack([host['dataset_index'], host['record_index'],
                                                           host['example_valid']], 1))
        out['rows'].append(np.asarray(rows).reshape(-1, 3).tolist())
    it.close()
    print(json.dumps(out), flush=True)


def jnp_bincount(codes):
    import jax.numpy as jnp

    from medplib_jax.data.records import REASONS
    return jnp.bincount(codes.ravel(), length=len(REASONS) + 1)


if __name__ == '__main__':
    main()
