"""FLUX transformer LoRA adapters <-> diffusers / PEFT LoRA files, so adapters trained here (Flow-GRPO) load with
``pipe.load_lora_weights(dir)`` in diffusers, and adapters trained in PyTorch load here.

diffusers' file (``FluxKontextPipeline.save_lora_weights``, `loaders/lora_pipeline.FluxLoraLoaderMixin`):
``pytorch_lora_weights.safetensors`` holding, per adapted ``nn.Linear``,

    transformer.<module>.lora_A.weight   [r, in]        (PEFT ``LoraLayer.lora_A``)
    transformer.<module>.lora_B.weight   [out, r]       (PEFT ``LoraLayer.lora_B``)

and the PEFT ``LoraConfig`` (r, lora_alpha, target_modules) as JSON under the file-metadata key
``lora_adapter_metadata``, its keys prefixed ``transformer.``. PEFT computes ``y = x W^T + (alpha/r) x A^T B^T``.

Ours (`models/lora.py`): ``lora_a`` [..., in, r] = A^T and ``lora_b`` [..., r, out] = B^T under the module's path,
stacked over layers for ``nn.scan`` (leading axis), with scale alpha / r from `LoraConfig`. The module names map
through `convert.kernel_modules` (the same mapping as the transformer's own weights).
"""
from __future__ import annotations

import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax.models import layer_layout
from edit_r1_jax.models import lora as lora_lib
from edit_r1_jax.models.flux import convert
from edit_r1_jax.models.flux.config import FluxTransformerConfig
from edit_r1_jax.models.flux.transformer import BLOCK_KEYS
from edit_r1_jax.models.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors

log = logging.getLogger(__name__)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
PREFIX = "transformer."
_SUFFIX = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight"}


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)


def _stacked(lora: dict) -> dict:
    """A LoRA tree in the stacked layout (trees whose blocks are per-layer, ``layers_i``, are stacked on the host)."""
    if any(k in lora and layer_layout.is_per_layer(lora[k]) for k in BLOCK_KEYS):
        return layer_layout.stack_layers(jax.tree.map(_host, lora), BLOCK_KEYS)
    return lora


def to_diffusers_lora(tcfg: FluxTransformerConfig, lora: dict, lcfg: lora_lib.LoraConfig
                      ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Our adapter tree -> ({diffusers tensor name: array [r, in] or [out, r]}, file metadata)."""
    by_path = {(path, layer): name for name, (path, layer, _) in convert.kernel_modules(tcfg).items()}
    tensors: dict[str, np.ndarray] = {}
    unknown = []
    for path, node in lora_lib.adapter_modules(_stacked(lora)):
        a, b = _host(node["lora_a"]), _host(node["lora_b"])
        layers = range(a.shape[0]) if path[0] in convert.STACKED_BLOCKS else [None]
        for i in layers:
            name = by_path.get((path, i))
            if name is None:
                unknown.append("/".join(path) + ("" if i is None else f"[{i}]"))
                continue
            tensors[PREFIX + name + _SUFFIX["lora_A"]] = np.ascontiguousarray((a if i is None else a[i]).T)
            tensors[PREFIX + name + _SUFFIX["lora_B"]] = np.ascontiguousarray((b if i is None else b[i]).T)
    if unknown:
        raise CheckpointError(f"LoRA adapters for modules this FLUX config does not have: {unknown}")
    if not tensors:
        raise CheckpointError("to_diffusers_lora: the LoRA tree holds no adapters")
    modules = sorted({n[len(PREFIX):-len(_SUFFIX["lora_A"])] for n in tensors if n.endswith(_SUFFIX["lora_A"])})
    peft_cfg = {"r": lcfg.rank, "lora_alpha": lcfg.alpha, "target_modules": modules}
    meta = {METADATA_KEY: json.dumps({PREFIX + k: v for k, v in peft_cfg.items()}, indent=2, sort_keys=True)}
    return tensors, meta


def save_diffusers_lora(tcfg: FluxTransformerConfig, lora: dict, lcfg: lora_lib.LoraConfig, out_dir: str,
                        weight_name: str = WEIGHT_NAME) -> str:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` (fp32) that ``FluxKontextPipeline.load_lora_weights(out_dir)``
    loads. Written completely or not at all; on multi-host runs only process 0 writes."""
    tensors, meta = to_diffusers_lora(tcfg, lora, lcfg)
    base = weight_name[:-len(".safetensors")]
    if jax.process_index() == 0:
        write_safetensors(tensors, out_dir, basename=base, metadata=meta)
    return os.path.join(out_dir, weight_name)


def save_adapters(tcfg: FluxTransformerConfig, lora: dict, lcfg: lora_lib.LoraConfig, out_dir: str) -> None:
    """An export's adapters in both formats, side by side: ours (``adapter_model.safetensors``, `lora.save_lora`)
    and diffusers' (``pytorch_lora_weights.safetensors``: ``FluxKontextPipeline.load_lora_weights(out_dir)``)."""
    lora_lib.save_lora(lora, lcfg, out_dir)
    save_diffusers_lora(tcfg, lora, lcfg, out_dir)


def _peft_config(meta: dict, source: str) -> dict:
    raw = meta.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{source}: metadata {METADATA_KEY!r} is not JSON ({e})") from None
    cfg = {k[len(PREFIX):]: v for k, v in cfg.items() if k.startswith(PREFIX)} or cfg
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise CheckpointError(f"{source}: per-module {key} is not supported (one rank and alpha for all modules)")
    for key in ("use_dora", "use_rslora"):
        if cfg.get(key):
            raise CheckpointError(f"{source}: {key}=true adapters are not supported (plain LoRA only)")
    return cfg


def _module_of(key: str) -> tuple[str, str] | None:
    """'transformer.<module>.lora_A.weight' -> (<module>, 'lora_A'); None for keys of another form."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for which, suffix in _SUFFIX.items():
        if name.endswith(suffix):
            return name[:-len(suffix)], which
    return None


def from_diffusers_lora(tcfg: FluxTransformerConfig, tensors: dict[str, np.ndarray], meta: dict, source: str,
                        dtype=jnp.float32) -> tuple[dict, lora_lib.LoraConfig]:
    """diffusers / PEFT transformer LoRA tensors -> (our stacked adapter tree, LoraConfig).

    Layers of a stacked block without an adapter in the file get zero adapters (no effect). Every problem (tensors
    of another component or format, unknown modules, a missing A or B, shapes, mixed ranks) is collected and raised
    in one CheckpointError that names the tensors."""
    modules = convert.kernel_modules(tcfg)
    found: dict[str, dict[str, np.ndarray]] = {}
    problems = []
    for key, arr in tensors.items():
        parsed = _module_of(key)
        if parsed is None:
            problems.append(f"unexpected tensor {key!r} (expected transformer.<module>.lora_A/lora_B.weight)")
        elif parsed[0] not in modules:
            problems.append(f"{key!r}: no Dense named {parsed[0]!r} in this FLUX transformer")
        else:
            found.setdefault(parsed[0], {})[parsed[1]] = arr
    ranks = {}
    for name, pair in sorted(found.items()):
        d_in, d_out = modules[name][2]
        if set(pair) != {"lora_A", "lora_B"}:
            problems.append(f"{name}: has {sorted(pair)} but not both lora_A and lora_B")
            continue
        r = pair["lora_A"].shape[0]
        ranks[name] = r
        for which, want in (("lora_A", (r, d_in)), ("lora_B", (d_out, r))):
            if tuple(pair[which].shape) != want:
                problems.append(f"{PREFIX}{name}{_SUFFIX[which]}: shape {tuple(pair[which].shape)}, expected {want}")
    if len(set(ranks.values())) > 1:
        problems.append(f"mixed ranks {sorted(set(ranks.values()))} (one rank for all modules is supported): {ranks}")
    if problems:
        raise CheckpointError(f"{source}: {len(problems)} problem(s) in the LoRA file:\n  " + "\n  ".join(problems))
    if not found:
        raise CheckpointError(f"{source}: no transformer LoRA tensors found")
    peft = _peft_config(meta, source)
    rank = next(iter(ranks.values()))
    if int(peft.get("r", rank)) != rank:
        raise CheckpointError(f"{source}: metadata says r={peft['r']} but the tensors have rank {rank}")
    alpha = float(peft.get("lora_alpha", rank))        # diffusers' default without metadata: alpha = r
    # our tree: one [L, in, r] / [L, r, out] pair per stacked module path (zeros for layers the file leaves out)
    grouped: dict[tuple, dict] = {}
    for name, pair in found.items():
        path, layer, (d_in, d_out) = modules[name]
        n = getattr(tcfg, convert.STACKED_BLOCKS[path[0]]) if layer is not None else None
        entry = grouped.setdefault(path, {
            "lora_a": np.zeros(((n,) if n else ()) + (d_in, rank), np.float32),
            "lora_b": np.zeros(((n,) if n else ()) + (rank, d_out), np.float32), "layers": set()})
        idx = (layer,) if layer is not None else ()
        entry["lora_a"][idx] = np.asarray(pair["lora_A"], np.float32).T
        entry["lora_b"][idx] = np.asarray(pair["lora_B"], np.float32).T
        entry["layers"].add(layer)
    lora: dict = {}
    zero_layers = 0
    for path, entry in grouped.items():
        if path[0] in convert.STACKED_BLOCKS:
            zero_layers += getattr(tcfg, convert.STACKED_BLOCKS[path[0]]) - len(entry["layers"])
        node = lora
        for k in path:
            node = node.setdefault(k, {})
        node["lora_a"] = jnp.asarray(entry["lora_a"], dtype)
        node["lora_b"] = jnp.asarray(entry["lora_b"], dtype)
    if zero_layers:
        log.info("%s: %d (module, layer) slots of stacked blocks have no adapter in the file; zero adapters there",
                 source, zero_layers)
    targets = "|".join(sorted({r"(^|/)" + re.escape(p[0]) + r"/(layers_\d+/)?" + re.escape("/".join(p[1:])) + "$"
                               if p[0] in convert.STACKED_BLOCKS else r"(^|/)" + re.escape("/".join(p)) + "$"
                               for p in grouped}))
    return lora, lora_lib.LoraConfig(rank=rank, alpha=alpha, targets=targets)


def load_diffusers_lora(path: str, tcfg: FluxTransformerConfig, dtype=jnp.float32,
                        weight_name: str = WEIGHT_NAME) -> tuple[dict, lora_lib.LoraConfig]:
    """Read a diffusers / PEFT FLUX LoRA file (a directory holding ``pytorch_lora_weights.safetensors``, or the
    file) -> (adapter tree, LoraConfig); use it as ``transformer_forward(..., lora=lora_lib.scale_lora(tree,
    cfg.scale))`` or merge it with ``lora_lib.apply_lora``."""
    fpath = os.path.join(path, weight_name) if os.path.isdir(path) else path
    if not os.path.isfile(fpath):
        raise CheckpointError(f"{path}: no LoRA file (expected {weight_name}; pickled .bin files are not read)")
    reader = SafetensorsReader(fpath)
    tensors = {k: reader.get(k) for k in reader.keys()}
    return from_diffusers_lora(tcfg, tensors, reader.metadata, fpath, dtype)


def load_any_lora(path: str, tcfg: FluxTransformerConfig, dtype=jnp.float32) -> tuple[dict, lora_lib.LoraConfig]:
    """Our adapter file (`lora.save_lora`: ``adapter_model.safetensors``) or diffusers' LoRA file
    (``pytorch_lora_weights.safetensors``), a directory holding one of them or the file itself."""
    if os.path.isdir(path):
        ours, theirs = os.path.join(path, "adapter_model.safetensors"), os.path.join(path, WEIGHT_NAME)
        if os.path.isfile(ours):
            return lora_lib.load_lora(ours, dtype=dtype)
        if os.path.isfile(theirs):
            return load_diffusers_lora(theirs, tcfg, dtype)
        raise CheckpointError(f"{path}: holds neither adapter_model.safetensors (ours) nor {WEIGHT_NAME} (diffusers)")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such LoRA file or directory")
    if "lora_config" in SafetensorsReader(path).metadata:      # ours (save_lora) or diffusers'?
        return lora_lib.load_lora(path, dtype=dtype)
    return load_diffusers_lora(path, tcfg, dtype)
