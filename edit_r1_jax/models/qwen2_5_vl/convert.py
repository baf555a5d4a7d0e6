"""Checkpoints: transformers safetensors (Hub layout or v5 in-memory layout) <-> our params tree.

Weight layouts (models.md §0): Linear ``[out, in]`` -> kernel ``W.T`` reshaped to our (possibly head-split) shape;
Conv3d patch embed ``[O, C, kt, kh, kw]`` -> ``W.reshape(O, -1).T``; norms ``weight`` -> ``scale``. Per-layer
tensors are stacked on a leading axis (nn.scan). With a mesh, every tensor is converted on the host from the
memory-mapped file and placed straight onto its ``NamedSharding`` (each device receives only its shard).
"""
from __future__ import annotations

import json
import re
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax import parallel
from edit_r1_jax.models.safetensors_io import CheckpointError, SafetensorsReader, check_tensors, write_safetensors
from edit_r1_jax.models.qwen2_5_vl.config import Qwen25VLConfig, load_config, to_hf_dict
from edit_r1_jax.models.qwen2_5_vl.model import param_logical_axes, param_shapes

# (our path, Hub name with {i} for per-layer tensors, kind)   kind: linear | conv | vector
_VISION_BLOCK = [
    (("norm1", "scale"), "norm1.weight", "vector"), (("norm2", "scale"), "norm2.weight", "vector"),
    (("attn", "qkv", "kernel"), "attn.qkv.weight", "linear"), (("attn", "qkv", "bias"), "attn.qkv.bias", "vector"),
    (("attn", "proj", "kernel"), "attn.proj.weight", "linear"),
    (("attn", "proj", "bias"), "attn.proj.bias", "vector"),
] + [((("mlp", p, "kernel")), f"mlp.{p}.weight", "linear") for p in ("gate_proj", "up_proj", "down_proj")] \
  + [((("mlp", p, "bias")), f"mlp.{p}.bias", "vector") for p in ("gate_proj", "up_proj", "down_proj")]

_TEXT_LAYER = [
    (("input_layernorm", "scale"), "input_layernorm.weight", "vector"),
    (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", "vector"),
    (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", "linear"),
] + [(("self_attn", p, "kernel"), f"self_attn.{p}.weight", "linear") for p in ("q_proj", "k_proj", "v_proj")] \
  + [(("self_attn", p, "bias"), f"self_attn.{p}.bias", "vector") for p in ("q_proj", "k_proj", "v_proj")] \
  + [(("mlp", p, "kernel"), f"mlp.{p}.weight", "linear") for p in ("gate_proj", "up_proj", "down_proj")]


def weight_map(cfg: Qwen25VLConfig) -> list[tuple[tuple[str, ...], str, str, int | None]]:
    """[(our path, Hub name template, kind, number of stacked layers or None)]."""
    out = [(("visual", "patch_embed", "kernel"), "visual.patch_embed.proj.weight", "conv", None),
           (("visual", "merger", "ln_q", "scale"), "visual.merger.ln_q.weight", "vector", None),
           (("visual", "merger", "mlp_0", "kernel"), "visual.merger.mlp.0.weight", "linear", None),
           (("visual", "merger", "mlp_0", "bias"), "visual.merger.mlp.0.bias", "vector", None),
           (("visual", "merger", "mlp_2", "kernel"), "visual.merger.mlp.2.weight", "linear", None),
           (("visual", "merger", "mlp_2", "bias"), "visual.merger.mlp.2.bias", "vector", None),
           (("embed_tokens", "embedding"), "model.embed_tokens.weight", "vector", None),
           (("norm", "scale"), "model.norm.weight", "vector", None)]
    out += [(("visual", "blocks") + p, "visual.blocks.{i}." + n, k, cfg.vision.depth) for p, n, k in _VISION_BLOCK]
    out += [(("layers",) + p, "model.layers.{i}." + n, k, cfg.text.num_hidden_layers) for p, n, k in _TEXT_LAYER]
    if not cfg.tie_word_embeddings:
        out.append((("lm_head", "kernel"), "lm_head.weight", "linear", None))
    return out


def hf_shape(kind: str, our_shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """Torch shape of one (unstacked) tensor from our shape."""
    if kind == "vector":
        return (int(np.prod(our_shape)),) if name.endswith(".bias") else tuple(our_shape)
    if kind == "conv":
        return None  # filled by caller (needs the vision config)
    # linear: our kernel [in..., out...]; torch [out, in]
    if name.endswith("qkv.weight"):
        return (int(np.prod(our_shape[1:])), our_shape[0])
    if name.endswith("o_proj.weight") or name.endswith("attn.proj.weight"):
        return (our_shape[-1], int(np.prod(our_shape[:-1])))
    return (int(np.prod(our_shape[1:])), our_shape[0])


def to_ours(kind: str, w: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
    if kind == "vector":
        return w.reshape(our_shape)
    if kind == "conv":
        return w.reshape(w.shape[0], -1).T
    return w.T.reshape(our_shape)


def to_torch(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "vector":
        return w.reshape(shape)
    if kind == "conv":
        return w.T.reshape(shape)
    return w.reshape(shape[1], shape[0]).T


def normalize_name(name: str) -> str:
    """transformers 5 in-memory names -> Hub names (conversion_mapping for Qwen2/2.5-VL, reversed)."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def expected_tensors(cfg: Qwen25VLConfig) -> Iterator[tuple[tuple[str, ...], str, str, int | None, tuple, tuple]]:
    """Yield (path, name template, kind, layers, our full shape, torch shape of one tensor)."""
    shapes = param_shapes(cfg)
    v = cfg.vision
    for path, name, kind, n in weight_map(cfg):
        our = tuple(_get(shapes, path).shape)
        one = our[1:] if n else our
        ts = ((v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size) if kind == "conv"
              else hf_shape(kind, one, name))
        yield path, name, kind, n, our, ts


def load_pretrained(path: str, dtype=jnp.float32, mesh=None, rules=None, **runtime):
    """HF Qwen2.5-VL directory -> (cfg, params). ``mesh``: place each tensor on its NamedSharding from
    ``param_logical_axes(cfg)`` and ``rules`` (default ``parallel.DEFAULT_RULES``). ``runtime`` sets config runtime
    options (attention_backend, remat_policy)."""
    cfg = load_config(path, **runtime)
    reader = SafetensorsReader(path)
    by_name = {}
    for k in reader.keys():
        nk = normalize_name(k)
        if nk in by_name:
            raise CheckpointError(f"{path}: tensor {nk} is stored twice (as {by_name[nk]} and {k})")
        by_name[nk] = k
    entries = list(expected_tensors(cfg))
    expected = {}
    for path_, name, kind, n, our, ts in entries:
        for i in range(n or 1):
            expected[name.format(i=i)] = ts
    actual = {nk: reader.shape(k) for nk, k in by_name.items()}
    ignore = ["lm_head.weight"] if cfg.tie_word_embeddings else []
    check_tensors(expected, actual, path, ignore=ignore)

    shardings = None
    if mesh is not None:
        rules = parallel.DEFAULT_RULES if rules is None else rules
        shardings = parallel.logical_shardings(param_logical_axes(cfg), mesh, rules, shapes=param_shapes(cfg))
    np_dtype = jnp.dtype(dtype)
    params: dict = {}
    for path_, name, kind, n, our, ts in entries:
        if n:
            host = np.empty(our, np_dtype)
            for i in range(n):
                host[i] = to_ours(kind, np.asarray(reader.get(by_name[name.format(i=i)])), our[1:]).astype(np_dtype)
        else:
            host = to_ours(kind, np.asarray(reader.get(by_name[name])), our).astype(np_dtype)
        if shardings is None:
            arr = jnp.asarray(host)
        else:
            sh = _get(shardings, path_)
            arr = jax.make_array_from_callback(our, sh, lambda idx, h=host: h[idx])
        _set(params, path_, arr)
        del host
    return cfg, params


def to_torch_state(cfg: Qwen25VLConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Hub name, NumPy tensor in torch layout) for every weight."""
    for path_, name, kind, n, our, ts in expected_tensors(cfg):
        leaf = _get(params, path_)
        if tuple(leaf.shape) != our:
            raise CheckpointError(f"param {'/'.join(path_)}: expected shape {our}, got {tuple(leaf.shape)}")
        arr = np.asarray(jax.device_get(leaf))
        if n:
            for i in range(n):
                yield name.format(i=i), np.ascontiguousarray(to_torch(kind, arr[i], ts))
        else:
            yield name, np.ascontiguousarray(to_torch(kind, arr, ts))


def save_pretrained(cfg: Qwen25VLConfig, params: dict, out_dir: str, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write Hub-layout safetensors (sharded with an index above ``max_shard_bytes``) + a v5 ``config.json``."""
    tensors = dict(to_torch_state(cfg, params))
    dt = {np.dtype(np.float32): "float32", np.dtype(jnp.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}
    torch_dtype = dt.get(next(iter(tensors.values())).dtype, "float32")
    conf = json.dumps(to_hf_dict(cfg, torch_dtype), indent=2)
    return write_safetensors(tensors, out_dir, basename="model", max_shard_bytes=max_shard_bytes,
                             extra_files={"config.json": conf})
