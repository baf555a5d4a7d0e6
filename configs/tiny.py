"""tiny: every command on a laptop CPU in seconds, random tiny models and synthetic data.

Runs on: CPU (any number of devices; the mesh fills the data axis). Time: seconds to a minute per command.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sharding = dict(rules=None)  # None = edit_r1_jax.parallel.DEFAULT_RULES
    c.train = dict(steps=4, lr=1e-3, warmup_steps=1, global_batch_size=8, grad_clip=1.0, weight_decay=0.0,
                   grad_accum_steps=1, log_every=1, checkpoint_every=2, keep_checkpoints=2, eval_every=2,
                   eval_examples=8, freeze_vision=False, export_hf=True, async_checkpoint=True)
    c.data = dict(num_train=32, num_eval=8, image_size=56, trace_style="minimal", sft_jsonl="", sft_eval_jsonl="",
                  pairs_jsonl="", skip_bad=False, pad_to_multiple=32, length_buckets=(256, 320, 384, 512))
    # reward model: random tiny Qwen2.5-VL with the synthetic world's tokenizer (checkpoint="" means random)
    c.rrm = dict(checkpoint="", tokenizer="", image_size=56, compact_prompt=True, hidden=64, layers=2, heads=4,
                 kv_heads=2, intermediate=128, vision_hidden=32, vision_depth=2, vision_heads=2,
                 remat_policy="none")
    # GCPO of the reward model (algorithms.md b2): N traces per image, mu PPO epochs; init_from = an SFT run's hf/
    c.gcpo = dict(num_samples=2, temperature=1.0, max_new_tokens=64, ppo_epochs=1, eps_low=0.2, eps_high=0.2,
                  kl_beta=0.0, std_normalize=False, divide_by_non_tied=False, skip_zero_adv=True, pairs_per_step=4,
                  init_from="", prompt_pad_to=320, score_fallback=False, logp_tol=1e-4, logp_check="warn")
    # image editor (FLUX.1-Kontext architecture, random tiny): pixel-codec latents (64 px images, 4x4 blocks -> 16x16x3,
    # packed 64 tokens of 12 channels + 64 reference tokens), random frozen T5/CLIP on the world tokenizer's ids
    c.editor = dict(checkpoint="", image_size=64, codec_factor=4, tokenizer="", hidden=32, heads=2, double_blocks=1,
                    single_blocks=1, text_hidden=32, text_layers=1, text_heads=2, t5_len=32, clip_len=16,
                    guidance=2.5, seed=0, dtype="float32", remat="none", num_train_prompts=32, num_eval_prompts=8,
                    train_jsonl="", eval_jsonl="", sample_steps=4, sft_timestep_sampling="uniform", export=True)
    # editing GRPO (Flow-GRPO, algorithms.md b3): G edits per prompt, SDE sampler, reward = synthetic pixel verifier
    c.grpo = dict(group_size=4, prompts_per_step=2, num_steps=4, eval_steps=4, noise_level=0.9, sde_type="sde",
                  timestep_fraction=0.99, timestep_selection="first", noise_on="trained", sde_window=0,
                  sde_window_range=(0, 0), same_noise=False, adv_std="group", adv_clip=5.0, clip_range=1e-4,
                  beta=0.04, filter_zero_adv=True, ppo_epochs=1, ema_decay=0.0, ema_every=8, reward="gold",
                  reward_rrm="", reward_mode="generate", reward_samples=1, reward_resize=0, eval_at_start=True,
                  eval_grid_rows=8, logp_tol=1e-5, logp_check="warn", lora_rank=8, lora_alpha=16.0, lora_targets="")
    # where each role lives (train/roles.py): "all" devices, "policy" (share the policy's mesh) or a slice "a:b"
    c.roles = dict(policy=dict(devices="all", offload=False), reference=dict(devices="policy", offload=False),
                   reward=dict(devices="all", offload=False))
    return c
