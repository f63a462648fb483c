"""This project's LLaMA train step (jitted, optax AdamW) vs HF transformers `LlamaForCausalLM` in torch eager
(sdpa attention, torch.optim.AdamW): same weights, same batch, steps interleaved in one run.

Every contestant (torch, and each JAX variant with its own XLA flags) is its own process, driven one step at a
time over a pipe: a round is one torch step, then one step of each JAX variant, so the machine's noise hits all of
them alike, and an idle contestant waits blocked instead of spinning its thread pool on the shared cores. The ratio
is torch's median step time over the variant's (= JAX tokens/s over torch tokens/s; > 1: JAX is faster). All start
from the HF-initialised weights and the same batch; their first-step losses are printed as a check.

Variants (`--variants`; attention / XLA flags / jit options):
  current   the model as it is (medplib_jax.models.llama, layers.dot_product_attention)
  einsum    the attention before this benchmark (commit 7b0e606): scale after QK^T, (B, T, T) boolean mask applied
            with jnp.where on the fp32 scores (monkeypatched in)
  bias      q scaled before QK^T, the mask as an additive fp32 bias
  jaxnn     jax.nn.dot_product_attention(implementation='xla') with the boolean mask
  fastmath, xnnpack, onednn, vec512   current + --xla_cpu_enable_fast_math / _use_xnnpack / _use_onednn=true,
            --xla_cpu_prefer_vector_width=512
  nodonate  current without donating parameters and optimizer state;  remat  current with remat_policy 'full'
  block64, block128, block256   current with llm.attention_block = 64 / 128 / 256 (layers.causal_attention: query
            blocks that skip the masked upper triangle);  block128_bias  the same with the `bias` formulation
  hm128, hm256   blocked attention with q, k, v transposed to heads-major once per layer (monkeypatched in)
  flash128  block128 with a flash-style custom VJP on each block's attention: the forward keeps only the output and
            the rows' log-sum-exp, the backward recomputes the probabilities from them (monkeypatched in)

    python benchmarks/vs_torch_cpu.py [--variants current,einsum] [--threads 1] [--rounds 6]
        [--layers 4 --hidden 256 --ffn 688 --heads 4 --vocab 8192 --batch 4 --length 512] [--xla_flags '...']
"""
from __future__ import annotations

import argparse
import datetime
import functools
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

from results_file import write_result  # benchmarks/results_file.py

# name -> (attention, extra XLA flags, donate, remat policy[, llm.attention_block])
VARIANTS = {
    'current': ('current', '', True, 'none'),
    'einsum': ('einsum', '', True, 'none'),
    'bias': ('bias', '', True, 'none'),
    'jaxnn': ('jaxnn', '', True, 'none'),
    'fastmath': ('current', '--xla_cpu_enable_fast_math=true', True, 'none'),
    'xnnpack': ('current', '--xla_cpu_use_xnnpack=true', True, 'none'),
    'onednn': ('current', '--xla_cpu_use_onednn=true', True, 'none'),
    'vec512': ('current', '--xla_cpu_prefer_vector_width=512', True, 'none'),
    'nodonate': ('current', '', False, 'none'),
    'remat': ('current', '', True, 'full'),
    'block64': ('current', '', True, 'none', 64),
    'block128': ('current', '', True, 'none', 128),
    'block256': ('current', '', True, 'none', 256),
    'block128_bias': ('bias', '', True, 'none', 128),
    'hm128': ('headsmajor', '', True, 'none', 128),
    'hm256': ('headsmajor', '', True, 'none', 256),
    'flash128': ('flash', '', True, 'none', 128),
}
SINGLE_THREAD_XLA = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def _batch(args):
    import numpy as np
    return np.random.default_rng(0).integers(0, args.vocab, size=(args.batch, args.length))


def _pin(args) -> None:
    """--threads 1: this process on one core (XLA sizes its thread pools from the affinity mask; its
    intra-op flag alone still leaves a second executor thread)."""
    if args.threads == 1 and hasattr(os, 'sched_setaffinity'):
        os.sched_setaffinity(0, {args.cpu})


def _serve(conn, step) -> None:
    while conn.recv() == 'step':
        start = time.perf_counter()
        loss = step()
        conn.send((loss, time.perf_counter() - start))


def _torch_worker(conn, argd) -> None:
    import torch
    import transformers
    args = argparse.Namespace(**argd)
    _pin(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=max(2048, args.length),
        rms_norm_eps=1e-5, attn_implementation='sdpa', tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).train()
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    conn.send((hf_cfg.to_dict(), state, dict(torch=torch.__version__, transformers=transformers.__version__,
                                             torch_threads=torch.get_num_threads())))
    t_ids = torch.from_numpy(_batch(args))
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        # No attention_mask (the batch has no padding): HF's sdpa then takes its is_causal path, torch's fastest.
        loss = hf(input_ids=t_ids, labels=t_ids).loss
        loss.backward()
        opt.step()
        return loss.item()

    _serve(conn, step)


def _jax_worker(conn, argd, variant, hf_cfg, state) -> None:
    args = argparse.Namespace(**argd)
    _pin(args)
    attention, flags, donate, remat, *block = VARIANTS[variant]
    flags = ' '.join(f for f in (os.environ.get('XLA_FLAGS', ''), SINGLE_THREAD_XLA if args.threads == 1 else '',
                                 args.xla_flags or '', flags) if f)
    os.environ['XLA_FLAGS'] = flags
    import jax
    import jax.numpy as jnp
    import optax

    import medplib_jax.models.llama as llama_mod
    from medplib_jax.convert.llama import hf_to_params
    from medplib_jax.models import layers
    base_attention = layers.dot_product_attention
    from medplib_jax.train.losses import next_token_cross_entropy

    def einsum_attention(q, k, v, mask=None, bias=None):
        """The formulation before this benchmark (layers.py as of 7b0e606)."""
        b, t, h, d = q.shape
        kv = k.shape[2]
        qg = q.reshape(b, t, kv, h // kv, d)
        scores = jnp.einsum('btkgd,bskd->bkgts', qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
        if mask is not None:
            mask = jnp.broadcast_to(mask, (b, t, mask.shape[-1]))[:, None, None]
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum('bkgts,bskd->btkgd', probs, v).reshape(b, t, h, d)

    def bias_attention(q, k, v, mask=None, bias=None):
        b, t, h, d = q.shape
        kv = k.shape[2]
        qg = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, t, kv, h // kv, d)
        scores = jnp.einsum('btkgd,bskd->bkgts', qg, k, preferred_element_type=jnp.float32)
        if mask is not None:
            add = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
            scores = scores + jax.lax.stop_gradient(add.reshape(add.shape[0], 1, 1, t, -1))
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum('bkgts,bskd->btkgd', probs, v).reshape(b, t, h, d)

    def jaxnn_attention(q, k, v, mask=None, bias=None):
        b, t = q.shape[:2]
        m = None if mask is None else jnp.broadcast_to(mask, (b, t, mask.shape[-1]))[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=m, implementation='xla')

    def headsmajor_causal(q, k, v, token_mask, block=0):
        """Blocked causal attention with q, k, v transposed to heads-major once (not per block)."""
        b, t, h, d = q.shape
        kv = k.shape[2]
        qh = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
        kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, D)
        uniform = jnp.mean(vh, axis=2)[:, :, None, None]  # (B, K, 1, 1, D)
        block = block or t
        outs = []
        for start in range(0, t, block):
            end = min(start + block, t)
            mask = (jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :])[None] & token_mask[:, None, :end]
            scores = jnp.einsum('bkgtd,bksd->bkgts', qh[:, :, :, start:end], kh[:, :, :end],
                                preferred_element_type=jnp.float32)
            scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
            out = jnp.einsum('bkgts,bksd->bkgtd', probs, vh[:, :, :end])
            outs.append(jnp.where(mask.any(-1)[:, None, None, :, None], out, uniform.astype(out.dtype)))
        out = jnp.concatenate(outs, axis=3)  # (B, K, G, T, D)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)

    neg = jnp.finfo(jnp.float32).min

    def _flash_forward(qh, k, v, mask, scale):  # head-major as layers.dot_product_attention: -> (out, lse)
        sc = jnp.where(mask, jnp.einsum('bktd,bskd->bkts', qh, k, preferred_element_type=jnp.float32) * scale, neg)
        m = sc.max(-1, keepdims=True)
        e = jnp.exp(sc - m)
        total = e.sum(-1, keepdims=True)
        out = jnp.einsum('bkts,bskd->bktd', e.astype(v.dtype), v, preferred_element_type=jnp.float32) / total
        return out.astype(v.dtype), m + jnp.log(total)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def flash_core(qh, k, v, mask, scale):
        return _flash_forward(qh, k, v, mask, scale)[0]

    def flash_fwd(qh, k, v, mask, scale):
        out, lse = _flash_forward(qh, k, v, mask, scale)
        return out, (qh, k, v, mask, out, lse)

    def flash_bwd(scale, res, do):
        qh, k, v, mask, out, lse = res
        sc = jnp.where(mask, jnp.einsum('bktd,bskd->bkts', qh, k, preferred_element_type=jnp.float32) * scale, neg)
        p = jnp.exp(sc - lse)  # the probabilities, recomputed
        do = do.astype(jnp.float32)
        dp = jnp.einsum('bktd,bskd->bkts', do, v.astype(jnp.float32))
        ds = p * (dp - jnp.sum(do * out.astype(jnp.float32), axis=-1, keepdims=True)) * scale
        return (jnp.einsum('bkts,bskd->bktd', ds, k.astype(jnp.float32)).astype(qh.dtype),
                jnp.einsum('bkts,bktd->bskd', ds, qh.astype(jnp.float32)).astype(k.dtype),
                jnp.einsum('bkts,bktd->bskd', p, do).astype(v.dtype), None)

    flash_core.defvjp(flash_fwd, flash_bwd)

    def flash_attention(q, k, v, mask=None, bias=None):
        b, t, h, d = q.shape
        kv = k.shape[2]
        g, s_len = h // kv, k.shape[1]
        qh = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
        mask = jnp.ones((b, t, s_len), bool) if mask is None else jnp.broadcast_to(mask, (b, t, s_len))
        mask = jnp.broadcast_to(mask[:, None, None], (b, 1, g, t, s_len)).reshape(b, 1, g * t, s_len)
        out = flash_core(qh, k, v, mask, d ** -0.5)
        return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)

    if attention == 'headsmajor':
        llama_mod.causal_attention = headsmajor_causal
        attention = 'current'
    layers.dot_product_attention = {'current': base_attention, 'einsum': einsum_attention,
                                       'bias': bias_attention, 'jaxnn': jaxnn_attention,
                                       'flash': flash_attention}[attention]
    cfg = llama_mod.LlamaConfig.from_hf(hf_cfg, remat_policy=remat, attention_block=block[0] if block else 0)
    model = llama_mod.LlamaForCausalLM(cfg)
    params = jax.tree.map(jnp.asarray, hf_to_params(state, cfg))
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
    ids = jnp.asarray(_batch(args), jnp.int32)

    def loss_fn(p):
        logits, _ = model.apply({'params': p}, ids, token_mask=jnp.ones(ids.shape, bool) if args.token_mask else None)
        return next_token_cross_entropy(logits, ids)[0]

    def train_step(p, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    jitted = jax.jit(train_step, donate_argnums=(0, 1) if donate else ())
    carry = [params, tx.init(params)]
    conn.send(dict(jax=jax.__version__, xla_flags=flags))

    def step():
        carry[0], carry[1], loss = jitted(carry[0], carry[1])
        return float(loss)  # waits for the step

    _serve(conn, step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--layers', type=int, default=4)
    parser.add_argument('--hidden', type=int, default=256)
    parser.add_argument('--ffn', type=int, default=688)
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--vocab', type=int, default=8192)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--length', type=int, default=512)
    parser.add_argument('--rounds', type=int, default=6, help='timed rounds after 2 warm-up rounds')
    parser.add_argument('--variants', default='current', help=f'comma-separated, of: {", ".join(VARIANTS)}')
    parser.add_argument('--threads', type=int, default=1,
                        help='1 (default): every contestant pinned to core --cpu, single-threaded; 0: no pinning, '
                             'each library\'s default threads (2 here)')
    parser.add_argument('--cpu', type=int, default=0, help='the core of --threads 1')
    parser.add_argument('--xla_flags', default='', help='added to every JAX variant\'s XLA_FLAGS')
    parser.add_argument('--token_mask', action='store_true', help='pass an all-ones token mask to the JAX model')
    parser.add_argument('--tag', default='', help='suffix of the result file name')
    parser.add_argument('--out', default=None)
    args = parser.parse_args()
    variants = args.variants.split(',')
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f'unknown variant {v!r}; known: {", ".join(VARIANTS)}')

    ctx = mp.get_context('spawn')
    workers, conns = {}, {}
    conns['torch'], child = ctx.Pipe()
    workers['torch'] = ctx.Process(target=_torch_worker, args=(child, vars(args)), daemon=True)
    workers['torch'].start()
    hf_cfg, state, info = conns['torch'].recv()
    for v in variants:
        conns[v], child = ctx.Pipe()
        workers[v] = ctx.Process(target=_jax_worker, args=(child, vars(args), v, hf_cfg, state), daemon=True)
        workers[v].start()
    jax_info = {v: conns[v].recv() for v in variants}  # sequentially, so set-ups do not overlap timed steps
    names = ['torch'] + variants
    times = {k: [] for k in names}
    first = {}
    for r in range(2 + args.rounds):
        for k in names:
            conns[k].send('step')
            loss, elapsed = conns[k].recv()
            if r == 0:
                first[k] = loss
            elif r >= 2:
                times[k].append(elapsed)
        if r == 0:
            print('first-step losses (same weights and batch): ' +
                  ', '.join(f'{k} {val:.6f}' for k, val in first.items()), flush=True)
    for k in names:
        conns[k].send('stop')
        workers[k].join()

    tokens = args.batch * args.length
    med = {k: statistics.median(t) for k, t in times.items()}
    best = {k: min(t) for k, t in times.items()}
    print(f'{"":>14} {"median step":>12} {"min step":>9} {"tokens/s":>9} {"vs torch: median":>17} {"min":>6} '
          f'{"paired":>7}')
    rows = []
    for k in names:
        paired = statistics.median(a / b for a, b in zip(times['torch'], times[k]))
        rows.append(dict(name=k, spec=None if k == 'torch' else dict(zip(('attention', 'xla_flags', 'donate',
                                                                          'remat', 'attention_block'), VARIANTS[k])),
                         median_step_s=med[k], min_step_s=best[k], tokens_per_s=tokens / med[k],
                         ratio_vs_torch=med['torch'] / med[k], ratio_vs_torch_min=best['torch'] / best[k],
                         ratio_vs_torch_paired=paired, step_times_s=times[k], first_loss=first[k]))
        print(f'{k:>14} {med[k]:>10.3f} s {best[k]:>7.3f} s {tokens / med[k]:>9.0f} {med["torch"] / med[k]:>16.2f}x '
              f'{best["torch"] / best[k]:>5.2f}x {paired:>6.2f}x', flush=True)
    result = dict(benchmark='vs_torch_cpu', date=datetime.date.today().isoformat(),
                  method='one process per contestant; rounds of one torch step then one step of each JAX variant; '
                  'times after 2 warm-up rounds; ratio_vs_torch = torch median / variant median (tokens/s ratio), '
                  '_min = ratio of the fastest steps, _paired = median over rounds of torch step / variant step',
                  size=dict(layers=args.layers, hidden=args.hidden, ffn=args.ffn, heads=args.heads,
                            vocab=args.vocab, batch=args.batch, length=args.length, dtype='float32'),
                  threads=args.threads, cpu=_cpu_model(), cpu_count=os.cpu_count(), machine=platform.machine(),
                  **info, jax=next(iter(jax_info.values()))['jax'] if jax_info else None,
                  xla_flags={v: i['xla_flags'] for v, i in jax_info.items()}, command=' '.join(sys.argv), rows=rows)
    write_result(result, f'vs_torch_cpu{"_" + args.tag if args.tag else ""}.json', args.out)


if __name__ == '__main__':
    main()
