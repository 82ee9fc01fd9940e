#!/usr/bin/env bash
# Stop the lake that start.sh started (found through its pid files).
#
# Usage: stop.sh [--only-rucio] [--purge] [STATE_DIR]   (STATE_DIR defaults to $PWD/.lake)
#   --only-rucio   stop only the Rucio server (the "lake outage"; see rucio-down.sh)
#   --purge        also delete STATE_DIR: database, stored files, logs and the
#                  venv inside it (a venv given by EDGE_LAKE_VENV is kept)
#
# Stopping what is already stopped is fine.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$HERE/common.sh"

ONLY_RUCIO=0
PURGE=0
POSITIONAL=()
for arg in "$@"; do
    case "$arg" in
        --only-rucio) ONLY_RUCIO=1 ;;
        --purge) PURGE=1 ;;
        -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
        -*) die "unknown option $arg (see --help)" ;;
        *) POSITIONAL+=("$arg") ;;
    esac
done
((${#POSITIONAL[@]} <= 1)) || die "at most one STATE_DIR argument"
((ONLY_RUCIO && PURGE)) && die "--only-rucio and --purge do not go together"
set_state_dir "${POSITIONAL[0]:-}"

if [[ ! -d "$STATE_DIR" ]]; then
    log "no lake state in $STATE_DIR: nothing to stop"
    exit 0
fi
lock_state

# The Rucio server first: it is the client of the others.
stop_pid rucio "$RUN_DIR/rucio.pid" "$RUN_DIR/rucio.pid"
if ((ONLY_RUCIO)); then
    exit 0   # PostgreSQL and memcached stay: the outage is the API's
fi
stop_postgres
# The S3 store of s3-start.sh, if there is one.
[[ -d "$STATE_DIR/ceph" ]] && "$HERE/s3-stop.sh" "$STATE_DIR"
stop_pid memcached "$RUN_DIR/memcached.pid" memcached
stop_pid xrootd "$RUN_DIR/xrootd.pid" "$STATE_DIR/xrootd.cfg"

if ((PURGE)); then
    # Only delete a directory that start.sh made: a wrong argument must not
    # wipe something else.
    [[ -f "$MARKER" ]] || die "$STATE_DIR has no $(basename "$MARKER") marker: not a lake state directory, not deleting it"
    rm -rf -- "$STATE_DIR"
    log "purged $STATE_DIR"
fi
