"""demo: the embedded default (`make demo` / `edit-r1-jax demo`): RRM SFT -> GCPO -> editor SFT -> editor GRPO.

Runs on: a 2-core CPU, no network, no weights (tiny random models trained from scratch on the synthetic world).
Time: about 8 minutes for the full demo on a 2-core CPU (8m05s measured 2026-11-27; budget 15); `--quick` about
3 minutes. Builds on configs/tiny.py; each stage gets the
overrides listed under `demo.<stage>` (and `demo.quick_<stage>` in quick mode).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_tiny_config", os.path.join(os.path.dirname(__file__), "tiny.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config():
    c = _tiny.get_config()
    c.seed = 0
    # reward model: image 84 px -> a 6x6 patch grid -> 3x3 merged tokens per image, one per scene cell
    c.rrm.image_size = 84
    c.data.image_size = 84
    c.rrm.hidden, c.rrm.layers, c.rrm.heads, c.rrm.kv_heads, c.rrm.intermediate = 96, 3, 4, 2, 256
    c.rrm.vision_hidden, c.rrm.vision_depth, c.rrm.vision_heads = 48, 2, 2
    c.data.trace_style = "minimal"
    c.data.length_buckets = (384,)   # one shape: one compile (a CPU compile costs far more than padding)
    c.train.async_checkpoint = True
    c.demo = dict(
        eval_pairs=64, eval_gold=32, eval_prompts=16, score_batch_size=16, score_mode="generate",
        accuracy_noise=0.06,   # ~1 binomial std of accuracy over 64 pairs at p=0.75
        rrm_sft=("train.steps=300", "train.lr=2e-3", "train.warmup_steps=20", "train.global_batch_size=16",
                 "data.num_train=3000", "data.num_eval=16", "train.eval_every=100", "train.checkpoint_every=100",
                 "train.log_every=10"),
        rrm_gcpo=("train.steps=16", "train.lr=2e-4", "train.warmup_steps=1", "train.checkpoint_every=8",
                  "train.log_every=1", "data.num_train=256"),
        editor_sft=("train.steps=300", "train.lr=1e-3", "train.warmup_steps=10", "train.global_batch_size=16",
                    "editor.num_train_prompts=512", "train.eval_every=0", "train.checkpoint_every=100",
                    "train.log_every=10"),
        grpo=("train.steps=12", "train.lr=3e-4", "train.warmup_steps=0", "train.eval_every=0",
              "train.checkpoint_every=6", "train.log_every=1", "grpo.group_size=8", "grpo.prompts_per_step=2",
              "grpo.eval_at_start=false"),
        quick=("demo.eval_pairs=16", "demo.eval_gold=8", "demo.eval_prompts=4", "demo.score_batch_size=8",
               "rrm.image_size=56", "data.image_size=56", "rrm.hidden=64", "rrm.layers=2", "rrm.intermediate=128",
               "rrm.vision_hidden=32"),
        quick_rrm_sft=("train.steps=80", "train.lr=3e-3", "data.num_train=640", "train.eval_every=0",
                       "train.checkpoint_every=80"),
        quick_rrm_gcpo=("train.steps=2", "train.checkpoint_every=2", "data.num_train=16"),
        quick_editor_sft=("train.steps=10", "editor.num_train_prompts=64", "train.checkpoint_every=10"),
        quick_grpo=("train.steps=2", "train.checkpoint_every=2", "grpo.group_size=4"),
        notes=("Traces use the 'minimal' style (verdict list, average, score; about 40 tokens) so that a CPU can "
               "decode them during GCPO and GRPO; the full chain-of-thought style is available with "
               "--set data.trace_style=full.",
               "The reward model is trained from scratch (no pretrained perception). Its accuracy target (>= 0.75 "
               "after SFT) has proved out of reach in this budget: the 3-layer, 96-wide LM needs a ~1000-step "
               "plateau (about 5 CPU minutes of short sequences) to learn even to read one fixed image cell, and "
               "the task needs several such skills (read a cell, compare it across the two images, tie a "
               "question's words to a cell). Without them it learns the output format and the verdict prior, so "
               "its scores tie and GCPO/GRPO get little signal. Measurements: NOTES.md, 'Session 3'. A real "
               "Qwen2.5-VL checkpoint (rrm.checkpoint=DIR) is the intended reward model.",),
    )
    return c
