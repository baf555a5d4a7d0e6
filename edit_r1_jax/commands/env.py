"""`edit-r1-jax env`: JAX version, backend, devices, process count, the native CPU decode kernel's state, and the
mesh a config would build."""
from __future__ import annotations


def add_parser(subparsers):
    p = subparsers.add_parser("env", help="print JAX/devices/process info and the mesh a config builds",
                              description=__doc__)
    p.add_argument("--config", default=None, help="config file (e.g. configs/tiny.py) whose mesh to build")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set mesh.fsdp=4")
    return p


def run(args) -> int:
    from edit_r1_jax import parallel
    parallel.maybe_initialize_distributed()
    import jax
    import flax

    print(f"jax {jax.__version__}  jaxlib {jax.lib.__version__ if hasattr(jax.lib, '__version__') else ''}  "
          f"flax {flax.__version__}")
    print(f"backend: {jax.default_backend()}")
    print(f"processes: {jax.process_count()} (this is process {jax.process_index()})")
    devs = jax.devices()
    print(f"devices: {len(devs)} global, {jax.local_device_count()} local: "
          f"{', '.join(str(d) for d in devs[:8])}{' ...' if len(devs) > 8 else ''}")
    if jax.default_backend() == "cpu":
        from edit_r1_jax.native import panel_matmul
        reason = panel_matmul.unavailable_reason()           # builds it on first use (a few seconds)
        if reason:
            state = f"unavailable ({reason}); CPU generation uses XLA's product (decode_layout='out_in')"
        elif panel_matmul.preferred():
            state = "built; CPU generation uses it by default (decode_layout='panel')"
        else:
            state = "built; not the default here (no AVX-512), decode_layout='panel' selects it"
        print(f"native decode kernel: {state}")
    if args.config:
        from edit_r1_jax import config as config_lib
        cfg = config_lib.get_config(args.config, args.overrides, num_devices=len(devs))
        mesh = parallel.make_mesh(cfg.get("mesh"))
        print(f"config: {args.config}")
        print(f"mesh: {parallel.describe_mesh(mesh)}")
        print(f"mesh axes: {dict(mesh.shape)}")
        rules = parallel.rules_from_config(cfg)
        print("logical rules: " + ", ".join(f"{k}->{v}" for k, v in rules))
    return 0
