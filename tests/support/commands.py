"""Runs `medplib-jax` as a user does: a subprocess from the repository root (not a test module: tests call it)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_command(*args: str, devices: int = 1, timeout: float = 600, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """`medplib-jax ARGS` on `devices` fake CPU devices; its exit status, stdout and stderr."""
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    return subprocess.run([sys.executable, '-m', 'medplib_jax', *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)
