"""FLUX transformer checkpoints: diffusers `transformer/` folder <-> our params tree.

Name mapping (diffusers -> ours): strip the block index (`transformer_blocks.{i}.` -> stacked leading axis i),
fold numeric sub-indices into the module name (`to_out.0` -> `to_out_0`, `net.0.proj` -> `net_0_proj`,
`net.2` -> `net_2`), `Linear.weight [out, in]` -> `kernel [in, out]` (transposed), `RMSNorm.weight` -> `scale`.

Loading reads `diffusion_pytorch_model.safetensors` or its sharded index, checks every tensor name and shape
against the config (one error listing all missing / unexpected / mis-shaped tensors), and builds each leaf
(stacking the per-layer tensors) straight onto its target sharding when a mesh is given.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax.models import layer_layout
from edit_r1_jax.models.flux import bfl_format, transformer as tr
from edit_r1_jax.models.flux.config import FluxTransformerConfig
from edit_r1_jax.models.safetensors_io import CheckpointError, SafetensorsReader, check_tensors, write_safetensors

WEIGHTS_NAME = "diffusion_pytorch_model"
# block key -> the config field with its depth
STACKED_BLOCKS = {"transformer_blocks": "num_layers", "single_transformer_blocks": "num_single_layers"}
_FOLD = (("to_out.0", "to_out_0"), ("net.0.proj", "net_0_proj"), ("net.2", "net_2"))


def _flatten(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _torch_name(path: tuple, layer: int | None) -> tuple[str, str]:
    """Our leaf path -> (diffusers tensor name, kind) with kind in {'kernel', 'bias', 'scale'}."""
    *mods, leaf = path
    name = ".".join(mods)
    for ours, theirs in _FOLD:
        name = name.replace(ours.replace(".", "_"), ours)
    if layer is not None:
        head, rest = name.split(".", 1)
        name = f"{head}.{layer}.{rest}"
    return f"{name}.{'bias' if leaf == 'bias' else 'weight'}", leaf


def _leaf_plan(cfg: FluxTransformerConfig) -> list[tuple[tuple, tuple, list[tuple[str, str]]]]:
    """For each of our leaves in the stacked layout: (path, our shape, [(diffusers name, kind) per layer, or one
    entry])."""
    shapes = tr.param_shapes(cfg.replace(scan_layers=True))
    plan = []
    for path, sds in _flatten(shapes):
        n_key = STACKED_BLOCKS.get(path[0])
        if n_key:
            names = [_torch_name(path, i) for i in range(getattr(cfg, n_key))]
        else:
            names = [_torch_name(path, None)]
        plan.append((path, tuple(sds.shape), names))
    return plan


def _torch_shape(shape: tuple, kind: str, stacked: bool) -> tuple:
    per = shape[1:] if stacked else shape
    return tuple(reversed(per)) if kind == "kernel" else tuple(per)


def expected_tensors(cfg: FluxTransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every diffusers tensor name and shape a checkpoint of this config holds."""
    out = {}
    for path, shape, names in _leaf_plan(cfg):
        for name, kind in names:
            out[name] = _torch_shape(shape, kind, len(names) > 1 or path[0] in STACKED_BLOCKS)
    return out


def kernel_modules(cfg: FluxTransformerConfig) -> dict[str, tuple[tuple, int | None, tuple[int, int]]]:
    """Every Dense of the transformer: diffusers module name (``transformer_blocks.0.attn.to_q``) -> (our module
    path in the stacked layout, layer index or None, kernel (in, out))."""
    out = {}
    for path, shape, names in _leaf_plan(cfg):
        if path[-1] != "kernel":
            continue
        stacked = path[0] in STACKED_BLOCKS
        for i, (name, _) in enumerate(names):
            out[name[:-len(".weight")]] = (path[:-1], i if stacked else None, tuple(shape[-2:]))
    return out


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (expected a diffusers FluxTransformer2DModel folder, e.g. "
                              "<pipeline>/transformer)")
    with open(cfg_path) as f:
        return json.load(f)


def _to_dtype(arr: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(arr).astype(jnp.dtype(dtype))


def load_transformer(path: str, dtype=jnp.float32, mesh=None, rules=None, **cfg_overrides
                     ) -> tuple[FluxTransformerConfig, dict]:
    """Load a diffusers FluxTransformer2DModel folder -> (config, params). ``path`` may also be a Black Forest Labs
    single file (``flux1-kontext-dev.safetensors``, BFL or ComfyUI key names; config inferred from the shapes, see
    `bfl_format`).

    dtype: parameter and activation dtype (bf16 checkpoints are upcast when dtype is float32 and vice versa).
    mesh: place each leaf directly on its NamedSharding (`param_shardings`); otherwise on the default device.
    cfg_overrides: JAX-only config fields (remat=..., attention_backend=..., scan_layers=False for the per-layer
        inference layout, each layer's leaves placed directly).
    """
    if os.path.isfile(path) and path.endswith(".safetensors"):       # BFL single file (flux1-kontext-dev...)
        reader = bfl_format.BflReader(path)
        d = bfl_format.config_from_bfl(reader, axes_dims_rope=cfg_overrides.pop("axes_dims_rope", None))
        cfg = FluxTransformerConfig.from_diffusers(d, dtype=dtype, param_dtype=dtype, **cfg_overrides)
    else:
        if os.path.isdir(os.path.join(path, "transformer")) and not os.path.isfile(os.path.join(path, "config.json")):
            path = os.path.join(path, "transformer")
        cfg = FluxTransformerConfig.from_diffusers(read_config(path), dtype=dtype, param_dtype=dtype, **cfg_overrides)
        reader = SafetensorsReader(path, prefix=WEIGHTS_NAME)
    check_tensors(expected_tensors(cfg), reader.shapes(), source=path)
    shardings = tr.param_shardings(cfg, mesh, rules) if mesh is not None else None
    params: dict = {}

    def place(path, host):
        if shardings is None:
            return jnp.asarray(host)
        return jax.make_array_from_callback(host.shape, _get(shardings, path), lambda idx: host[idx])

    for leaf_path, _, names in _leaf_plan(cfg):
        parts = [reader.get(name).T if kind == "kernel" else reader.get(name) for name, kind in names]
        host = _to_dtype(np.stack(parts) if leaf_path[0] in STACKED_BLOCKS else parts[0], dtype)
        if leaf_path[0] in STACKED_BLOCKS and not cfg.scan_layers:   # per-layer inference layout
            for i in range(host.shape[0]):
                path_i = (leaf_path[0], layer_layout.layer_name(i)) + leaf_path[1:]
                _set(params, path_i, place(path_i, host[i]))
        else:
            _set(params, leaf_path, place(leaf_path, host))
    return cfg, params


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def to_diffusers_state_dict(cfg: FluxTransformerConfig, params: dict, dtype=None) -> dict[str, np.ndarray]:
    """Our params -> {diffusers name: numpy array} (kernels transposed, stacked blocks split per layer).
    Params in the per-layer layout (cfg.scan_layers=False) are stacked on the host first."""
    if not cfg.scan_layers:
        params = layer_layout.stack_layers(jax.tree.map(_host, params), tr.BLOCK_KEYS)
    plan = {p: names for p, _, names in _leaf_plan(cfg)}
    out = {}
    for path, value in _flatten(params):
        if path not in plan:
            raise CheckpointError(f"save_transformer: unexpected param {'/'.join(path)} for this config")
        arr = _host(value)
        if dtype is not None:
            arr = arr.astype(jnp.dtype(dtype))
        names = plan[path]
        stacked = path[0] in STACKED_BLOCKS
        for i, (name, kind) in enumerate(names):
            a = arr[i] if stacked else arr
            out[name] = np.ascontiguousarray(a.T if kind == "kernel" else a)
    missing = set(expected_tensors(cfg)) - set(out)
    if missing:
        raise CheckpointError(f"save_transformer: params lack {sorted(missing)}")
    return out


def save_transformer_bfl(tcfg: FluxTransformerConfig, tparams: dict, path: str, dtype=None) -> str:
    """Write one Black Forest Labs single-file checkpoint (``path`` ends in .safetensors; BFL key names, fused qkv)
    that BFL's reference code, ComfyUI and `load_transformer(path)` read. Complete or absent, never half-written."""
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_transformer_bfl: {path!r} must end in .safetensors")
    state = bfl_format.to_bfl_state_dict(to_diffusers_state_dict(tcfg, tparams, dtype), tcfg.inner_dim)
    if jax.process_index() != 0:
        return path
    out_dir = os.path.dirname(os.path.abspath(path))
    write_safetensors(state, out_dir, basename=os.path.basename(path)[:-len(".safetensors")],
                      max_shard_bytes=2**62)
    return path


def save_transformer(tcfg: FluxTransformerConfig, tparams: dict, out_dir: str, dtype=None,
                     max_shard_bytes: int = 10 * 2**30) -> list[str]:
    """Write `config.json` + `diffusion_pytorch_model*.safetensors` (sharded with an index above max_shard_bytes)
    so `FluxTransformer2DModel.from_pretrained(out_dir)` loads it. dtype: cast on save (default: as stored).
    On multi-host runs every process gathers, only process 0 writes."""
    state = to_diffusers_state_dict(tcfg, tparams, dtype)
    if jax.process_index() != 0:
        return []
    return write_safetensors(state, out_dir, basename=WEIGHTS_NAME, max_shard_bytes=max_shard_bytes,
                             extra_files={"config.json": json.dumps(tcfg.to_diffusers(), indent=2) + "\n"})

