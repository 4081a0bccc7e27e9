#!/usr/bin/env bash
# Installs the project on every worker of a TPU VM slice (ssh --worker=all).
#
#   launch/setup.sh --project my-proj --zone us-west4-a --name moe-vlm \
#       [--repo https://github.com/ORG/moe_vlm.git [--ref main]] \
#       [--sync gs://my-bucket/moe-llava=/data/moe-llava --sync gs://my-bucket/ckpt=/ckpt]
#
# Without --repo the local checkout is packed (no .git, .venv, runs) and copied to each
# worker. The TPU images ship Python 3.10 while jax >= 0.7 needs 3.11+, so `uv` installs
# a standalone Python (--python, default 3.12) into ~/REMOTE_DIR/.venv, then
# `pip install -e "REMOTE_DIR[gcs]" "jax[tpu]"` (the gcs extra: gcsfs and
# google-cloud-storage, which gs:// workdirs need). Flags (besides the common ones):
#   --repo URL           git clone URL on the workers instead of copying this checkout
#   --ref REF            branch, tag or commit to check out with --repo (default: main)
#   --remote-dir DIR     install directory under the workers' home (default: moe_vlm)
#   --jax-version X      pin jax[tpu]==X (default: the newest)
#   --python X           Python version for the venv (default: 3.12)
#   --sync SRC=DST       `gcloud storage rsync -r SRC DST` on every worker (repeatable;
#                        data and HF checkpoints the configs read from local disk)
#   --no-check           skip the final jax device check
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

REPO="" REF="main" REMOTE_DIR="moe_vlm" JAX_VERSION="" PY_VERSION="3.12" CHECK=1
SYNCS=()
while (($#)); do
  case "${1%%=*}" in
    --repo | --ref | --remote-dir | --jax-version | --python | --sync)
      value="$(flag_value "$@")"
      case "${1%%=*}" in
        --repo) REPO="$value" ;;
        --ref) REF="$value" ;;
        --remote-dir) REMOTE_DIR="$value" ;;
        --jax-version) JAX_VERSION="$value" ;;
        --python) PY_VERSION="$value" ;;
        --sync)
          [[ "$value" == *=* ]] || die "--sync takes SRC=DST, got $value"
          SYNCS+=("$value")
          ;;
      esac
      shift "$(flag_words "$1")"
      ;;
    --no-check) CHECK=0 && shift ;;
    *)
      parse_common_flag "$@"
      shift "$CONSUMED"
      ;;
  esac
done
require PROJECT ZONE NAME
[[ "$REMOTE_DIR" != /* && "$REMOTE_DIR" != *..* ]] || die "--remote-dir is relative to the home"
location_flags

# Expanded by the workers' shell, not here.
# shellcheck disable=SC2088
DIR="~/$(shell_quote "$REMOTE_DIR")"
JAX_REQ="jax[tpu]${JAX_VERSION:+==$JAX_VERSION}"
STEPS=("set -euo pipefail")

if [[ -n "$REPO" ]]; then
  STEPS+=("[ -d $DIR/.git ] || git clone --quiet $(shell_quote "$REPO") $DIR"
    "git -C $DIR fetch --quiet origin $(shell_quote "$REF")"
    "git -C $DIR checkout --quiet --detach FETCH_HEAD")
else
  ARCHIVE="${TMPDIR:-/tmp}/moe_vlm_src_${NAME}.tgz"
  run tar -czf "$ARCHIVE" -C "$REPO_ROOT" --exclude=.git --exclude=.venv --exclude=runs \
    --exclude=__pycache__ --exclude='*.egg-info' .
  run "$GCLOUD" compute tpus tpu-vm scp "$ARCHIVE" "$NAME:/tmp/moe_vlm_src.tgz" \
    "${LOCATION[@]}" --worker=all
  STEPS+=("mkdir -p $DIR" "tar -xzf /tmp/moe_vlm_src.tgz -C $DIR" "rm -f /tmp/moe_vlm_src.tgz")
fi

STEPS+=(
  "command -v uv >/dev/null || python3 -m pip install --quiet --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh"
  "export PATH=\$HOME/.local/bin:\$PATH"
  "[ -x $DIR/.venv/bin/python ] || uv venv --quiet --python $(shell_quote "$PY_VERSION") $DIR/.venv"
  "uv pip install --quiet --python $DIR/.venv/bin/python -e $DIR$(shell_quote "[gcs]") $(shell_quote "$JAX_REQ")"
)
for sync in ${SYNCS[@]+"${SYNCS[@]}"}; do
  src="${sync%%=*}" dst="${sync#*=}"
  STEPS+=("sudo mkdir -p $(shell_quote "$dst") && sudo chown \$USER $(shell_quote "$dst")"
    "gcloud storage rsync --recursive $(shell_quote "$src") $(shell_quote "$dst")")
done
if ((CHECK)); then
  # Every worker starts the TPU runtime at the same time (a slice needs all of them).
  STEPS+=("$DIR/.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)'")
fi

REMOTE=""
for step in "${STEPS[@]}"; do
  REMOTE+="${REMOTE:+; }$step"
done
tpu_ssh all "$REMOTE"
info "next: launch/train.sh --name $NAME --zone $ZONE --project $PROJECT" \
  "--accelerator-type ACCELERATOR --bucket BUCKET"
