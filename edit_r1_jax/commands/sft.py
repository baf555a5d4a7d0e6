"""`edit-r1-jax sft`: cold-start SFT of the reasoning reward model on CoT traces."""
from edit_r1_jax.commands._training import add_training_parser, run_training


def add_parser(subparsers):
    return add_training_parser(subparsers, "sft", "SFT of the reasoning reward model (Qwen2.5-VL)", __doc__)


def run(args) -> int:
    return run_training(args, "edit_r1_jax.train.sft")
