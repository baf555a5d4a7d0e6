"""Two layouts for the params of a repeated block: one stacked array per weight (``nn.scan``) or one per layer.

    stacked   (scan_layers=True):  tree[key][...][leaf]               leaves [L, ...]   (leading 'layers' axis)
    per-layer (scan_layers=False): tree[key]["layers_{i}"][...][leaf]  leaves [...]

Training and checkpoints use the stacked layout: compile time stays flat in depth. The per-layer layout is the
inference option (MaxText calls it ``scan_layers=False``): inside a scan every iteration slices its weights out of
the stack, and XLA:CPU materialises some of those slices as copies; with one array per layer the dots read the
weights in place, at the price of one compiled body per layer. Measured on the CPU FLUX benchmark: 13 % faster
before the attention-layout fix of session 4, ~3 % (within noise) after it; on TPU, measure before switching.

The helpers convert any tree whose top-level ``keys`` hold repeated blocks (params, LoRA adapters, optimizer-free
inference state); other entries are passed through. NumPy leaves stay NumPy, jax.Arrays stay on their devices.
"""
from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

LAYER_PREFIX = "layers_"


def layer_name(i: int) -> str:
    return f"{LAYER_PREFIX}{i}"


def is_per_layer(block_tree) -> bool:
    """True when a block's subtree is in the per-layer layout (``layers_0``, ``layers_1``, ... children)."""
    return isinstance(block_tree, dict) and bool(block_tree) and all(
        isinstance(k, str) and k.startswith(LAYER_PREFIX) and k[len(LAYER_PREFIX):].isdigit() for k in block_tree)


def num_layers(block_tree) -> int:
    """Depth of a block subtree in either layout."""
    if is_per_layer(block_tree):
        return len(block_tree)
    leaves = jax.tree.leaves(block_tree)
    if not leaves:
        raise ValueError("layer_layout: empty block subtree")
    return int(np.shape(leaves[0])[0])


def split_layers(block_tree) -> list:
    """A stacked block subtree -> one subtree per layer (leaf ``a`` -> ``a[i]``), in layer order."""
    return [jax.tree.map(lambda a, i=i: a[i], block_tree) for i in range(num_layers(block_tree))]


def unstack_layers(tree: dict, keys: Iterable[str]) -> dict:
    """Stacked -> per-layer for the blocks under ``keys`` (those already per-layer or absent are left alone)."""
    out = dict(tree)
    for key in keys:
        block = tree.get(key)
        if block is None or is_per_layer(block):
            continue
        out[key] = {layer_name(i): layer for i, layer in enumerate(split_layers(block))}
    return out


def stack_layers(tree: dict, keys: Iterable[str]) -> dict:
    """Per-layer -> stacked for the blocks under ``keys`` (inverse of `unstack_layers`). Raises if the layers'
    trees or leaf shapes differ, naming the first mismatch."""
    out = dict(tree)
    for key in keys:
        block = tree.get(key)
        if block is None or not is_per_layer(block):
            continue
        names = [layer_name(i) for i in range(len(block))]
        if set(names) != set(block):
            raise ValueError(f"layer_layout: {key} has layers {sorted(block)}; expected {names[0]}..{names[-1]}")
        layers = [block[n] for n in names]
        ref = jax.tree.structure(layers[0])
        for i, t in enumerate(layers[1:], 1):
            if jax.tree.structure(t) != ref:
                raise ValueError(f"layer_layout: {key}/{layer_name(i)} has a different tree than {key}/layers_0")
        out[key] = jax.tree.map(_stack, *layers)
    return out


def _stack(*xs):
    shapes = {tuple(np.shape(x)) for x in xs}
    if len(shapes) != 1:
        raise ValueError(f"layer_layout: per-layer leaves differ in shape: {sorted(shapes)}")
    if all(isinstance(x, np.ndarray) for x in xs):
        return np.stack(xs)
    return jnp.stack(xs)
