"""7B RRM SFT on a TPU v5e-256 pod: 256 chips, 16 GiB HBM each.

    edit-r1-jax plan --config configs/pods/v5e_256.py
Mesh: 4-way data x 64-way FSDP (the 7B's 16 GB of fp32 moments per copy need sharding; pure 256-way FSDP also works
but all-gathers over the whole pod); one 2048-token sample per chip; full remat (16 GiB is tight).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_pods_common", os.path.join(os.path.dirname(__file__), "common.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)


def get_config():
    return _common.rrm_7b_sft(chips=256, hbm_gib=16.0, mesh=dict(data=4, fsdp=64, tensor=1), global_batch_size=256,
                              remat="full", pod="v5e-256")
