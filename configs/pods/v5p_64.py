"""7B RRM SFT on a TPU v5p-64 slice: 32 chips (v5p-N counts TensorCores, 2 per chip), 95 GiB HBM each.

    edit-r1-jax plan --config configs/pods/v5p_64.py
Mesh: FSDP over all 32 chips; one 2048-token sample (two 448 px images) per chip; remat keeps weight matmuls.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_pods_common", os.path.join(os.path.dirname(__file__), "common.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)


def get_config():
    return _common.rrm_7b_sft(chips=32, hbm_gib=95.0, mesh=dict(data=1, fsdp=32, tensor=1), global_batch_size=32,
                              remat="dots_no_batch", pod="v5p-64")
