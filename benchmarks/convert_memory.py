"""Peak host memory of `medplib-jax convert medplib` on a synthetic release checkpoint of about 1 GB.

Writes a MedPLIB-shaped release directory (`pytorch_model-*.bin` shards of about 256 MiB + the index, as
transformers 4.31 writes them; bf16 tensors; the MoE config.json): an LLM of width 1536, FFN 4096, all layers
two-expert MoE, vocabulary 32267, with the tiny CLIP and SAM-Med2D; 8 layers make about 0.48 B parameters
(0.9 GiB). Then, in a fresh process, converts it to float32 (the default parameter dtype) and records the process's
peak resident memory (VmHWM) against its resident memory just before converting, plus the peaks of its anonymous
memory (what the converter allocates) and of its file-backed resident pages (mapped checkpoint pages, which the
kernel can drop under pressure), sampled every 20 ms. Run for 2 and 8 layers: a streaming converter's peak does
not grow with the checkpoint. Results: benchmarks/results/convert_memory_cpu.json.

    python benchmarks/convert_memory.py [--layers 2 8]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARD_BYTES = 256 * 2**20


def _config(layers: int):
    from configs.common import get_config
    config = get_config('model=tiny')
    config.model.llm.update(vocab_size=32267, hidden_size=1536, intermediate_size=4096, num_layers=layers,
                            num_heads=12, num_kv_heads=12, head_dim=128)
    config.model.medplib.seg_token_id = 32000
    config.model.moe.mode = 'dense'
    return config


def _config_json(config) -> dict:
    llm = config.model.llm
    return dict(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
                num_key_value_heads=llm.num_kv_heads, rms_norm_eps=1e-5, max_position_embeddings=4096,
                mm_hidden_size=config.model.vision.hidden_size, mm_projector_type='mlp2x_gelu',
                mm_vision_select_layer=-2, out_dim=config.model.sam_decoder.embed_dim,
                moe=dict(capacity_factor=1.5, ep_size=1, eval_capacity_factor=2, min_capacity=0, moe_enable=True,
                         moe_layers_idx=list(range(llm.num_layers)), moe_mode='dense',
                         num_experts=[2] * llm.num_layers, router_aux_loss_coef=0.0, top_k_experts=1,
                         use_residual=False))


def write_release(directory: str, layers: int) -> dict:
    """Every key the model needs, named by the release table, bf16 random, shard by shard."""
    import numpy as np
    import torch

    from medplib_jax.convert.release import MEDPLIB_TABLE, model_shapes
    from medplib_jax.convert.stream import _expected_slots
    config = _config(layers)
    os.makedirs(directory)
    rng = np.random.default_rng(0)
    shard, shard_bytes, weight_map, total, files = {}, 0, {}, 0, []

    def flush():
        nonlocal shard, shard_bytes
        name = f'pytorch_model-{len(files) + 1:05d}.bin'
        torch.save(shard, os.path.join(directory, name))
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, shard_bytes = {}, 0

    for path, (shape, _) in model_shapes(config.model).items():
        for slot in _expected_slots(MEDPLIB_TABLE, path, shape):
            src_shape = slot.layout.inverse(np.broadcast_to(np.zeros((), np.int8), shape[len(slot.index):])).shape
            t = torch.from_numpy(rng.standard_normal(src_shape, dtype=np.float32) * 0.02).bfloat16()
            shard[slot.key] = t
            shard_bytes += t.numel() * 2
            total += t.numel() * 2
            if shard_bytes >= SHARD_BYTES:
                flush()
    if shard:
        flush()
    n = len(files)
    for i, name in enumerate(files):  # transformers' names: pytorch_model-0000i-of-0000n.bin
        final = f'pytorch_model-{i + 1:05d}-of-{n:05d}.bin'
        os.rename(os.path.join(directory, name), os.path.join(directory, final))
        weight_map = {k: (final if v == name else v) for k, v in weight_map.items()}
    with open(os.path.join(directory, 'pytorch_model.bin.index.json'), 'w') as f:
        json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f)
    with open(os.path.join(directory, 'config.json'), 'w') as f:
        json.dump(_config_json(config), f)
    return {'tensors': len(weight_map), 'shards': n, 'checkpoint_bytes': total}


def _status() -> dict[str, int]:
    out = {}
    with open('/proc/self/status') as f:
        for line in f:
            key, _, value = line.partition(':')
            if key in ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile'):
                out[key] = int(value.split()[0]) * 1024
    return out


def convert(src: str, out: str, layers: int) -> dict:
    import jax

    from medplib_jax.convert.release import convert_release, model_shapes
    config = _config(layers)
    model_shapes(config.model)  # trace once before measuring: what is measured is the conversion itself
    jax.devices()
    peaks = {'RssAnon': 0, 'RssFile': 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            s = _status()
            for k in peaks:
                peaks[k] = max(peaks[k], s[k])
            time.sleep(0.02)
    before = _status()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.time()
    convert_release(src, out, config, progress=False, log=lambda s: None)
    seconds = time.time() - t0
    done.set()
    sampler.join()
    after = _status()
    mib = 2**20
    return {'seconds': round(seconds, 1), 'rss_before_mib': round(before['VmRSS'] / mib),
            'peak_rss_mib': round(after['VmHWM'] / mib),
            'peak_rss_growth_mib': round((after['VmHWM'] - before['VmRSS']) / mib),
            'peak_anon_growth_mib': round((peaks['RssAnon'] - before['RssAnon']) / mib),
            'peak_file_backed_growth_mib': round((peaks['RssFile'] - before['RssFile']) / mib)}


def measure(layers: int) -> dict:
    """Writes the synthetic release (a child process), converts it (another) and reads the figures."""
    from medplib_jax.convert.writer import GROUP_BYTES
    tmp = tempfile.mkdtemp(prefix='convert-memory-')
    try:
        src, out = os.path.join(tmp, 'MedPLIB-synthetic'), os.path.join(tmp, 'converted')
        written = subprocess.run([sys.executable, '-c', f'import sys, json; sys.path.insert(0, {ROOT!r}); '
                                  f'from benchmarks.convert_memory import write_release; '
                                  f'print(json.dumps(write_release({src!r}, {layers})))'],
                                 check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip().splitlines()[-1]
        results = {'layers': layers, **json.loads(written)}
        res = subprocess.run([sys.executable, __file__, '--_convert', src, out, str(layers)],
                             capture_output=True, text=True, cwd=ROOT)
        if res.returncode:
            sys.exit(res.stderr[-3000:])
        results.update(json.loads(res.stdout.strip().splitlines()[-1]))
        with open(out + '.json') as f:
            meta = json.load(f)
        on_disk = sum(os.path.getsize(os.path.join(b, f)) for b, _, fs in os.walk(out) for f in fs)
        llm = _config(layers).model.llm
        largest = max(llm.vocab_size * llm.hidden_size, 2 * llm.hidden_size * llm.intermediate_size) * 4
        results.update({'checkpoint_mib': round(results.pop('checkpoint_bytes') / 2**20),
                        'parameters': meta['parameters'], 'arrays_written': meta['arrays'],
                        'param_dtype': meta['param_dtype'], 'output_mib': round(meta['parameters'] * 4 / 2**20),
                        'output_on_disk_mib': round(on_disk / 2**20), 'group_mib': GROUP_BYTES // 2**20,
                        'largest_array_mib': round(largest / 2**20)})
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--layers', type=int, nargs='+', default=[2, 8])
    parser.add_argument('--_convert', nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._convert:
        src, out, layers = args._convert
        print(json.dumps(convert(src, out, int(layers))))
        return
    import jax
    runs = []
    for layers in args.layers:
        r = measure(layers)
        runs.append(r)
        print(f'{layers} layers: checkpoint {r["checkpoint_mib"]} MiB ({r["tensors"]} tensors) '
              f'-> {r["output_mib"]} MiB '
              f'float32 in {r["seconds"]} s; peak RSS +{r["peak_rss_growth_mib"]} MiB (anonymous '
              f'+{r["peak_anon_growth_mib"]}, file-backed +{r["peak_file_backed_growth_mib"]})')
    results = {'runs': runs,
               'method': 'VmHWM of a fresh process converting, minus its VmRSS just before (imports and the model '
                         'trace done); RssAnon / RssFile peaks sampled every 20 ms',
               'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, '
                          f'{platform.system()}, jax {jax.__version__} CPU, 1 device'}
    path = os.path.join(ROOT, 'benchmarks', 'results', 'convert_memory_cpu.json')
    with open(path, 'w') as f:
        json.dump(results, f, indent=1)
    print(path)


if __name__ == '__main__':
    main()
