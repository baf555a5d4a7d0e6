"""Shared builder of the pod presets in this folder (not a config itself: it has no ``get_config``).

A preset = configs/tiny.py's keys (so every command accepts it) + the Qwen2.5-VL-7B architecture in ``rrm.hf_config``
+ a pod mesh + bf16 compute + a ``plan`` section (device count and HBM per device for ``edit-r1-jax plan``).
To train for real, also set ``rrm.checkpoint`` to the Hub directory of Qwen2.5-VL-7B-Instruct and ``rrm.tokenizer``.
"""
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rrm_7b_sft(*, chips: int, hbm_gib: float, mesh: dict, global_batch_size: int, seq_len: int = 2048,
               image_size: int = 448, remat: str = "full", grad_accum_steps: int = 1, pod: str = ""):
    tiny = _load(os.path.join(HERE, "..", "tiny.py"), "_pods_tiny")
    q7 = _load(os.path.join(HERE, "..", "qwen2_5_vl_7b.py"), "_pods_q7")
    c = tiny.get_config()
    c.mesh = dict(mesh)
    c.dtype = dict(param="float32", compute="bfloat16")     # fp32 master params + Adam moments, bf16 matmuls
    c.train.global_batch_size = global_batch_size
    c.train.grad_accum_steps = grad_accum_steps
    c.train.lr = 1e-5
    c.train.export_hf = True
    c.rrm.hf_config = q7.HF_CONFIG
    c.rrm.image_size = image_size                           # two images per sample: 2 * (448/28)^2 = 512 tokens
    c.rrm.remat_policy = remat
    c.rrm.compact_prompt = False
    c.data.length_buckets = (seq_len,)
    c.data.image_size = image_size
    c.plan = dict(devices=chips, hbm_gib=hbm_gib, seq_len=seq_len, pod=pod)
    return c
