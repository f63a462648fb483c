"""`python -m medplib_jax ...`: the `medplib-jax` command (medplib_jax/main/cli.py)."""
from medplib_jax.main.cli import main

main()
