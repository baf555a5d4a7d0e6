"""Export a training checkpoint (Orbax, ``train/checkpoint.py`` layout) as a transformers / diffusers directory.

Meant to run as its own job after (or while) training, on one host and one device, whatever number of processes and
whatever mesh wrote the checkpoint (anchors.md §4: exporting inline from non-addressable arrays is fragile):

  1. ``resolve_step_dir``: RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/STEP (default: the newest finalized
     step) -> the step directory;
  2. ``restore_params``: the ``state`` item's tree metadata gives every leaf's shape and dtype; only the params subtree
     is restored (Orbax partial restore with ``ShapeDtypeStruct`` targets on one device), never the optimizer state;
  3. ``saved_config``: the run's config JSON stored in the step (``config`` item) rebuilds the model description
     (``rrm_setup.build_rrm`` for the reward model, ``editor_setup.build_editor`` for the editor);
  4. the params' top-level keys say which model it is: Qwen2.5-VL (``visual`` + ``embed_tokens``) -> ``--to hf``
     (``train.export.export_rrm_hf``: safetensors + config + tokenizer + image processor); FLUX transformer or its
     LoRA adapters -> ``--to diffusers`` (``EditorSetup.save``: transformer/, text encoders, editor.json; adapters are
     merged into the base transformer, and also written to ``lora/``).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked (message names the path and the fix)."""


def resolve_step_dir(path: str, step: int | None = None) -> tuple[str, str]:
    """(run_dir, step_dir) from RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/STEP."""
    from edit_r1_jax.train.checkpoint import CHECKPOINT_SUBDIR
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ExportError(f"export: checkpoint path {path} does not exist")
    if os.path.isdir(os.path.join(path, "state")):
        step_dir = path
        return os.path.dirname(os.path.dirname(step_dir)), step_dir
    root = path if os.path.basename(path) == CHECKPOINT_SUBDIR else os.path.join(path, CHECKPOINT_SUBDIR)
    if not os.path.isdir(root):
        raise ExportError(f"export: {path} is neither a run directory (with {CHECKPOINT_SUBDIR}/), its "
                          f"{CHECKPOINT_SUBDIR}/ folder, nor a step directory (with state/)")
    # finalized steps only: integer names (Orbax writes '<step>.orbax-checkpoint-tmp-*' until a save commits)
    steps = sorted(int(d) for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d, "state")))
    if not steps:
        raise ExportError(f"export: no finalized checkpoint step in {root}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ExportError(f"export: step {step} not in {root} (finalized steps: {steps})")
    return os.path.dirname(root), os.path.join(root, str(step))


def saved_config(step_dir: str) -> Any:
    """The run's config (``config`` item of the step) as an ``ml_collections.ConfigDict``."""
    import ml_collections
    import orbax.checkpoint as ocp
    item = os.path.join(step_dir, "config")
    if not os.path.isdir(item):
        raise ExportError(f"export: {step_dir} has no config item; it was not written by train/checkpoint.py")
    cfg = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item)
    if not cfg:
        raise ExportError(f"export: the config stored in {item} is empty; cannot tell the model's sizes")
    return ml_collections.ConfigDict(cfg)


def _state_metadata(step_dir: str) -> dict:
    import orbax.checkpoint as ocp
    md = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state"))
    tree = md.item_metadata
    tree = getattr(tree, "tree", tree)
    if "params" not in tree:
        raise ExportError(f"export: {step_dir}/state has no 'params' subtree (keys: {sorted(tree)})")
    return tree


def param_metadata(step_dir: str) -> Any:
    """Tree of ``ShapeDtypeStruct`` of the checkpoint's params (nothing restored)."""
    tree = _state_metadata(step_dir)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree["params"])


def restore_params(step_dir: str, device: jax.Device | None = None) -> Any:
    """The checkpoint's params on one device (default: this host's first), whatever mesh saved them."""
    import orbax.checkpoint as ocp
    sh = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    meta = param_metadata(step_dir)
    target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), meta)}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=sh, global_shape=x.shape, dtype=x.dtype),
                                target)
    out = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
    return out["params"]


def model_kind(params: Any) -> str:
    """'rrm' (Qwen2.5-VL), 'editor' (FLUX transformer) or 'editor_lora' (FLUX LoRA adapters)."""
    from edit_r1_jax.models import lora as lora_lib
    keys = set(params)
    if {"visual", "embed_tokens"} <= keys:
        return "rrm"
    paths = [tuple(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if paths and all(p[-1] in lora_lib.LORA_LEAVES for p in paths):
        return "editor_lora"
    if any("transformer_blocks" in k for k in keys):
        return "editor"
    raise ExportError(f"export: cannot tell the model from the params' top-level keys {sorted(keys)[:8]}")


def check_shapes(expected: Any, got: Any, what: str) -> None:
    """Same tree and shapes, or an error listing the first differences."""
    e = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    g = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(got)[0]}
    problems = [f"missing in checkpoint: {k} {e[k]}" for k in sorted(set(e) - set(g))]
    problems += [f"unexpected in checkpoint: {k} {g[k]}" for k in sorted(set(g) - set(e))]
    problems += [f"{k}: checkpoint {g[k]} vs model {e[k]}" for k in sorted(set(e) & set(g)) if e[k] != g[k]]
    if problems:
        raise ExportError(f"export: the checkpoint's params do not match the {what} its saved config describes "
                          f"({len(problems)} differences): " + "; ".join(problems[:6]))


def _workdir_for(run_dir: str, tmp: str) -> str:
    """The run directory when it holds the run's cached tokenizer, else a scratch dir (never write into the run)."""
    return run_dir if os.path.isdir(os.path.join(run_dir, "tokenizer")) else tmp


def export_rrm(config: Any, params: Any, run_dir: str, out_dir: str) -> str:
    from edit_r1_jax.models import qwen2_5_vl as qwen
    from edit_r1_jax.train.export import export_rrm_hf
    from edit_r1_jax.train.rrm_setup import build_rrm
    gcpo_from = config.get("gcpo", {}).get("init_from", "") if "gcpo" in config else ""
    with tempfile.TemporaryDirectory() as tmp:
        if gcpo_from and not config.rrm.get("checkpoint", ""):
            with config.unlocked():
                config.rrm.checkpoint = gcpo_from
        setup = build_rrm(config, _workdir_for(run_dir, tmp))
        check_shapes(qwen.param_shapes(setup.cfg), params, "Qwen2.5-VL")
        export_rrm_hf(setup, params, out_dir)
    return out_dir


def export_editor(config: Any, params: Any, kind: str, run_dir: str, out_dir: str) -> str:
    from edit_r1_jax.train.editor_setup import build_editor
    with tempfile.TemporaryDirectory() as tmp:
        setup = build_editor(config, _workdir_for(run_dir, tmp))
        if kind == "editor_lora":
            from edit_r1_jax.models import lora as lora_lib
            g = config.get("grpo", {})
            rank = int(g.get("lora_rank", 0))
            lcfg = lora_lib.LoraConfig(rank=rank, alpha=float(g.get("lora_alpha", 0.0)) or float(rank),
                                       targets=g.get("lora_targets", "") or lora_lib.FLUX_ATTN_FF_TARGETS)
            host = jax.tree.map(np.asarray, params)
            from edit_r1_jax.models.flux import lora_diffusers
            lora_diffusers.save_adapters(setup.tcfg, host, lcfg, os.path.join(out_dir, "lora"))
            params = lora_lib.apply_lora(setup.transformer_params(), host, lcfg.scale)
        check_shapes(setup.param_shapes(), params, "FLUX transformer")
        setup.save(jax.tree.map(np.asarray, params), out_dir)
    return out_dir


def export_checkpoint(path: str, to: str, out_dir: str, step: int | None = None) -> dict:
    """Export ``path`` (run dir / checkpoints dir / step dir) ``to`` 'hf' or 'diffusers' into ``out_dir``."""
    if to not in ("hf", "diffusers"):
        raise ExportError(f"export --to {to!r}: expected 'hf' (reward model) or 'diffusers' (editor)")
    run_dir, step_dir = resolve_step_dir(path, step)
    config = saved_config(step_dir)
    kind = model_kind(param_metadata(step_dir))
    want = "hf" if kind == "rrm" else "diffusers"
    if to != want:
        raise ExportError(f"export: {step_dir} holds a {'Qwen2.5-VL reward model' if kind == 'rrm' else 'FLUX editor'}"
                          f" checkpoint; export it with --to {want}")
    params = restore_params(step_dir)
    os.makedirs(out_dir, exist_ok=True)
    if kind == "rrm":
        export_rrm(config, params, run_dir, out_dir)
    else:
        export_editor(config, params, kind, run_dir, out_dir)
    info = {"checkpoint": step_dir, "step": int(os.path.basename(step_dir)), "model": kind, "to": to,
            "out": os.path.abspath(out_dir)}
    with open(os.path.join(out_dir, "export_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info
