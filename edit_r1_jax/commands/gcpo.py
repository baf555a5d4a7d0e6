"""`edit-r1-jax gcpo`: GCPO of the reasoning reward model on preference pairs (N sampled traces per image,
cross-group win/loss-ratio rewards, clipped surrogate). Start from an SFT run with --set gcpo.init_from=RUN/hf."""
from edit_r1_jax.commands._training import add_training_parser, run_training


def add_parser(subparsers):
    return add_training_parser(subparsers, "gcpo", "GCPO of the reasoning reward model on preference pairs", __doc__)


def run(args) -> int:
    return run_training(args, "edit_r1_jax.train.gcpo")
