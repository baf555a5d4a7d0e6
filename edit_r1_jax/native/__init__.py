"""Native CPU kernels, registered with XLA as FFI custom calls (built from source on first use; see `build`).

Only the CPU decode step uses one (`panel_matmul`); every caller falls back to plain XLA when the kernel cannot be
built here (no C++ compiler, no XLA FFI headers), and ``EDIT_R1_JAX_NATIVE=0`` turns them off.
"""
