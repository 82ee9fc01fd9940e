#!/usr/bin/env bash
# Stop the one-node Ceph that s3-start.sh started in STATE_DIR (radosgw, OSD, mon, by pid file).
# Its data stays in STATE_DIR/ceph (stop.sh --purge removes it). Stopping what is stopped is fine.
#
# Usage: s3-stop.sh [STATE_DIR]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$HERE/common.sh"

case "${1:-}" in -h | --help) sed -n '2,5p' "$0"; exit 0 ;; -*) die "unknown option $1" ;; esac
set_state_dir "${1:-}"
load_s3_settings
[[ -d "$CEPH_DIR" ]] || { log "no Ceph in $STATE_DIR: nothing to stop"; exit 0; }
# The gateway first (the OSD's client), the monitor last. stop_pid sends SIGKILL after 15 s:
# a radosgw stuck on a full OSD ignores SIGTERM.
stop_pid radosgw "$CEPH_DIR/run/ceph-client.rgw.a.pid" "$CEPH_DIR/ceph.conf"
stop_pid ceph-osd "$CEPH_DIR/run/ceph-osd.0.pid" "$CEPH_DIR/ceph.conf"
stop_pid ceph-mon "$CEPH_DIR/run/ceph-mon.a.pid" "$CEPH_DIR/ceph.conf"
