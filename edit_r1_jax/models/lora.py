"""LoRA adapters over Dense kernels of any params tree (plain nested dicts), chosen by regex over module paths.

For a Dense kernel W [..., in, out] (leading axes = stacked layers from nn.scan) an adapter is a pair
A [..., in, r], B [..., r, out] and the adapted layer computes

    y = x W + s (x A) B + bias,        s = alpha / r,

with B = 0 at initialisation (outputs unchanged) and A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform
default). Adapters live in their own tree mirroring the params' module paths, with leaves `lora_a`, `lora_b`:

    params["transformer_blocks"]["attn"]["to_q"]["kernel"]   ->   lora["transformer_blocks"]["attn"]["to_q"]["lora_a"]

Two ways to use them, both without modifying the base tree:
  * in-layer (memory-friendly, used by the FLUX transformer): pass the tree as the Flax "lora" collection
    (`transformer_forward(..., lora=tree, lora_scale=s)`); each adapted Dense adds (x A)(s B). Only A and B get
    gradients; the base kernels are never copied.
  * merged: `apply_lora(params, lora, s)` returns a new params tree with W + s A B for the adapted kernels
    (inside jit this is a per-kernel temporary); `unmerge` subtracts it again.

`trainable_mask` / `lora_only` build the optax mask so that only adapter leaves are updated; `save_lora` /
`load_lora` write/read the adapters alone as safetensors (names `<module path>/lora_a`, with rank, alpha and
target regex in the file metadata).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax.models.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors

LORA_LEAVES = ("lora_a", "lora_b")

# FLUX.1 attention and feed-forward projections (Flow-GRPO trains Kontext with r=64 on these).
FLUX_ATTN_FF_TARGETS = (r"attn/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
                        r"|ff(_context)?/(net_0_proj|net_2)$"
                        r"|single_transformer_blocks/(proj_mlp|proj_out)$")
TARGET_PRESETS = {"flux_attn_ff": FLUX_ATTN_FF_TARGETS}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (scale = alpha / r), targets: regex searched in each kernel's '/'-joined module path, or a
    preset name from TARGET_PRESETS ("flux_attn_ff")."""
    rank: int = 64
    alpha: float = 64.0
    targets: str = FLUX_ATTN_FF_TARGETS

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be > 0, got {self.rank}")
        re.compile(self.regex)

    @property
    def regex(self) -> str:
        return TARGET_PRESETS.get(self.targets, self.targets)

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)


def _walk(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _walk(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def target_modules(params: dict, targets: str) -> list[tuple]:
    """Module paths (tuples) whose `kernel` leaf (ndim >= 2) matches `targets`; raises if none match."""
    rx = re.compile(TARGET_PRESETS.get(targets, targets))
    out = [p[:-1] for p, v in _walk(params) if p[-1] == "kernel" and np.ndim(v) >= 2 and rx.search("/".join(p[:-1]))]
    if not out:
        kernels = ["/".join(p[:-1]) for p, _ in _walk(params) if p[-1] == "kernel"]
        raise ValueError(f"LoRA targets {targets!r} match no Dense kernel; kernels are e.g. {kernels[:8]}")
    return out


def init_lora(params: dict, cfg: LoraConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """Adapter tree for every targeted kernel: lora_a [..., in, r] ~ U(+-1/sqrt(in)), lora_b [..., r, out] = 0.

    Drawn on the host with NumPy (adapters are small; no per-shape compilation)."""
    rng = np.random.default_rng(seed)
    lora: dict = {}
    for mod in target_modules(params, cfg.targets):
        shape = tuple(np.shape(_get(params, mod + ("kernel",))))
        lead, d_in, d_out = shape[:-2], shape[-2], shape[-1]
        bound = 1.0 / np.sqrt(d_in)
        a = rng.uniform(-bound, bound, lead + (d_in, cfg.rank)).astype(np.float32)
        _set(lora, mod + ("lora_a",), jnp.asarray(a, dtype))
        _set(lora, mod + ("lora_b",), jnp.zeros(lead + (cfg.rank, d_out), dtype))
    return lora


def scale_lora(lora: dict, scale: float) -> dict:
    """The "lora" collection for in-layer use: lora_b multiplied by `scale` (= alpha / r)."""
    if scale == 1.0:
        return lora
    return {k: (scale_lora(v, scale) if isinstance(v, dict) else (v * scale if k == "lora_b" else v))
            for k, v in lora.items()}


def _delta(a, b, scale, dtype):
    d = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return (scale * d).astype(dtype)


def _modules(lora: dict) -> list[tuple]:
    return [p[:-1] for p, _ in _walk(lora) if p[-1] == "lora_a"]


def adapter_modules(lora: dict) -> list[tuple[tuple, dict]]:
    """[(module path, {"lora_a": ..., "lora_b": ...})] for every adapter in the tree, in tree order."""
    return [(mod, _get(lora, mod) if mod else lora) for mod in _modules(lora)]


def apply_lora(params: dict, lora: dict, scale: float) -> dict:
    """Merged params: kernel + scale * lora_a @ lora_b for every adapted module (other leaves shared, not copied)."""
    out = _shallow_copy(params)
    for mod in _modules(lora):
        try:
            w = _get(params, mod + ("kernel",))
        except KeyError:
            raise CheckpointError(f"LoRA adapter for {'/'.join(mod)} has no kernel in params") from None
        node = lora if not mod else _get(lora, mod)
        _set(out, mod + ("kernel",), (w.astype(jnp.float32) + _delta(node["lora_a"], node["lora_b"], scale,
                                                                       jnp.float32)).astype(w.dtype))
    return out


merge = apply_lora


def unmerge(merged: dict, lora: dict, scale: float) -> dict:
    """Inverse of `merge`: kernel - scale * lora_a @ lora_b."""
    return apply_lora(merged, lora, -scale)


def _shallow_copy(tree: dict) -> dict:
    return {k: _shallow_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def trainable_mask(tree: Any) -> Any:
    """Bool tree: True exactly for adapter leaves (path ends in lora_a / lora_b). Works on any nesting (e.g. a
    {"params": base, "lora": adapters} train tree)."""
    def is_lora(path, _):
        last = path[-1]
        key = getattr(last, "key", getattr(last, "name", None))
        return key in LORA_LEAVES
    return jax.tree_util.tree_map_with_path(is_lora, tree)


def lora_only(tx, tree: Any):
    """optax transform that updates adapter leaves with `tx` and leaves every other leaf exactly unchanged."""
    import optax
    labels = jax.tree.map(lambda m: "train" if m else "frozen", trainable_mask(tree))
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def count(lora: dict) -> int:
    return int(sum(np.prod(np.shape(v)) for _, v in _walk(lora)))


def save_lora(lora: dict, cfg: LoraConfig, path: str) -> str:
    """Write the adapters alone to `path` (a directory -> `adapter_model.safetensors`, or a *.safetensors file).
    Names are '/'-joined module paths + '/lora_a' | '/lora_b'; stacked adapters stay stacked."""
    out_dir, base = (os.path.dirname(path) or ".", os.path.basename(path)[:-len(".safetensors")]) \
        if path.endswith(".safetensors") else (path, "adapter_model")
    tensors = {"/".join(p): np.asarray(jax.device_get(v)) for p, v in _walk(lora)}
    meta = {"lora_config": json.dumps(dataclasses.asdict(cfg))}
    if jax.process_index() == 0:
        write_safetensors(tensors, out_dir, basename=base, metadata=meta)
    return os.path.join(out_dir, base + ".safetensors")


def load_lora(path: str, dtype=None) -> tuple[dict, LoraConfig]:
    """Read adapters written by `save_lora` -> (lora tree, LoraConfig)."""
    fpath = os.path.join(path, "adapter_model.safetensors") if os.path.isdir(path) else path
    if not os.path.isfile(fpath):
        raise CheckpointError(f"{path}: no LoRA adapter file (expected adapter_model.safetensors)")
    reader = SafetensorsReader(fpath)
    if "lora_config" not in reader.metadata:
        raise CheckpointError(f"{fpath}: not a LoRA adapter file written by save_lora (no lora_config metadata)")
    cfg = LoraConfig(**json.loads(reader.metadata["lora_config"]))
    lora: dict = {}
    for name in reader.keys():
        parts = tuple(name.split("/"))
        if parts[-1] not in LORA_LEAVES:
            raise CheckpointError(f"{fpath}: unexpected tensor {name!r} (names end in /lora_a or /lora_b)")
        arr = np.array(reader.get(name))
        _set(lora, parts, jnp.asarray(arr if dtype is None else arr.astype(jnp.dtype(dtype))))
    for mod in _modules(lora):
        node = _get(lora, mod)
        if "lora_b" not in node or node["lora_a"].shape[-1] != cfg.rank or node["lora_b"].shape[-2] != cfg.rank:
            raise CheckpointError(f"{fpath}: adapter {'/'.join(mod)} is incomplete or not rank {cfg.rank}")
    return lora, cfg
