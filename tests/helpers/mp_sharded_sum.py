"""Worker for test_multiprocess: each process feeds its half of a global batch; prints the global result."""
import json

import numpy as np

from edit_r1_jax import parallel

parallel.maybe_initialize_distributed()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

mesh = parallel.make_mesh(dict(data=-1, fsdp=2, tensor=1))
n, pid = jax.process_count(), jax.process_index()
full = np.arange(16 * 4, dtype=np.float32).reshape(16, 4)
local = np.split(full, n)[pid]
x = parallel.global_batch_from_local(local, mesh)
w = jnp.arange(4 * 3, dtype=jnp.float32).reshape(4, 3)
y = jax.jit(lambda x, w: jnp.tanh(x @ w / 100.0).sum(0))(x, w)
out = multihost_utils.process_allgather(y, tiled=True)
print("RESULT " + json.dumps({"pid": pid, "n": n, "devices": jax.device_count(), "y": np.asarray(out).tolist()}))
