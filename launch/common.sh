# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): flags every script takes, defaults,
# and `run`, which prints the exact command instead of running it under --dry-run.
#
# Common flags (each also as --flag=value):
#   --project ID            GCP project          (default: $MOE_VLM_PROJECT)
#   --zone ZONE             e.g. us-central2-b   (default: $MOE_VLM_ZONE)
#   --accelerator-type T    v5litepod-16, v4-32, v5p-128, ...
#                                                (default: $MOE_VLM_ACCELERATOR_TYPE)
#   --runtime-version V     TPU VM image (default: by generation, configs/topologies.py)
#   --bucket NAME           GCS bucket for workdirs, without gs:// ($MOE_VLM_BUCKET)
#   --name NAME             TPU VM / queued resource name (default: moe-vlm)
#   --dry-run               print the commands, run nothing
#   -h, --help              the script's usage
# GCLOUD and PYTHON name the binaries (default: gcloud, python3).

# The globals below are read by the scripts that source this file.
# shellcheck disable=SC2034

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$LAUNCH_DIR")"
GCLOUD="${GCLOUD:-gcloud}"
PYTHON="${PYTHON:-python3}"

PROJECT="${MOE_VLM_PROJECT:-}"
ZONE="${MOE_VLM_ZONE:-}"
ACCELERATOR_TYPE="${MOE_VLM_ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${MOE_VLM_RUNTIME_VERSION:-}"
BUCKET="${MOE_VLM_BUCKET:-}"
NAME="${MOE_VLM_TPU_NAME:-moe-vlm}"
DRY_RUN=0
CONSUMED=0

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

info() {
  echo "[$(basename "$0")] $*" >&2
}

# One word quoted for a POSIX shell, left bare when it needs no quoting; for
# --flag=value only the value is quoted (--command='...').
shell_quote() {
  local word="$1"
  if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_@%+=:,./~-]+$ && "$word" != "~"* ]]; then
    printf '%s' "$word"
  elif [[ "$word" =~ ^(--[A-Za-z0-9][A-Za-z0-9_.-]*=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    shell_quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# A command line that a shell reads back as exactly these words.
quote_cmd() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or under --dry-run prints it (stdout, one line) and returns 0.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_cmd "$@")"
  else
    "$@"
  fi
}

# Value of `--flag value` / `--flag=value` at "$@" (words: $(flag_words "$1")).
flag_value() {
  if [[ "$1" == *=* ]]; then
    printf '%s' "${1#*=}"
  else
    [[ $# -ge 2 && -n "$2" ]] || die "${1%%=*} needs a value"
    printf '%s' "$2"
  fi
}

flag_words() {
  if [[ "$1" == *=* ]]; then echo 1; else echo 2; fi
}

# Parses one common flag at "$@"; sets CONSUMED (the caller shifts). Unknown: error.
parse_common_flag() {
  local flag="${1%%=*}" value=""
  case "$flag" in
    --project | --zone | --accelerator-type | --runtime-version | --bucket | --name)
      value="$(flag_value "$@")"
      CONSUMED="$(flag_words "$1")"
      [[ -n "$value" ]] || die "$flag needs a value"
      ;;
  esac
  case "$flag" in
    --project) PROJECT="$value" ;;
    --zone) ZONE="$value" ;;
    --accelerator-type) ACCELERATOR_TYPE="$value" ;;
    --runtime-version) RUNTIME_VERSION="$value" ;;
    --bucket) BUCKET="${value#gs://}" ;;
    --name) NAME="$value" ;;
    --dry-run) DRY_RUN=1 CONSUMED=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown flag $1 (see --help)" ;;
  esac
}

require() {
  local var flag
  for var in "$@"; do
    flag="${var,,}"
    [[ -n "${!var}" ]] || die "--${flag//_/-} is required"
  done
}

# The gcloud location flags every TPU command takes.
location_flags() {
  LOCATION=(--project="$PROJECT" --zone="$ZONE")
}

# Topology facts for $ACCELERATOR_TYPE from configs/topologies.py (no jax needed):
# sets TOPOLOGY, CHIPS, HOSTS, HBM_GIB, RUNTIME.
load_topology() {
  local line
  TOPOLOGY="" CHIPS="" HOSTS="" HBM_GIB="" RUNTIME=""
  while IFS= read -r line; do
    case "$line" in
      TOPOLOGY=* | CHIPS=* | HOSTS=* | HBM_GIB=* | RUNTIME=*) declare -g "$line" ;;
    esac
  done < <("$PYTHON" "$REPO_ROOT/configs/topologies.py" shell "$1") || true
  [[ -n "$TOPOLOGY" ]] || die "no preset for --accelerator-type=$1 in configs/topologies.py"
}

# --runtime-version default for any accelerator type (presets or not).
default_runtime_version() {
  "$PYTHON" - "$REPO_ROOT/configs" "$1" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import topologies
try:
  print(topologies.RUNTIME_VERSIONS[topologies.generation_of(sys.argv[2])])
except KeyError as e:
  sys.exit(f"{e.args[0]}")
EOF
}

# `gcloud compute tpus tpu-vm ssh` on the given worker(s) ("all" or an index).
tpu_ssh() {
  local worker="$1" command="$2"
  run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$worker" \
    --command="$command"
}
