"""Mesh shapes, logical rules -> PartitionSpec, sharding a Linen model on 2x2x2, sharded matmul == unsharded."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from edit_r1_jax import parallel


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("axes,expected", [
    ((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)), ((1, 1, -1), (1, 1, 8)), ((1, 8, 1), (1, 8, 1)),
])
def test_mesh_shapes_fill(axes, expected):
    mesh = parallel.make_mesh(dict(zip(("data", "fsdp", "tensor"), axes)))
    assert tuple(mesh.shape.values()) == expected
    assert mesh.axis_names == ("data", "fsdp", "tensor")


def test_mesh_errors():
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        parallel.resolve_mesh_shape(-1, -1, 1, 8)
    with pytest.raises(ValueError, match="must be positive or -1"):
        parallel.resolve_mesh_shape(0, 1, 8, 8)


def test_mesh_axes_are_auto():
    mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
    # with_sharding_constraint only works on Auto axes (env-notes G4)
    f = jax.jit(lambda x: jax.lax.with_sharding_constraint(x * 2, NamedSharding(mesh, P("data"))))
    assert f(jnp.ones(8)).sharding.spec == P("data")


def test_rules_to_partition_spec():
    rules = parallel.DEFAULT_RULES
    assert parallel.logical_to_mesh_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert parallel.logical_to_mesh_spec(("batch", "length", "embed"), rules) == P(("data", "fsdp"), None, None)
    assert parallel.logical_to_mesh_spec(("vocab", "embed"), rules) == P("tensor", "fsdp")
    assert parallel.logical_to_mesh_spec(("layers", "embed", "heads", "head_dim"), rules) == P(None, "fsdp", "tensor", None)
    assert parallel.logical_to_mesh_spec(("unknown_name",), rules) == P(None)
    # a mesh axis is used at most once per spec
    assert parallel.logical_to_mesh_spec(("mlp", "heads"), rules) == P("tensor", None)


def test_fit_spec_drops_non_dividing_axes():
    mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
    assert parallel.fit_spec_to_shape(P("fsdp", "tensor"), (4, 3), mesh) == P("fsdp", None)
    assert parallel.fit_spec_to_shape(P(("data", "fsdp"), None), (2, 5), mesh) == P("data", None)


class _Annotated(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), name="up")(x)
        h = nn.with_logical_constraint(jax.nn.gelu(h), ("batch", "activation_mlp"))
        return nn.Dense(8, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")),
                        use_bias=False, name="down")(h)


def test_shard_annotated_linen_model():
    mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
    model = _Annotated()
    x = jnp.ones((8, 8))
    boxed = model.init(jax.random.key(0), x)
    logical = parallel.logical_axes_of_boxed(boxed)
    params = parallel.unbox(boxed)
    shardings = parallel.logical_shardings(logical, mesh, parallel.DEFAULT_RULES, shapes=params)
    sharded = parallel.shard_tree(params, shardings)
    p = sharded["params"]
    assert p["up"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert p["up"]["bias"].sharding.spec == P("tensor")
    assert p["down"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert p["up"]["kernel"].sharding.mesh == mesh
    # each device holds 1/4 of the up kernel (fsdp=2 x tensor=2)
    assert p["up"]["kernel"].addressable_shards[0].data.shape == (4, 8)

    def apply(params, x):
        with nn.logical_axis_rules(parallel.DEFAULT_RULES):
            return model.apply(params, x)
    with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else mesh:
        y_sharded = jax.jit(apply)(sharded, parallel.global_batch_from_local(np.ones((8, 8), np.float32), mesh))
    y_ref = model.apply(params, x)
    np.testing.assert_allclose(np.asarray(y_sharded), np.asarray(y_ref), rtol=1e-6, atol=1e-6)


def test_sharded_matmul_equals_unsharded():
    mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((32, 64)).astype(np.float32)
    b = rng.standard_normal((64, 48)).astype(np.float32)
    xs = NamedSharding(mesh, P(("data", "fsdp"), None))
    ws = NamedSharding(mesh, P("fsdp", "tensor"))
    with jax.default_matmul_precision("highest"):
        f = jax.jit(lambda x, w: x @ w, in_shardings=(xs, ws), out_shardings=NamedSharding(mesh, P(("data", "fsdp"), "tensor")))
        y = f(jax.device_put(a, xs), jax.device_put(b, ws))
        ref = jax.jit(lambda x, w: x @ w)(a, b)
    assert y.sharding.spec == P(("data", "fsdp"), "tensor")
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-5)


def test_global_batch_from_local_single_process():
    mesh = parallel.make_mesh(dict(data=4, fsdp=2, tensor=1))
    batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "y": np.arange(16)}
    g = parallel.global_batch_from_local(batch, mesh)
    assert g["x"].shape == (16, 3) and g["x"].sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(g["y"]), batch["y"])


def test_maybe_initialize_distributed_noop_and_errors():
    assert parallel.maybe_initialize_distributed({}) is False
    assert parallel.maybe_initialize_distributed({"EDIT_R1_COORDINATOR_ADDRESS": "127.0.0.1:1",
                                                  "EDIT_R1_NUM_PROCESSES": "1"}) is False
    with pytest.raises(ValueError, match="EDIT_R1_PROCESS_ID is not"):
        parallel.maybe_initialize_distributed({"EDIT_R1_COORDINATOR_ADDRESS": "127.0.0.1:1",
                                               "EDIT_R1_NUM_PROCESSES": "2"})
