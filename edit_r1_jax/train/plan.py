"""Memory planning for the RRM SFT train step: AOT-compile it for a mesh of N devices from abstract shapes only.

Nothing is ever allocated at model size: the TrainState comes from ``jax.eval_shape`` (``state.plan_sharded_state``
without calling ``init``), the batch is ``ShapeDtypeStruct``s, and ``make_train_step(...).jitted.lower(...)
.compile()`` gives XLA's per-device buffer assignment (``compiled.memory_analysis()``):

    params_bytes   sum over param leaves of the bytes of this device's shard (``sharding.shard_shape``)
    opt_bytes      the same for the optimizer state (Adam mu/nu, counts)
    argument_bytes XLA: all inputs of the step on one device (state + batch)
    output_bytes   XLA: all outputs (new state + metrics)
    alias_bytes    XLA: outputs written in place of donated inputs (the state; not counted twice)
    temp_bytes     XLA: scratch live during the step = activations kept for the backward pass + workspace
    total_bytes    argument + output - alias + temp   (peak per device, up to XLA's liveness analysis)

``fit_layers`` fits ``total(L) = a + b * L`` through the configured depth and half of it (per-layer params, moments,
gradients and saved activations scale with L for a scanned decoder; XLA's buffer reuse makes it only roughly
linear), then compiles the predicted largest depth that fits the HBM size to check it (stepping down if needed).

Caveat: off TPU the numbers are XLA's buffer assignment for the backend the devices belong to (fake CPU devices when
planning a pod from a workstation). Parameter and optimizer bytes are exact; temporaries on CPU can differ from
TPU's (other fusion decisions, bf16 arithmetic widened to f32 on CPU).

Config fields read: ``rrm.checkpoint`` (its config.json, when the directory exists) or ``rrm.hf_config`` (a Qwen2.5-VL
config.json dict; presets in ``configs/pods``) or the tiny ``rrm`` sizes; ``rrm.image_size``, ``rrm.remat_policy``,
``dtype.{param,compute}``, ``mesh``, ``sharding.rules``, ``train.{global_batch_size, grad_accum_steps, ...}`` and
``plan.{seq_len, vocab_size}`` (defaults: the largest ``data.length_buckets`` entry, 1024 + world-tokenizer specials).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax import parallel
from edit_r1_jax.train import state as state_lib
from edit_r1_jax.train import step as step_lib
from edit_r1_jax.train.state import cfg_get

GIB = 2 ** 30
_TINY_IDS = {"eos": 2, "pad": 1, "image": 5, "video": 6, "vision_start": 3, "vision_end": 4}


# ----------------------------------------------------------------------------------------------------------------
# model and inputs from the config

def rrm_model_config(config: Any, layers: int | None = None) -> Any:
    """The ``Qwen25VLConfig`` the config trains (``rrm.checkpoint`` if present > ``rrm.hf_config`` > tiny sizes),
    optionally with ``layers`` text-decoder layers."""
    from edit_r1_jax.models import qwen2_5_vl as qwen
    from edit_r1_jax.train.rrm_setup import tiny_qwen_config
    r = cfg_get(config, "rrm", {})
    hf = cfg_get(r, "hf_config", None)
    ckpt = cfg_get(r, "checkpoint", "")
    if ckpt and os.path.isfile(os.path.join(ckpt, "config.json")):
        cfg = qwen.load_config(ckpt)
    elif hf:
        cfg = qwen.from_hf_dict(hf.to_dict() if hasattr(hf, "to_dict") else dict(hf))
    elif ckpt:
        raise FileNotFoundError(f"rrm.checkpoint={ckpt!r} has no config.json and the config has no rrm.hf_config")
    else:
        from edit_r1_jax.data.world_tokenizer import DEFAULT_VOCAB_SIZE
        vocab = int(cfg_get(cfg_get(config, "plan", {}), "vocab_size", DEFAULT_VOCAB_SIZE + 16))
        cfg = tiny_qwen_config(_TINY_IDS, vocab=vocab, hidden=int(cfg_get(r, "hidden", 64)),
                               layers=int(cfg_get(r, "layers", 2)), heads=int(cfg_get(r, "heads", 4)),
                               kv_heads=int(cfg_get(r, "kv_heads", 2)),
                               intermediate=int(cfg_get(r, "intermediate", 128)),
                               vision_hidden=int(cfg_get(r, "vision_hidden", 32)),
                               vision_depth=int(cfg_get(r, "vision_depth", 2)),
                               vision_heads=int(cfg_get(r, "vision_heads", 2)))
    remat = cfg_get(r, "remat_policy", "none")
    cfg = cfg.replace(remat_policy=remat)
    if layers is not None:
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=int(layers)))
    return cfg.validate()


def image_grid(cfg: Any, image_size: int, images: int = 2) -> np.ndarray:
    """[images, 3] grid (t, h, w) in patches for square ``image_size`` px images (multiple of patch*merge)."""
    unit = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    if image_size % unit:
        raise ValueError(f"rrm.image_size={image_size}: must be a multiple of patch_size*spatial_merge_size={unit}")
    side = image_size // cfg.vision.patch_size
    return np.array([[1, side, side]] * images)


def seq_len_of(config: Any) -> int:
    p = cfg_get(config, "plan", {})
    if cfg_get(p, "seq_len", None):
        return int(cfg_get(p, "seq_len", 0))
    buckets = cfg_get(cfg_get(config, "data", {}), "length_buckets", None)
    return int(max(buckets)) if buckets else 512


def sft_batch_shapes(cfg: Any, batch: int, seq_len: int, grid: np.ndarray) -> dict:
    """ShapeDtypeStructs of one SFT batch (the keys ``sft.sft_loss_fn`` reads)."""
    n_patch = int(sum(t * h * w for t, h, w in grid))
    n_img_tok = n_patch // cfg.vision.spatial_merge_size ** 2
    if seq_len <= n_img_tok:
        raise ValueError(f"plan.seq_len={seq_len} must exceed the {n_img_tok} image tokens of one sample")
    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    return {"input_ids": ids, "attention_mask": ids, "loss_mask": ids,
            "pixel_values": jax.ShapeDtypeStruct((batch, n_patch, cfg.vision.patch_dim), jnp.float32)}


@dataclasses.dataclass
class _GridSetup:
    """The two fields of ``RRMSetup`` that ``sft.sft_loss_fn`` uses."""
    cfg: Any
    grid_per_sample: np.ndarray

    def grid(self, batch_size: int) -> np.ndarray:
        return np.tile(self.grid_per_sample, (batch_size, 1))


def sft_loss_with_policy(cfg: Any, grid_per_sample: np.ndarray, policy: state_lib.DTypePolicy):
    """``sft.sft_loss_fn`` with params cast to the compute dtype inside the step (fp32 master params)."""
    from edit_r1_jax.train.sft import sft_loss_fn
    base = sft_loss_fn(_GridSetup(cfg, grid_per_sample))
    if policy.compute_dtype == policy.param_dtype:
        return base

    def loss_fn(params, batch, rng):
        return base(policy.cast_for_compute(params), batch, rng)
    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# the step, abstractly

@dataclasses.dataclass
class SFTStepSpec:
    """An SFT train step built for a mesh, with abstract state and batch (nothing allocated)."""
    cfg: Any
    mesh: Any
    state_plan: state_lib.StatePlan
    step: Any                      # make_train_step(...) result; ``.jitted`` for lower()
    batch: dict                    # ShapeDtypeStructs
    grid_per_sample: np.ndarray
    policy: state_lib.DTypePolicy

    def lower(self):
        with self.mesh:
            return self.step.jitted.lower(self.state_plan.restore_target(), self.batch)


def build_sft_step(config: Any, devices: Sequence[jax.Device] | None = None, *, layers: int | None = None,
                   cfg: Any = None, platform: str | None = None, donate: bool = True) -> SFTStepSpec:
    """The configured SFT step on a mesh over ``devices`` (default: all), from abstract shapes only."""
    from edit_r1_jax.models import qwen2_5_vl as qwen
    cfg = cfg if cfg is not None else rrm_model_config(config, layers)
    devices = list(jax.devices() if devices is None else devices)
    mesh = parallel.make_mesh(cfg_get(config, "mesh", None), devices)
    rules = parallel.rules_from_config(config)
    tcfg = cfg_get(config, "train", {})
    policy = state_lib.DTypePolicy.from_config(config, platform or devices[0].platform)
    grid = image_grid(cfg, int(cfg_get(cfg_get(config, "rrm", {}), "image_size", 112)))
    mask = None
    if bool(cfg_get(tcfg, "freeze_vision", False)):
        frozen = state_lib.mask_from_regex(qwen.param_shapes(cfg), [r"^visual/"])
        mask = jax.tree.map(lambda f: not f, frozen)
    tx = state_lib.make_optimizer(tcfg, mask)
    plan = state_lib.plan_sharded_state(lambda k: qwen.init_params(cfg, k, policy.param_dtype), tx, mesh, rules,
                                        rng=jax.random.PRNGKey(0), param_logical_axes=qwen.param_logical_axes(cfg))
    loss_fn = sft_loss_with_policy(cfg, grid, policy)
    step = step_lib.make_train_step(loss_fn, state_shardings=plan.shardings, mesh=mesh,
                                    grad_accum_steps=int(cfg_get(tcfg, "grad_accum_steps", 1)), trainable_mask=mask,
                                    lr_schedule=state_lib.make_lr_schedule(tcfg), donate=donate)
    gbs = int(cfg_get(tcfg, "global_batch_size", 8))
    batch = sft_batch_shapes(cfg, gbs, seq_len_of(config), grid)
    return SFTStepSpec(cfg=cfg, mesh=mesh, state_plan=plan, step=step, batch=batch, grid_per_sample=grid,
                       policy=policy)


# ----------------------------------------------------------------------------------------------------------------
# memory report

def shard_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of ``abstract`` (ShapeDtypeStructs) under ``shardings`` (the largest shard)."""
    total = 0
    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        shape = s.shard_shape(tuple(x.shape)) if x.shape else ()
        total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
    return total


def tree_bytes(abstract: Any) -> int:
    return int(sum(int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(abstract)))


@dataclasses.dataclass
class MemoryPlan:
    devices: int
    mesh: dict
    layers: int
    num_params: int
    params_bytes: int          # per device (shards)
    opt_bytes: int             # per device (shards)
    params_total_bytes: int    # whole model
    opt_total_bytes: int
    argument_bytes: int        # XLA memory_analysis, per device
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    compile_s: float

    @property
    def activation_bytes(self) -> int:
        return self.temp_bytes

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(activation_bytes=self.activation_bytes, total_bytes=self.total_bytes)
        return d


def memory_plan(spec: SFTStepSpec) -> MemoryPlan:
    """AOT-compile ``spec`` and read XLA's per-device memory analysis."""
    t0 = time.perf_counter()
    compiled = spec.lower().compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError(f"plan: the {jax.default_backend()} backend gave no memory_analysis() for the step")
    sp, ab = spec.state_plan.shardings, spec.state_plan.abstract
    return MemoryPlan(
        devices=int(spec.mesh.size), mesh={k: int(v) for k, v in spec.mesh.shape.items()},
        layers=int(spec.cfg.text.num_hidden_layers), num_params=int(sum(np.prod(x.shape) for x in
                                                                       jax.tree.leaves(ab.params))),
        params_bytes=shard_bytes(ab.params, sp.params), opt_bytes=shard_bytes(ab.opt_state, sp.opt_state),
        params_total_bytes=tree_bytes(ab.params), opt_total_bytes=tree_bytes(ab.opt_state),
        argument_bytes=int(ma.argument_size_in_bytes), output_bytes=int(ma.output_size_in_bytes),
        alias_bytes=int(ma.alias_size_in_bytes), temp_bytes=int(ma.temp_size_in_bytes), compile_s=compile_s)


@dataclasses.dataclass
class LayerFit:
    layers_probe: tuple[int, int]
    total_probe: tuple[int, int]
    per_layer_bytes: float
    fixed_bytes: float
    hbm_bytes: int
    max_layers: int            # 0: not even the embeddings/vision fit
    checked: list              # [(layers, compiled total bytes)] of the verification compiles

    def predicted_total(self, layers: int) -> float:
        return self.fixed_bytes + self.per_layer_bytes * layers


def fit_layers(config: Any, devices: Sequence[jax.Device], hbm_bytes: int, *, base: MemoryPlan | None = None,
               max_checks: int = 3) -> LayerFit:
    """Largest text-decoder depth whose step fits ``hbm_bytes`` per device.

    Linear fit ``total(L) = a + b L`` through the configured depth L (``base``, compiled if not given) and L/2,
    then verified by compiling at the predicted depth and stepping down (at most ``max_checks`` compiles): XLA's
    buffer reuse makes total(L) only roughly linear, so the answer is always a compiled, fitting depth when one of
    the checks fits (``max_layers`` = 0 when even the smallest tried depth does not).
    """
    base = base if base is not None else memory_plan(build_sft_step(config, devices))
    hi = base.layers
    lo = max(1, hi // 2) if hi > 1 else 2
    other = memory_plan(build_sft_step(config, devices, layers=lo))
    per = (base.total_bytes - other.total_bytes) / (hi - lo)
    fixed = base.total_bytes - per * hi
    totals = {hi: base.total_bytes, lo: other.total_bytes}

    def predict(budget):
        if per <= 0:
            return 4 * hi if fixed <= budget else 0
        return max(0, int(np.floor((budget - fixed) / per)))
    guess = predict(hbm_bytes)
    checked = []
    best = max([n for n, t in totals.items() if t <= hbm_bytes], default=0)
    for _ in range(max_checks):
        if guess <= 0 or guess in totals:
            break
        t = memory_plan(build_sft_step(config, devices, layers=guess)).total_bytes
        totals[guess] = t
        checked.append((guess, t))
        if t <= hbm_bytes:
            best = max(best, guess)
            break
        guess = max(0, guess - int(np.ceil((t - hbm_bytes) / max(per, 1.0))) - 1)
    return LayerFit(layers_probe=(lo, hi), total_probe=(other.total_bytes, base.total_bytes), per_layer_bytes=per,
                    fixed_bytes=fixed, hbm_bytes=int(hbm_bytes), max_layers=best, checked=checked)


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.3f} {unit}"
    return f"{int(n)} B"


def format_plan(p: MemoryPlan, hbm_bytes: int | None = None) -> str:
    g = lambda n: f"{human_bytes(n):>12}"   # noqa: E731
    count = f"{p.num_params / 1e9:.3f} B" if p.num_params >= 1e9 else f"{p.num_params / 1e6:.3f} M"
    lines = [f"mesh {p.mesh} ({p.devices} devices), text layers {p.layers}, {count} params",
             f"  parameters   {g(p.params_bytes)} per device   (whole model {g(p.params_total_bytes)})",
             f"  optimizer    {g(p.opt_bytes)} per device   (whole model {g(p.opt_total_bytes)})",
             f"  activations  {g(p.activation_bytes)} per device   (XLA temporaries)",
             f"  total        {g(p.total_bytes)} per device   (XLA: arguments {g(p.argument_bytes).strip()} + outputs "
             f"{g(p.output_bytes).strip()} - donated {g(p.alias_bytes).strip()} + temporaries)",
             f"  compile      {p.compile_s:.1f} s"]
    if hbm_bytes:
        verdict = "fits" if p.total_bytes <= hbm_bytes else "does NOT fit"
        lines.append(f"  HBM          {g(hbm_bytes)} per device: {verdict} "
                     f"({100 * p.total_bytes / hbm_bytes:.1f}% used)")
    return "\n".join(lines)
