"""FLUX.1-Kontext in Flax: transformer, VAE, T5/CLIP text encoders, scheduler and pipeline.

Public API (stable; called with diffusers-style inputs):

    tcfg, tparams = flux.load_transformer(path, dtype=jnp.float32, mesh=None)
    v = flux.transformer_forward(tcfg, tparams, hidden_states, encoder_hidden_states, pooled_projections,
                                 timestep, img_ids, txt_ids, guidance=None)
    flux.save_transformer(tcfg, tparams, out_dir)
    tcfg, tparams = flux.load_transformer("flux1-kontext-dev.safetensors")   # BFL single file (config inferred)
    flux.save_transformer_bfl(tcfg, tparams, "out.safetensors")
    tcfg, tparams = flux.unstack_layers(tcfg, tparams)   # per-layer inference layout (scan_layers=False); back
                                                         # with flux.stack_layers; or load with scan_layers=False
    vcfg, vparams = flux.load_vae(path); flux.vae_encode(...); flux.vae_decode(...); flux.save_vae(...)

The VAE functions live in `flux/vae.py` and are imported lazily.
"""
from edit_r1_jax.models.flux.config import FluxTransformerConfig, kontext_dev_config
from edit_r1_jax.models.flux.convert import load_transformer, save_transformer, save_transformer_bfl
from edit_r1_jax.models.flux.transformer import (init_params, param_logical_axes, param_shardings, stack_layers,
                                                 transformer_forward, unstack_layers)

__all__ = ["FluxTransformerConfig", "kontext_dev_config", "load_transformer", "save_transformer",
           "save_transformer_bfl",
           "transformer_forward", "init_params", "unstack_layers", "stack_layers", "param_logical_axes",
           "param_shardings",
           "load_vae", "vae_encode", "vae_decode", "save_vae"]


def load_vae(path, *args, **kwargs):
    """diffusers AutoencoderKL folder -> (vcfg, vparams). See flux/vae.py."""
    from edit_r1_jax.models.flux import vae
    return vae.load_vae(path, *args, **kwargs)


def vae_encode(vcfg, vparams, images_nchw, *args, **kwargs):
    """Images [B, 3, H, W] in [-1, 1] -> posterior mean latents [B, C, H/8, W/8], unscaled. See flux/vae.py."""
    from edit_r1_jax.models.flux import vae
    return vae.vae_encode(vcfg, vparams, images_nchw, *args, **kwargs)


def vae_decode(vcfg, vparams, latents, *args, **kwargs):
    """Latents [B, C, h, w] (unscaled) -> images [B, 3, 8h, 8w]. See flux/vae.py."""
    from edit_r1_jax.models.flux import vae
    return vae.vae_decode(vcfg, vparams, latents, *args, **kwargs)


def save_vae(vcfg, vparams, out_dir, *args, **kwargs):
    """Write a diffusers AutoencoderKL folder. See flux/vae.py."""
    from edit_r1_jax.models.flux import vae
    return vae.save_vae(vcfg, vparams, out_dir, *args, **kwargs)
