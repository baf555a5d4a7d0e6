"""FLUX transformer on CPU, fp32: our jitted forward vs diffusers' eager FluxTransformer2DModel (same small random
config and Kontext-style inputs), and the time per denoising step of our jitted `lax.fori_loop` sampler vs the
diffusers loop (transformer + FlowMatchEulerDiscreteScheduler.step).

Goal: ratio = diffusers time / ours >= 1 (ours not slower). ``ratio`` is our inference layout (per-layer params,
``scan_layers=False``: no per-iteration weight slices); ``scanned_ratio`` is the training layout (``nn.scan`` over
stacked params). ``gemm_ratio``: the same run's PyTorch / XLA:CPU time for exactly this model's token-wise matmuls
as bare GEMMs (`gemm_fns`), i.e. the kernel library's share of the forward ratio. The forwards and GEMM chains are
timed in alternation (``timing.time_interleaved``). Inputs: batch 1, 64 text tokens, a 16x16 packed
target grid (256 tokens) plus a 16x16 Kontext reference grid (256 tokens).

Full sampling (``full_*``): the STEPS Euler steps followed by the VAE decode of the result to pixels (a small random
FLUX-shaped AutoencoderKL: 16 latent channels, 4 blocks, 32x32 latents -> 256x256 px), ours jitted vs diffusers'
loop + ``AutoencoderKL.decode``; ``full_ms_per_step`` is that time divided by STEPS.
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import timing  # noqa: E402

SMALL = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=2, num_single_layers=4,
             attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512, pooled_projection_dim=256,
             guidance_embeds=True, axes_dims_rope=(8, 28, 28))
TXT, GRID, STEPS = 64, 16, 4


def grid_ids(h, w, first):
    t = np.zeros((h, w, 3), np.float32)
    t[..., 0] = first
    t[..., 1] = np.arange(h)[:, None]
    t[..., 2] = np.arange(w)[None]
    return t.reshape(-1, 3)


def small_vae():
    """A small random FLUX-shaped AutoencoderKL (16 latent channels, scale 8) and our converted copy."""
    import torch
    from diffusers import AutoencoderKL

    from edit_r1_jax.models import flux
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 64, 64],
                        layers_per_block=1, latent_channels=16, norm_num_groups=16, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False).eval()
    with tempfile.TemporaryDirectory() as d:
        vae.save_pretrained(d)
        vcfg, vparams = flux.load_vae(d)
    return vae, vcfg, vparams


def gemm_fns(params, tokens, reps: int = 3) -> tuple:
    """(jax_fn, torch_fn, gflop): every token-wise Dense of the transformer once, as a plain [tokens, in] x [in, out]
    matmul on that layer's own weights (one jitted chain; the same chain in torch), ``reps`` times per call. Their
    time ratio is the GEMM-kernel rate of XLA:CPU vs PyTorch on exactly this model's matmuls, measured in the same
    run: the part of the forward ratio that is the kernel library's, not our graph's."""
    import jax
    import jax.numpy as jnp
    import torch
    shapes = []
    for block in ("transformer_blocks", "single_transformer_blocks"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(params[block])[0]:
            names = [getattr(k, "key", "") for k in path]
            if names[-1] == "kernel" and not any(n.startswith("norm") for n in names):   # AdaNorm runs on 1 token
                for i in range(leaf.shape[0]):                                         # stacked layers
                    shapes.append((tokens(block, names), np.asarray(leaf[i])))
    xs = [jnp.ones((t, w.shape[0]), jnp.float32) for t, w in shapes]
    ws = [jnp.asarray(w) for _, w in shapes]

    @jax.jit
    def chain(xs, ws):
        return sum(jnp.sum(x @ w) for x, w in zip(xs, ws))

    def run_jax():
        for _ in range(reps):
            out = jax.block_until_ready(chain(xs, ws))
        return out
    txs, tws = [torch.ones(t, w.shape[0]) for t, w in shapes], [torch.from_numpy(w.copy()) for _, w in shapes]

    def run_torch():
        with torch.no_grad():
            for _ in range(reps):
                out = sum((x @ w).sum() for x, w in zip(txs, tws))
        return out
    gflop = sum(2 * t * w.shape[0] * w.shape[1] for t, w in shapes) / 1e9
    return run_jax, run_torch, gflop


def build() -> dict:
    """The small random diffusers model, our converted params and the Kontext-style inputs; ``torch``/``ours`` run
    one forward each (used here and by ``bench/op_profile.py``)."""
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import FluxTransformer2DModel

    from edit_r1_jax.models import flux

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**SMALL).eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        cfg, params = flux.load_transformer(d)
    rng = np.random.default_rng(0)
    n_img = GRID * GRID
    img_ids = np.concatenate([grid_ids(GRID, GRID, 0), grid_ids(GRID, GRID, 1)])
    txt_ids = np.zeros((TXT, 3), np.float32)
    hs = rng.standard_normal((1, 2 * n_img, 64)).astype(np.float32)
    enc = rng.standard_normal((1, TXT, 512)).astype(np.float32)
    pooled = rng.standard_normal((1, 256)).astype(np.float32)
    t, g = np.array([0.7], np.float32), np.array([2.5], np.float32)
    T = torch.from_numpy

    def run_torch():
        with torch.no_grad():
            return model(hidden_states=T(hs), encoder_hidden_states=T(enc), pooled_projections=T(pooled),
                         timestep=T(t), guidance=T(g), img_ids=T(img_ids), txt_ids=T(txt_ids), return_dict=False)[0]
    fwd = jax.jit(lambda p, *a: flux.transformer_forward(cfg, p, *a))
    lcfg, lparams = flux.unstack_layers(cfg, params)       # per-layer inference layout
    fwd_layers = jax.jit(lambda p, *a: flux.transformer_forward(lcfg, p, *a))
    args = (jnp.asarray(hs), jnp.asarray(enc), jnp.asarray(pooled), jnp.asarray(t), jnp.asarray(img_ids),
            jnp.asarray(txt_ids), jnp.asarray(g))
    return dict(model=model, cfg=cfg, params=params, fwd=fwd, args=args, torch=run_torch,
                ours=lambda: fwd_layers(lparams, *args), ours_scanned=lambda: fwd(params, *args),
                lcfg=lcfg, lparams=lparams, fwd_layers=fwd_layers, hs=hs, enc=enc, pooled=pooled, g=g, img_ids=img_ids,
                txt_ids=txt_ids, n_img=n_img)


def main():
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from edit_r1_jax.models.flux import pipeline as pl
    from edit_r1_jax.models.flux.scheduler import FlowMatchEulerScheduler

    b = build()
    model, cfg, params, fwd, args, run_torch = b["model"], b["cfg"], b["params"], b["fwd"], b["args"], b["torch"]
    hs, enc, pooled, g, img_ids, txt_ids, n_img = (b[k] for k in ("hs", "enc", "pooled", "g", "img_ids", "txt_ids",
                                                                   "n_img"))
    T = torch.from_numpy
    lcfg, lparams, fwd_layers = b["lcfg"], b["lparams"], b["fwd_layers"]
    _, compile_s = timing.time_compile(fwd, params, *args)
    _, compile_layers_s = timing.time_compile(fwd_layers, lparams, *args)
    def tokens(block, names):   # double blocks: image stream (target + reference) or text stream; single: both
        if block == "single_transformer_blocks":
            return TXT + 2 * b["n_img"]
        text = any(n.startswith(("add_", "ff_context", "to_add_out")) for n in names)
        return TXT if text else 2 * b["n_img"]
    gemm_jax, gemm_torch, gflop = gemm_fns(params, tokens)
    tt = timing.time_interleaved({"torch": (run_torch, lambda x: x), "ours": (b["ours"], timing.block),
                                  "scanned": (b["ours_scanned"], timing.block),
                                  "gemm_jax": (gemm_jax, lambda x: x), "gemm_torch": (gemm_torch, lambda x: x)},
                                 rounds=7)
    t_torch, t_ours, t_scan = tt["torch"], tt["ours"], tt["scanned"]
    gemm_ratio = tt["gemm_torch"]["median_s"] / tt["gemm_jax"]["median_s"]
    err = float(np.abs(np.asarray(b["ours"]()) - run_torch().numpy()).max())

    # --- sampling: STEPS Euler steps with the reference tokens, per step
    sched = FlowMatchEulerScheduler()
    prep = pl.prepare_denoise_inputs(cfg, sched, STEPS, 2 * GRID, 2 * GRID, (2 * GRID, 2 * GRID), TXT)
    lat, ref = jnp.asarray(hs[:, :n_img]), jnp.asarray(hs[:, n_img:])
    sample = lambda: pl.denoise(lcfg, lparams, lat, ref, jnp.asarray(enc), jnp.asarray(pooled), jnp.asarray(g),  # noqa
                                prep["sigmas"], prep["model_t"], prep["cos"], prep["sin"])
    s_ours = timing.time_fn(sample, warmup=1, repeat=3)

    def sample_torch():
        ts = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        ts.set_timesteps(sigmas=np.linspace(1, 1 / STEPS, STEPS), mu=sched.mu(n_img))
        x = T(hs[:, :n_img].copy())
        with torch.no_grad():
            for step_t in ts.timesteps:
                v = model(hidden_states=torch.cat([x, T(hs[:, n_img:])], 1), encoder_hidden_states=T(enc),
                          pooled_projections=T(pooled), timestep=(step_t / 1000).expand(1), guidance=T(g),
                          img_ids=T(img_ids), txt_ids=T(txt_ids), return_dict=False)[0][:, :n_img]
                x = ts.step(v, step_t, x, return_dict=False)[0]
        return x
    s_torch = timing.time_fn(sample_torch, sync=lambda x: x, warmup=1, repeat=3)
    samp_err = float(np.abs(np.asarray(sample()) - sample_torch().numpy()).max())

    # --- full sampling: the STEPS Euler steps, then the VAE decode of the result to pixels
    from diffusers import FluxKontextPipeline

    from edit_r1_jax.models.flux import vae as fvae
    vae, vcfg, vparams = small_vae()
    lat_hw = 2 * GRID

    @jax.jit
    def decode_ours(packed):
        lat = pl.unpack_latents(packed, lat_hw, lat_hw)
        return fvae.postprocess_images(fvae.vae_decode(vcfg, vparams, fvae.denormalize_latents(vcfg, lat)))

    full_ours = lambda: decode_ours(sample())  # noqa: E731

    def full_torch():
        x = FluxKontextPipeline._unpack_latents(sample_torch(), lat_hw * 8, lat_hw * 8, 8)
        with torch.no_grad():
            img = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        return (img / 2 + 0.5).clamp(0, 1)
    f_ours = timing.time_fn(full_ours, warmup=1, repeat=3)
    f_torch = timing.time_fn(full_torch, sync=lambda x: x, warmup=1, repeat=3)
    full_err = float(np.abs(np.asarray(full_ours()) - full_torch().numpy()).max())
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    timing.report("flux_forward", "ours not slower than diffusers eager (ratio >= 1)",
                  t_torch["median_s"] / t_ours["median_s"],
                  torch_forward_ms=1e3 * t_torch["median_s"], ours_forward_ms=1e3 * t_ours["median_s"],
                  scanned_forward_ms=1e3 * t_scan["median_s"], scanned_ratio=t_torch["median_s"] / t_scan["median_s"],
                  gemm_ratio=gemm_ratio, gemm_gflop=gflop,
                  gemm_jax_gflops=3 * gflop / tt["gemm_jax"]["median_s"],
                  gemm_torch_gflops=3 * gflop / tt["gemm_torch"]["median_s"],
                  ours_compile_s=compile_layers_s, scanned_compile_s=compile_s, forward_max_abs_err=err,
                  torch_ms_per_step=1e3 * s_torch["median_s"] / STEPS,
                  ours_ms_per_step=1e3 * s_ours["median_s"] / STEPS,
                  sampling_ratio=s_torch["median_s"] / s_ours["median_s"], sampling_max_abs_err=samp_err,
                  full_torch_ms_per_step=1e3 * f_torch["median_s"] / STEPS,
                  full_ours_ms_per_step=1e3 * f_ours["median_s"] / STEPS,
                  full_ratio=f_torch["median_s"] / f_ours["median_s"], full_max_abs_err=full_err,
                  image_px=lat_hw * 8,
                  params_m=n_params / 1e6, tokens=TXT + 2 * n_img, steps=STEPS)


if __name__ == "__main__":
    main()
