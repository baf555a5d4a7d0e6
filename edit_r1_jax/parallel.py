"""Meshes, logical-axis sharding rules, host-local <-> global batches, multi-host initialisation.

The device mesh always has the three axes ``('data', 'fsdp', 'tensor')`` (MaxText's naming, reduced):
  data   - pure data parallelism (params replicated across it),
  fsdp   - data parallelism with parameters and optimizer state sharded across it (ZeRO-3 style),
  tensor - tensor (model) parallelism over heads / MLP width / vocab.
Meshes are built with ``jax.sharding.Mesh`` directly, so every axis is an *Auto* axis (env-notes G4:
``jax.make_mesh`` would default to Explicit axes and break ``with_sharding_constraint``).

Parameters and activations carry *logical* axis names (``'embed'``, ``'mlp'``, ``'heads'``, ``'vocab'``,
``'batch'``, ...) set with Flax Linen's ``nn.with_logical_partitioning`` / ``nn.with_logical_constraint``. The rules
in the config (``config.sharding.rules``) map logical names to mesh axes; this module turns them into
``NamedSharding``s.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Default logical -> mesh rules (MaxText-style). A logical name may map to one mesh axis, a tuple of axes, or None.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("q_heads_dim", "tensor"),   # fused (heads*head_dim) projections
    ("kv_heads_dim", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("length", None),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("norm", None),
)

# Environment variables read by maybe_initialize_distributed() (set by launchers/local_multiprocess.sh and
# launchers/gke/jobset.yaml). On Cloud TPU VMs none are needed: jax.distributed.initialize() discovers peers.
ENV_COORDINATOR = "EDIT_R1_COORDINATOR_ADDRESS"   # host:port of process 0
ENV_NUM_PROCESSES = "EDIT_R1_NUM_PROCESSES"
ENV_PROCESS_ID = "EDIT_R1_PROCESS_ID"
ENV_LOCAL_DEVICES = "EDIT_R1_LOCAL_DEVICE_COUNT"   # fake CPU devices per process (tests, local simulation)
ENV_TPU_AUTO = "EDIT_R1_TPU_MULTIHOST"            # "1": call jax.distributed.initialize() with TPU auto-discovery


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Mesh shape with at most one axis equal to -1 (filled so the product is ``num_devices``)."""
    shape = [int(data), int(fsdp), int(tensor)]
    fill = [i for i, s in enumerate(shape) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh: at most one axis may be -1 (fill), got data={data} fsdp={fsdp} tensor={tensor}")
    for name, s in zip(MESH_AXES, shape):
        if s == 0 or s < -1:
            raise ValueError(f"mesh.{name}={s}: mesh axis sizes must be positive or -1 (fill the remaining devices)")
    known = int(np.prod([s for s in shape if s != -1]))
    if fill:
        if num_devices % known:
            raise ValueError(
                f"mesh: cannot fill axis '{MESH_AXES[fill[0]]}': {num_devices} devices are not divisible by the "
                f"product of the other axes ({known}). Fix: choose axis sizes that divide {num_devices}.")
        shape[fill[0]] = num_devices // known
    prod = int(np.prod(shape))
    if prod != num_devices:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {shape[0]}*{shape[1]}*{shape[2]} = {prod} but there are {num_devices} devices. "
            f"Fix: make the product equal {num_devices}, or set one axis to -1 to fill, e.g. --set mesh.data=-1")
    return tuple(shape)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a ('data','fsdp','tensor') Mesh (Auto axes) from a config with fields data/fsdp/tensor."""
    devices = list(jax.devices() if devices is None else devices)
    get = (lambda k, d: mesh_cfg.get(k, d)) if mesh_cfg is not None else (lambda k, d: d)
    shape = resolve_mesh_shape(get("data", -1), get("fsdp", 1), get("tensor", 1), len(devices))
    try:  # topology-aware ordering on real TPU slices; plain reshape elsewhere
        from jax.experimental import mesh_utils
        dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - fake CPU devices / unusual topologies
        dev_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(dev_array, MESH_AXES)


def rules_from_config(config: Any) -> tuple[tuple[str, Any], ...]:
    """Logical-axis rules as a tuple of (logical_name, mesh_axes) from ``config.sharding.rules`` (or defaults)."""
    rules = None
    try:
        rules = config.sharding.rules
    except (AttributeError, KeyError):
        pass
    if rules is None:
        return DEFAULT_RULES
    return tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in rules)


def logical_to_mesh_spec(logical: Sequence[str | None] | P | None, rules: Iterable[tuple[str, Any]]) -> P:
    """Map a tuple of logical axis names to a mesh PartitionSpec; unknown names map to None (replicated).

    A mesh axis is used at most once per spec (later dims that would reuse it are replicated).
    """
    if logical is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical:
        axes = table.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if a not in used)
        used.update(axes_t)
        out.append(None if not axes_t else (axes_t[0] if len(axes_t) == 1 else axes_t))
    return P(*out)


def fit_spec_to_shape(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drop mesh axes from dims they do not divide (replicate that dim instead), e.g. 2 kv-heads on tensor=4."""
    out = []
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        kept: list[str] = []
        size = 1
        for a in axes_t:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return P(*out)


def _is_leaf_spec(x: Any) -> bool:
    return x is None or isinstance(x, P) or (isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x))


def logical_shardings(logical_tree: Any, mesh: Mesh, rules: Iterable[tuple[str, Any]],
                      shapes: Any = None) -> Any:
    """Tree of logical axis tuples (or logical PartitionSpecs) -> tree of NamedSharding.

    ``shapes``: optional matching tree of arrays / ShapeDtypeStructs; when given, axes that do not divide a dim are
    dropped for that dim (see ``fit_spec_to_shape``).
    """
    rules = tuple(rules)
    if shapes is None:
        return jax.tree.map(lambda l: NamedSharding(mesh, logical_to_mesh_spec(l, rules)), logical_tree,
                            is_leaf=_is_leaf_spec)
    return jax.tree.map(
        lambda l, s: NamedSharding(mesh, fit_spec_to_shape(logical_to_mesh_spec(l, rules), s.shape, mesh)),
        logical_tree, shapes, is_leaf=_is_leaf_spec)


def logical_axes_of_boxed(boxed_params: Any) -> Any:
    """Flax-boxed params (``nn.LogicallyPartitioned`` from ``with_logical_partitioning``) -> tree of logical specs."""
    import flax.linen as nn
    return nn.get_partition_spec(boxed_params)


def unbox(boxed_params: Any) -> Any:
    import flax.linen as nn
    return nn.meta.unbox(boxed_params)


def shard_tree(tree: Any, shardings: Any) -> Any:
    """Place every leaf on its NamedSharding (host arrays are split, not broadcast)."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dim over ('data','fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def global_batch_from_local(local_batch: Any, mesh: Mesh) -> Any:
    """Host-local numpy batch (this process's rows) -> global jax.Array sharded on ('data','fsdp').

    On one process the local batch *is* the global batch. On N processes each passes its 1/N slice.
    """
    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
    return jax.tree.map(one, local_batch)


def maybe_initialize_distributed(env: dict[str, str] | None = None) -> bool:
    """Initialise multi-controller JAX when the launcher's environment says so; no-op on a single host.

    Reads ``EDIT_R1_COORDINATOR_ADDRESS``, ``EDIT_R1_NUM_PROCESSES``, ``EDIT_R1_PROCESS_ID`` (and optionally
    ``EDIT_R1_LOCAL_DEVICE_COUNT`` for fake CPU devices). ``EDIT_R1_TPU_MULTIHOST=1`` calls
    ``jax.distributed.initialize()`` without arguments (Cloud TPU auto-discovery). Returns True if initialised.
    Must run before any JAX computation.
    """
    env = dict(os.environ if env is None else env)
    if env.get(ENV_TPU_AUTO) == "1":
        jax.distributed.initialize()
        return True
    addr = env.get(ENV_COORDINATOR)
    nproc = int(env.get(ENV_NUM_PROCESSES, "1"))
    if not addr or nproc <= 1:
        return False
    if ENV_PROCESS_ID not in env:
        raise ValueError(f"{ENV_COORDINATOR} and {ENV_NUM_PROCESSES}={nproc} are set but {ENV_PROCESS_ID} is not")
    if env.get(ENV_LOCAL_DEVICES):
        jax.config.update("jax_num_cpu_devices", int(env[ENV_LOCAL_DEVICES]))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=addr, num_processes=nproc,
                               process_id=int(env[ENV_PROCESS_ID]),
                               heartbeat_timeout_seconds=int(env.get("EDIT_R1_HEARTBEAT_TIMEOUT_S", "60")))
    return True


def describe_mesh(mesh: Mesh) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return f"Mesh({shape}) over {mesh.devices.size} devices [{mesh.devices.flat[0].platform}]"
