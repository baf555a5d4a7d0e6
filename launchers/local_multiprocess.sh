#!/usr/bin/env bash
# Simulate N JAX hosts on one machine with fake CPU devices and gloo collectives.
#   launchers/local_multiprocess.sh N CMD...            e.g.
#   launchers/local_multiprocess.sh 2 edit-r1-jax env --config configs/tiny.py
# Each process gets EDIT_R1_{COORDINATOR_ADDRESS,NUM_PROCESSES,PROCESS_ID,LOCAL_DEVICE_COUNT}; logs are prefixed
# with the process index. The script exits non-zero if any process fails, and kills the others when one dies.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NUM_PROCESSES CMD [ARGS...]   (env: LOCAL_DEVICES per process, default 4; PORT)" >&2
  exit 2
fi
N=$1; shift
LOCAL_DEVICES=${LOCAL_DEVICES:-4}
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
pids=()
set -m   # each process runs in its own process group, so cleanup kills whole pipelines
cleanup() { for p in "${pids[@]}"; do kill -- "-$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for ((i = 0; i < N; i++)); do
  (
    export EDIT_R1_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" EDIT_R1_NUM_PROCESSES="$N" EDIT_R1_PROCESS_ID="$i"
    export EDIT_R1_LOCAL_DEVICE_COUNT="$LOCAL_DEVICES" JAX_PLATFORMS=cpu
    export XLA_FLAGS="--xla_force_host_platform_device_count=${LOCAL_DEVICES}"
    "$@" 2>&1 | sed -u "s/^/[proc $i] /"
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=($!)
done
rc=0
for ((i = 0; i < N; i++)); do
  if ! wait -n; then rc=1; echo "local_multiprocess: a process failed; stopping the others" >&2; cleanup; break; fi
done
exit $rc
