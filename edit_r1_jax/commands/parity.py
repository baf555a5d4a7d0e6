"""`edit-r1-jax parity MODEL ...`: run the PyTorch reference and our port on the same inputs, print error tables.

Models are dispatched lazily to ``edit_r1_jax.models.<pkg>.parity.run_parity(args) -> int``; a model package may
also define ``add_arguments(parser)`` for its own options (it is imported when the CLI parser is built, so keep that
module's top level light: import torch/jax inside ``run_parity``). To add a model: one entry in ``MODELS`` plus
``edit_r1_jax/models/<pkg>/parity.py``.
"""
from __future__ import annotations

import importlib

MODELS = {
    "qwen2_5_vl": ("edit_r1_jax.models.qwen2_5_vl.parity",
                   "Qwen2.5-VL: transformers vs ours on text + two images (per-layer errors, logits, greedy tokens)"),
    "flux": ("edit_r1_jax.models.flux.parity", "FLUX.1-Kontext pieces: diffusers vs ours"),
}


def _module(name: str):
    try:
        return importlib.import_module(MODELS[name][0])
    except ImportError:
        return None


def add_parser(subparsers):
    p = subparsers.add_parser("parity", help="compare our model ports with the PyTorch reference on one checkpoint",
                              description=__doc__)
    sub = p.add_subparsers(dest="parity_model", metavar="MODEL")
    for name, (_, helptext) in MODELS.items():
        sp = sub.add_parser(name, help=helptext, description=helptext)
        sp.add_argument("--hf-dir", "--dir", dest="hf_dir", required=True,
                        help="checkpoint directory (transformers layout, or a diffusers pipeline directory)")
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and activations dtype on both sides (default float32)")
        sp.add_argument("--seed", type=int, default=0, help="seed for the random test inputs")
        mod = _module(name)
        if mod is not None and hasattr(mod, "add_arguments"):
            mod.add_arguments(sp)
    return p


def run(args) -> int:
    name = getattr(args, "parity_model", None)
    if name is None:
        print("usage: edit-r1-jax parity {" + ",".join(MODELS) + "} --hf-dir DIR [--dtype float32|bfloat16]")
        return 2
    mod = _module(name)
    if mod is None or not hasattr(mod, "run_parity"):
        print(f"parity {name}: {MODELS[name][0]}.run_parity is not available in this build")
        return 2
    return int(mod.run_parity(args) or 0)
