"""Where the JAX train step of benchmarks/vs_torch_cpu.py spends its time: a jax.profiler trace of 3 steps on one
pinned core (XLA's per-thunk events via --xla_cpu_enable_xprof_traceme), op time summed by fusion kind.

    python benchmarks/vs_torch_profile.py [ATTENTION_BLOCK]     # 0 (default): one (T, T) block
"""
import collections
import glob
import os
import re
import sys
import tempfile

# One core, one thread, per-thunk trace events: set before JAX is imported.
os.sched_setaffinity(0, {0})
os.environ['XLA_FLAGS'] = ('--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 '
                           '--xla_cpu_enable_xprof_traceme=true')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from jax._src.lib import _profile_data  # noqa: E402

from medplib_jax.convert.llama import hf_to_params  # noqa: E402
from medplib_jax.models.config import LlamaConfig  # noqa: E402
from medplib_jax.models.llama import LlamaForCausalLM  # noqa: E402
from medplib_jax.train.losses import next_token_cross_entropy  # noqa: E402

STEPS = 3


def main() -> None:
    block = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                                      attn_implementation='sdpa', tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    cfg = LlamaConfig.from_hf(hf_cfg, attention_block=block)
    model = LlamaForCausalLM(cfg)
    params = jax.tree.map(jnp.asarray, hf_to_params(state, cfg))
    tx = optax.adamw(1e-4)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 8192, (4, 512)), jnp.int32)

    def loss_fn(p):
        return next_token_cross_entropy(model.apply({'params': p}, ids)[0], ids)[0]

    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    f = jax.jit(step, donate_argnums=(0, 1))
    opt = tx.init(params)
    for _ in range(2):  # compile and warm up
        params, opt, loss = f(params, opt)
        loss.block_until_ready()
    trace = tempfile.mkdtemp(prefix='jprof')
    jax.profiler.start_trace(trace)
    for _ in range(STEPS):
        params, opt, loss = f(params, opt)
        loss.block_until_ready()
    jax.profiler.stop_trace()

    profile = _profile_data.ProfileData.from_file(glob.glob(trace + '/**/*.xplane.pb', recursive=True)[0])
    ops, wall = collections.Counter(), 0
    for plane in profile.planes:
        for line in plane.lines:
            for ev in line.events:
                if 'PjRtCpuClient' in line.name and 'wait for completion' in ev.name:
                    wall += ev.duration_ns
                if 'XLAEigen' in line.name and not ev.name.startswith('ThunkExecutor'):
                    ops[re.sub(r'\.\d+$', '', ev.name)] += ev.duration_ns
    total = sum(ops.values())
    per_step = STEPS * 1e6  # ns -> ms per step
    print(f'step wall {wall / per_step:.0f} ms; op time {total / per_step:.0f} ms/step')
    for name, ns in ops.most_common(14):
        print(f'{ns / per_step:8.1f} ms/step {100 * ns / total:5.1f}%  {name}')


if __name__ == '__main__':
    main()
