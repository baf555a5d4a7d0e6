"""FLUX.1 transformer weights in Black Forest Labs' single-file layout (``flux1-kontext-dev.safetensors``, also
with ComfyUI's ``model.diffusion_model.`` prefix) <-> the diffusers tensor names our loader and saver use.

The BFL layout (the reference ``flux`` repository's ``Flux`` model) differs from diffusers' in names and in fusion:

    double_blocks.{i}.img_attn.qkv      rows [q; k; v]              -> attn.to_q / to_k / to_v
    double_blocks.{i}.txt_attn.qkv      rows [q; k; v]              -> attn.add_q_proj / add_k_proj / add_v_proj
    single_blocks.{i}.linear1           rows [q; k; v; mlp]         -> attn.to_q / to_k / to_v, proj_mlp
    final_layer.adaLN_modulation.1      rows [shift; scale]         -> norm_out.linear rows [scale; shift]

and the rest is renaming (`_RENAMES`). `BflReader` presents a BFL file under diffusers names, lazily (row slices of
the memory-mapped tensors), so `convert.load_transformer` reads it like a diffusers folder; `config_from_bfl` infers
the transformer config from the tensor shapes; `to_bfl_state_dict` is the inverse mapping for saving.
"""
from __future__ import annotations

import logging
import re
from typing import Mapping

import numpy as np

from edit_r1_jax.models.safetensors_io import CheckpointError, SafetensorsReader

log = logging.getLogger(__name__)

COMFY_PREFIX = "model.diffusion_model."      # ComfyUI checkpoints (an all-in-one file also holds VAE / encoders)

# BFL name (with {i} for the block index) -> diffusers name; '.weight'/'.bias'/'.scale' suffixes handled below
_EMBED = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
          "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
          "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
          "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
          "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
          "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
          "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}
_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
           "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
           "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
           "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
           "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
           "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
_SINGLE = {"modulation.lin": "norm.linear", "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k",
           "linear2": "proj_out"}
_FUSED = {"double_blocks.{i}.img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "double_blocks.{i}.txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "single_blocks.{i}.linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_SWAPPED = "final_layer.adaLN_modulation.1"      # -> norm_out.linear, halves swapped
_BLOCK_RE = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_DIFFUSERS_BLOCK = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def _split_suffix(name: str) -> tuple[str, str]:
    stem, _, suffix = name.rpartition(".")
    return stem, suffix


def _diffusers_suffix(suffix: str) -> str:
    return "weight" if suffix == "scale" else suffix      # RMSNorm scale -> weight


def _plan(names, inner: int) -> tuple[dict[str, tuple[str, slice | None, bool]], list[str]]:
    """BFL names -> ({diffusers name: (BFL name, row slice or None, swap halves)}, unrecognised BFL names)."""
    plan, unknown = {}, []
    for name in names:
        stem, suffix = _split_suffix(name)
        dsuf = _diffusers_suffix(suffix)
        m = _BLOCK_RE.match(stem)
        if m:
            kind, i, rest = m.groups()
            head = f"{_DIFFUSERS_BLOCK[kind]}.{i}."
            fused = _FUSED.get(f"{kind}.{{i}}.{rest}")
            table = _DOUBLE if kind == "double_blocks" else _SINGLE
            if fused:
                for j, target in enumerate(fused):
                    rows = slice(j * inner, (j + 1) * inner) if j < 3 else slice(3 * inner, None)
                    plan[f"{head}{target}.{dsuf}"] = (name, rows, False)
            elif rest in table:
                plan[f"{head}{table[rest]}.{dsuf}"] = (name, None, False)
            else:
                unknown.append(name)
        elif stem in _EMBED:
            plan[f"{_EMBED[stem]}.{dsuf}"] = (name, None, False)
        elif stem == _SWAPPED:
            plan[f"norm_out.linear.{dsuf}"] = (name, None, True)
        else:
            unknown.append(name)
    return plan, unknown


def _swap_halves(arr: np.ndarray) -> np.ndarray:
    half = arr.shape[0] // 2
    return np.concatenate([arr[half:], arr[:half]], axis=0)


class BflReader:
    """A BFL single-file FLUX transformer under diffusers tensor names, with `SafetensorsReader`'s interface (keys,
    shape, shapes, get, dtype). Reads lazily: fused tensors are row slices of the memory-mapped file."""

    def __init__(self, path: str):
        self.path = path
        self._src = SafetensorsReader(path)
        keys = self._src.keys()
        comfy = [k for k in keys if k.startswith(COMFY_PREFIX)]
        self.prefix = COMFY_PREFIX if comfy else ""
        self._bfl = {k[len(self.prefix):]: k for k in (comfy or keys)}
        if comfy and len(comfy) < len(keys):        # a ComfyUI all-in-one file: VAE / text encoders beside it
            log.info("%s: reading the %d model.diffusion_model.* tensors; %d tensors of other components ignored",
                     path, len(comfy), len(keys) - len(comfy))
        if "img_in.weight" not in self._bfl:
            raise CheckpointError(f"{path}: not a BFL FLUX transformer file (no img_in.weight; keys e.g. "
                                  f"{sorted(self._bfl)[:5]})")
        self.inner_dim = int(self._src.shape(self._bfl["img_in.weight"])[0])
        self._plan, unknown = _plan(self._bfl, self.inner_dim)
        if unknown:
            raise CheckpointError(f"{path}: {len(unknown)} tensor(s) that are not part of a BFL FLUX transformer: "
                                  f"{sorted(unknown)[:20]}")

    def keys(self) -> list[str]:
        return list(self._plan)

    def __contains__(self, name: str) -> bool:
        return name in self._plan

    def bfl_shape(self, bfl_name: str) -> tuple[int, ...]:
        return self._src.shape(self._bfl[bfl_name])

    def shape(self, name: str) -> tuple[int, ...]:
        src, rows, _ = self._plan[name]
        shape = self.bfl_shape(src)
        if rows is None:
            return shape
        return (len(range(*rows.indices(shape[0]))),) + tuple(shape[1:])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self._plan}

    def dtype(self, name: str) -> np.dtype:
        return self._src.dtype(self._bfl[self._plan[name][0]])

    def get(self, name: str) -> np.ndarray:
        src, rows, swap = self._plan[name]
        arr = self._src.get(self._bfl[src])
        if rows is not None:
            arr = arr[rows]
        return _swap_halves(arr) if swap else arr


def config_from_bfl(reader: BflReader, axes_dims_rope=None) -> dict:
    """diffusers-style FluxTransformer2DModel config inferred from a BFL file's shapes. ``axes_dims_rope`` cannot be
    read from weights: FLUX.1's (16, 56, 56) when the head dim is 128, else it must be passed."""
    n_double = 1 + max([-1] + [int(m.group(2)) for k in reader._bfl if (m := _BLOCK_RE.match(k))
                               and m.group(1) == "double_blocks"])
    n_single = 1 + max([-1] + [int(m.group(2)) for k in reader._bfl if (m := _BLOCK_RE.match(k))
                               and m.group(1) == "single_blocks"])
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if n_double else "single_blocks.0.norm.query_norm.scale"
    head_dim = int(reader.bfl_shape(norm)[0])
    cfg = {"_class_name": "FluxTransformer2DModel", "patch_size": 1,
           "in_channels": int(reader.bfl_shape("img_in.weight")[1]),
           "out_channels": int(reader.bfl_shape("final_layer.linear.weight")[0]),
           "num_layers": n_double, "num_single_layers": n_single, "attention_head_dim": head_dim,
           "num_attention_heads": reader.inner_dim // head_dim,
           "joint_attention_dim": int(reader.bfl_shape("txt_in.weight")[1]),
           "pooled_projection_dim": int(reader.bfl_shape("vector_in.in_layer.weight")[1]),
           "guidance_embeds": "guidance_in.in_layer.weight" in reader._bfl}
    if axes_dims_rope is not None:
        cfg["axes_dims_rope"] = list(axes_dims_rope)
    elif head_dim == 128:
        cfg["axes_dims_rope"] = [16, 56, 56]
    else:
        raise CheckpointError(f"{reader.path}: head dim {head_dim} is not FLUX.1's 128; pass axes_dims_rope "
                              "(it is not stored in the weights)")
    if cfg["out_channels"] == cfg["in_channels"]:
        cfg["out_channels"] = None
    return cfg


def _bfl_names(state_names) -> list[str]:
    """Every BFL tensor name a transformer with the blocks present in ``state_names`` (diffusers names) can have."""
    blocks = {kind: {m.group(1) for n in state_names if (m := re.match(rf"^{dkind}\.(\d+)\.", n))}
              for kind, dkind in _DIFFUSERS_BLOCK.items()}
    stems = list(_EMBED) + [_SWAPPED]
    for kind, table in (("double_blocks", _DOUBLE), ("single_blocks", _SINGLE)):
        rests = list(table) + [f[len(kind) + 5:] for f in _FUSED if f.startswith(kind)]   # drop "{kind}.{i}."
        stems += [f"{kind}.{i}.{rest}" for i in sorted(blocks[kind]) for rest in rests]
    return [f"{stem}.{suf}" for stem in stems
            for suf in (("scale",) if stem.endswith("_norm") else ("weight", "bias"))]


def to_bfl_state_dict(state: Mapping[str, np.ndarray], inner_dim: int) -> dict[str, np.ndarray]:
    """A diffusers-named FLUX transformer state dict -> BFL names (fused tensors concatenated, the final
    modulation's halves swapped back): the inverse of `BflReader`'s plan. Raises naming any diffusers tensor the BFL
    layout has no place for, and any missing piece of a fused BFL tensor."""
    plan, _ = _plan(_bfl_names(state), inner_dim)
    touched = {bname for dname, (bname, _, _) in plan.items() if dname in state}
    plan = {dname: p for dname, p in plan.items() if p[0] in touched}      # every piece of each BFL tensor used
    unplaced, lacking = sorted(set(state) - set(plan)), sorted(set(plan) - set(state))
    if unplaced or lacking:
        raise CheckpointError(f"to_bfl_state_dict: no BFL tensor for {unplaced[:20]}; the fused BFL tensors also "
                              f"need {lacking[:20]}")
    parts: dict[str, list[tuple[int, np.ndarray]]] = {}
    out = {}
    for dname, (bname, rows, swap) in plan.items():
        arr = np.asarray(state[dname])
        if rows is not None:
            parts.setdefault(bname, []).append((rows.start, arr))
        else:
            out[bname] = _swap_halves(arr) if swap else arr
    for bname, pieces in parts.items():
        out[bname] = np.concatenate([a for _, a in sorted(pieces, key=lambda p: p[0])], axis=0)
    return out
