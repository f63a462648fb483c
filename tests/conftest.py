"""Test setup: 8 fake CPU devices (set before jax is imported), absl flags parsed, offline HF."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import tempfile  # noqa: E402

# JAX's persistent compilation cache for the whole test session, shared with the subprocesses the CLI tests start
# (they inherit the environment): each distinct program compiles once per CI run.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='medplib-jax-jit-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain reads absl flags in worker processes; tests do not go through absl.app.run.
flags.FLAGS.mark_as_parsed()


@pytest.fixture
def np_rng(request):
    """Fresh random inputs on every run; the seed is printed on failure and MEDPLIB_TEST_SEED replays it."""
    seed = int(os.environ.get('MEDPLIB_TEST_SEED') or int.from_bytes(os.urandom(4), 'little'))
    request.node.user_properties.append(('seed', seed))
    print(f'random seed: {seed}')
    return np.random.default_rng(seed)


def pytest_collection_modifyitems(config, items):
    """Test files marked `heavy_module` first, the rest in their usual order: with `-n 2 --dist loadfile` a
    long file that starts last would leave the other test process idle at the end."""
    items.sort(key=lambda item: item.get_closest_marker('heavy_module') is None)


def pytest_report_header(config):
    return f'jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}'
