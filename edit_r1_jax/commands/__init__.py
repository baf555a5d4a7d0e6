"""CLI subcommands, one module each (auto-discovered by edit_r1_jax.cli)."""
