"""`edit-r1-jax export`: a training checkpoint -> a transformers (reward model) or diffusers (editor) directory.

Run it as its own job, on one host: it restores only the params (onto one device) from an Orbax checkpoint written by
any number of processes on any mesh, rebuilds the model from the run's saved config, and writes the directory.

    edit-r1-jax export --checkpoint runs/sft --to hf --out runs/sft/hf_export            # newest step
    edit-r1-jax export --checkpoint runs/grpo/checkpoints/40 --to diffusers --out editor_step40
"""
from __future__ import annotations


def add_parser(subparsers):
    p = subparsers.add_parser("export", help="export a checkpoint as a transformers / diffusers directory",
                              description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="RUN_DIR, RUN_DIR/checkpoints (newest finalized step) or RUN_DIR/checkpoints/STEP")
    p.add_argument("--to", required=True, choices=["hf", "diffusers"],
                   help="hf: Qwen2.5-VL reward model for transformers; diffusers: FLUX.1-Kontext editor")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--step", type=int, default=None, help="step to export when --checkpoint is a run directory")
    return p


def run(args) -> int:
    import logging
    import os
    os.environ.setdefault("JAX_PLATFORMS", "cpu")     # one host, one device: no accelerator needed
    from edit_r1_jax.train.export_run import ExportError, export_checkpoint
    logging.basicConfig(level=logging.WARNING)
    try:
        info = export_checkpoint(args.checkpoint, args.to, args.out, step=args.step)
    except ExportError as e:
        print(f"error: {e}")
        return 2
    print(f"export: {info['model']} step {info['step']} from {info['checkpoint']} -> {info['out']} ({args.to})")
    return 0
