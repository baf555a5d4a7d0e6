#!/usr/bin/env bash
# Run an edit-r1-jax command on every worker of a Cloud TPU VM slice (multi-controller JAX).
#
#   launchers/tpu_vm.sh create  NAME ZONE ACCELERATOR [RUNTIME]   # e.g. my-v5p v5p-64 (creates or reuses)
#   launchers/tpu_vm.sh setup   NAME ZONE                         # copy this checkout to all workers, install
#   launchers/tpu_vm.sh run     NAME ZONE -- edit-r1-jax sft --config configs/... --workdir gs://.../run1
#   launchers/tpu_vm.sh logs    NAME ZONE                         # stream the run's logs from all workers
#   launchers/tpu_vm.sh delete  NAME ZONE
#
# `run` sets EDIT_R1_TPU_MULTIHOST=1 so parallel.maybe_initialize_distributed() calls jax.distributed.initialize()
# with TPU auto-discovery; every worker runs the same command (SPMD), process 0 writes metrics, Orbax writes
# checkpoints collectively. Use a gs:// workdir (or shared filesystem) so all hosts see the same checkpoints.
set -euo pipefail
cmd=${1:-}; NAME=${2:-}; ZONE=${3:-}
[[ -n "$cmd" && -n "$NAME" && -n "$ZONE" ]] || { sed -n '2,14p' "$0"; exit 2; }
shift 3 || true
PROJECT_FLAG=${GCP_PROJECT:+--project=$GCP_PROJECT}
ssh_all() { gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"; }
case "$cmd" in
  create)
    ACC=${1:?accelerator type, e.g. v5p-64}; RUNTIME=${2:-v2-alpha-tpuv5}
    if gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" $PROJECT_FLAG >/dev/null 2>&1; then
      echo "reusing existing TPU VM $NAME"
    else
      gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" $PROJECT_FLAG --accelerator-type="$ACC" --version="$RUNTIME"
    fi ;;
  setup)
    tar czf /tmp/edit_r1_jax_src.tgz --exclude=.venv --exclude=runs --exclude=.git .
    gcloud compute tpus tpu-vm scp /tmp/edit_r1_jax_src.tgz "$NAME":~/ --zone="$ZONE" $PROJECT_FLAG --worker=all
    ssh_all "mkdir -p ~/edit_r1_jax && tar xzf ~/edit_r1_jax_src.tgz -C ~/edit_r1_jax && cd ~/edit_r1_jax && \
      python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/pip install -q 'jax[tpu]==0.10.2'" ;;
  run)
    [[ "${1:-}" == "--" ]] && shift
    CMDLINE=$(printf '%q ' "$@")
    ssh_all "cd ~/edit_r1_jax && EDIT_R1_TPU_MULTIHOST=1 nohup .venv/bin/$CMDLINE > ~/edit_r1_jax/run.log 2>&1 &"
    echo "started on all workers; follow with: $0 logs $NAME $ZONE" ;;
  logs)
    ssh_all "tail -n 50 -f ~/edit_r1_jax/run.log | sed -u \"s/^/[\$(hostname)] /\"" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" $PROJECT_FLAG --quiet ;;
  *) echo "unknown command $cmd"; exit 2 ;;
esac
