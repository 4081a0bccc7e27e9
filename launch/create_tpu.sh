#!/usr/bin/env bash
# Creates a Cloud TPU VM / pod slice, or a queued resource (--queued) that provisions one.
#
#   launch/create_tpu.sh --project my-proj --zone us-west4-a \
#       --accelerator-type v5litepod-16 --name moe-vlm [--queued [--wait]] [--spot]
#
# Flags (besides the common ones in launch/common.sh):
#   --queued                 request through `gcloud compute tpus queued-resources`
#                            (needed for most v5e / v5p capacity); the node gets --name
#   --wait                   with --queued: poll until the resource is ACTIVE
#   --spot                   spot capacity (cheaper, preemptible)
#   --reserved               use the project's reservation
#   --valid-until DURATION   with --queued: give up if not provisioned in time (e.g. 6h)
#   --create-bucket          also create gs://BUCKET in the zone's region when missing
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

QUEUED=0 WAIT=0 SPOT=0 RESERVED=0 CREATE_BUCKET=0 VALID_UNTIL="" POLL_SECONDS=30
while (($#)); do
  case "${1%%=*}" in
    --queued) QUEUED=1 && shift ;;
    --wait) WAIT=1 && shift ;;
    --spot) SPOT=1 && shift ;;
    --reserved) RESERVED=1 && shift ;;
    --create-bucket) CREATE_BUCKET=1 && shift ;;
    --valid-until)
      VALID_UNTIL="$(flag_value "$@")"
      shift "$(flag_words "$1")"
      ;;
    *)
      parse_common_flag "$@"
      shift "$CONSUMED"
      ;;
  esac
done
require PROJECT ZONE ACCELERATOR_TYPE NAME
((SPOT && RESERVED)) && die "--spot and --reserved exclude each other"
[[ -z "$VALID_UNTIL" || $QUEUED == 1 ]] || die "--valid-until needs --queued"
((WAIT == 0 || QUEUED)) || die "--wait needs --queued (tpu-vm create already waits)"
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}"
location_flags

CAPACITY=()
((SPOT)) && CAPACITY+=(--spot)
((RESERVED)) && CAPACITY+=(--reserved)

if ((CREATE_BUCKET)); then
  require BUCKET
  if ((DRY_RUN)) || ! "$GCLOUD" storage buckets describe "gs://$BUCKET" \
    --project="$PROJECT" >/dev/null 2>&1; then
    run "$GCLOUD" storage buckets create "gs://$BUCKET" --project="$PROJECT" \
      --location="${ZONE%-*}" --uniform-bucket-level-access
  fi
fi

if ((QUEUED)); then
  EXTRA=()
  [[ -n "$VALID_UNTIL" ]] && EXTRA+=(--valid-until-duration="$VALID_UNTIL")
  run "$GCLOUD" compute tpus queued-resources create "$NAME" "${LOCATION[@]}" \
    --node-id="$NAME" --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$RUNTIME_VERSION" ${CAPACITY[@]+"${CAPACITY[@]}"} \
    ${EXTRA[@]+"${EXTRA[@]}"}
  STATE_CMD=("$GCLOUD" compute tpus queued-resources describe "$NAME" "${LOCATION[@]}"
    --format="value(state.state)")
  if ((WAIT)); then
    if ((DRY_RUN)); then
      run "${STATE_CMD[@]}"
    else
      while true; do
        state="$("${STATE_CMD[@]}")"
        info "queued resource $NAME: $state"
        case "$state" in
          ACTIVE) break ;;
          FAILED | SUSPENDED) die "queued resource $NAME ended in state $state" ;;
        esac
        sleep "$POLL_SECONDS"
      done
    fi
  else
    info "queued; watch it with: $(quote_cmd "${STATE_CMD[@]}")"
  fi
else
  run "$GCLOUD" compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${CAPACITY[@]+"${CAPACITY[@]}"}
fi
info "next: launch/setup.sh --name $NAME --zone $ZONE --project $PROJECT"
