"""``edit-r1-jax parity flux --dir DIR``: diffusers/transformers vs our FLUX.1-Kontext port, piece by piece.

DIR is a diffusers FluxKontextPipeline directory (or just its ``transformer/`` folder). Reported per row: max
|ours - ref| and relative error max|ours - ref| / max|ref|:
  * transformer: the embeddings (x, context, temb), every double and single block (text and image streams), the
    velocity, on random inputs with Kontext reference tokens (txt 8 tokens, target 4x4, reference 2x3 grid);
  * VAE: posterior mean of a random image and the decoder output; T5 last hidden state; CLIP last hidden state
    and pooled output (prompt "make the sky red");
  * pipeline: a short run (``--steps``, ``--size``) of FluxKontextPipeline and ours from the same packed noise,
    final latents and decoded image.
Both sides run in ``--dtype``. Passes when every relative error <= ``--tol`` (default 1e-4 fp32, 0.15 bf16: on the
tiny random model, bf16 rounding compounds so that diffusers' own bf16 velocity is ~10% (max-norm) away from its
fp32 velocity while ours is ~3%, and the two bf16 results differ by ~13%; per-block errors stay at ~1 bf16 ulp).

The module also builds the tiny random reference components used by the tests (``torch_transformer``,
``torch_kontext_pipeline``): everything offline from configs (models.md 2.8, env-notes "Tiny FLUX.1-Kontext
pipeline, offline").
"""
from __future__ import annotations

import os
import time

TINY_TRANSFORMER = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=2,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                        guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def torch_transformer(seed: int = 0, perturb: float = 0.1, **overrides):
    """diffusers FluxTransformer2DModel with the tiny config; biases and norm weights are perturbed by
    `perturb * N(0, 1)` so that every parameter influences the output."""
    import torch
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    m = FluxTransformer2DModel(**{**TINY_TRANSFORMER, **overrides}).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(perturb * torch.randn_like(p))
    return m


def _byte_vocab() -> dict[str, int]:
    """A byte-level BPE vocabulary with no merges (CLIP tokenizer needs the `</w>` variants)."""
    # GPT-2 byte -> printable unicode table
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    return vocab


def torch_kontext_pipeline(seed: int = 0, latent_channels: int = 4):
    """A complete tiny diffusers FluxKontextPipeline. The VAE has two blocks (vae_scale_factor 2), so sizes are
    multiples of 4 pixels and an HxW image has (H/4)(W/4) packed tokens.

    transformer in_channels = 4 * latent_channels (2x2 packing)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast
    torch.manual_seed(seed)
    tr = torch_transformer(seed, in_channels=4 * latent_channels, joint_attention_dim=32, pooled_projection_dim=32)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=4, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()
    clip = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=1000, hidden_act="gelu", projection_dim=32,
                                        max_position_embeddings=77)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")).eval()
    clip_tok = CLIPTokenizer(vocab=_byte_vocab(), merges=[], model_max_length=77, bos_token="<|startoftext|>",
                             eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    t5_tok = _t5_tokenizer(T5TokenizerFast)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxKontextPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                               tokenizer_2=t5_tok, transformer=tr)


def _t5_tokenizer(cls):
    """A unigram T5 tokenizer over lowercase letters (offline, no sentencepiece model file)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    return cls(vocab=vocab, extra_ids=0)


# ------------------------------------------------------------------------------------------------------------------
# Parity tool
# ------------------------------------------------------------------------------------------------------------------
def add_arguments(p):
    p.add_argument("--steps", type=int, default=2, help="pipeline steps for the end-to-end check (default 2)")
    p.add_argument("--size", default="64x64", help="pipeline output HxW in pixels (default 64x64)")
    p.add_argument("--skip-pipeline", action="store_true", help="only the per-component checks")
    p.add_argument("--tol", type=float, default=None, help="pass if every relative error <= tol (default 1e-4 "
                   "fp32, 0.15 bf16)")


def _err(ours, ref) -> tuple[float, float]:
    import numpy as np
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    mx = float(np.abs(a - b).max())
    return mx, mx / max(float(np.abs(b).max()), 1e-30)


def _grid_ids(h, w, first):
    import numpy as np
    t = np.zeros((h, w, 3), np.float32)
    t[..., 0] = first
    t[..., 1] = np.arange(h)[:, None]
    t[..., 2] = np.arange(w)[None]
    return t.reshape(-1, 3)


def transformer_rows(torch_model, cfg, params, seed: int = 0, dtype="float32") -> list[tuple[str, float, float]]:
    """Per-stage errors of our transformer vs a diffusers FluxTransformer2DModel on random Kontext inputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from edit_r1_jax.models.flux import transformer as tr
    tdt = torch.float32 if dtype == "float32" else torch.bfloat16
    rng = np.random.default_rng(seed)
    txt, img_ids = 8, np.concatenate([_grid_ids(4, 4, 0), _grid_ids(2, 3, 1)])
    ids = np.concatenate([np.zeros((txt, 3), np.float32), img_ids])
    hs = rng.standard_normal((1, img_ids.shape[0], cfg.in_channels)).astype(np.float32)
    enc = rng.standard_normal((1, txt, cfg.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((1, cfg.pooled_projection_dim)).astype(np.float32)
    t, g = np.array([0.6], np.float32), np.array([2.5], np.float32)
    cap: dict = {}

    def hook(name):
        def fn(_m, _inp, out):
            cap[name] = [o.float().numpy() for o in (out if isinstance(out, tuple) else (out,))]
        return fn
    hooks = [torch_model.x_embedder.register_forward_hook(hook("x_embedder")),
             torch_model.context_embedder.register_forward_hook(hook("context_embedder")),
             torch_model.time_text_embed.register_forward_hook(hook("time_text_embed"))]
    hooks += [b.register_forward_hook(hook(f"double[{i}]")) for i, b in enumerate(torch_model.transformer_blocks)]
    hooks += [b.register_forward_hook(hook(f"single[{i}]"))
              for i, b in enumerate(torch_model.single_transformer_blocks)]
    T = lambda a: torch.from_numpy(a).to(tdt)  # noqa: E731
    with torch.no_grad():
        ref = torch_model(hidden_states=T(hs), encoder_hidden_states=T(enc), pooled_projections=T(pooled),
                          timestep=T(t), guidance=T(g) if cfg.guidance_embeds else None,
                          img_ids=torch.from_numpy(img_ids), txt_ids=torch.zeros(txt, 3),
                          return_dict=False)[0].float().numpy()
    for h in hooks:
        h.remove()
    dt = cfg.dtype
    cos, sin = tr.rope_from_ids(ids.astype(np.float64), cfg.axes_dims_rope, cfg.theta)
    rows = []
    x = tr.Dense(cfg.inner_dim, dtype=dt).apply({"params": params["x_embedder"]}, jnp.asarray(hs, dt))
    c = tr.Dense(cfg.inner_dim, dtype=dt).apply({"params": params["context_embedder"]}, jnp.asarray(enc, dt))
    temb = tr.TimeTextEmbed(cfg).apply({"params": params["time_text_embed"]}, jnp.asarray(t, dt) * 1000,
                                       jnp.asarray(g, dt) * 1000 if cfg.guidance_embeds else None,
                                       jnp.asarray(pooled, dt))
    rows += [("x_embedder", *_err(x, cap["x_embedder"][0])), ("context_embedder", *_err(c, cap["context_embedder"][0])),
             ("time_text_embed", *_err(temb, cap["time_text_embed"][0]))]
    layer = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    double = jax.jit(tr.DoubleBlock(cfg).apply)
    single = jax.jit(tr.SingleBlock(cfg).apply)
    for i in range(cfg.num_layers):   # each block is fed the reference's own inputs (no error accumulation)
        ci, xi = (jnp.asarray(a, dt) for a in (cap[f"double[{i - 1}]"] if i else [cap["context_embedder"][0],
                                                                                  cap["x_embedder"][0]]))
        (co, xo), _ = double({"params": layer(params["transformer_blocks"], i)}, (ci, xi),
                             jnp.asarray(cap["time_text_embed"][0], dt), cos, sin)
        rows += [(f"double[{i}] image", *_err(xo, cap[f"double[{i}]"][1])),
                 (f"double[{i}] text", *_err(co, cap[f"double[{i}]"][0]))]
    prev = cap[f"double[{cfg.num_layers - 1}]"] if cfg.num_layers else [cap["context_embedder"][0],
                                                                         cap["x_embedder"][0]]
    for i in range(cfg.num_single_layers):
        h = jnp.concatenate([jnp.asarray(prev[0], dt), jnp.asarray(prev[1], dt)], axis=1)
        h, _ = single({"params": layer(params["single_transformer_blocks"], i)}, h,
                      jnp.asarray(cap["time_text_embed"][0], dt), cos, sin)
        prev = cap[f"single[{i}]"]
        rows += [(f"single[{i}] image", *_err(h[:, txt:], prev[1])), (f"single[{i}] text", *_err(h[:, :txt], prev[0]))]
    out = tr.transformer_forward(cfg, params, hs.astype(np.float32), enc, pooled, t, img_ids,
                                 np.zeros((txt, 3), np.float32), g if cfg.guidance_embeds else None)
    rows.append(("velocity (whole model)", *_err(out, ref)))
    return rows


def _print(title: str, rows) -> None:
    width = max([len(r[0]) for r in rows] + [24])
    print(f"\n{title}\n{'tensor':<{width}}  {'max abs err':>12}  {'rel err':>10}")
    for name, mx, rel in rows:
        print(f"{name:<{width}}  {mx:12.3e}  {rel:10.3e}")


def run_parity(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from edit_r1_jax.models.flux import convert
    d = args.hf_dir
    dtype = getattr(args, "dtype", "float32")
    jdt, tdt = (jnp.float32, torch.float32) if dtype == "float32" else (jnp.bfloat16, torch.bfloat16)
    tol = args.tol if getattr(args, "tol", None) is not None else (1e-4 if dtype == "float32" else 0.15)
    seed = getattr(args, "seed", 0)
    is_pipeline = os.path.isfile(os.path.join(d, "model_index.json"))
    tdir = os.path.join(d, "transformer") if is_pipeline else d
    all_rows = []
    with jax.default_matmul_precision("highest"):
        from diffusers import FluxTransformer2DModel
        t0 = time.time()
        ref_t = FluxTransformer2DModel.from_pretrained(tdir, dtype=tdt).eval()
        cfg, params = convert.load_transformer(tdir, dtype=jdt)
        print(f"transformer: {tdir} loaded in {time.time() - t0:.1f}s ({dtype})")
        rows = transformer_rows(ref_t, cfg, params, seed, dtype)
        _print("transformer (random inputs, Kontext reference tokens)", rows)
        all_rows += rows
        if is_pipeline:
            rows = _component_rows(d, jdt, tdt, seed)
            _print("VAE and text encoders", rows)
            all_rows += rows
            if not getattr(args, "skip_pipeline", False):
                rows = pipeline_rows(d, jdt, tdt, seed, getattr(args, "steps", 2), getattr(args, "size", "64x64"))
                _print("pipeline (same packed noise and prompt)", rows)
                all_rows += rows
    worst = max(all_rows, key=lambda r: r[2])
    ok = worst[2] <= tol
    print(f"\nworst relative error {worst[2]:.3e} ({worst[0]}) {'<=' if ok else '>'} tol {tol:g}: "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def _component_rows(d: str, jdt, tdt, seed: int) -> list[tuple[str, float, float]]:
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel
    from edit_r1_jax.models.flux import clip, t5, tokenization, vae
    rows = []
    ref_vae = AutoencoderKL.from_pretrained(os.path.join(d, "vae"), dtype=tdt).eval()
    vcfg, vparams = vae.load_vae(d, dtype=jdt)
    f = 2 ** (len(vcfg.block_out_channels) - 1)
    img = np.random.default_rng(seed).uniform(-1, 1, (1, 3, 8 * f, 8 * f)).astype(np.float32)
    with torch.no_grad():
        mean_ref = ref_vae.encode(torch.from_numpy(img).to(tdt)).latent_dist.mode()
        dec_ref = ref_vae.decode(mean_ref, return_dict=False)[0].float().numpy()
    mean = vae.vae_encode(vcfg, vparams, jnp.asarray(img, jdt))
    rows.append(("vae encoder (posterior mean)", *_err(mean, mean_ref.float().numpy())))
    rows.append(("vae decoder", *_err(vae.vae_decode(vcfg, vparams, jnp.asarray(mean_ref.float().numpy(), jdt)),
                                       dec_ref)))
    clip_tok, t5_tok = tokenization.load_tokenizers(d)
    clip_ids, t5_ids = tokenization.tokenize_prompts(clip_tok, t5_tok, ["make the sky red"], 64)
    ref_t5 = T5EncoderModel.from_pretrained(os.path.join(d, "text_encoder_2"), dtype=tdt).eval()
    ref_clip = CLIPTextModel.from_pretrained(os.path.join(d, "text_encoder"), dtype=tdt).eval()
    with torch.no_grad():
        h_t5 = ref_t5(torch.from_numpy(t5_ids.astype(np.int64)))[0].float().numpy()
        out_clip = ref_clip(torch.from_numpy(clip_ids.astype(np.int64)))
    t5cfg, t5params = t5.load_t5(d, dtype=jdt)
    clipcfg, clipparams = clip.load_clip(d, dtype=jdt)
    rows.append(("t5 last hidden state", *_err(t5.t5_encode(t5cfg, t5params, jnp.asarray(t5_ids)), h_t5)))
    last, pooled = clip.clip_encode(clipcfg, clipparams, jnp.asarray(clip_ids))
    rows.append(("clip last hidden state", *_err(last, out_clip.last_hidden_state.float().numpy())))
    rows.append(("clip pooled output", *_err(pooled, out_clip.pooler_output.float().numpy())))
    return rows


def pipeline_rows(d: str, jdt, tdt, seed: int, steps: int, size: str) -> list[tuple[str, float, float]]:
    """Short FluxKontextPipeline run vs ours from the same packed noise: final latents and decoded image."""
    import numpy as np
    import torch
    from diffusers import FluxKontextPipeline
    from PIL import Image
    from edit_r1_jax.models.flux.pipeline import KontextPipeline
    h, w = (int(v) for v in size.lower().split("x"))
    ref = FluxKontextPipeline.from_pretrained(d, dtype=tdt)
    ours = KontextPipeline.from_pretrained(d, dtype=jdt)
    f = ref.vae_scale_factor
    if h % (2 * f) or w % (2 * f):
        raise ValueError(f"--size {size}: height and width must be multiples of {2 * f} for this VAE")
    image = Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))
    c = ref.transformer.config.in_channels // 4
    noise = torch.randn(1, c, 2 * (h // (2 * f)), 2 * (w // (2 * f)), generator=torch.Generator().manual_seed(seed))
    latents = ref._pack_latents(noise, 1, c, noise.shape[2], noise.shape[3]).to(tdt)
    kw = dict(height=h, width=w, max_area=h * w, num_inference_steps=steps, guidance_scale=2.5,
              max_sequence_length=64)
    with torch.no_grad():
        lat_ref = ref(image=image, prompt="make the sky red", latents=latents, _auto_resize=False,
                      output_type="latent", **kw).images
        vc = ref.vae.config
        img_ref = ref.vae.decode(ref._unpack_latents(lat_ref, h, w, f) / vc.scaling_factor + vc.shift_factor,
                                 return_dict=False)[0]
        img_ref = ref.image_processor.postprocess(img_ref, output_type="np")
    lat = ours(image=image, prompt="make the sky red", latents=latents.float().numpy(), auto_resize=False,
               output_type="latent", **kw)
    img = np.asarray(ours.decode(lat, noise.shape[2], noise.shape[3]), np.float32).transpose(0, 2, 3, 1)
    return [(f"final latents ({steps} steps, {h}x{w})", *_err(lat, lat_ref.float().numpy())),
            ("decoded image [0, 1]", *_err(img, img_ref))]
