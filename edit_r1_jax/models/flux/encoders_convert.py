"""PyTorch checkpoint <-> Flax params conversion shared by the FLUX VAE and the two text encoders.

A model describes its checkpoint as a list of ``TensorMap`` entries: one Flax leaf (a path into the nested-dict
params) and the PyTorch tensor name(s) it comes from. A leaf of a layer stack built with ``nn.scan`` has a leading
layer axis and lists one PyTorch name per layer. Layouts (models.md §0):

  Flax ``kernel`` [in, out]           <- torch Linear ``weight`` [out, in]        (transpose)
  Flax ``kernel`` [kh, kw, in, out]   <- torch Conv2d ``weight`` [out, in, kh, kw] (transpose 2,3,1,0)
  Flax ``scale`` / ``bias`` / ``embedding``  <- torch ``weight`` / ``bias`` / ``weight`` (unchanged)

Loading reads every tensor lazily (memory-mapped safetensors), converts it on the host, casts it to the requested
dtype and places it straight onto its ``NamedSharding`` when a mesh is given, so a checkpoint is never held twice.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax import parallel
from edit_r1_jax.models.safetensors_io import CheckpointError, SafetensorsReader, check_tensors, write_safetensors

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One Flax leaf and its PyTorch source tensor(s); ``stacked``: leading layer axis, one name per layer."""
    flax_path: Path
    torch_names: tuple[str, ...]
    stacked: bool = False


# ----------------------------------------------------------------------------------------------- tree helpers
def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    out: dict[Path, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def map_with_path(fn: Callable[[Path, Any], Any], tree: Mapping[str, Any]) -> dict[str, Any]:
    return unflatten({p: fn(p, v) for p, v in flatten(tree).items()})


# ----------------------------------------------------------------------------------------------- layouts
def torch_to_flax(leaf: str, w: np.ndarray) -> np.ndarray:
    """One PyTorch tensor -> the Flax layout of a leaf named ``leaf``."""
    if leaf == "kernel":
        if w.ndim == 2:
            return w.T
        if w.ndim == 4:
            return w.transpose(2, 3, 1, 0)
        raise CheckpointError(f"kernel with {w.ndim} dims has no known layout")
    return w


def flax_to_torch(leaf: str, w: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if w.ndim == 2:
            return w.T
        if w.ndim == 4:
            return w.transpose(3, 2, 0, 1)
        raise CheckpointError(f"kernel with {w.ndim} dims has no known layout")
    return w


def torch_shape(leaf: str, flax_shape: Sequence[int]) -> tuple[int, ...]:
    s = tuple(flax_shape)
    if leaf == "kernel":
        if len(s) == 2:
            return (s[1], s[0])
        if len(s) == 4:
            return (s[3], s[2], s[0], s[1])
    return s


def expected_torch_shapes(maps: Iterable[TensorMap], flax_shapes: Mapping[Path, Sequence[int]]) -> dict[str, tuple]:
    out = {}
    for m in maps:
        shape = tuple(flax_shapes[m.flax_path])
        per_layer = shape[1:] if m.stacked else shape
        for name in m.torch_names:
            out[name] = torch_shape(m.flax_path[-1], per_layer)
    return out


# ----------------------------------------------------------------------------------------------- folders
def resolve_folder(path: str, subfolder: str) -> str:
    """``path`` itself when it holds config.json, else ``path/subfolder`` (a diffusers pipeline directory)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    sub = os.path.join(path, subfolder)
    if os.path.isfile(os.path.join(sub, "config.json")):
        return sub
    raise FileNotFoundError(f"{path}: no config.json here or in {subfolder}/ (expected a diffusers/transformers "
                            f"model folder or a pipeline directory)")


def read_json(folder: str, name: str = "config.json") -> dict:
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def open_reader(folder: str, basename: str) -> SafetensorsReader:
    """Reader over ``basename*.safetensors`` (falls back to every *.safetensors file in the folder)."""
    try:
        return SafetensorsReader(folder, prefix=basename)
    except CheckpointError:
        return SafetensorsReader(folder)


# ----------------------------------------------------------------------------------------------- load / save
def _place(host: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def load_mapped(reader: SafetensorsReader, maps: Sequence[TensorMap], shapes: Mapping[Path, Any], source: str,
                shardings: Mapping[Path, Any] | None = None,
                rename: Callable[[str], str] | None = None, ignore: Iterable[str] = (),
                aliases: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read, check, convert, cast and place every mapped tensor; returns the nested params dict.

    ``shapes``: flat {flax path: ShapeDtypeStruct} giving each leaf's shape and target dtype.
    ``rename``: checkpoint name -> canonical name (e.g. strip a legacy prefix). ``aliases``: canonical name ->
    alternative checkpoint name used when the canonical one is absent (e.g. T5 ``encoder.embed_tokens.weight``).
    ``ignore``: checkpoint names (after rename) that may be present without being used (buffers, tied copies).
    Raises one ``CheckpointError`` listing every missing, unexpected and mis-shaped tensor.
    """
    rename = rename or (lambda n: n)
    by_name = {rename(k): k for k in reader.keys()}
    for canon, alt in (aliases or {}).items():
        if canon not in by_name and alt in by_name:
            by_name[canon] = by_name.pop(alt)
    actual = {k: reader.shape(v) for k, v in by_name.items()}
    expected = expected_torch_shapes(maps, {p: s.shape for p, s in shapes.items()})
    check_tensors(expected, actual, source, ignore=set(ignore) | set((aliases or {}).values()))
    flat = {}
    for m in maps:
        leaf = m.flax_path[-1]
        np_dtype = np.dtype(shapes[m.flax_path].dtype)
        host = np.empty(tuple(shapes[m.flax_path].shape), np_dtype)   # filled layer by layer: one host copy
        for i, n in enumerate(m.torch_names):
            w = torch_to_flax(leaf, np.asarray(reader.get(by_name[n])))
            if m.stacked:
                host[i] = w
            else:
                host[...] = w
        flat[m.flax_path] = _place(host, None if shardings is None else shardings[m.flax_path])
    return unflatten(flat)


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def export_mapped(params: Mapping[str, Any], maps: Sequence[TensorMap]) -> dict[str, np.ndarray]:
    """Flax params -> {torch name: numpy array in PyTorch layout} (stacked leaves are split per layer)."""
    flat = flatten(params)
    out = {}
    for m in maps:
        if m.flax_path not in flat:
            raise CheckpointError(f"params have no leaf {'/'.join(m.flax_path)} (needed for {m.torch_names[0]})")
        w = _to_host(flat[m.flax_path])
        leaf = m.flax_path[-1]
        if m.stacked:
            for i, name in enumerate(m.torch_names):
                out[name] = np.ascontiguousarray(flax_to_torch(leaf, w[i]))
        else:
            out[m.torch_names[0]] = np.ascontiguousarray(flax_to_torch(leaf, w))
    return out


def save_mapped(params: Mapping[str, Any], maps: Sequence[TensorMap], out_dir: str, basename: str,
                config: Mapping[str, Any], max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write the mapped tensors + config.json (process 0 only on multi-host; the gather runs everywhere)."""
    tensors = export_mapped(params, maps)
    if jax.process_index() != 0:
        return []
    return write_safetensors(tensors, out_dir, basename=basename, max_shard_bytes=max_shard_bytes,
                             extra_files={"config.json": json.dumps(dict(config), indent=2, sort_keys=True) + "\n"})


def shardings_for(logical_axes: Mapping[str, Any], shapes: Mapping[str, Any], mesh, rules=None) -> dict[Path, Any]:
    """Flat {path: NamedSharding} from a logical-axes tree and a matching tree of shapes (ShapeDtypeStructs)."""
    rules = parallel.DEFAULT_RULES if rules is None else rules
    flat_axes = flatten(logical_axes)
    flat_shapes = flatten(shapes)
    out = {}
    for p, s in flat_shapes.items():
        spec = parallel.logical_to_mesh_spec(flat_axes[p], rules)
        out[p] = jax.sharding.NamedSharding(mesh, parallel.fit_spec_to_shape(spec, s.shape, mesh))
    return out


def random_params(shapes: Mapping[str, Any], rng, embed_std: float = 0.02) -> dict[str, Any]:
    """Host-side random init for a tree of ShapeDtypeStructs (XLA-compiling random init is very slow on CPU).

    ``kernel``: N(0, 1/fan_in) with fan_in = prod(shape[:-1]) for 4-D conv kernels, shape[-2] for (stacked) dense;
    ``embedding``: N(0, embed_std^2); ``scale``: ones; ``bias``: zeros. Deterministic in ``rng`` (a JAX key).
    """
    key = rng
    if jnp.issubdtype(getattr(rng, "dtype", np.uint32), jax.dtypes.prng_key):
        key = jax.random.key_data(rng)
    gen = np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())
    flat = {}
    for p, s in sorted(flatten(shapes).items()):
        leaf, shape = p[-1], tuple(s.shape)
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1])) if len(shape) == 4 else shape[-2]
            w = gen.standard_normal(shape, np.float32) / np.sqrt(fan_in)
        elif leaf == "embedding":
            w = gen.standard_normal(shape, np.float32) * embed_std
        elif leaf == "scale":
            w = np.ones(shape, np.float32)
        else:
            w = np.zeros(shape, np.float32)
        flat[p] = jnp.asarray(w.astype(s.dtype))
    return unflatten(flat)


def count_params(params: Mapping[str, Any]) -> int:
    return int(sum(np.prod(np.shape(v)) for v in flatten(params).values()))
