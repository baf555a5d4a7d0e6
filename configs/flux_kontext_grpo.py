"""flux_kontext_grpo: Edit-R1's editing RL = Flow-GRPO on FLUX.1-Kontext-dev with the reasoning reward model.

    edit-r1-jax grpo --config configs/flux_kontext_grpo.py --workdir gs://.../runs/grpo \
        --set editor.checkpoint=/path/FLUX.1-Kontext-dev --set grpo.reward_rrm=/path/rrm_hf \
        --set editor.train_jsonl=/path/edit_prompts.jsonl --set editor.eval_jsonl=/path/heldout.jsonl

Hyper-parameters (algorithms.md §d): LoRA r=64 / alpha=128 on the attention and feed-forward projections, 512 px,
G=24 edits per prompt, 6 sampling steps in training and 28 in evaluation, SDE noise level 0.9 (``sde`` type),
guidance embedding 2.5, PPO clip 1e-4, KL beta 0.04 (code-form KL against the LoRA-disabled base), advantage clip 5
with the per-group std (decision e10), timestep fraction 0.99, AdamW lr 3e-4 (0.9, 0.999) wd 1e-4, grad clip 1.0,
EMA 0.9 every 8 steps, greedy RRM decoding with the shared-prefix cache (e14).

Runs on: TPU pod slices (e.g. v5p-64 / v6e-64). The 12B transformer is FSDP-sharded over every chip (bf16 compute,
fp32 log-probs); the reference shares the policy's base weights (LoRA). The RRM (Qwen2.5-VL-7B) is colocated by
default; to give it its own chips, e.g. on 64 chips: --set roles.policy.devices=0:48 --set
roles.reward.devices=48:64 (the policy mesh then has 48 chips: prompts_per_step * 24 must divide its data*fsdp).
Expected time: not measured yet (see BENCHMARKS.md for the CPU split of one step).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.sharding = dict(rules=None)
    c.roles = dict(policy=dict(devices="all", offload=False), reference=dict(devices="policy", offload=False),
                   reward=dict(devices="all", offload=False))
    # optimizer / loop (train.steps = GRPO steps; warmup and schedule in optimizer steps x ppo_epochs)
    c.train = dict(steps=1000, lr=3e-4, schedule="constant", b1=0.9, b2=0.999, eps=1e-8,
                   weight_decay=1e-4, grad_clip=1.0, grad_accum_steps=8, log_every=1, checkpoint_every=20,
                   keep_checkpoints=3, eval_every=20, max_consecutive_nonfinite=5, async_checkpoint=True)
    # the editor: a diffusers FluxKontextPipeline directory (transformer/, vae/, text_encoder(_2)/, tokenizer(_2)/)
    c.editor = dict(checkpoint="", image_size=512, t5_len=512, clip_len=77, guidance=2.5, dtype="bfloat16",
                    remat="dots", num_train_prompts=1024, num_eval_prompts=64, train_jsonl="", eval_jsonl="",
                    sample_steps=28, export=True)
    c.grpo = dict(group_size=24, prompts_per_step=8, num_steps=6, eval_steps=28, noise_level=0.9, sde_type="sde",
                  timestep_fraction=0.99, timestep_selection="first", noise_on="all", sde_window=0,
                  sde_window_range=(0, 0), same_noise=False, adv_std="group", adv_clip=5.0, clip_range=1e-4,
                  beta=0.04, filter_zero_adv=True, ppo_epochs=1, ema_decay=0.9, ema_every=8, reward="rrm",
                  reward_rrm="", reward_mode="generate", reward_samples=1, reward_resize=0, eval_at_start=True,
                  eval_grid_rows=8, logp_tol=1e-3, logp_check="warn", lora_rank=64, lora_alpha=128.0,
                  lora_targets="")
    return c
