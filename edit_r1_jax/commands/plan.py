"""`edit-r1-jax plan`: per-device memory of the configured RRM SFT train step on N devices, before renting them.

AOT-compiles the step for N (fake CPU) devices from abstract shapes only (no parameter is allocated, so the 7B plans
on a laptop) and prints per-device parameter, optimizer, activation and total bytes from XLA's memory_analysis(),
then the largest text-decoder depth that fits --hbm-gib per device.

    edit-r1-jax plan --config configs/pods/v5p_64.py
    edit-r1-jax plan --config configs/tiny.py --devices 8 --set mesh.fsdp=8 --hbm-gib 16
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

CHILD_ENV = "EDIT_R1_PLAN_CHILD"


def add_parser(subparsers):
    from edit_r1_jax.config import add_config_args
    p = subparsers.add_parser("plan", help="per-device memory of the SFT train step on N devices (AOT, abstract)",
                              description=__doc__)
    add_config_args(p)
    p.add_argument("--devices", type=int, default=None,
                   help="number of devices to plan for (default: plan.devices of the config, else the mesh product)")
    p.add_argument("--hbm-gib", type=float, default=None,
                   help="HBM per device in GiB (default: plan.hbm_gib of the config); enables the depth fit")
    p.add_argument("--layers", type=int, default=None, help="override the text-decoder depth of the plan")
    p.add_argument("--no-fit", action="store_true",
                   help="skip the largest-depth-that-fits search (2 to 4 more compiles)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    return p


def _wanted_devices(args, cfg) -> int:
    if args.devices:
        return int(args.devices)
    plan = cfg.get("plan", None)
    if plan is not None and plan.get("devices", None):
        return int(plan.devices)
    m = cfg.get("mesh", None)
    sizes = [int(m.get(k, 1)) for k in ("data", "fsdp", "tensor")] if m is not None else [-1]
    if all(s > 0 for s in sizes):
        return int(sizes[0] * sizes[1] * sizes[2])
    raise SystemExit("plan: pass --devices N (the config's mesh has a -1 axis and no plan.devices)")


def _force_cpu_devices(n: int) -> None:
    """Before JAX's backend starts: plan on ``n`` fake CPU devices."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={n}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def _devices(n: int):
    """The first ``n`` devices: real ones if the running backend has enough, else fake CPU devices (re-exec)."""
    from jax._src import xla_bridge
    if not xla_bridge.backends_are_initialized():
        _force_cpu_devices(n)
    import jax
    devs = jax.devices()
    if len(devs) >= n:
        return devs[:n]
    try:
        cpus = jax.devices("cpu")
    except RuntimeError:
        cpus = []
    if len(cpus) >= n:
        return cpus[:n]
    return None


def _argv(args, n: int) -> list[str]:
    """The command line of this plan (for the re-exec with N fake devices)."""
    out = ["plan", "--config", args.config, "--devices", str(n)]
    for o in args.overrides:
        out += ["--set", o]
    if args.hbm_gib is not None:
        out += ["--hbm-gib", str(args.hbm_gib)]
    if args.layers is not None:
        out += ["--layers", str(args.layers)]
    if args.no_fit:
        out.append("--no-fit")
    if args.json:
        out += ["--json", args.json]
    return out


def run(args) -> int:
    from edit_r1_jax import config as config_lib
    cfg = config_lib.get_config(args.config, args.overrides)
    n = _wanted_devices(args, cfg)
    config_lib.validate(cfg, num_devices=n)
    devices = _devices(n)
    if devices is None:
        if os.environ.get(CHILD_ENV):
            raise SystemExit(f"plan: could not get {n} fake CPU devices")
        # JAX already runs with fewer devices in this process: plan in a fresh one with N fake CPU devices.
        env = dict(os.environ, **{CHILD_ENV: "1", "JAX_PLATFORMS": "cpu"})
        env["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
                            + f" --xla_force_host_platform_device_count={n}").strip()
        return subprocess.call([sys.executable, "-m", "edit_r1_jax.cli", *_argv(args, n)], env=env)

    from edit_r1_jax.train import plan as plan_lib
    pcfg = cfg.get("plan", None)
    hbm_gib = args.hbm_gib if args.hbm_gib is not None else (pcfg.get("hbm_gib", None) if pcfg is not None else None)
    hbm = int(float(hbm_gib) * plan_lib.GIB) if hbm_gib else None
    print(f"plan: {args.config} on {n} {devices[0].platform} devices, seq_len {plan_lib.seq_len_of(cfg)}, "
          f"global batch {cfg.train.get('global_batch_size', 8)}", flush=True)
    spec = plan_lib.build_sft_step(cfg, devices, layers=args.layers)
    mp = plan_lib.memory_plan(spec)
    print(plan_lib.format_plan(mp, hbm), flush=True)
    out = {"config": args.config, "overrides": list(args.overrides), "plan": mp.as_dict(), "hbm_bytes": hbm}
    if hbm and not args.no_fit:
        fit = plan_lib.fit_layers(cfg, devices, hbm, base=mp)
        checks = ", ".join(f"L={n}: {plan_lib.human_bytes(t)}" for n, t in fit.checked) or "none needed"
        print(f"  depth fit    total(L) ~ {plan_lib.human_bytes(fit.fixed_bytes)} + "
              f"{plan_lib.human_bytes(fit.per_layer_bytes)} x L (compiled at L={fit.layers_probe}); checked {checks}; "
              f"largest depth that fits {hbm_gib} GiB: {fit.max_layers} text layers")
        out["fit"] = {"layers_probe": list(fit.layers_probe), "total_probe": list(fit.total_probe),
                      "per_layer_bytes": fit.per_layer_bytes, "fixed_bytes": fit.fixed_bytes,
                      "max_layers": fit.max_layers, "checked": [list(c) for c in fit.checked]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=float)
    return 0
