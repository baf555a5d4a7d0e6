"""RL roles on meshes (anchors.md 2.3, Tunix's role -> mesh design): policy, reference and reward model, each placed
by config on the whole device set or on its own sub-mesh, with optional host offload of idle weights.

``config.roles`` (every field optional)::

    roles = dict(policy=dict(devices="all"),                 # "all" | "a:b" (a slice of jax.devices())
                 reference=dict(devices="policy"),           # "policy" = colocated with the policy
                 reward=dict(devices="all", offload=False))  # offload: idle weights -> pinned host memory

and per role ``data``/``fsdp``/``tensor`` (default: the top-level ``mesh`` section, resolved on the role's devices).

Colocated roles share weights where they can: with LoRA the reference *is* the policy's base with the adapters
disabled (no copy); a reference on another sub-mesh gets its own copy of the frozen weights, and its per-step means
are computed there and sent back to the policy mesh. Every process must see the same config (roles are global).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding

from edit_r1_jax import parallel
from edit_r1_jax.train.state import cfg_get

log = logging.getLogger(__name__)

ROLE_NAMES = ("policy", "reference", "reward")


@dataclasses.dataclass
class Role:
    name: str
    mesh: Mesh
    devices: str               # the config spec, for logs
    colocated: bool            # same devices (and mesh) as the policy
    offload: bool = False

    def describe(self) -> str:
        shape = dict(self.mesh.shape)
        return f"{self.name}: devices={self.devices} mesh={shape}{' (colocated)' if self.colocated else ''}" \
               f"{' offload' if self.offload else ''}"


def _devices(spec: str, all_devices: list, role: str) -> list:
    spec = str(spec or "all").strip()
    if spec == "all":
        return all_devices
    if ":" in spec:
        lo, hi = spec.split(":", 1)
        lo = int(lo) if lo else 0
        hi = int(hi) if hi else len(all_devices)
        if not 0 <= lo < hi <= len(all_devices):
            raise ValueError(f"roles.{role}.devices={spec!r}: slice out of range for {len(all_devices)} devices")
        return all_devices[lo:hi]
    raise ValueError(f"roles.{role}.devices={spec!r}: expected 'all', 'policy' or a slice 'a:b'")


def _mesh_cfg(config: Any, rcfg: Any) -> dict:
    base = cfg_get(config, "mesh", {})
    return {k: int(cfg_get(rcfg, k, cfg_get(base, k, -1 if k == "data" else 1))) for k in ("data", "fsdp", "tensor")}


def build_roles(config: Any, devices: list | None = None) -> dict[str, Role]:
    """Meshes of the three roles from ``config.roles`` (absent = everything on the whole mesh)."""
    all_devices = list(jax.devices() if devices is None else devices)
    rc = cfg_get(config, "roles", {})
    pcfg = cfg_get(rc, "policy", {})
    pspec = str(cfg_get(pcfg, "devices", "all"))
    pdev = _devices(pspec, all_devices, "policy")
    pmesh = parallel.make_mesh(_mesh_cfg(config, pcfg), devices=pdev)
    roles = {"policy": Role("policy", pmesh, pspec, True, bool(cfg_get(pcfg, "offload", False)))}
    for name, default in (("reference", "policy"), ("reward", "all")):
        r = cfg_get(rc, name, {})
        spec = str(cfg_get(r, "devices", default))
        offload = bool(cfg_get(r, "offload", False))
        if spec == "policy":
            roles[name] = Role(name, pmesh, spec, True, offload)
            continue
        dev = _devices(spec, all_devices, name)
        mcfg = _mesh_cfg(config, r)
        same = [d.id for d in dev] == [d.id for d in pdev] and mcfg == _mesh_cfg(config, pcfg)
        roles[name] = Role(name, pmesh if same else parallel.make_mesh(mcfg, devices=dev), spec, same, offload)
    for r in roles.values():
        log.info("role %s", r.describe())
    return roles


# ----------------------------------------------------------------------------------------------------------------
# host offload of idle weights

def _with_kind(x: Any, kind: str) -> Any:
    sh = getattr(x, "sharding", None)
    if not isinstance(x, jax.Array) or sh is None:
        return x
    if getattr(sh, "memory_kind", None) == kind:
        return x
    return jax.device_put(x, sh.with_memory_kind(kind))


def offload(tree: Any) -> Any:
    """Move every array to pinned host memory (same sharding); a no-op where the backend has no such memory."""
    try:
        return jax.tree.map(lambda x: _with_kind(x, "pinned_host"), tree)
    except (ValueError, RuntimeError, NotImplementedError) as e:   # backend without host memory kinds
        log.warning("offload to host memory unavailable (%s); keeping weights on device", e)
        return tree


def onload(tree: Any) -> Any:
    """Bring offloaded arrays back to device memory."""
    return jax.tree.map(lambda x: _with_kind(x, "device"), tree)


def place_like(tree: Any, mesh: Mesh, shardings_fn) -> Any:
    """Copy ``tree`` onto ``mesh`` with the shardings ``shardings_fn(mesh)`` (cross-mesh transfer by device_put)."""
    return jax.device_put(tree, shardings_fn(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    from jax.sharding import PartitionSpec as P
    return NamedSharding(mesh, P())
