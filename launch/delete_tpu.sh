#!/usr/bin/env bash
# Deletes a TPU VM / pod slice, or with --queued the queued resource and its node.
#
#   launch/delete_tpu.sh --project my-proj --zone us-west4-a --name moe-vlm [--queued]
#
# Flags (besides the common ones in launch/common.sh):
#   --queued    delete the queued resource (with --force: its TPU VM goes too)
#   --async     return without waiting for the deletion
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }

QUEUED=0 ASYNC=()
while (($#)); do
  case "$1" in
    --queued) QUEUED=1 && shift ;;
    --async) ASYNC=(--async) && shift ;;
    *)
      parse_common_flag "$@"
      shift "$CONSUMED"
      ;;
  esac
done
require PROJECT ZONE NAME
location_flags

if ((QUEUED)); then
  run "$GCLOUD" compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force \
    --quiet ${ASYNC[@]+"${ASYNC[@]}"}
else
  run "$GCLOUD" compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet \
    ${ASYNC[@]+"${ASYNC[@]}"}
fi
