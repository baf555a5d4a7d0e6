"""Kontext-style transformer inputs and the two forwards (diffusers eager, ours jitted at highest precision) for the
FLUX checkpoint-interchange tests."""
import jax
import numpy as np


def kontext_inputs(tcfg, seed: int, grid: int = 3, n_txt: int = 5, timestep: float = 0.6,
                   guidance: float = 2.5) -> dict:
    """Batch 1: a grid x grid target and an equal reference grid (ids with first coordinate 1), n_txt text tokens."""
    rng = np.random.default_rng(seed)
    ids = np.stack(np.meshgrid([0, 1], np.arange(grid), np.arange(grid), indexing="ij"), -1).reshape(-1, 3)
    return dict(hidden_states=rng.standard_normal((1, 2 * grid * grid, tcfg.in_channels)).astype(np.float32),
                encoder_hidden_states=rng.standard_normal((1, n_txt, tcfg.joint_attention_dim)).astype(np.float32),
                pooled_projections=rng.standard_normal((1, tcfg.pooled_projection_dim)).astype(np.float32),
                timestep=np.array([timestep], np.float32), img_ids=ids.astype(np.float32),
                txt_ids=np.zeros((n_txt, 3), np.float32), guidance=np.array([guidance], np.float32))


def torch_forward(transformer, x: dict) -> np.ndarray:
    import torch
    with torch.no_grad():
        return transformer(**{k: torch.from_numpy(v) for k, v in x.items()}, return_dict=False)[0].numpy()


def ours_forward(tcfg, tparams, x: dict, lora=None) -> np.ndarray:
    """``lora``: the in-layer adapter collection, already scaled (`lora.scale_lora`)."""
    from edit_r1_jax.models import flux
    with jax.default_matmul_precision("highest"):
        return np.asarray(flux.transformer_forward(
            tcfg, tparams, x["hidden_states"], x["encoder_hidden_states"], x["pooled_projections"], x["timestep"],
            x["img_ids"], x["txt_ids"], x["guidance"], lora=lora))


def rel_err(a, b) -> float:
    """max|a - b| / max|b| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
