"""tiny: every command on a laptop CPU in seconds, random tiny models and synthetic data.

Runs on: CPU (any number of devices; the mesh fills the data axis). Time: seconds per command.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sharding = dict(rules=None)  # None = edit_r1_jax.parallel.DEFAULT_RULES
    c.train = dict(steps=4, lr=1e-3, warmup_steps=1, global_batch_size=8, grad_clip=1.0, weight_decay=0.0,
                   log_every=1, checkpoint_every=2, keep_checkpoints=2, eval_every=2)
    c.data = dict(num_train=64, num_eval=16, image_size=32)
    return c
