"""FLUX.1-Kontext image editing pipeline (diffusers `FluxKontextPipeline.__call__`, models.md 2.6).

Host side (NumPy / PIL): output-size fitting to `max_area`, the Kontext preferred-resolution choice for the
reference image, LANCZOS resize, 2x2 latent packing and position ids. Device side: one jitted function runs the
whole denoising loop (`lax.fori_loop` over the steps) with the reference tokens concatenated after the noisy
target tokens and dropped from the velocity; RoPE tables are computed once, on the host in float64.

    packed:  [B, C, H, W] -> [B, (H/2)(W/2), 4C], channel order c*4 + dy*2 + dx
    ids:     target (0, r, c), reference (1, r, c) on the packed grids; text ids are zeros
    sigmas:  FlowMatchEulerScheduler.schedule(steps, L_target)   (mu counts target tokens only)
    loop:    v = transformer(cat(x, ref), t = timesteps[i] / 1000, guidance)[:, :L_target];  x += (s_{i+1}-s_i) v

Classifier-free guidance is off by default (FLUX.1-Kontext-dev is guidance-distilled: `guidance_scale` enters the
guidance embedding); `true_cfg_scale > 1` with negative prompt embeddings enables true CFG as diffusers does.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax.models.flux import transformer as tr
from edit_r1_jax.models.flux.config import FluxTransformerConfig
from edit_r1_jax.models.flux.scheduler import FlowMatchEulerScheduler, model_timestep

# (width, height) pairs FLUX.1-Kontext was trained on.
PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672))


# ------------------------------------------------------------------------------------------------------------------
# Sizes, packing, ids (host side)
# ------------------------------------------------------------------------------------------------------------------
def fit_to_max_area(height: int, width: int, max_area: int, multiple_of: int) -> tuple[int, int]:
    """Rescale (height, width) to area max_area at the same aspect ratio, then floor to multiple_of.

    w = round(sqrt(A * w/h)), h = round(sqrt(A * h/w)) (Python round: half to even), as diffusers does."""
    ar = width / height
    w = round((max_area * ar) ** 0.5)
    h = round((max_area / ar) ** 0.5)
    return h // multiple_of * multiple_of, w // multiple_of * multiple_of


def kontext_reference_size(height: int, width: int, multiple_of: int, auto_resize: bool = True) -> tuple[int, int]:
    """Reference-image size: the preferred Kontext resolution closest in aspect ratio (ties -> smaller width) when
    auto_resize, else the image's own size; floored to multiple_of. Returns (height, width)."""
    if auto_resize:
        ar = width / height
        _, width, height = min((abs(ar - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return height // multiple_of * multiple_of, width // multiple_of * multiple_of


def preprocess_image(image, height: int, width: int) -> np.ndarray:
    """PIL image -> [1, 3, height, width] float32 in [-1, 1] (VaeImageProcessor: LANCZOS resize, x/255, 2x-1)."""
    from PIL import Image
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    x = np.asarray(image).astype(np.float32) / 255.0
    return (2.0 * x - 1.0).transpose(2, 0, 1)[None]


def pack_latents(lat_bchw):
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C] (diffusers `_pack_latents`)."""
    b, c, h, w = lat_bchw.shape
    x = lat_bchw.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed_blc, height: int, width: int):
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W] for latent height/width H, W (diffusers `_unpack_latents`)."""
    b, _, c4 = packed_blc.shape
    x = packed_blc.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def latent_image_ids(h_half: int, w_half: int, first: float = 0.0) -> np.ndarray:
    """[h_half * w_half, 3] float32 ids (first, row, col), row-major over the packed grid."""
    ids = np.zeros((h_half, w_half, 3), np.float32)
    ids[..., 0] = first
    ids[..., 1] = np.arange(h_half)[:, None]
    ids[..., 2] = np.arange(w_half)[None]
    return ids.reshape(-1, 3)


# ------------------------------------------------------------------------------------------------------------------
# Denoising loop (device side)
# ------------------------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("tcfg", "true_cfg_scale", "lora_scale", "mesh"))
def denoise(tcfg: FluxTransformerConfig, tparams: dict, latents, image_latents, prompt_embeds, pooled, guidance,
            sigmas, model_t, cos, sin, neg_prompt_embeds=None, neg_pooled=None, *, true_cfg_scale: float = 1.0,
            lora: dict | None = None, lora_scale: float = 1.0, mesh=None):
    """Run all N Euler steps in one `lax.fori_loop`.

    latents [B, L, 4C] packed noise (target tokens); image_latents [B, L_ref, 4C] packed reference or None;
    prompt_embeds [B, T, D_t5]; pooled [B, D_clip]; guidance [B] or None; sigmas [N+1]; model_t [N] (= timesteps /
    1000, what the transformer receives); cos/sin RoPE tables for ids cat(txt_ids, target_ids, ref_ids).
    Returns the final packed latents [B, L, 4C] in latents' dtype.
    """
    n_steps = model_t.shape[0]
    out_len = latents.shape[1]
    b = latents.shape[0]

    def velocity(x, t_b, emb, pool):
        inp = x if image_latents is None else jnp.concatenate([x, image_latents.astype(x.dtype)], axis=1)
        return tr.forward_with_rope(tcfg, tparams, inp, emb, pool, t_b, cos, sin, guidance, lora=lora,
                                    lora_scale=lora_scale, out_len=out_len, mesh=mesh)

    def body(i, x):
        t_b = jnp.broadcast_to(model_t[i].astype(x.dtype), (b,))
        v = velocity(x, t_b, prompt_embeds, pooled)
        if true_cfg_scale > 1.0:
            v_neg = velocity(x, t_b, neg_prompt_embeds, neg_pooled)
            v = v_neg + true_cfg_scale * (v - v_neg)
        return FlowMatchEulerScheduler.step(v, x, sigmas[i], sigmas[i + 1])

    return jax.lax.fori_loop(0, n_steps, body, latents)


def prepare_denoise_inputs(tcfg: FluxTransformerConfig, scheduler: FlowMatchEulerScheduler, num_steps: int,
                           lat_h: int, lat_w: int, ref_lat_hw: tuple[int, int] | None, txt_len: int):
    """Host-side schedule and RoPE for a target latent grid (lat_h, lat_w) and an optional reference latent grid.

    Returns dict(sigmas [N+1], model_t [N], cos, sin [txt + L + L_ref, head_dim/2], img_ids, txt_ids)."""
    ids = [latent_image_ids(lat_h // 2, lat_w // 2, 0.0)]
    if ref_lat_hw is not None:
        ids.append(latent_image_ids(ref_lat_hw[0] // 2, ref_lat_hw[1] // 2, 1.0))
    img_ids = np.concatenate(ids, axis=0)
    txt_ids = np.zeros((txt_len, 3), np.float32)
    sigmas, timesteps = scheduler.schedule(num_steps, (lat_h // 2) * (lat_w // 2))
    cos, sin = tr.rope_from_ids(np.concatenate([txt_ids, img_ids]).astype(np.float64), tcfg.axes_dims_rope,
                                tcfg.theta)
    return dict(sigmas=jnp.asarray(sigmas), model_t=jnp.asarray(model_timestep(timesteps)), cos=cos, sin=sin,
                img_ids=img_ids, txt_ids=txt_ids)


# ------------------------------------------------------------------------------------------------------------------
# Full pipeline
# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class KontextPipeline:
    """Transformer + VAE (+ T5/CLIP text encoders and tokenizers when prompts are given as text)."""
    tcfg: FluxTransformerConfig
    tparams: dict
    vcfg: Any = None
    vparams: Any = None
    scheduler: FlowMatchEulerScheduler = dataclasses.field(default_factory=FlowMatchEulerScheduler)
    t5cfg: Any = None
    t5params: Any = None
    clipcfg: Any = None
    clipparams: Any = None
    clip_tokenizer: Any = None
    t5_tokenizer: Any = None
    mesh: Any = None

    @classmethod
    def from_pretrained(cls, path: str, dtype=jnp.float32, mesh=None, text_encoders: bool = True,
                        transformer: str | None = None, **transformer_overrides) -> "KontextPipeline":
        """Load a diffusers FluxKontextPipeline directory (transformer/, vae/, text_encoder/, text_encoder_2/,
        tokenizer/, tokenizer_2/, scheduler/), each component straight onto `mesh` when given.

        ``transformer``: another transformer to use, a diffusers folder or a BFL single file
        (``flux1-kontext-dev.safetensors``; its rotary ``axes_dims_rope`` is taken from ``path/transformer``'s
        config.json when that exists)."""
        import os
        from edit_r1_jax.models.flux import convert, vae
        tpath = transformer or os.path.join(path, "transformer")
        own_cfg = os.path.join(path, "transformer", "config.json")
        if os.path.isfile(tpath) and os.path.isfile(own_cfg) and "axes_dims_rope" not in transformer_overrides:
            transformer_overrides["axes_dims_rope"] = tuple(convert.read_config(os.path.dirname(own_cfg))
                                                            .get("axes_dims_rope", (16, 56, 56)))
        tcfg, tparams = convert.load_transformer(tpath, dtype=dtype, mesh=mesh, **transformer_overrides)
        vcfg, vparams = vae.load_vae(path, dtype=dtype, mesh=mesh)
        kw = {}
        if text_encoders:
            from edit_r1_jax.models.flux import clip, t5, tokenization
            kw["t5cfg"], kw["t5params"] = t5.load_t5(path, dtype=dtype, mesh=mesh)
            kw["clipcfg"], kw["clipparams"] = clip.load_clip(path, dtype=dtype, mesh=mesh)
            kw["clip_tokenizer"], kw["t5_tokenizer"] = tokenization.load_tokenizers(path)
        return cls(tcfg, tparams, vcfg, vparams, FlowMatchEulerScheduler.from_pretrained(path), mesh=mesh, **kw)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vcfg.block_out_channels) - 1) if self.vcfg is not None else 8

    @property
    def latent_channels(self) -> int:
        return self.tcfg.in_channels // 4

    def encode_prompt(self, prompts: str | Sequence[str], max_sequence_length: int = 512):
        """-> (prompt_embeds [B, max_sequence_length, D_t5], pooled [B, D_clip]); T5 and CLIP run unmasked."""
        if self.t5params is None or self.clip_tokenizer is None:
            raise ValueError("KontextPipeline: text encoders are not loaded; pass prompt_embeds and "
                             "pooled_prompt_embeds, or load with text_encoders=True")
        from edit_r1_jax.models.flux import clip, t5, tokenization
        clip_ids, t5_ids = tokenization.tokenize_prompts(self.clip_tokenizer, self.t5_tokenizer, prompts,
                                                         max_sequence_length)
        prompt_embeds = t5.t5_encode(self.t5cfg, self.t5params, jnp.asarray(t5_ids))
        _, pooled = clip.clip_encode(self.clipcfg, self.clipparams, jnp.asarray(clip_ids))
        return prompt_embeds.astype(self.tcfg.dtype), pooled.astype(self.tcfg.dtype)

    def encode_reference(self, images, auto_resize: bool = True) -> tuple[jax.Array, tuple[int, int]]:
        """PIL image(s) -> (normalised latents [B, C, h, w] = (mean - shift) * scale, (pixel height, width))."""
        from edit_r1_jax.models.flux import vae
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        mult = self.vae_scale_factor * 2
        w0, h0 = images[0].size
        h0, w0 = h0 - h0 % mult, w0 - w0 % mult              # VaeImageProcessor.get_default_height_width
        h, w = kontext_reference_size(h0, w0, mult, auto_resize)
        pixels = np.concatenate([preprocess_image(im, h, w) for im in images], axis=0)
        mean = vae.vae_encode(self.vcfg, self.vparams, jnp.asarray(pixels, self.tcfg.dtype))
        return vae.normalize_latents(self.vcfg, mean), (h, w)

    def decode(self, latents_packed, lat_h: int, lat_w: int) -> jax.Array:
        """Packed latents -> images [B, 3, H, W] in [0, 1]."""
        from edit_r1_jax.models.flux import vae
        lat = unpack_latents(latents_packed, lat_h, lat_w)
        return vae.postprocess_images(vae.vae_decode(self.vcfg, self.vparams, vae.denormalize_latents(self.vcfg, lat)))

    def __call__(self, image=None, prompt: str | Sequence[str] | None = None, *, height: int | None = None,
                 width: int | None = None, max_area: int = 1024 ** 2, num_inference_steps: int = 28,
                 guidance_scale: float = 3.5, seed: int = 0, latents=None, image_latents=None,
                 prompt_embeds=None, pooled_prompt_embeds=None, negative_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, true_cfg_scale: float = 1.0, auto_resize: bool = True,
                 max_sequence_length: int = 512, output_type: str = "np", lora=None, lora_scale: float = 1.0):
        """Edit `image` following `prompt`, as FluxKontextPipeline.__call__.

        height/width default to 1024 and are re-fitted to max_area (env-notes G12: pass max_area=h*w for small
        runs). latents: packed initial noise [B, L, 4C] (default: N(0, 1) from `seed`). image_latents: already
        normalised reference latents [B, C, h, w] (skips the VAE encoder). output_type: "np" ([B, H, W, 3] in
        [0, 1]), "pil" (list of PIL images) or "latent" (packed final latents).
        """
        mult = self.vae_scale_factor * 2
        height, width = fit_to_max_area(height or 1024, width or 1024, max_area, mult)
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("KontextPipeline: pass `prompt` or `prompt_embeds` + `pooled_prompt_embeds`")
            prompt_embeds, pooled_prompt_embeds = self.encode_prompt(prompt, max_sequence_length)
        elif pooled_prompt_embeds is None:
            raise ValueError("KontextPipeline: `prompt_embeds` needs `pooled_prompt_embeds`")
        prompt_embeds = jnp.asarray(prompt_embeds, self.tcfg.dtype)
        pooled_prompt_embeds = jnp.asarray(pooled_prompt_embeds, self.tcfg.dtype)
        bsz = prompt_embeds.shape[0]
        if image_latents is None and image is not None:
            image_latents, _ = self.encode_reference(image, auto_resize)
        ref_packed = ref_hw = None
        if image_latents is not None:
            image_latents = jnp.asarray(image_latents, self.tcfg.dtype)
            if image_latents.shape[0] != bsz:
                if bsz % image_latents.shape[0]:
                    raise ValueError(f"KontextPipeline: cannot repeat {image_latents.shape[0]} reference images to "
                                     f"a batch of {bsz} prompts")
                image_latents = jnp.repeat(image_latents, bsz // image_latents.shape[0], axis=0)
            ref_hw = tuple(image_latents.shape[2:])
            ref_packed = pack_latents(image_latents)
        lat_h, lat_w = 2 * (height // mult), 2 * (width // mult)
        if latents is None:
            noise = jax.random.normal(jax.random.PRNGKey(seed), (bsz, self.latent_channels, lat_h, lat_w), jnp.float32)
            latents = pack_latents(noise).astype(self.tcfg.dtype)
        latents = jnp.asarray(latents, self.tcfg.dtype)
        want = (bsz, (lat_h // 2) * (lat_w // 2), 4 * self.latent_channels)
        if tuple(latents.shape) != want:
            raise ValueError(f"KontextPipeline: latents shape {tuple(latents.shape)} != {want} for {height}x{width}")
        prep = prepare_denoise_inputs(self.tcfg, self.scheduler, num_inference_steps, lat_h, lat_w, ref_hw,
                                      prompt_embeds.shape[1])
        guidance = jnp.full((bsz,), guidance_scale, jnp.float32) if self.tcfg.guidance_embeds else None
        do_cfg = true_cfg_scale > 1.0 and negative_prompt_embeds is not None
        out = denoise(self.tcfg, self.tparams, latents, ref_packed, prompt_embeds, pooled_prompt_embeds, guidance,
                      prep["sigmas"], prep["model_t"], prep["cos"], prep["sin"],
                      jnp.asarray(negative_prompt_embeds, self.tcfg.dtype) if do_cfg else None,
                      jnp.asarray(negative_pooled_prompt_embeds, self.tcfg.dtype) if do_cfg else None,
                      true_cfg_scale=float(true_cfg_scale) if do_cfg else 1.0, lora=lora,
                      lora_scale=float(lora_scale), mesh=self.mesh)
        if output_type == "latent":
            return out
        images = np.asarray(self.decode(out, lat_h, lat_w), np.float32).transpose(0, 2, 3, 1)
        if output_type == "np":
            return images
        if output_type == "pil":
            from PIL import Image
            return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
        raise ValueError(f"output_type must be 'np', 'pil' or 'latent', got {output_type!r}")

