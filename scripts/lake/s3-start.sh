#!/usr/bin/env bash
# Add an S3 object store to a lake that start.sh runs in STATE_DIR: a one-node Ceph on
# 127.0.0.1 (1 mon, 1 OSD on a sparse bluestore file, radosgw with a TLS endpoint and a
# self-signed certificate), a bucket and keys, registered in the lake's Rucio server as
# the S3 RSE EDGE_S3 (https, sign_url=s3, keys in rse-accounts.cfg); lake.env and a
# matching agent config (edge-agent-s3.toml) are written.
#
# Usage: s3-start.sh [STATE_DIR]   (STATE_DIR defaults to $PWD/.lake; run start.sh first)
#
# Idempotent: a running Ceph is left alone, an existing cluster is started again.
# Ports (127.0.0.1): EDGE_LAKE_CEPH_MON_PORT (msgr v2, 13300), EDGE_LAKE_CEPH_MON_V1_PORT
# (16789), EDGE_LAKE_CEPH_OSD_PORTS (16800-16899), EDGE_LAKE_S3_PORT (radosgw TLS, 17443).
# Stop with s3-stop.sh STATE_DIR (stop.sh stops it too).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$HERE/common.sh"

case "${1:-}" in -h | --help) sed -n '2,13p' "$0"; exit 0 ;; -*) die "unknown option $1" ;; esac
(($# <= 1)) || die "at most one STATE_DIR argument"
set_state_dir "${1:-}"
[[ -f "$MARKER" && -f "$LAKE_ENV" ]] || die "no lake in $STATE_DIR: run start.sh $STATE_DIR first"
load_s3_settings
T0=$EPOCHREALTIME
lock_state
elapsed() { awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
wait_for() {
    local secs="$1" i
    shift
    for ((i = 0; i < secs * 5; i++)); do
        "$@" && return 0
        sleep 0.2
    done
    return 1
}
CONF="$CEPH_DIR/ceph.conf"
# every call bounded: a command that needs a ceph-mgr (there is none) would wait forever
CEPH=(timeout 60 ceph -c "$CONF" --connect-timeout 20)

install_ceph() {
    local need=() p
    for p in radosgw ceph-mon ceph-osd openssl curl; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
    done
    ((${#need[@]})) || return 0
    [[ $EUID -eq 0 ]] || die "missing Debian packages: ${need[*]} (run as root, or install them)"
    log "apt: installing ${need[*]} (~60 MB, ~20 s)"
    # The packages' postinst must not start system-wide Ceph daemons.
    local made_policy=0 rc=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    {
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
                --no-install-recommends "${need[@]}"
    } </dev/null >"$LOG_DIR/apt-ceph.log" 2>&1 || rc=$?
    if ((made_policy)); then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
    ((rc == 0)) || { show_log "$LOG_DIR/apt-ceph.log"; die "apt-get install failed (rc $rc)"; }
}

write_conf() {
    local fsid
    fsid="$(cat "$CEPH_DIR/fsid" 2>/dev/null || true)"
    if [[ -z "$fsid" ]]; then
        fsid="$(cat /proc/sys/kernel/random/uuid)"
        echo "$fsid" >"$CEPH_DIR/fsid"
    fi
    cat >"$CONF.tmp" <<EOF
# Written by scripts/lake/s3-start.sh: a one-node Ceph for tests, on 127.0.0.1 only.
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$CEPH_MON_PORT,v1:127.0.0.1:$CEPH_MON_V1_PORT]
public addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind ipv6 = false
ms bind port min = ${CEPH_OSD_PORTS%-*}
ms bind port max = ${CEPH_OSD_PORTS#*-}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $CEPH_DIR/admin.keyring
run dir = $CEPH_DIR/run
admin socket = $CEPH_DIR/run/\$cluster-\$name.asok
pid file = $CEPH_DIR/run/\$cluster-\$name.pid
log file = $CEPH_DIR/log/\$cluster-\$name.log
# one OSD: one copy, and no host-level failure domain
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
# a test machine's disk may be fuller than a Ceph node's: do not refuse to run
mon data avail warn = 2
mon data avail crit = 1

[mon.a]
mon data = $CEPH_DIR/mon/a

[osd]
osd data = $CEPH_DIR/osd/\$id
keyring = \$osd_data/keyring
osd objectstore = bluestore
# a sparse file: only written data takes disk space; memstore would keep every object in RAM
bluestore block create = true
bluestore block size = $CEPH_BLOCK_BYTES
osd memory target = 1073741824

[client.rgw.a]
keyring = $CEPH_DIR/rgw.keyring
rgw data = $CEPH_DIR/rgw
# deleted and overwritten objects' data is freed after 5 min, not 2 h: tests and benchmarks churn
rgw gc obj min wait = 300
rgw gc processor period = 300
rgw frontends = beast ssl_endpoint=127.0.0.1:$S3_PORT ssl_certificate=$CEPH_DIR/tls/cert.pem ssl_private_key=$CEPH_DIR/tls/key.pem
EOF
    mv -f "$CONF.tmp" "$CONF"
}

make_tls() {
    [[ -s "$CEPH_DIR/tls/cert.pem" && -s "$CEPH_DIR/tls/key.pem" ]] && return 0
    mkdir -p "$CEPH_DIR/tls"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=edge-lake-s3" \
        -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
        -keyout "$CEPH_DIR/tls/key.pem" -out "$CEPH_DIR/tls/cert.pem" >"$LOG_DIR/openssl.log" 2>&1 ||
        { show_log "$LOG_DIR/openssl.log"; die "openssl could not make the gateway's certificate"; }
    chmod 600 "$CEPH_DIR/tls/key.pem"
}

mon_up() { timeout 10 "${CEPH[@]}" mon stat >/dev/null 2>&1; }

start_mon() {
    if [[ ! -f "$CEPH_DIR/mon/a/done" ]]; then
        log "ceph: creating the monitor"
        rm -rf "$CEPH_DIR/mon/a"
        mkdir -p "$CEPH_DIR/mon/a"
        ceph-authtool --create-keyring "$CEPH_DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
        ceph-authtool --create-keyring "$CEPH_DIR/admin.keyring" --gen-key -n client.admin \
            --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
        ceph-authtool "$CEPH_DIR/mon.keyring" --import-keyring "$CEPH_DIR/admin.keyring" >/dev/null
        monmaptool --create --fsid "$(cat "$CEPH_DIR/fsid")" \
            --addv a "[v2:127.0.0.1:$CEPH_MON_PORT,v1:127.0.0.1:$CEPH_MON_V1_PORT]" \
            "$CEPH_DIR/monmap" >/dev/null
        ceph-mon -c "$CONF" --mkfs -i a --monmap "$CEPH_DIR/monmap" --keyring "$CEPH_DIR/mon.keyring" \
            >>"$LOG_DIR/ceph-setup.log" 2>&1 || { show_log "$LOG_DIR/ceph-setup.log"; die "ceph-mon --mkfs failed"; }
        touch "$CEPH_DIR/mon/a/done"
    fi
    if ! pid_alive "$CEPH_DIR/run/ceph-mon.a.pid" "$CONF"; then
        port_taken "$CEPH_MON_PORT" && die "port $CEPH_MON_PORT is taken (EDGE_LAKE_CEPH_MON_PORT)"
        ceph-mon -c "$CONF" -i a </dev/null >>"$LOG_DIR/ceph-setup.log" 2>&1 9>&- ||
            { show_log "$CEPH_DIR/log/ceph-mon.a.log"; die "ceph-mon did not start"; }
    fi
    wait_for 30 mon_up || { show_log "$CEPH_DIR/log/ceph-mon.a.log"; die "the Ceph monitor does not answer"; }
    log "ceph: mon up (v2 127.0.0.1:$CEPH_MON_PORT)"
}

osd_up() { "${CEPH[@]}" osd dump 2>/dev/null | grep -q '^osd.0 up'; }

start_osd() {
    local osd="$CEPH_DIR/osd/0" uuid
    if [[ ! -f "$osd/done" ]]; then
        log "ceph: creating the OSD (bluestore on a sparse $((CEPH_BLOCK_BYTES >> 30)) GiB file)"
        rm -rf "$osd"
        mkdir -p "$osd"
        uuid="$(cat /proc/sys/kernel/random/uuid)"
        # a half-made OSD of an earlier attempt: forget it first
        # (mon commands only: 'osd purge' needs a ceph-mgr, which this cluster does without, and hangs)
        "${CEPH[@]}" osd crush rm osd.0 >/dev/null 2>&1 || true
        "${CEPH[@]}" auth del osd.0 >/dev/null 2>&1 || true
        "${CEPH[@]}" osd rm 0 >/dev/null 2>&1 || true
        "${CEPH[@]}" osd new "$uuid" 0 >/dev/null
        # --no-mon-config: the OSD has no key yet to fetch the monitor's config with
        ceph-osd -c "$CONF" -i 0 --mkfs --mkkey --osd-uuid "$uuid" --no-mon-config \
            >>"$LOG_DIR/ceph-setup.log" 2>&1 || { show_log "$LOG_DIR/ceph-setup.log"; die "ceph-osd --mkfs failed"; }
        "${CEPH[@]}" auth add osd.0 osd 'allow *' mon 'allow profile osd' -i "$osd/keyring" >/dev/null
        "${CEPH[@]}" osd crush add-bucket localhost host >/dev/null 2>&1 || true
        "${CEPH[@]}" osd crush move localhost root=default >/dev/null 2>&1 || true
        "${CEPH[@]}" osd crush add osd.0 1.0 host=localhost >/dev/null
        touch "$osd/done"
    fi
    if ! pid_alive "$CEPH_DIR/run/ceph-osd.0.pid" "$CONF"; then
        ceph-osd -c "$CONF" -i 0 </dev/null >>"$LOG_DIR/ceph-setup.log" 2>&1 9>&- ||
            { show_log "$CEPH_DIR/log/ceph-osd.0.log"; die "ceph-osd did not start"; }
    fi
    wait_for 60 osd_up || { show_log "$CEPH_DIR/log/ceph-osd.0.log"; die "the OSD did not come up"; }
    log "ceph: osd.0 up"
}

s3_answers() { curl -s -o /dev/null --cacert "$CEPH_DIR/tls/cert.pem" -m 5 "https://127.0.0.1:$S3_PORT/"; }

start_rgw() {
    if [[ ! -s "$CEPH_DIR/rgw.keyring" ]]; then
        mkdir -p "$CEPH_DIR/rgw"
        "${CEPH[@]}" auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' \
            -o "$CEPH_DIR/rgw.keyring" >/dev/null
    fi
    if ! pid_alive "$CEPH_DIR/run/ceph-client.rgw.a.pid" "$CONF"; then
        port_taken "$S3_PORT" && die "port $S3_PORT is taken (EDGE_LAKE_S3_PORT)"
        radosgw -c "$CONF" -n client.rgw.a </dev/null >>"$LOG_DIR/ceph-setup.log" 2>&1 9>&- ||
            { show_log "$CEPH_DIR/log/ceph-client.rgw.a.log"; die "radosgw did not start"; }
    fi
    # the first start creates the gateway's pools: allow it time
    wait_for 90 s3_answers || { show_log "$CEPH_DIR/log/ceph-client.rgw.a.log"; die "radosgw does not answer on https://127.0.0.1:$S3_PORT"; }
    log "ceph: radosgw answering on https://127.0.0.1:$S3_PORT"
}

make_user_and_bucket() {
    if ! radosgw-admin -c "$CONF" user info --uid edge-lake >/dev/null 2>&1; then
        radosgw-admin -c "$CONF" user create --uid edge-lake --display-name "edge-agent test lake" \
            --access-key "$S3_ACCESS_KEY" --secret-key "$S3_SECRET_KEY" >/dev/null ||
            die "radosgw-admin user create failed"
    fi
    # curl 7.88 signs SigV4 but sends no x-amz-content-sha256, which RGW requires
    local code
    code="$(curl -s -o "$LOG_DIR/bucket.out" -w '%{http_code}' --cacert "$CEPH_DIR/tls/cert.pem" -X PUT \
        --aws-sigv4 "aws:amz:us-east-1:s3" -u "$S3_ACCESS_KEY:$S3_SECRET_KEY" \
        -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "https://127.0.0.1:$S3_PORT/$S3_BUCKET")"
    # 200 created; 409 BucketAlreadyExists / owned by us already
    [[ "$code" == 200 || "$code" == 409 ]] || { show_log "$LOG_DIR/bucket.out"; die "bucket creation answered HTTP $code"; }
    log "ceph: bucket $S3_BUCKET ready"
}

rucio_has_home() {
    local pid
    pid="$(tr -dc 0-9 <"$RUN_DIR/rucio.pid" 2>/dev/null)"
    [[ -n "$pid" ]] && tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "RUCIO_HOME=$RUCIO_DIR"
}

register_rse() {
    # Rucio reads rse-accounts.cfg from $RUCIO_HOME/etc; a server started by an older start.sh
    # has no RUCIO_HOME: restart it (3 s) so that it finds the keys.
    if ! rucio_has_home; then
        log "rucio: restarting with RUCIO_HOME=$RUCIO_DIR (rse-accounts.cfg)"
        exec 9>&-   # the scripts below take the state lock themselves
        "$HERE/stop.sh" --only-rucio "$STATE_DIR" >/dev/null
        "$HERE/start.sh" --only-rucio "$STATE_DIR" >/dev/null
        lock_state
    fi
    EDGE_LAKE_RUCIO_URL="http://127.0.0.1:$RUCIO_PORT" EDGE_LAKE_RUCIO_ACCOUNT="$RUCIO_ACCOUNT" \
        EDGE_LAKE_RUCIO_USERNAME="$RUCIO_USERNAME" EDGE_LAKE_RUCIO_PASSWORD="$RUCIO_PASSWORD" \
        EDGE_LAKE_S3_RSE="$S3_RSE" EDGE_LAKE_S3_PORT="$S3_PORT" EDGE_LAKE_S3_BUCKET="$S3_BUCKET" \
        EDGE_LAKE_S3_ACCESS_KEY="$S3_ACCESS_KEY" EDGE_LAKE_S3_SECRET_KEY="$S3_SECRET_KEY" \
        "$VENV/bin/python" "$HERE/lake_bootstrap.py" s3 "$RUCIO_DIR/etc/rse-accounts.cfg" \
        </dev/null >>"$LOG_DIR/bootstrap.log" 2>&1 ||
        { show_log "$LOG_DIR/bootstrap.log" 10; die "registering the S3 RSE in Rucio failed"; }
    tail -n 1 "$LOG_DIR/bootstrap.log" | sed 's/^/[lake] /'
}

write_env() {
    local tmp="$LAKE_ENV.tmp"
    grep -v '^EDGE_LAKE_S3_\|^EDGE_LAKE_CEPH_' "$LAKE_ENV" >"$tmp" || true
    cat >>"$tmp" <<EOF
EDGE_LAKE_S3_RSE="$S3_RSE"
EDGE_LAKE_S3_URL="https://127.0.0.1:$S3_PORT"
EDGE_LAKE_S3_PORT="$S3_PORT"
EDGE_LAKE_S3_BUCKET="$S3_BUCKET"
EDGE_LAKE_S3_CA="$CEPH_DIR/tls/cert.pem"
EDGE_LAKE_S3_ACCESS_KEY="$S3_ACCESS_KEY"
EDGE_LAKE_S3_SECRET_KEY="$S3_SECRET_KEY"
EDGE_LAKE_CEPH_CONF="$CONF"
EDGE_LAKE_CEPH_MON_PORT="$CEPH_MON_PORT"
EDGE_LAKE_CEPH_MON_V1_PORT="$CEPH_MON_V1_PORT"
EDGE_LAKE_CEPH_OSD_PORTS="$CEPH_OSD_PORTS"
EOF
    mv -f "$tmp" "$LAKE_ENV"
}

write_agent_config() {
    local lake1="${LAKE_RSES%% *}" cfg="$STATE_DIR/edge-agent-s3.toml"
    mkdir -p "$STATE_DIR/daq/s3"
    cat >"$cfg.tmp" <<EOF
# edge-agent pushing to the S3 RSE $S3_RSE and to $lake1 (written by scripts/lake/s3-start.sh).
#   edge-agent -c $cfg run
state_dir = "$STATE_DIR/agent-state-s3"
rescan_seconds = 30

[status]
port = 8788

[lake]
kind = "rucio"

[lake.rucio]
url = "http://127.0.0.1:$RUCIO_PORT"
account = "$RUCIO_ACCOUNT"
schemes = ["http", "root"]

[lake.rucio.auth]
type = "userpass"
username = "$RUCIO_USERNAME"
password = "$RUCIO_PASSWORD"

# Every read, write and delete on $S3_RSE goes through a URL Rucio signs; the gateway's
# self-signed certificate is verified with its own CA file.
[destinations.s3]
kind = "rse"
rse = "$S3_RSE"
sign_url = "s3"
ca_cert = "$CEPH_DIR/tls/cert.pem"

[destinations.lake1]
kind = "rse"
rse = "$lake1"
scheme = "http"

# Files written to $STATE_DIR/daq/s3 go to both; deleted once both copies verify
# (S3: size + ETag = MD5, which is why md5 is on).
[rules.s3]
directory = "$STATE_DIR/daq/s3"
completion = ["closed", "stable"]
stable_seconds = 2
scope = "$SCOPE"
name_template = "s3.{night}.{filename}"
dataset_template = "s3.{night}"
destinations = ["s3", "lake1"]
copies = 2
md5 = true
EOF
    mv -f "$cfg.tmp" "$cfg"
    AGENT_CFG="$cfg"
}

mkdir -p "$CEPH_DIR/run" "$CEPH_DIR/log" "$LOG_DIR"
install_ceph
write_conf
make_tls
start_mon
start_osd
start_rgw
make_user_and_bucket
register_rse
write_env
write_agent_config
cat <<EOF
[lake] S3 ready in $(elapsed) s
  S3 (radosgw) https://127.0.0.1:$S3_PORT/$S3_BUCKET  CA $CEPH_DIR/tls/cert.pem
               keys in $LAKE_ENV (EDGE_LAKE_S3_ACCESS_KEY/SECRET_KEY); Ceph logs $CEPH_DIR/log
  RSE          $S3_RSE (sign_url=s3, s3=true; keys in $RUCIO_DIR/etc/rse-accounts.cfg)
  agent        edge-agent -c $AGENT_CFG run
  stop         $HERE/s3-stop.sh $STATE_DIR
EOF
