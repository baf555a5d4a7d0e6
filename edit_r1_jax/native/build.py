"""Build a C++ XLA FFI library from a source file in this package and load it (cached per source and machine).

The library is compiled with the machine's ``g++`` (``$CXX``) against the FFI headers jaxlib ships
(``jax.ffi.include_dir()``), with ``-O3 -march=native``, into ``$EDIT_R1_JAX_NATIVE_CACHE`` (default
``~/.cache/edit_r1_jax/native``) under a name that hashes the source, the flags, the compiler's version, jax's
version and the CPU's feature flags: a changed source or another machine builds anew, anything else reuses it.
The compiler writes to a temporary file that is renamed into place, so concurrent builds (pytest-xdist workers)
never load a half-written library. Failures raise `NativeBuildError` with the compiler's output.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

log = logging.getLogger(__name__)

CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


class NativeBuildError(RuntimeError):
    """A native kernel could not be compiled or loaded here (the message says why)."""


def cache_dir() -> str:
    return os.environ.get("EDIT_R1_JAX_NATIVE_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "edit_r1_jax", "native"))


@functools.lru_cache(maxsize=None)
def cpu_flags() -> str:
    """The CPU's feature flags (``/proc/cpuinfo``, read once per process), or the machine name where there is no
    such file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _compiler() -> tuple[str, str]:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise NativeBuildError(f"no C++ compiler: {cxx!r} (set $CXX) is not on PATH")
    out = subprocess.run([path, "--version"], capture_output=True, text=True)
    if out.returncode != 0:
        raise NativeBuildError(f"C++ compiler {path} --version failed: {out.stderr.strip()}")
    return path, out.stdout.splitlines()[0] if out.stdout else ""


def build_library(source_name: str) -> str:
    """Path of the compiled shared library for ``source_name`` (a ``.cc`` file in this package), building it if the
    cache does not hold it yet."""
    import jax
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), source_name)
    if not os.path.exists(src):
        raise NativeBuildError(f"native kernel source missing: {src}")
    cxx, version = _compiler()
    include = jax.ffi.include_dir()
    with open(src, "rb") as f:
        key = hashlib.sha256(b"\0".join([f.read(), " ".join(CXX_FLAGS).encode(), version.encode(),
                                         jax.__version__.encode(), cpu_flags().encode()])).hexdigest()[:16]
    out_dir = cache_dir()
    lib = os.path.join(out_dir, f"{os.path.splitext(source_name)[0]}-{key}.so")
    if os.path.exists(lib):
        return lib
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    except OSError as e:
        raise NativeBuildError(f"cannot write the kernel cache {out_dir} (set $EDIT_R1_JAX_NATIVE_CACHE): {e}") from e
    os.close(fd)
    try:
        cmd = [cxx, *CXX_FLAGS, f"-I{include}", src, "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise NativeBuildError(f"compiling {src} failed ({' '.join(cmd)}):\n{res.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
        log.info("built native kernel %s", lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load_ffi_target(source_name: str, symbol: str, target: str):
    """Build ``source_name``, load it and register its FFI handler ``symbol`` as XLA CPU custom call ``target``."""
    import jax
    lib_path = build_library(source_name)
    try:
        lib = ctypes.cdll.LoadLibrary(lib_path)
        handler = getattr(lib, symbol)
    except (OSError, AttributeError) as e:
        raise NativeBuildError(f"loading {symbol} from {lib_path} failed: {e}") from e
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return lib
