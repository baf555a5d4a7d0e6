#!/usr/bin/env bash
# One prepared GPU benchmark run (NVIDIA H100/H200 class, one card), < 10 minutes including compilation.
#
#   bash bench/gpu.sh                 # all sections, RESULT lines on stdout, log in bench/gpu_results.txt
#   bash bench/gpu.sh --only sft      # one section (matmul always runs first: it is the MFU denominator)
#   bash bench/gpu.sh --smoke         # toy sizes (checks the script itself, e.g. on a CPU)
#
# Sections (bench/gpu_bench.py): bf16 matmul ceiling; bf16 SFT step MFU of a ~1.2 B Qwen2.5-VL-shaped model;
# Kontext transformer forward / train step at 512 px (reduced depth); our decode tokens/s vs transformers.
# Python: $PYTHON, else .venv/bin/python, else python3. On a machine with an NVIDIA GPU it installs jax[cuda12] (the
# installed jax's version) and this package when missing (needs network; on an offline machine preinstall them).
# Without a GPU it installs nothing: --smoke runs on the CPU, anything else exits 3.
# Offline machine whose image already has jax (CUDA), torch, transformers, optax and orbax: download the missing pure
# dependencies as cp312 wheels into a folder (flax grain array-record portpicker ml-collections tensorboardX; the
# command is in BENCHMARKS.md section 8) and run `GPU_WHEELS=.whl PYTHON=python3 bash bench/gpu.sh`: the wheels go
# to a temporary target and the repository onto PYTHONPATH, nothing is installed into the image.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${GPU_WHEELS:-}" ]; then
  SITE="$(mktemp -d)"
  ${PYTHON:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$GPU_WHEELS"/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
echo "gpu.sh: python $PY ($($PY --version 2>&1))"
SMOKE=0
for a in "$@"; do [ "$a" = "--smoke" ] && SMOKE=1; done
HAVE_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  HAVE_GPU=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
  echo "gpu.sh: no NVIDIA GPU found (nvidia-smi)"
fi
# Installs happen only on a machine with a GPU and never for --smoke (a dev box's environment is left alone).
if ! $PY -c "import edit_r1_jax, flax, optax, orbax.checkpoint, ml_collections, transformers" 2>/dev/null; then
  if [ "$HAVE_GPU" = 1 ] && [ "$SMOKE" = 0 ]; then
    echo "gpu.sh: installing the package (pip install -e .)"
    $PY -m pip install -q -e . || { echo "gpu.sh: pip install -e . failed (offline?)"; exit 3; }
  else
    echo "gpu.sh: edit_r1_jax or its dependencies are missing for $PY"; exit 3
  fi
fi
if ! $PY -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; then
  if [ "$HAVE_GPU" = 1 ] && [ "$SMOKE" = 0 ]; then
    JAXV=$($PY -c "import jax; print(jax.__version__)" 2>/dev/null || echo "")
    echo "gpu.sh: JAX has no GPU backend; installing jax[cuda12]${JAXV:+==$JAXV}"
    $PY -m pip install -q "jax[cuda12]${JAXV:+==$JAXV}" || { echo "gpu.sh: could not install jax[cuda12]"; exit 3; }
  elif [ "$SMOKE" = 0 ]; then
    echo "gpu.sh: no GPU and no --smoke: nothing to measure"; exit 3
  fi
fi
$PY -c "import jax; print('gpu.sh: jax', jax.__version__, jax.devices())"

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}"   # leave room for torch (decode)
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LOG="${GPU_BENCH_LOG:-bench/gpu_results.txt}"
set +e
timeout 590 $PY bench/gpu_bench.py "$@" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp "$LOG" "$OUT/"; fi   # a job runner's output folder, if any
echo "gpu.sh: RESULT lines in $LOG; append them to BENCHMARKS.md with the card's name (exit $status)"
exit "$status"
