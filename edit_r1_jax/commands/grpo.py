"""`edit-r1-jax grpo`: Flow-GRPO of the FLUX.1-Kontext editor with a reward function (the reasoning reward model,
--set grpo.reward_rrm=DIR; the synthetic pixel verifier with --set grpo.reward=gold). G edits per prompt with the
SDE sampler, group-relative advantages, clipped policy ratio + KL to the reference; ODE evaluation every
train.eval_every steps (mean reward + PNG grid). The trained editor (LoRA adapters or full weights) is exported to
WORKDIR/editor."""
from edit_r1_jax.commands._training import add_training_parser, run_training


def add_parser(subparsers):
    return add_training_parser(subparsers, "grpo", "Flow-GRPO of the image editor with the reward model as reward",
                               __doc__)


def run(args) -> int:
    return run_training(args, "edit_r1_jax.train.grpo")
