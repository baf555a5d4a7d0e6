"""``edit-r1-jax parity qwen2_5_vl --hf-dir DIR``: transformers vs our port, layer by layer.

Inputs: one sample with text and two random images of different sizes (random patches; the processor is not
involved). Reported per row: max |ours - ref| and relative Frobenius error ||ours - ref|| / ||ref|| for the hidden
state after every vision block (window order), the merged image features, after every decoder layer, the final
normed hidden state and the logits; then greedy-token agreement over ``--max-new-tokens``.
"""
from __future__ import annotations

import time


def add_arguments(p):
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens to compare (default 16)")
    p.add_argument("--grids", default="1x8x12,1x6x6", help="image grids t x h x w in 14-px patches (default "
                   "1x8x12,1x6x6)")
    p.add_argument("--tol", type=float, default=None, help="pass if logits rel. error <= tol (default 1e-4 fp32, "
                   "5e-2 bf16)")


def _inputs(cfg, grids, seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    grid = np.array(grids, np.int64)
    n = int(np.prod(grid, axis=1).sum())
    pv = rng.standard_normal((n, cfg.vision.patch_dim)).astype(np.float32)
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
               *cfg.eos_token_id}
    pool = [i for i in range(min(cfg.text.vocab_size, 5000)) if i not in special]
    text = lambda k: [int(x) for x in rng.choice(pool, k)]
    u = cfg.vision.spatial_merge_size ** 2
    ids = text(3)
    for g in grid:
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * int(np.prod(g) // u) + \
               [cfg.vision_end_token_id] + text(2)
    ids += text(4)
    return np.array([ids]), pv, grid


def _err(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a - b
    return float(np.abs(d).max()), float(np.linalg.norm(d) / max(np.linalg.norm(b), 1e-30))


def run_parity(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from edit_r1_jax.models import qwen2_5_vl as q

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    t0 = time.time()
    ref_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.hf_dir, dtype=tdtype,
                                                                   attn_implementation="eager").eval()
    cfg, params = q.load_pretrained(args.hf_dir, dtype=jdtype)
    print(f"loaded {args.hf_dir} in {time.time() - t0:.1f}s ({q.num_params(cfg) / 1e6:.1f}M params, {args.dtype})")
    grids = [[int(x) for x in g.split("x")] for g in args.grids.split(",")]
    ids, pv, grid = _inputs(cfg, grids, args.seed)
    mm = (ids == cfg.image_token_id).astype(np.int64)

    captured: dict[str, list] = {"vision": [], "text": [], "merger": []}
    hooks = [b.register_forward_hook(lambda m, i, o: captured["vision"].append(o.detach().float().numpy()))
             for b in ref_model.model.visual.blocks]
    # the tower's merged features (raster order) through a hook on the tower, not the model output's
    # `image_outputs` field (absent in earlier transformers 5.x releases, e.g. 5.17)
    hooks.append(ref_model.model.visual.register_forward_hook(lambda m, i, o: captured["merger"].append(
        getattr(o, "pooler_output", o).detach().float().numpy())))
    hooks += [l.register_forward_hook(lambda m, i, o: captured["text"].append(
        (o[0] if isinstance(o, tuple) else o).detach().float().numpy())) for l in ref_model.model.language_model.layers]
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pv).to(tdtype),
                        image_grid_thw=torch.tensor(grid), mm_token_type_ids=torch.tensor(mm),
                        output_hidden_states=True)
    for h in hooks:
        h.remove()
    with jax.default_matmul_precision("highest"):
        ours = q.forward_with_hidden(cfg, params, ids, None, pv, grid)
    merged, vis_hidden = ours["vision"]
    ref_merged = np.concatenate(captured["merger"])

    rows = []
    for i, r in enumerate(captured["vision"]):
        rows.append((f"vision.block.{i}" + (" (full)" if i in cfg.vision.fullatt_block_indexes else ""),
                     *_err(vis_hidden[i], r)))
    rows.append(("vision.merger (features)", *_err(merged, ref_merged)))
    for i, r in enumerate(captured["text"]):
        rows.append((f"text.layer.{i}", *_err(ours["layer_hidden"][i], r)))
    rows.append(("text.norm (last hidden)", *_err(ours["last_hidden"], ref.hidden_states[-1].float().numpy())))
    logit_err = _err(ours["logits"], ref.logits.float().numpy())
    rows.append(("logits", *logit_err))
    width = max(len(r[0]) for r in rows)
    print(f"{'tensor':<{width}}  {'max abs err':>12}  {'rel err':>10}")
    for name, mx, rel in rows:
        print(f"{name:<{width}}  {mx:12.3e}  {rel:10.3e}")

    n = args.max_new_tokens
    with torch.no_grad():
        out = ref_model.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pv).to(tdtype),
                                 image_grid_thw=torch.tensor(grid), mm_token_type_ids=torch.tensor(mm),
                                 max_new_tokens=n, do_sample=False)
    ref_tokens = out[0, ids.shape[1]:].numpy()
    with jax.default_matmul_precision("highest"):
        toks, _ = q.generate(cfg, params, ids, None, pv, grid, max_new_tokens=n)
    toks = np.asarray(toks)[0, :len(ref_tokens)]
    same = toks == ref_tokens
    prefix = int(np.argmin(same)) if not same.all() else len(same)
    print(f"greedy tokens: {int(same.sum())}/{len(same)} equal, identical prefix {prefix}/{len(same)}")
    tol = args.tol if args.tol is not None else (1e-4 if args.dtype == "float32" else 5e-2)
    ok = logit_err[1] <= tol
    print(f"logits relative error {logit_err[1]:.3e} {'<=' if ok else '>'} tol {tol:g}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1
