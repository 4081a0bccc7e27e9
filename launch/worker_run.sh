#!/usr/bin/env bash
# Runs on each TPU VM worker (launch/train.sh calls it over `ssh --worker=all`): starts a
# training process detached from the ssh session, follows its log, stops it cleanly.
#
#   worker_run.sh start RUN -- CMD...   start CMD in the background (refused while RUN runs)
#   worker_run.sh exec -- CMD...        run CMD in the foreground (pre-flight checks)
#   worker_run.sh tail RUN              print RUN's log until it ends; exit with its status
#   worker_run.sh stop RUN [--timeout S]  SIGTERM (the loop saves a checkpoint and exits
#                                       143), SIGKILL after S seconds (default 600)
#   worker_run.sh status RUN            running / exited N / unknown
#   worker_run.sh env                   the distributed settings this worker would use
#
# Multi-host: with MOE_VLM_NUM_PROCESSES > 1 and no MOE_VLM_COORDINATOR, this worker's
# MOE_VLM_PROCESS_ID and the coordinator (worker 0, port MOE_VLM_COORDINATOR_PORT or
# 8476) come from the TPU VM metadata server (agent-worker-number,
# worker-network-endpoints), and moe_vlm.distributed.maybe_initialize() reads them.
# State lives in $MOE_VLM_RUNS_DIR/RUN (default ~/moe_vlm_runs/RUN): log, pid,
# supervisor.pid, exit_code.
set -euo pipefail

RUNS_DIR="${MOE_VLM_RUNS_DIR:-$HOME/moe_vlm_runs}"
METADATA_URL="${MOE_VLM_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1/instance/attributes}"

die() {
  echo "worker_run.sh: $*" >&2
  exit 2
}

info() {
  echo "[worker_run $(hostname)] $*" >&2
}

metadata() {
  curl -sSf -H "Metadata-Flavor: Google" "$METADATA_URL/$1" ||
    die "cannot read TPU metadata '$1' from $METADATA_URL"
}

# Exports MOE_VLM_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID for a multi-host slice.
distributed_env() {
  local n="${MOE_VLM_NUM_PROCESSES:-1}" id endpoints first
  if [[ -n "${MOE_VLM_COORDINATOR:-}" ]]; then
    [[ -n "${MOE_VLM_PROCESS_ID:-}" ]] || die "MOE_VLM_COORDINATOR set without MOE_VLM_PROCESS_ID"
    return
  fi
  if ((n <= 1)); then
    unset MOE_VLM_NUM_PROCESSES MOE_VLM_PROCESS_ID
    return
  fi
  id="$(metadata agent-worker-number)"
  endpoints="$(metadata worker-network-endpoints)"
  local -a workers
  IFS=, read -ra workers <<<"$endpoints"
  ((${#workers[@]} == n)) ||
    die "this slice has ${#workers[@]} workers but MOE_VLM_NUM_PROCESSES=$n (wrong topology?)"
  first="${workers[0]}"
  first="${first##*:}" # new format: host; old format: name:id:ip
  export MOE_VLM_COORDINATOR="$first:${MOE_VLM_COORDINATOR_PORT:-8476}"
  export MOE_VLM_NUM_PROCESSES="$n" MOE_VLM_PROCESS_ID="$id"
}

is_running() {
  local pid
  pid="$(cat "$1/pid" 2>/dev/null)" || return 1
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

run_dir() {
  [[ -n "${1:-}" && "$1" != -* && "$1" != */* ]] || die "expected a run name, got '${1:-}'"
  printf '%s/%s' "$RUNS_DIR" "$1"
}

expect_separator() {
  [[ "${1:-}" == "--" && $# -ge 2 ]] || die "expected -- CMD..."
}

cmd_start() {
  local dir
  dir="$(run_dir "${1:-}")"
  shift
  expect_separator "$@"
  shift
  mkdir -p "$dir"
  if is_running "$dir"; then
    die "run $(basename "$dir") is already running (pid $(cat "$dir/pid")); stop it first"
  fi
  rm -f "$dir/exit_code" "$dir/pid"
  [[ -f "$dir/log" ]] && mv "$dir/log" "$dir/log.previous"
  distributed_env
  nohup bash "${BASH_SOURCE[0]}" _supervise "$dir" "$@" >"$dir/log" 2>&1 </dev/null &
  echo "$!" >"$dir/supervisor.pid"
  info "started $(basename "$dir") (process ${MOE_VLM_PROCESS_ID:-0} of" \
    "${MOE_VLM_NUM_PROCESSES:-1}); log: $dir/log"
}

# Child of cmd_start: runs CMD, records its pid and exit status, forwards SIGTERM.
cmd_supervise() {
  local dir="$1" child rc
  shift
  echo "[worker_run] $(date -u +%FT%TZ) start: $*"
  "$@" &
  child=$!
  echo "$child" >"$dir/pid"
  trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
  while true; do
    rc=0
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break # a trapped signal interrupts wait: wait again
  done
  echo "[worker_run] $(date -u +%FT%TZ) exit status $rc"
  echo "$rc" >"$dir/exit_code.tmp"
  mv "$dir/exit_code.tmp" "$dir/exit_code"
}

wait_for_exit_code() {
  local dir="$1" tries=0
  until [[ -f "$dir/exit_code" ]] || ((tries >= 30)); do
    sleep 1
    tries=$((tries + 1))
  done
  cat "$dir/exit_code" 2>/dev/null || echo 1
}

cmd_tail() {
  local dir sup tries=0
  dir="$(run_dir "${1:-}")"
  until [[ -f "$dir/log" && -f "$dir/supervisor.pid" ]] || ((tries >= 60)); do
    sleep 1
    tries=$((tries + 1))
  done
  [[ -f "$dir/log" ]] || die "no log for run $(basename "$dir") in $RUNS_DIR"
  sup="$(cat "$dir/supervisor.pid")"
  if kill -0 "$sup" 2>/dev/null; then
    tail -n +1 -F --pid="$sup" "$dir/log" 2>/dev/null || true
  else
    cat "$dir/log"
  fi
  local rc
  rc="$(wait_for_exit_code "$dir")"
  info "$(basename "$dir") exited with status $rc"
  exit "$rc"
}

cmd_stop() {
  local dir timeout=600 pid waited=0
  dir="$(run_dir "${1:-}")"
  shift
  while (($#)); do
    case "$1" in
      --timeout) timeout="${2:?--timeout needs seconds}" && shift 2 ;;
      --timeout=*) timeout="${1#*=}" && shift ;;
      *) die "stop: unknown flag $1" ;;
    esac
  done
  if ! is_running "$dir"; then
    info "$(basename "$dir") is not running"
    return 0
  fi
  pid="$(cat "$dir/pid")"
  info "SIGTERM to $pid: the loop saves a checkpoint and exits (waiting up to ${timeout}s)"
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && ((waited < timeout)); do
    sleep 1
    waited=$((waited + 1))
  done
  if kill -0 "$pid" 2>/dev/null; then
    info "still running after ${timeout}s: SIGKILL (the last periodic checkpoint remains)"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  info "$(basename "$dir") stopped with status $(wait_for_exit_code "$dir")"
}

cmd_status() {
  local dir
  dir="$(run_dir "${1:-}")"
  if is_running "$dir"; then
    echo "running (pid $(cat "$dir/pid"))"
  elif [[ -f "$dir/exit_code" ]]; then
    echo "exited $(cat "$dir/exit_code")"
  else
    echo "unknown"
  fi
}

COMMAND="${1:-}"
(($#)) && shift
case "$COMMAND" in
  start) cmd_start "$@" ;;
  _supervise) cmd_supervise "$@" ;;
  exec)
    expect_separator "$@"
    shift
    distributed_env
    exec "$@"
    ;;
  tail) cmd_tail "$@" ;;
  stop) cmd_stop "$@" ;;
  status) cmd_status "$@" ;;
  env)
    distributed_env
    env | grep '^MOE_VLM_' | sort || true
    ;;
  *)
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
