#!/usr/bin/env bash
# Bring the Rucio server back on the existing state (a few seconds).
# Usage: rucio-up.sh [STATE_DIR]       Same as: start.sh --only-rucio [STATE_DIR]
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/start.sh" --only-rucio "$@"
