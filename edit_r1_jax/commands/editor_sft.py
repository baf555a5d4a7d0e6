"""`edit-r1-jax editor-sft`: flow-matching SFT of the FLUX.1-Kontext editor on (source, instruction, target) triples
(the synthetic world by default). The trained editor is exported to WORKDIR/editor; start GRPO from it with
--set editor.checkpoint=WORKDIR/editor."""
from edit_r1_jax.commands._training import add_training_parser, run_training


def add_parser(subparsers):
    return add_training_parser(subparsers, "editor-sft", "flow-matching SFT of the image editor (FLUX.1-Kontext)",
                               __doc__)


def run(args) -> int:
    return run_training(args, "edit_r1_jax.train.editor_sft")
