#!/usr/bin/env bash
# Functional checks on one accelerator (NVIDIA H100/H200 class; prepared for a lent, offline machine), < 8 minutes:
#   1. `edit-r1-jax parity flux` and `parity qwen2_5_vl` on tiny random diffusers / transformers checkpoints built
#      here (ours on the accelerator, the references on its CPU or GPU as the tools choose), fp32;
#   2. `edit-r1-jax edit` on the tiny Kontext pipeline (one image, 4 steps) on the accelerator;
#   3. `edit-r1-jax demo --quick`: every stage of the embedded default (RRM SFT, GCPO, editor SFT, Flow-GRPO, eval)
#      on the accelerator, with its wall time.
# Usage: [GPU_WHEELS=.whl] [PYTHON=python3] bash bench/gpu_checks.sh [OUT_DIR]   (OUT_DIR default: $OUT or runs/gpu)
# GPU_WHEELS as in bench/gpu.sh (this also needs diffusers==0.42.1 among the wheels). Exit status: failures count.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -n "${GPU_WHEELS:-}" ]; then
  SITE="$(mktemp -d)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$GPU_WHEELS"/*.whl \
    || exit 3
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
DEST="${1:-${OUT:-runs/gpu}}"
mkdir -p "$DEST"
WORK="$(mktemp -d)"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
CLI="$PY -m edit_r1_jax.cli"
fails=0
step() {  # name, command...: runs it, prints its wall time and status
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name"
  "$@"; local rc=$?
  echo "CHECK $name rc=$rc wall_s=$((SECONDS - t0))"
  [ $rc = 0 ] || fails=$((fails + 1))
}
$PY -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())"
step build $PY - "$WORK" <<'PYEOF'
import sys
import numpy as np
from PIL import Image
from edit_r1_jax.models.flux import parity
from edit_r1_jax.models.qwen2_5_vl import testing as T
d = sys.argv[1]
parity.torch_kontext_pipeline(seed=1).save_pretrained(f"{d}/kontext")
T.tiny_torch_model(tie=False, seed=0).save_pretrained(f"{d}/qwen")
Image.fromarray((np.random.default_rng(3).random((40, 56, 3)) * 255).astype(np.uint8)).save(f"{d}/in.png")
PYEOF
step parity_flux $CLI parity flux --dir "$WORK/kontext" --steps 2 --size 32x48
step parity_qwen $CLI parity qwen2_5_vl --hf-dir "$WORK/qwen"
step edit $CLI edit --model "$WORK/kontext" --image "$WORK/in.png" --prompt "make it red" --steps 4 --seed 0 \
  --out "$DEST/edit.png" --height 32 --width 48 --max-area 1536 --no-auto-resize --max-sequence-length 16
step demo_quick $CLI demo --quick --out "$WORK/demo"
cp "$WORK/demo/report.md" "$DEST/demo_report.md" 2>/dev/null
ls "$WORK/demo" 2>/dev/null | head -30
echo "gpu_checks: $fails failed"
exit $fails
