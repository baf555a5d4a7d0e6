"""Cold-start SFT of the reasoning reward model (algorithms.md b1): next-token CE on the assistant trace.

The loop is ``generic_loop.train`` with this task: records (synthetic world or JSONL) -> scoring prompt with the two
images + target trace -> Qwen2.5-VL logits -> ``rl.sft_loss`` on the target tokens only.

    edit-r1-jax sft --config configs/tiny.py --workdir runs/sft [--set train.steps=N]
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax import rl
from edit_r1_jax.models import qwen2_5_vl as qwen
from edit_r1_jax.train import generic_loop
from edit_r1_jax.train.rrm_setup import RRMSetup, build_rrm

log = logging.getLogger(__name__)


def sft_tokenize_fn(setup: RRMSetup):
    def tokenize(rec: dict) -> dict:
        ex = setup.inputs.sft_example(rec["instruction"], rec["principles"], _image(rec["source"]),
                                      _image(rec["edited"]), rec["target"])
        return {"input_ids": ex["input_ids"], "attention_mask": np.ones_like(ex["input_ids"]),
                "loss_mask": ex["loss_mask"], "pixel_values": ex["pixel_values"]}
    return tokenize


def _image(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    from edit_r1_jax.data.formats import load_image
    return load_image(x)


def sft_loss_fn(setup: RRMSetup):
    """(params, batch, rng) -> (loss, aux): batch input_ids/attention_mask/loss_mask [B,T], pixel_values [B,P,D]."""
    cfg = setup.cfg

    def loss_fn(params, batch, rng):
        del rng
        ids = batch["input_ids"]
        b = ids.shape[0]
        pv = batch["pixel_values"].reshape(-1, batch["pixel_values"].shape[-1])
        logits = qwen.forward(cfg, params, ids, batch["attention_mask"], pv, setup.grid(b))
        loss, count = rl.sft_loss(logits, ids, batch["loss_mask"])
        pred = jnp.argmax(logits[:, :-1], axis=-1)
        m = batch["loss_mask"][:, 1:].astype(jnp.float32)
        acc = jnp.sum((pred == ids[:, 1:]) * m) / jnp.maximum(m.sum(), 1.0)
        return loss, {"tokens": count, "token_acc": acc, "loss_weight": count}
    return loss_fn


def sft_records(config: Any, split: str = "train") -> list:
    """Records from ``data.sft_jsonl`` if set, else the synthetic world (``data.num_train``/``num_eval``)."""
    path = config.data.get("sft_jsonl", "") if split == "train" else config.data.get("sft_eval_jsonl", "")
    if path:
        from edit_r1_jax.data import formats
        return formats.JsonlSource(path, formats.SFT, skip_bad=bool(config.data.get("skip_bad", False)))
    from edit_r1_jax.data import synthetic
    n = int(config.data.num_train if split == "train" else config.data.num_eval)
    seed = int(config.seed) + (0 if split == "train" else 1000)
    size = int(config.data.get("image_size", 112))
    return synthetic.make_sft_records(n, seed=seed, size=size, style=config.data.get("trace_style", "minimal"))


def make_task(config: Any, setup: RRMSetup, train_records: Any, eval_records: Any = None) -> generic_loop.Task:
    loss_fn = sft_loss_fn(setup)
    tokenize = sft_tokenize_fn(setup)
    pad_values = {"input_ids": setup.inputs.pad_id, "attention_mask": 0, "loss_mask": 0}
    eval_fn = None
    if eval_records is not None and len(eval_records):
        from edit_r1_jax.rrm.inputs import pad_batch
        exs = [tokenize(r) for r in list(eval_records)[: int(config.train.get("eval_examples", 16))]]
        t = max(len(e["input_ids"]) for e in exs)
        eb = {k: np.stack([np.pad(e[k], (0, t - len(e[k])), constant_values=pad_values[k]) for e in exs])
              for k in pad_values}
        eb["pixel_values"] = np.stack([e["pixel_values"] for e in exs])
        del pad_batch
        eval_loss = jax.jit(loss_fn)

        def eval_fn(state, step):
            loss, aux = eval_loss(state.params, eb, None)
            return {"loss": float(loss), "token_acc": float(aux["token_acc"])}
    return generic_loop.Task(
        init_params=setup.init_params, param_logical_axes=setup.param_logical_axes(), loss_fn=loss_fn,
        train_source=train_records, tokenize_fn=tokenize, pad_values=pad_values, eval_fn=eval_fn,
        trainable_mask=_trainable_mask(config, setup),
        tokens_in_batch=lambda b: float(np.sum(b["attention_mask"])))


def _trainable_mask(config: Any, setup: RRMSetup):
    if not bool(config.train.get("freeze_vision", False)):
        return None
    from edit_r1_jax.train.state import mask_from_regex
    shapes = qwen.param_shapes(setup.cfg)
    frozen = mask_from_regex(shapes, [r"^visual/"])
    return jax.tree.map(lambda f: not f, frozen)


def run(config: Any, workdir: str) -> generic_loop.LoopResult:
    os.makedirs(workdir, exist_ok=True)
    setup = build_rrm(config, workdir)
    task = make_task(config, setup, sft_records(config, "train"), sft_records(config, "eval"))
    result = generic_loop.train(config, workdir, task)
    if bool(config.train.get("export_hf", True)) and result.stopped == "done":
        from edit_r1_jax.train.export import export_rrm_hf
        export_rrm_hf(setup, result.state.params, os.path.join(workdir, "hf"))   # collective; process 0 writes
    return result
