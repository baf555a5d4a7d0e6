"""FLUX.1-Kontext-dev preset: transformer config.json values (models.md 2.1; 11,901,408,320 parameters), the
scheduler config, the VAE latent scaling, and the sampling defaults of `edit-r1-jax edit`.

``get_config()`` gives the ml_collections config; ``transformer_config()`` the ``FluxTransformerConfig`` used by
``edit_r1_jax.models.flux``. Real weights: a diffusers pipeline directory (``flux.load_transformer(<dir>/transformer)``
or ``KontextPipeline.from_pretrained(<dir>)``); bf16 weights need ~24 GB, so shard over fsdp on TPU/GPU.
Runs on: TPU/GPU meshes (fsdp over hosts, tensor within a host). Time: ~28 transformer calls per edit.
"""
import copy

import ml_collections

TRANSFORMER_CONFIG = {
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "out_channels": None,
    "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
    "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
VAE_LATENTS = {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "vae_scale_factor": 8}
NUM_PARAMS = 11_901_408_320


def transformer_config(**runtime):
    """FluxTransformerConfig; runtime: dtype=, param_dtype=, remat="none"|"full"|"dots", attention_backend=."""
    from edit_r1_jax.models.flux.config import FluxTransformerConfig
    return FluxTransformerConfig.from_diffusers(copy.deepcopy(TRANSFORMER_CONFIG), **runtime)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(name="flux_kontext", transformer=copy.deepcopy(TRANSFORMER_CONFIG),
                   scheduler=copy.deepcopy(SCHEDULER_CONFIG), vae=copy.deepcopy(VAE_LATENTS),
                   dtype="bfloat16", remat="dots", attention_backend="xla")
    # FluxKontextPipeline defaults; Edit-R1 trains at 512 px with guidance 2.5 (config/kontext_nft.py).
    c.sample = dict(num_steps=28, guidance_scale=2.5, true_cfg_scale=1.0, max_area=1024 * 1024,
                    max_sequence_length=512, auto_resize=True)
    c.lora = dict(rank=64, alpha=128.0, targets="flux_attn_ff")
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.sharding = dict(rules=None)
    return c
