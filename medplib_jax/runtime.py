"""Process-wide JAX settings the commands share: which platforms to bring up and the persistent compilation cache.

Called by the CLI before anything touches a device (jax reads both settings when it first initialises a backend).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os

# `--compilation_cache` / MEDPLIB_JAX_COMPILATION_CACHE: a folder, or this word to switch the cache off.
CACHE_OFF = 'off'
CACHE_ENV = 'MEDPLIB_JAX_COMPILATION_CACHE'


def default_cache_dir() -> str:
    """Where compiled programs are kept between runs: `$XDG_CACHE_HOME/medplib-jax/jit` (`~/.cache/...`)."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'medplib-jax', 'jit')


def _accelerator_plugins() -> list[str]:
    """Installed non-TPU PJRT plugins (CUDA / ROCm builds of jaxlib), as jax discovers them."""
    names = [e.name for e in importlib.metadata.entry_points(group='jax_plugins')]
    if importlib.util.find_spec('jax_plugins') is not None:
        import pkgutil

        import jax_plugins
        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    return [n for n in names if 'tpu' not in n.lower()]


def host_platforms() -> None:
    """With libtpu installed (the `tpu-compile` / test extras) on a machine without TPU chips, jax would still try
    to bring up a TPU backend and print libtpu's probe errors on every run; use the CPU instead. Nothing changes
    when JAX_PLATFORMS is set, a TPU is present, a GPU plugin is installed, or backends are already up."""
    if os.environ.get('JAX_PLATFORMS') or importlib.util.find_spec('libtpu') is None or _accelerator_plugins():
        return
    import jax
    from jax._src import hardware_utils, xla_bridge
    if xla_bridge.backends_are_initialized() or hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        return
    jax.config.update('jax_platforms', 'cpu')


def compilation_cache(setting: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache: `setting` (a folder, or 'off'), else MEDPLIB_JAX_COMPILATION_CACHE,
    else JAX_COMPILATION_CACHE_DIR (jax's own variable, left as it is), else `default_cache_dir()`. A second run
    of a command then loads its programs instead of compiling them. Returns the folder (None: off)."""
    import jax
    setting = setting or os.environ.get(CACHE_ENV) or ''
    if setting == CACHE_OFF:
        jax.config.update('jax_enable_compilation_cache', False)
        return None
    if not setting and os.environ.get('JAX_COMPILATION_CACHE_DIR'):
        return os.environ['JAX_COMPILATION_CACHE_DIR']
    folder = os.path.abspath(os.path.expanduser(setting or default_cache_dir()))
    os.makedirs(folder, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', folder)
    return folder
