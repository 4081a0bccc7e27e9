#!/usr/bin/env bash
# The test command named in README.md (expects the package installed, see .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
exec python -m pytest -q tests "$@"
