"""`edit-r1-jax` entry point.

Subcommands live one per module in ``edit_r1_jax/commands/``; each module exposes ``add_parser(subparsers)`` and
``run(args) -> int``. They are discovered automatically, so adding a command never edits this file. Modules are
imported lazily enough: only argparse wiring runs at start-up; heavy imports happen inside ``run``.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from edit_r1_jax import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edit-r1-jax",
        description="Edit-R1 in JAX/Flax: reasoning reward model (Qwen2.5-VL), FLUX.1-Kontext editor, "
                    "SFT / GCPO / Flow-GRPO training on TPU meshes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"edit_r1_jax.commands.{info.name}")
        sp = module.add_parser(sub)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
