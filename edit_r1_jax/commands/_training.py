"""Shared wiring for the training subcommands (sft, gcpo, editor-sft, grpo): CLI conventions of design.md."""
from __future__ import annotations

import importlib
import logging


def add_training_parser(subparsers, name: str, help_text: str, description: str):
    from edit_r1_jax.config import add_config_args
    p = subparsers.add_parser(name, help=help_text, description=description)
    add_config_args(p)
    p.add_argument("--workdir", required=True,
                   help="run directory: metrics.jsonl, tb/, checkpoints/ (rerunning resumes from the latest)")
    return p


def run_training(args, module: str) -> int:
    from edit_r1_jax import parallel
    parallel.maybe_initialize_distributed()
    import jax
    from edit_r1_jax import config as config_lib
    logging.basicConfig(level=logging.INFO,
                        format=f"[proc {jax.process_index()}] %(asctime)s %(name)s: %(message)s")
    cfg = config_lib.get_config(args.config, args.overrides, num_devices=jax.device_count())
    result = importlib.import_module(module).run(cfg, args.workdir)
    print(f"{module.rsplit('.', 1)[-1]}: {getattr(result, 'stopped', 'done')} at step {getattr(result, 'step', '?')}; "
          f"metrics in {args.workdir}/metrics.jsonl")
    return 0
