"""KV-cache decoding (infer/generate.py) of the tiny / demo model's LLM: prefill time of a prompt with 576 image
positions, decode tokens/s at batch 1 and 8, and the share of the memory-bandwidth roofline reached.

The LLM is the stage-IV tiny one (configs/stage4.py:model=tiny: 2 layers, hidden 64, the two-expert MoE FFNs,
LoRA), random weights, float32. The prompt is 576 image positions + `--text` text positions, fed as token ids (the
LLM's cost is the same for image embeddings; the CLIP tower that makes them is not timed). Decoding is greedy
without an EOS stop. Per decode step: time(generate with 1 + N new tokens) - time(generate with 1), over N (fastest of
--repeats calls each).

Roofline: a decode step must read every LLM weight once (all of them, both experts: a batch's tokens can route to
either) and the KV cache up to the current position: bytes/step = weight bytes + 2 x layers x batch x context x
kv_heads x head_dim x 4; the bound is bandwidth x batch / bytes/step tokens/s. On a GPU the bandwidth is the HBM
figure (`--bandwidth_gbs`, e.g. 4800 for an H200); on CPU it is measured here as a large memcpy (read + write
bytes / time), so the share printed is against this host's DRAM copy bandwidth.

    python benchmarks/decode.py [--batches 1,8] [--new_tokens 256] [--text 64] [--hidden 0 --layers 0]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from results_file import write_result  # noqa: E402  (benchmarks/results_file.py)

IMAGE_TOKENS = 576


def memcpy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large array copy (read + write counted)."""
    import numpy as np
    src = np.ones(mib * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def roofline(weight_bytes: int, cfg, batch: int, context: float, bandwidth: float, dtype_bytes: int = 4) -> dict:
    kv = 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    per_step = weight_bytes + kv
    return dict(bytes_per_step=per_step, weight_bytes=weight_bytes, kv_bytes=kv,
                bound_tokens_per_s=bandwidth * batch / per_step)


def _best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` calls after a warm-up (the least disturbed on a shared host)."""
    fn()  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batches', default='1,8')
    parser.add_argument('--new_tokens', type=int, default=256)
    parser.add_argument('--text', type=int, default=64, help='text positions after the 576 image positions')
    parser.add_argument('--hidden', type=int, default=0, help='override the LLM width (head_dim kept)')
    parser.add_argument('--layers', type=int, default=0, help='override the LLM depth')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--bandwidth_gbs', type=float, default=0.0, help='device bandwidth; 0: measure (memcpy)')
    parser.add_argument('--out', default=None)
    args = parser.parse_args()

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from medplib_jax.infer.generate import generate, init_cache, positions_from_mask
    from medplib_jax.models.llama import LlamaConfig, LlamaForCausalLM

    spec = importlib.util.spec_from_file_location('stage4', os.path.join(ROOT, 'configs/stage4.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model_cfg = module.get_config('model=tiny,init=random').model
    cfg = LlamaConfig.from_model_config(model_cfg)
    over = {}
    if args.hidden:
        over.update(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 8 * 8,
                    num_heads=args.hidden // cfg.head_dim, num_kv_heads=args.hidden // cfg.head_dim)
    if args.layers:
        over.update(num_layers=args.layers)
    cfg = dataclasses.replace(cfg, **over, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg)
    length = IMAGE_TOKENS + args.text
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else memcpy_bandwidth()
    platform_name = jax.devices()[0].platform
    print(f'LLM: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, MoE {cfg.moe.mode}; '
          f'{weight_bytes / 2**20:.2f} MiB of weights; prompt {IMAGE_TOKENS} image + {args.text} text positions; '
          f'bandwidth {bandwidth / 1e9:.1f} GB/s ({"given" if args.bandwidth_gbs else "measured memcpy"})',
          flush=True)

    @jax.jit
    def prefill(params, ids, mask):
        cache = init_cache(model, ids.shape[0], ids.shape[1] + args.new_tokens + 1)
        (logits, _), state = model.apply({'params': params, 'cache': cache}, ids,
                                         positions=positions_from_mask(mask), token_mask=mask, decode=True,
                                         mutable=['cache'])
        return logits[:, -1], state['cache']

    rows = []
    rng = np.random.default_rng(0)
    for b in (int(x) for x in args.batches.split(',')):
        ids = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(b, length)), jnp.int32)
        mask = jnp.ones((b, length), bool)
        prompt = {'input_ids': ids, 'token_mask': mask}
        t_prefill = _best_time(lambda: jax.block_until_ready(prefill(params, ids, mask)), args.repeats)

        def gen(n):
            return lambda: jax.block_until_ready(generate(model, params, prompt, max_new_tokens=n, eos_id=-1)['tokens'])
        t1 = _best_time(gen(1), args.repeats)
        tn = _best_time(gen(1 + args.new_tokens), args.repeats)
        per_step = max(tn - t1, 1e-9) / args.new_tokens
        tokens_per_s = b / per_step
        roof = roofline(weight_bytes, cfg, b, length + args.new_tokens / 2, bandwidth)
        row = dict(batch=b, prompt_length=length, prefill_s=t_prefill, prefill_tokens_per_s=b * length / t_prefill,
                   decode_step_s=per_step, decode_tokens_per_s=tokens_per_s, generate_1_s=t1,
                   generate_n_s=tn, new_tokens=args.new_tokens, **roof,
                   roofline_share=tokens_per_s / roof['bound_tokens_per_s'])
        rows.append(row)
        print(f'batch {b}: prefill {t_prefill * 1e3:.1f} ms ({row["prefill_tokens_per_s"]:.0f} tokens/s); decode '
              f'{per_step * 1e3:.2f} ms/step = {tokens_per_s:.0f} tokens/s; roofline '
              f'{roof["bytes_per_step"] / 2**20:.2f} MiB/step -> bound {roof["bound_tokens_per_s"]:.0f} tokens/s, '
              f'share {row["roofline_share"]:.1%}',
              flush=True)
    result = dict(benchmark='decode', date=datetime.date.today().isoformat(), command=' '.join(sys.argv),
                  platform=platform_name, device=str(jax.devices()[0].device_kind), cpu_count=os.cpu_count(),
                  machine=platform.machine(), jax=jax.__version__,
                  llm=dict(layers=cfg.num_layers, hidden=cfg.hidden_size, ffn=cfg.intermediate_size,
                           heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                           vocab=cfg.vocab_size, moe=cfg.moe.mode, weight_bytes=weight_bytes),
                  bandwidth_bytes_per_s=bandwidth, bandwidth_source='given' if args.bandwidth_gbs else 'memcpy',
                  rows=rows)
    write_result(result, f'decode_{platform_name}.json', args.out)


if __name__ == '__main__':
    main()
