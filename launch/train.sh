#!/usr/bin/env bash
# Runs `moe-vlm train` on every worker of a TPU slice and streams worker 0's log.
#
#   launch/train.sh --project my-proj --zone us-west4-a --name moe-vlm \
#       --accelerator-type v5litepod-16 --bucket my-bucket \
#       [--config configs/moe_llava.py:phi2] [--stage all] [--run-name phi2-run1] \
#       [--preflight] [-- --config.init.hf_llm=/ckpt/phi-2 ...]
#
# The mesh and each stage's gradient accumulation come from the topology's preset in
# configs/topologies.py as --config.mesh.* / --config.stages.stageK.grad_accum flags;
# words after `--` go to `moe-vlm train` last, so they override them. The workdir is
# gs://BUCKET/RUN_NAME (--workdir: any path the workers share). Each worker runs
# launch/worker_run.sh, which derives MOE_VLM_PROCESS_ID and MOE_VLM_COORDINATOR from
# the TPU metadata (moe_vlm.distributed reads them) and keeps the run alive when ssh
# drops. Ctrl-C while streaming stops the
# run cleanly on all workers (SIGTERM: checkpoint, exit 143; rerun to resume);
# --detach leaves it running. Flags (besides the common ones):
#   --config CFG          experiment config (default: configs/moe_llava.py:phi2)
#   --stage S             1, 2, 3, a comma list or all (default: all)
#   --run-name RUN        workdir name in the bucket and run name on the workers
#                         (default: from the config, e.g. moe_llava-phi2)
#   --workdir DIR         instead of gs://BUCKET/RUN_NAME (e.g. a gcsfuse mount)
#   --topology T          mesh preset (default: from --accelerator-type)
#   --batch-sizes A,B,C   the stages' global batches, for grad_accum (default 256,128,128)
#   --preflight           first compile every stage on the slice and check its memory
#                         against the chips' HBM (moe_vlm.train.preflight)
#   --detach              start and return; --attach: only stream a running RUN's log
#   --stop                stop RUN cleanly on all workers (--stop-timeout S, default 600)
#   --remote-dir DIR      the install directory under the workers' home (default: moe_vlm)
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }

CONFIG="configs/moe_llava.py:phi2" STAGE="all" RUN_NAME="" TOPOLOGY_NAME="" WORKDIR=""
BATCH_SIZES="256,128,128" REMOTE_DIR="moe_vlm" STOP_TIMEOUT=600
MODE="start" PREFLIGHT=0 DETACH=0
EXTRA=()
while (($#)); do
  case "${1%%=*}" in
    --config | --stage | --run-name | --workdir | --topology | --batch-sizes | --remote-dir | \
      --stop-timeout)
      value="$(flag_value "$@")"
      case "${1%%=*}" in
        --config) CONFIG="$value" ;;
        --stage) STAGE="$value" ;;
        --run-name) RUN_NAME="$value" ;;
        --workdir) WORKDIR="$value" ;;
        --topology) TOPOLOGY_NAME="$value" ;;
        --batch-sizes) BATCH_SIZES="$value" ;;
        --remote-dir) REMOTE_DIR="$value" ;;
        --stop-timeout) STOP_TIMEOUT="$value" ;;
      esac
      shift "$(flag_words "$1")"
      ;;
    --preflight) PREFLIGHT=1 && shift ;;
    --detach) DETACH=1 && shift ;;
    --attach) MODE="attach" && shift ;;
    --stop) MODE="stop" && shift ;;
    --)
      shift
      EXTRA=("$@")
      break
      ;;
    *)
      parse_common_flag "$@"
      shift "$CONSUMED"
      ;;
  esac
done
require PROJECT ZONE NAME
[[ "$REMOTE_DIR" != /* && "$REMOTE_DIR" != *..* ]] || die "--remote-dir is relative to the home"
[[ "$STAGE" =~ ^(all|[123](,[123])*)$ ]] || die "--stage=$STAGE: expected 1, 2, 3, a comma list or all"
if [[ -z "$RUN_NAME" ]]; then
  RUN_NAME="$(basename "${CONFIG%%:*}" .py)"
  [[ "$CONFIG" == *:* ]] && RUN_NAME+="-${CONFIG#*:}"
fi
[[ "$RUN_NAME" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "--run-name=$RUN_NAME: use letters, digits, . _ -"
location_flags

# Runs launch/worker_run.sh on the workers, from the install directory.
worker_run() {
  local worker="$1"
  shift
  tpu_ssh "$worker" "cd ~/$(shell_quote "$REMOTE_DIR") && $(quote_cmd "$@")"
}

stream() {
  info "streaming worker 0's log of $RUN_NAME (Ctrl-C stops the run cleanly)"
  trap on_interrupt INT
  local rc=0
  worker_run 0 bash launch/worker_run.sh tail "$RUN_NAME" || rc=$?
  trap - INT
  ((DRY_RUN)) && return 0
  case "$rc" in
    0) info "$RUN_NAME finished" ;;
    143) info "$RUN_NAME stopped at a checkpoint (SIGTERM / preemption): rerun to resume" ;;
    *) info "$RUN_NAME ended with status $rc; see ~/moe_vlm_runs/$RUN_NAME/log on each worker" ;;
  esac
  return "$rc"
}

stop() {
  worker_run all bash launch/worker_run.sh stop "$RUN_NAME" --timeout "$STOP_TIMEOUT"
}

on_interrupt() {
  trap - INT
  info "interrupted: stopping $RUN_NAME on all workers (checkpoint, then exit)"
  stop
  exit 130
}

case "$MODE" in
  stop)
    stop
    exit 0
    ;;
  attach)
    stream
    exit $?
    ;;
esac

require ACCELERATOR_TYPE
[[ -n "$WORKDIR" ]] || require BUCKET
load_topology "${TOPOLOGY_NAME:-$ACCELERATOR_TYPE}"
MESH_FLAGS=()
while IFS= read -r flag; do
  MESH_FLAGS+=("$flag")
done < <("$PYTHON" "$REPO_ROOT/configs/topologies.py" flags "$TOPOLOGY" \
  --batch-sizes "$BATCH_SIZES")
((${#MESH_FLAGS[@]})) || die "configs/topologies.py gave no mesh flags for $TOPOLOGY"
WORKDIR="${WORKDIR:-gs://$BUCKET/$RUN_NAME}"
# What every worker's process sees (worker_run.sh adds the per-worker ones).
ENVIRONMENT=(MOE_VLM_NUM_PROCESSES="$HOSTS" MOE_VLM_COORDINATOR_PORT=8476
  PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1)
info "$TOPOLOGY: $CHIPS chips on $HOSTS workers, ${HBM_GIB} GiB HBM each; workdir $WORKDIR"

if ((PREFLIGHT)); then
  worker_run all env "${ENVIRONMENT[@]}" bash launch/worker_run.sh exec -- \
    .venv/bin/python -m moe_vlm.train.preflight --config="$CONFIG" --stage="$STAGE" \
    --hbm_gib="$HBM_GIB" "${MESH_FLAGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
fi
worker_run all env "${ENVIRONMENT[@]}" bash launch/worker_run.sh start "$RUN_NAME" -- \
  .venv/bin/moe-vlm train --config="$CONFIG" --workdir="$WORKDIR" --stage="$STAGE" \
  "${MESH_FLAGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
if ((DETACH)); then
  info "detached; follow with --attach, stop with --stop (same --name/--run-name)"
  exit 0
fi
stream
