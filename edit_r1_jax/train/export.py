"""Export a trained reward model as a Hugging Face directory (``WORKDIR/hf``) that ``rrm.checkpoint`` /
``gcpo.init_from`` / ``qwen2_5_vl.load_pretrained`` read back: safetensors weights + config, the tokenizer and the
image processor settings."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np


def params_to_host(params: Any) -> Any:
    """Params (sharded over any mesh, one or many processes) -> NumPy arrays, the full tree on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), params)
    return jax.tree.map(np.asarray, jax.device_get(params))


def export_rrm_hf(setup: Any, params: Any, out_dir: str) -> str | None:
    """Write ``params`` of an ``RRMSetup`` model to ``out_dir`` (process 0 writes; call it on every process)."""
    from edit_r1_jax.models import qwen2_5_vl as qwen
    from edit_r1_jax.rrm.inputs import save_image_processor
    host = params_to_host(params)
    if jax.process_index() != 0:
        return None
    qwen.save_pretrained(setup.cfg, host, out_dir)
    setup.inputs.tokenizer.save_pretrained(out_dir)
    save_image_processor(setup.inputs.image_processor, out_dir)
    # how prompts were laid out in training, read back by rrm.reward.RewardModel.from_dir
    import json
    import os
    with open(os.path.join(out_dir, "rrm.json"), "w") as f:
        json.dump({"compact_prompt": bool(setup.inputs.compact)}, f)
    return out_dir
