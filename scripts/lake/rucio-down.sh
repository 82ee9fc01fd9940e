#!/usr/bin/env bash
# Take only the Rucio server away (the "lake outage" test); storage keeps running.
# Usage: rucio-down.sh [STATE_DIR]     Same as: stop.sh --only-rucio [STATE_DIR]
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/stop.sh" --only-rucio "$@"
