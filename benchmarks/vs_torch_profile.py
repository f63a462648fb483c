"""Where the JAX train step of benchmarks/vs_torch_cpu.py spends its time: a jax.profiler trace of 3 steps on one
pinned core (XLA's per-thunk events via --xla_cpu_enable_xprof_traceme), op time summed by fusion kind.

    python benchmarks/vs_torch_profile.py [ATTENTION_BLOCK]     # 0 (default): one (T, T) block
"""
import os, sys, time, glob, collections, re
os.sched_setaffinity(0, {0})
os.environ['XLA_FLAGS']='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 --xla_cpu_enable_xprof_traceme=true'
import jax, jax.numpy as jnp, numpy as np, optax, transformers, torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import medplib_jax.models.llama as L
from medplib_jax.convert.llama import hf_to_params
from medplib_jax.train.losses import next_token_cross_entropy
block=int(sys.argv[1]) if len(sys.argv) > 1 else 0
torch.manual_seed(0)
hf_cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, attn_implementation='sdpa', tie_word_embeddings=False)
hf = transformers.LlamaForCausalLM(hf_cfg)
state={k:v.detach().numpy() for k,v in hf.state_dict().items()}
cfg=L.LlamaConfig.from_hf(hf_cfg, attention_block=block); model=L.LlamaForCausalLM(cfg)
params=jax.tree.map(jnp.asarray, hf_to_params(state,cfg)); tx=optax.adamw(1e-4)
ids=jnp.asarray(np.random.default_rng(0).integers(0,8192,(4,512)),jnp.int32)
def loss_fn(p): return next_token_cross_entropy(model.apply({'params':p},ids)[0], ids)[0]
def step(p,o):
    l,g=jax.value_and_grad(loss_fn)(p); u,o=tx.update(g,o,p); return optax.apply_updates(p,u),o,l
f=jax.jit(step, donate_argnums=(0,1)); o=tx.init(params)
for _ in range(2): params,o,l=f(params,o); l.block_until_ready()
import tempfile; d=tempfile.mkdtemp(prefix='jprof')
jax.profiler.start_trace(d)
for _ in range(3): params,o,l=f(params,o); l.block_until_ready()
jax.profiler.stop_trace()
from jax._src.lib import _profile_data
pb=glob.glob(d+'/**/*.xplane.pb',recursive=True)[0]
pd=_profile_data.ProfileData.from_file(pb)
cat=collections.Counter(); wall=0
for plane in pd.planes:
  for line in plane.lines:
    for ev in line.events:
      if 'PjRtCpuClient' in line.name and 'wait for completion' in ev.name: wall+=ev.duration_ns
      if 'XLAEigen' not in line.name or ev.name.startswith('ThunkExecutor'): continue
      cat[re.sub(r'\.\d+$','',ev.name)]+=ev.duration_ns
tot=sum(cat.values())
print(f'step wall {wall/3e6:.0f} ms; op time {tot/3e6:.0f} ms/step')
for k,v in cat.most_common(14): print(f'{v/3e6:8.1f} ms/step {100*v/tot:5.1f}%  {k}')
