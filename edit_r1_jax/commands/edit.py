"""`edit-r1-jax edit`: edit one image with FLUX.1-Kontext (a diffusers pipeline directory), sharded over the mesh.

    edit-r1-jax edit --model DIR --image in.png --prompt "make the sky red" --steps 28 --seed 0 --out out.png

The output size defaults to the reference image's size (after Kontext's preferred-resolution choice unless
--no-auto-resize), re-fitted to --max-area like diffusers; pass --height/--width to choose it. Guidance is the
distilled guidance embedding (no classifier-free guidance). --lora DIR applies adapters saved by
`models.lora.save_lora` or diffusers' LoRA file; --transformer FILE uses another transformer (e.g. Black Forest
Labs' single-file checkpoint) with the pipeline folder's VAE and text encoders. The mesh comes from --config
(default: every device on the fsdp axis).
"""
from __future__ import annotations

import time


def add_parser(subparsers):
    p = subparsers.add_parser("edit", help="edit an image with FLUX.1-Kontext (diffusers pipeline directory)",
                              description=__doc__)
    p.add_argument("--model", required=True, help="diffusers FluxKontextPipeline directory")
    p.add_argument("--image", required=True, help="reference image (PNG/JPEG)")
    p.add_argument("--prompt", required=True, help="editing instruction")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    p.add_argument("--seed", type=int, default=0, help="initial-noise seed (default 0)")
    p.add_argument("--guidance", type=float, default=2.5, help="distilled guidance scale (default 2.5)")
    p.add_argument("--height", type=int, default=None, help="output height in pixels (default: from the image)")
    p.add_argument("--width", type=int, default=None, help="output width in pixels (default: from the image)")
    p.add_argument("--max-area", type=int, default=1024 * 1024, help="output area cap in pixels (default 1024^2)")
    p.add_argument("--no-auto-resize", action="store_true",
                   help="keep the reference image's size instead of the nearest preferred Kontext resolution")
    p.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens (default 512)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights/activations dtype (auto: bfloat16 on TPU/GPU, float32 on CPU)")
    p.add_argument("--lora", default=None, help="LoRA adapter directory/file: ours (models.lora.save_lora) or "
                   "diffusers' pytorch_lora_weights.safetensors")
    p.add_argument("--transformer", default=None, help="use this transformer instead of MODEL/transformer: a "
                   "diffusers folder or a BFL single file (flux1-kontext-dev.safetensors)")
    p.add_argument("--config", default=None, help="config file whose mesh/sharding to use "
                   "(e.g. configs/flux_kontext_dev.py)")
    p.add_argument("--per-layer", action="store_true",
                   help="run the transformer blocks as a loop over per-layer params instead of nn.scan over stacked "
                        "params (no per-step weight slices; one compiled body per block, so longer compiles for "
                        "deep models; see models/layer_layout.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set mesh.tensor=4")
    return p


def run(args) -> int:
    from edit_r1_jax import parallel
    parallel.maybe_initialize_distributed()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from edit_r1_jax.models import lora as lora_lib
    from edit_r1_jax.models.flux import lora_diffusers
    from edit_r1_jax.models.flux.pipeline import KontextPipeline, kontext_reference_size

    if args.config:
        from edit_r1_jax import config as config_lib
        cfg = config_lib.get_config(args.config, args.overrides, num_devices=jax.device_count())
        mesh_cfg, rules = cfg.get("mesh"), parallel.rules_from_config(cfg)
    else:
        mesh_cfg, rules = {"data": 1, "fsdp": -1, "tensor": 1}, parallel.DEFAULT_RULES
    mesh = parallel.make_mesh(mesh_cfg)
    mesh = mesh if mesh.devices.size > 1 else None
    dtype = args.dtype if args.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    jdt = jnp.float32 if dtype == "float32" else jnp.bfloat16

    t0 = time.time()
    pipe = KontextPipeline.from_pretrained(args.model, dtype=jdt, mesh=mesh, scan_layers=not args.per_layer,
                                           transformer=args.transformer)
    if rules != parallel.DEFAULT_RULES:
        print("note: custom sharding rules apply to activations only; params use the default rules")
    print(f"loaded {args.model} in {time.time() - t0:.1f}s ({dtype}, "
          f"{'per-layer' if args.per_layer else 'scanned'} blocks, "
          f"{parallel.describe_mesh(mesh) if mesh is not None else 'single device'})")
    lora, lora_scale = None, 1.0
    if args.lora:
        lora, lcfg = lora_diffusers.load_any_lora(args.lora, pipe.tcfg, dtype=jdt)
        lora_scale = lcfg.scale
        print(f"LoRA: {lora_lib.count(lora) / 1e6:.2f}M params, rank {lcfg.rank}, alpha {lcfg.alpha}")

    image = Image.open(args.image).convert("RGB")
    height, width = args.height, args.width
    if height is None or width is None:
        mult = pipe.vae_scale_factor * 2
        h, w = kontext_reference_size(image.height - image.height % mult, image.width - image.width % mult, mult,
                                      not args.no_auto_resize)
        height, width = height or h, width or w
    t0 = time.time()
    images = pipe(image=image, prompt=args.prompt, height=height, width=width, max_area=args.max_area,
                  num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                  auto_resize=not args.no_auto_resize, max_sequence_length=args.max_sequence_length,
                  output_type="np", lora=lora, lora_scale=lora_scale)
    dt = time.time() - t0
    out = Image.fromarray((np.clip(images[0], 0, 1) * 255).round().astype(np.uint8))
    import os
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if jax.process_index() == 0:
        out.save(args.out)
    print(f"wrote {args.out} ({out.width}x{out.height}) in {dt:.1f}s for {args.steps} steps "
          f"(including compilation)")
    return 0
