"""Host batches -> global arrays: on 8 fake devices in one process (equal to the host batch, batch-sharded, skip
codes summed on device), and across two real JAX processes (jax.distributed over gloo), whose pipelines pick
different length buckets and must agree before forming global arrays."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from PIL import Image
from support.ports import free_port

from medplib_jax.data.batch import pad_batch
from medplib_jax.data.config import DataConfig, DatasetSpec, ModelShapes
from medplib_jax.data.pipeline import build_dataset
from medplib_jax.data.records import REASONS
from medplib_jax.data.skips import skip_counts
from medplib_jax.sharding import make_mesh
from medplib_jax.train.inputs import global_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'support', 'multihost_data_worker.py')
SHAPES = ModelShapes(num_image_tokens=576, max_regions=1, max_seg=1, seg_token_id=309, vocab_size=576)
IMG = 'images/ct_00--T--case_0--z_0001.png'


def _records(folder, n=9, bad=(8,)):
    """Records 4-7 long, the others short: with 2 processes and a global batch of 8, process 1's block of the first
    batch is 4-7, so the two processes' rows land in different length buckets; the records in `bad` name a missing
    image."""
    (folder / 'images').mkdir(exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(folder / IMG)
    out = []
    for i in range(n):
        answer = 'a long answer ' * 10 if 4 <= i < 8 else 'short.'
        out.append({'id': str(i), 'image': 'images/none.png' if i in bad else IMG,
                    'conversations': [{'from': 'human', 'value': '<image>\nWhat is shown?'},
                                      {'from': 'gpt', 'value': answer}]})
    path = folder / 'set.jsonl'
    path.write_text('\n'.join(json.dumps(r) for r in out) + '\n')
    return str(path)


def test_global_batch_on_eight_devices_equals_the_host_batch(tmp_path):
    cfg = DataConfig(datasets={'s': DatasetSpec(_records(tmp_path))}, tokenizer='tiny', batch_size=8,
                     length_buckets=(640, 768, 1024), mask_canvas=64)
    it = iter(build_dataset(cfg, SHAPES, seed=0, train=False))
    host = next(it)
    it.close()
    mesh = make_mesh(mlc.ConfigDict(dict(data=-1, fsdp=2, tensor=1)))
    arrays = global_batch(host, mesh)
    assert set(arrays) == set(host) - {'_skip_messages'}
    for k, v in arrays.items():
        np.testing.assert_array_equal(np.asarray(v), host[k], err_msg=k)
        assert v.sharding.spec == PartitionSpec(('data', 'fsdp'), *([None] * (v.ndim - 1)))
    codes = jax.jit(lambda c: jnp.bincount(c.ravel(), length=len(REASONS) + 1))(arrays['skip_reason'])
    assert {r: int(codes[i + 1]) for i, r in enumerate(REASONS)} == skip_counts(host['skip_reason'])
    assert skip_counts(host['skip_reason'])['image'] == 0  # the bad record is the 9th: in the next batch
    picked = global_batch(host, mesh, keys=('input_ids', 'token_mask'))
    assert set(picked) == {'input_ids', 'token_mask'}


def test_pad_batch_pads_only_the_sequence_arrays():
    batch = dict(input_ids=np.ones((2, 3), np.int32), labels=np.full((2, 3), 5, np.int32),
                 token_mask=np.ones((2, 3), bool), clip_pixels=np.ones((2, 4, 4, 3), np.float32))
    out = pad_batch(batch, 5)
    assert out['input_ids'].shape == (2, 5) and (out['input_ids'][:, 3:] == 0).all()
    assert (out['labels'][:, 3:] == -100).all() and not out['token_mask'][:, 3:].any()
    assert out['clip_pixels'] is batch['clip_pixels']
    with pytest.raises(ValueError, match='length 2 is shorter than the batch'):
        pad_batch(batch, 2)


@pytest.mark.slow
@pytest.mark.e2e
def test_two_jax_processes_agree_on_length_and_cover_the_data(tmp_path):
    records = _records(tmp_path)
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop('XLA_FLAGS', None)
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), port,
                               records, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=ROOT) for i in range(2)]
    outs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    a, b = outs
    assert a['devices'] == b['devices'] == 8
    # 9 records, global batches of 8 as blocks of 4 per process: process 0 holds 0-3 then 8 (+3 padding), process
    # 1 holds 4-7 then 4 padding rows -> 2 steps each
    assert len(a['local_lengths']) == len(b['local_lengths']) == 2
    assert a['local_lengths'][0] < b['local_lengths'][0]  # short answers on process 0, long ones on process 1 ...
    assert a['global_shapes'] == b['global_shapes']  # ... one global shape per step all the same
    for step in range(2):
        assert a['global_shapes'][step] == [8, max(a['local_lengths'][step], b['local_lengths'][step])]
    assert a['valid'] == b['valid'] and sum(a['valid']) == 8  # global sums, identical on both processes
    assert a['skips'] == b['skips'] and sum(s[1 + REASONS.index('image')] for s in a['skips']) == 1
    rows = [tuple(r) for step in a['rows'] for r in step]
    assert rows == [tuple(r) for step in b['rows'] for r in step]
    good = sorted(r[1] for r in rows if r[2])
    assert good == list(range(8))  # every good record once, over both processes
