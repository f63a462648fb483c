"""A params directory of a tiny randomly initialised MedPLIB, as `medplib-jax chat` / `serve` read one (tests of
the commands that run them as a user does)."""
import os

import jax
import numpy as np

from configs.common import get_config
from medplib_jax import checkpoint
from medplib_jax.tree import flatten, unflatten


def random_params_dir(path: str, moe: str = 'dense', *, synthetic: bool | None = None) -> str:
    """A tiny MedPLIB's parameter tree (shapes from `jax.eval_shape` of its init: seconds, not a compiled init),
    filled with fresh random values: N(0, 0.02) weights, norm scales 1; written as a params directory with its
    config (`moe=dense`: every layer a two-expert MoE FFN, so answers have a routing). `synthetic`: written as the
    metadata's `synthetic_data` (weights trained on the synthetic demo data: chat and serve show the demo notice);
    None leaves it to `checkpoint.describe_params_dir` (False: the config's data root holds no synthetic marker)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM
    config = get_config(f'moe={moe}')
    mcfg = MedPLIBConfig.from_model_config(config.model)
    model = MedPLIBForCausalLM(mcfg.llm, mcfg=mcfg)
    ids = jnp.zeros((1, 600), jnp.int32).at[0, 10:586].set(-200)
    shapes = jax.eval_shape(lambda k: nn.unbox(model.init(
        k, ids, jnp.zeros((1, 336, 336, 3)), jnp.zeros((1, 256, 256, 3)), jnp.zeros((1, 1, 24, 24), jnp.uint8),
        method=MedPLIBForCausalLM.forward))['params'], jax.random.key(0))
    seed = int.from_bytes(os.urandom(4), 'little')
    print(f'random params seed: {seed}')
    rng = np.random.default_rng(seed)
    flat = {}
    for key, s in flatten(shapes).items():
        norm = key.endswith(('/scale', 'norm/weight'))
        flat[key] = np.ones(s.shape, s.dtype) if norm else (0.02 * rng.standard_normal(s.shape)).astype(s.dtype)
    meta = {'config': config.to_dict(), 'stage': 'IV'}
    if synthetic is not None:
        meta['synthetic_data'] = synthetic
    return checkpoint.save_params(path, unflatten(flat), meta)
