"""7B RRM SFT on a TPU v6e-256 (Trillium) pod: 256 chips, 32 GiB HBM each.

    edit-r1-jax plan --config configs/pods/v6e_256.py
Mesh: 4-way data x 64-way FSDP; one 2048-token sample per chip; remat keeps weight matmuls.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_pods_common", os.path.join(os.path.dirname(__file__), "common.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)


def get_config():
    return _common.rrm_7b_sft(chips=256, hbm_gib=32.0, mesh=dict(data=4, fsdp=64, tensor=1), global_batch_size=256,
                              remat="dots_no_batch", pod="v6e-256")
