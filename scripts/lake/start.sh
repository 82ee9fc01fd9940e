#!/usr/bin/env bash
# Start a real data lake on 127.0.0.1: XRootD storage (root:// + HTTP), a
# PostgreSQL (or SQLite: EDGE_LAKE_RUCIO_DB=sqlite), a memcached and a Rucio
# server (gunicorn), then bootstrap the catalogue.
#
# Usage: start.sh [--only-rucio] [STATE_DIR]      (STATE_DIR defaults to $PWD/.lake)
#   --only-rucio   (re)start only PostgreSQL, memcached and the Rucio server on an
#                  existing state (the "lake outage" test's way back; see rucio-up.sh)
#
# Idempotent: what already runs is left alone, what is already installed or
# registered is kept. Settings: see README.md (EDGE_LAKE_* variables).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$HERE/common.sh"

ONLY_RUCIO=0
POSITIONAL=()
for arg in "$@"; do
    case "$arg" in
        --only-rucio) ONLY_RUCIO=1 ;;
        -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
        -*) die "unknown option $arg (see --help)" ;;
        *) POSITIONAL+=("$arg") ;;
    esac
done
((${#POSITIONAL[@]} <= 1)) || die "at most one STATE_DIR argument"
set_state_dir "${POSITIONAL[0]:-}"

T0=$EPOCHREALTIME
if ((ONLY_RUCIO)) && [[ ! -f "$MARKER" ]]; then
    die "no lake state in $STATE_DIR: run start.sh (without --only-rucio) first"
fi
lock_state
if [[ "$RUCIO_DB" == sqlite ]] && ((RUCIO_WORKERS > 1)); then
    log "warning: $RUCIO_WORKERS Rucio workers on SQLite: concurrent writes will fail ('database is locked')"
fi
elapsed() { awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
PY="${EDGE_LAKE_PYTHON:-/usr/bin/python3}"
AS_ROOT=0
[[ $EUID -eq 0 ]] && AS_ROOT=1
# PostgreSQL refuses to run as root: as root it runs as the Debian package's user.
PG_USER=postgres
PG_PASSWORD=rucio   # role and database 'rucio'; the server listens on 127.0.0.1 only
LEDGER_PASSWORD=edge-ledger   # role and database 'edge_ledger': the agents' ledger (issue 15)
PG_STARTED=0
if [[ "$RUCIO_DB" == postgresql ]]; then
    DB_URL="postgresql+psycopg://rucio:$PG_PASSWORD@127.0.0.1:$POSTGRES_PORT/rucio"
    BULK_MAX=1000   # Rucio's request schema caps lists at 1,000 items
else
    DB_URL="sqlite:///$RUCIO_DIR/rucio.db"
    BULK_MAX=480    # SQLite's expression-depth limit (add_replicas >= 997, rules >= ~1000 locks)
fi

# wait_for SECONDS CMD...: poll CMD every 0.2 s until it succeeds.
wait_for() {
    local secs="$1" i
    shift
    for ((i = 0; i < secs * 5; i++)); do
        "$@" && return 0
        sleep 0.2
    done
    return 1
}

# A daemon's config is copied to RUN_DIR when it starts; a running daemon whose
# copy differs from the current config (other ports) gets restarted.
config_differs() { ! cmp -s -- "$1" "$RUN_DIR/$(basename "$1").started"; }
remember_config() { cp -f -- "$1" "$RUN_DIR/$(basename "$1").started"; }

# ---------------------------------------------------------------- packages ---
install_packages() {
    local need=() p
    for p in xrootd-server xrootd-client xrootd-server-plugins xrootd-plugins memcached curl; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
    done
    # Debian's server (its postinst makes a 'main' cluster on 5432; policy-rc.d below
    # keeps it from starting; this lake initdb's its own).
    if [[ "$RUCIO_DB" == postgresql ]] && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
        need+=(postgresql)
    fi
    # Python with venv support is needed only to create the venv.
    if [[ ! -x "$VENV/bin/python" ]] && ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
        [[ "$PY" == /usr/bin/python3 ]] || die "$PY cannot create a venv (EDGE_LAKE_PYTHON)"
        need+=(python3 python3-venv)
    fi
    ((${#need[@]})) || return 0

    ((AS_ROOT)) || die "missing Debian packages: ${need[*]} (run as root, or install them)"
    log "apt: installing ${need[*]}"
    # Keep the packages' postinst from starting a system-wide memcached on
    # 11211 (or PostgreSQL on 5432): this lake runs its own, on its own port.
    local made_policy=0 rc=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    {
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}"
    } </dev/null >"$LOG_DIR/apt.log" 2>&1 || rc=$?
    if ((made_policy)); then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
    ((rc == 0)) || { show_log "$LOG_DIR/apt.log"; die "apt-get install failed (rc $rc)"; }
}

venv_ready() {
    [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" - <<EOF 2>/dev/null
from importlib.metadata import version
assert version("rucio") == "$RUCIO_VERSION" and version("gunicorn") == "$GUNICORN_VERSION"
import psycopg, psycopg_pool  # the postgresql extra
EOF
}

install_venv() {
    if venv_ready; then
        return 0
    fi
    local held
    held="$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("rucio"))' 2>/dev/null)" || held=""
    # Another lake may run from this venv: a pip install here would swap its Rucio underneath it.
    [[ -z "$held" || "$held" == "$RUCIO_VERSION" ]] ||
        die "the venv $VENV holds Rucio $held, not $RUCIO_VERSION: give each Rucio release a venv of its own (EDGE_LAKE_VENV, or leave it unset)"
    if [[ ! -x "$VENV/bin/python" ]]; then
        log "venv: creating $VENV"
        "$PY" -m venv "$VENV" </dev/null >"$LOG_DIR/pip.log" 2>&1 ||
            { show_log "$LOG_DIR/pip.log"; die "could not create the venv $VENV"; }
    fi
    # Rucio (server) does not pull gunicorn in; the postgresql extra is psycopg 3 (binary) +
    # psycopg-pool, installed whatever EDGE_LAKE_RUCIO_DB says so that a venv serves both.
    log "venv: pip install rucio[postgresql]==$RUCIO_VERSION gunicorn==$GUNICORN_VERSION (30-45 s the first time)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check \
        "rucio[postgresql]==$RUCIO_VERSION" "gunicorn==$GUNICORN_VERSION" </dev/null >>"$LOG_DIR/pip.log" 2>&1 ||
        { show_log "$LOG_DIR/pip.log"; die "pip install into $VENV failed"; }
    venv_ready || die "rucio/gunicorn/psycopg still missing from $VENV after pip (see $LOG_DIR/pip.log)"
}

# -------------------------------------------------------------- directories ---
# The Rucio release a state directory was made with (MADE_WITH, common.sh), recorded before its
# database exists: the schema is that release's, and another release on it fails in obscure
# ways (or migrates it).
check_release() {
    if [[ -n "$MADE_WITH" && "$MADE_WITH" != "$RUCIO_VERSION" ]]; then
        die "the lake in $STATE_DIR was made by Rucio $MADE_WITH, not $RUCIO_VERSION (EDGE_LAKE_RUCIO_VERSION): use another STATE_DIR, or stop.sh --purge this one"
    fi
    printf '%s\n' "$RUCIO_VERSION" >"$STATE_DIR/rucio-version"
}

prepare_dirs() {
    check_release
    mkdir -p "$RUN_DIR" "$LOG_DIR" "$RUCIO_DIR" "$XROOTD_ADMIN" \
        "$DATA_DIR/data/buf" "$DATA_DIR/data/lake1" "$DATA_DIR/data/lake2"
    touch "$MARKER"
    if ((AS_ROOT)); then
        # XRootD refuses to run as root: it runs as user xrootd, which must write
        # the data, its admin dir, its log (it keeps a .lock there) and its pid file.
        chown xrootd:xrootd "$RUN_DIR" "$LOG_DIR" "$XROOTD_ADMIN" "$DATA_DIR" "$DATA_DIR/data" \
            "$DATA_DIR/data/buf" "$DATA_DIR/data/lake1" "$DATA_DIR/data/lake2"
        runuser -u xrootd -- test -w "$DATA_DIR/data/lake1" -a -w "$XROOTD_ADMIN" ||
            die "user xrootd cannot reach $STATE_DIR (a parent directory such as /root is not
       world-searchable). Use a state directory elsewhere, e.g. start.sh /var/tmp/edge-lake"
    fi
    if [[ "$RUCIO_DB" == postgresql ]]; then
        mkdir -p "$PG_DIR"
        chmod 700 "$PG_DIR"
        touch "$LOG_DIR/postgresql.log"   # pg_ctl opens it as the server's user
        if ((AS_ROOT)); then
            id -u "$PG_USER" >/dev/null 2>&1 ||
                die "user $PG_USER is missing (it comes with Debian's postgresql package)"
            chown "$PG_USER:" "$PG_DIR" "$LOG_DIR/postgresql.log"
            runuser -u "$PG_USER" -- test -w "$PG_DIR" -a -w "$LOG_DIR/postgresql.log" ||
                die "user $PG_USER cannot reach $PG_DIR: use a state directory elsewhere, e.g. /var/tmp/edge-lake"
        fi
    fi
}

# -------------------------------------------------------------- postgresql ---
# as_pg CMD...: run CMD as the user PostgreSQL runs as.
as_pg() {
    if ((AS_ROOT)); then runuser -u "$PG_USER" -- "$@"; else "$@"; fi
}

# The binaries of the cluster's major version (after a Debian upgrade the newest
# server could not open it), else of the newest installed server.
pg_bin() {
    local v
    if [[ -f "$PGDATA/PG_VERSION" ]]; then
        v="$(cat "$PGDATA/PG_VERSION")"
        [[ -x "/usr/lib/postgresql/$v/bin/postgres" ]] ||
            die "$PGDATA is a PostgreSQL $v cluster but /usr/lib/postgresql/$v/bin is missing"
        echo "/usr/lib/postgresql/$v/bin"
        return
    fi
    v="$(compgen -G '/usr/lib/postgresql/*/bin/initdb' | sort -V | tail -n 1)"
    [[ -n "$v" ]] || die "no PostgreSQL server in /usr/lib/postgresql (apt-get install postgresql)"
    dirname "$v"
}

# pid_gone PID: no process (not even a zombie) has this pid any more.
pid_gone() { [[ ! -e "/proc/$1" ]]; }

# postgres_children_gone: no backend of an earlier postmaster on this PGDATA is left (they
# keep its shared memory; a new postmaster refuses to start next to them).
postgres_children_gone() {
    local d
    for d in /proc/[0-9]*; do
        [[ "$(cat "$d/comm" 2>/dev/null)" == postgres ]] || continue
        [[ "$(readlink "$d/cwd" 2>/dev/null)" == "$PGDATA" ]] && return 1
    done
    return 0
}

pg_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$POSTGRES_PORT" -d postgres -U rucio; }

init_postgres() {
    PG_BIN="$(pg_bin)"
    if [[ ! -f "$PGDATA/PG_VERSION" ]]; then
        # initdb into a new directory and rename it: an interrupted run leaves no half cluster.
        local new="$PG_DIR/data.new" pw="$PG_DIR/pwfile"
        rm -rf -- "$new"
        ( umask 077; printf '%s\n' "$PG_PASSWORD" >"$pw" )
        if ((AS_ROOT)); then chown "$PG_USER:" "$pw"; fi
        log "postgresql: initdb $PGDATA ($("$PG_BIN/postgres" --version))"
        # Superuser 'rucio' with a password; no unix sockets (paths under STATE_DIR can be
        # too long for one, and /var/run/postgresql belongs to the system cluster).
        as_pg "$PG_BIN/initdb" -D "$new" -U rucio --pwfile="$pw" --auth=scram-sha-256 -E UTF8 --no-locale \
            </dev/null >"$LOG_DIR/postgresql-initdb.log" 2>&1 ||
            { rm -f -- "$pw"; show_log "$LOG_DIR/postgresql-initdb.log"; die "initdb failed"; }
        rm -f -- "$pw"
        echo "include_if_exists = 'edge-lake.conf'" >>"$new/postgresql.conf"
        mv -- "$new" "$PGDATA"
    fi
    local tmp="$PGDATA/edge-lake.conf.tmp"
    cat >"$tmp" <<EOF
# Written by scripts/lake/start.sh (included by postgresql.conf): loopback only.
listen_addresses = '127.0.0.1'
port = $POSTGRES_PORT
unix_socket_directories = ''
EOF
    if ((AS_ROOT)); then chown "$PG_USER:" "$tmp"; fi
    mv -f -- "$tmp" "$PGDATA/edge-lake.conf"
}

start_postgres() {
    local pidfile logf="$LOG_DIR/postgresql.log" have
    init_postgres
    pidfile="$(postgres_pidfile)"
    if pid_alive "$pidfile" "$PGDATA" && config_differs "$PGDATA/edge-lake.conf"; then
        log "postgresql: configuration changed, restarting"
        stop_postgres
    fi
    pidfile="$(postgres_pidfile)"
    if pid_alive "$pidfile" "$PGDATA"; then
        log "postgresql: already running (pid $(cat "$pidfile"))"
    else
        # After a kill -9 the dead postmaster's pid (a zombie until reaped) and its
        # children still count for PostgreSQL's own lock check: wait for them to go.
        if [[ -s "$pidfile" ]]; then wait_for 15 pid_gone "$(cat "$pidfile")" || true; fi
        wait_for 15 postgres_children_gone ||
            die "processes of the killed PostgreSQL on $PGDATA are still there"
        port_taken "$POSTGRES_PORT" && die "port $POSTGRES_PORT is taken by another process (EDGE_LAKE_POSTGRES_PORT)"
        # pg_ctl -w returns once the server accepts connections (or has failed).
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$logf" -w -t 60 start \
            </dev/null >>"$LOG_DIR/postgresql.stdout" 2>&1 9>&- ||
            { show_log "$logf"; show_log "$LOG_DIR/postgresql.stdout"; die "PostgreSQL did not start"; }
        remember_config "$PGDATA/edge-lake.conf"
        PG_STARTED=1
        log "postgresql: started (pid $(cat "$(postgres_pidfile)" 2>/dev/null || echo ?))"
    fi
    wait_for 30 pg_ready ||
        { show_log "$logf"; die "PostgreSQL does not answer on 127.0.0.1:$POSTGRES_PORT"; }
    have="$(PGPASSWORD="$PG_PASSWORD" "$PG_BIN/psql" -h 127.0.0.1 -p "$POSTGRES_PORT" -U rucio -d postgres \
        -tAc "SELECT 1 FROM pg_database WHERE datname = 'rucio'" </dev/null)" ||
        die "cannot query PostgreSQL on 127.0.0.1:$POSTGRES_PORT"
    if [[ "$have" != 1 ]]; then
        PGPASSWORD="$PG_PASSWORD" "$PG_BIN/createdb" -h 127.0.0.1 -p "$POSTGRES_PORT" -U rucio rucio </dev/null ||
            die "createdb rucio failed"
        log "postgresql: database rucio created"
    fi
    # the agents' shared ledger (issue 15): a role and a database of its own on the same server
    have="$(PGPASSWORD="$PG_PASSWORD" "$PG_BIN/psql" -h 127.0.0.1 -p "$POSTGRES_PORT" -U rucio -d postgres \
        -tAc "SELECT 1 FROM pg_database WHERE datname = 'edge_ledger'" </dev/null)" ||
        die "cannot query PostgreSQL on 127.0.0.1:$POSTGRES_PORT"
    if [[ "$have" != 1 ]]; then
        PGPASSWORD="$PG_PASSWORD" "$PG_BIN/psql" -h 127.0.0.1 -p "$POSTGRES_PORT" -U rucio -d postgres -q \
            -c "CREATE ROLE edge_ledger LOGIN PASSWORD '$LEDGER_PASSWORD'" \
            -c "CREATE DATABASE edge_ledger OWNER edge_ledger" </dev/null ||
            die "creating the ledger database edge_ledger failed"
        log "postgresql: database edge_ledger (the agents' ledger) created"
    fi
}

# ------------------------------------------------------------------- xrootd ---
xrootd_ready() {
    # HEAD first (cheap); xrdfs proves the root:// side. xrdfs sometimes lingers
    # ~5 s on exit, hence the timeout.
    curl -sf -o /dev/null -I "http://127.0.0.1:$XROOTD_HTTP_PORT/data/lake1/" &&
        timeout 10 xrdfs "root://127.0.0.1:$XROOTD_PORT" ls /data >/dev/null 2>&1
}

start_xrootd() {
    local cfg="$STATE_DIR/xrootd.cfg" pidfile="$RUN_DIR/xrootd.pid" logf="$LOG_DIR/xrootd.log"
    cat >"$cfg" <<EOF
# Written by scripts/lake/start.sh: loopback test storage for the edge-agent lake.
all.export /data
oss.localroot $DATA_DIR
all.adminpath $XROOTD_ADMIN
all.pidpath $XROOTD_ADMIN
xrd.port $XROOTD_PORT
xrd.protocol XrdHttp:$XROOTD_HTTP_PORT libXrdHttp.so
http.listingdeny no
xrootd.chksum max 4 adler32 md5 crc32c
# XRootD cannot bind to one address (it listens on every interface), so it
# refuses every connection that does not come from this host.
xrd.allow host localhost
xrd.network nodnr
# No 'all.role server': that makes it wait for a cluster manager.
EOF
    chmod 644 "$cfg"
    # Started earlier with other ports: restart it (0.1 s) rather than fail later.
    if pid_alive "$pidfile" "$cfg" && config_differs "$cfg"; then
        log "xrootd: configuration changed, restarting"
        stop_pid xrootd "$pidfile" "$cfg"
    fi
    if pid_alive "$pidfile" "$cfg"; then
        log "xrootd: already running (pid $(cat "$pidfile"))"
    else
        port_taken "$XROOTD_PORT" && die "port $XROOTD_PORT is taken by another process (EDGE_LAKE_XROOTD_PORT)"
        port_taken "$XROOTD_HTTP_PORT" && die "port $XROOTD_HTTP_PORT is taken by another process (EDGE_LAKE_XROOTD_HTTP_PORT)"
        local as=()
        ((AS_ROOT)) && as=(-R xrootd)
        # -b daemonizes; the parent exits only once the server is configured.
        xrootd -b "${as[@]}" -l "$logf" -s "$pidfile" -c "$cfg" </dev/null >>"$LOG_DIR/xrootd.stdout" 2>&1 9>&- ||
            { show_log "$logf"; show_log "$LOG_DIR/xrootd.stdout"; die "xrootd did not start"; }
        remember_config "$cfg"
        log "xrootd: started (pid $(cat "$pidfile" 2>/dev/null || echo ?))"
    fi
    wait_for 20 xrootd_ready ||
        { show_log "$logf"; die "xrootd does not answer on root://127.0.0.1:$XROOTD_PORT and http://127.0.0.1:$XROOTD_HTTP_PORT"; }
}

# ---------------------------------------------------------------- memcached ---
start_memcached() {
    local pidfile="$RUN_DIR/memcached.pid"
    if pid_alive "$pidfile" memcached && ! pid_alive "$pidfile" "-p $MEMCACHED_PORT "; then
        log "memcached: port changed, restarting"
        stop_pid memcached "$pidfile" memcached
    fi
    # Rucio's cache keys are not namespaced per database: entries of another database
    # (RSE ids) would break this one. Another database, an empty cache.
    if pid_alive "$pidfile" memcached && [[ "$(cat "$RUN_DIR/memcached.db" 2>/dev/null)" != "$DB_URL" ]]; then
        log "memcached: Rucio's database changed, restarting (empty cache)"
        stop_pid memcached "$pidfile" memcached
    fi
    if pid_alive "$pidfile" memcached; then
        log "memcached: already running (pid $(cat "$pidfile"))"
    else
        port_taken "$MEMCACHED_PORT" && die "port $MEMCACHED_PORT is taken by another process (EDGE_LAKE_MEMCACHED_PORT)"
        local as=()
        ((AS_ROOT)) && as=(-u memcache)
        # Foreground process in its own session: its pid is known exactly
        # (memcached -d -P would need a pid directory writable by user memcache).
        setsid memcached "${as[@]}" -l 127.0.0.1 -p "$MEMCACHED_PORT" -U 0 -m 256 \
            </dev/null >>"$LOG_DIR/memcached.log" 2>&1 9>&- &
        echo $! >"$pidfile"
        echo "$DB_URL" >"$RUN_DIR/memcached.db"
        log "memcached: started (pid $!)"
    fi
    wait_for 10 port_open "$MEMCACHED_PORT" ||
        { show_log "$LOG_DIR/memcached.log"; die "memcached does not answer on 127.0.0.1:$MEMCACHED_PORT"; }
    pid_alive "$pidfile" memcached || die "memcached pid $(cat "$pidfile") is not the process on port $MEMCACHED_PORT"
}

# -------------------------------------------------------------------- rucio ---
write_rucio_config() {
    local site
    site="$("$VENV/bin/python" -c 'import os, rucio; print(os.path.dirname(rucio.__file__))')"
    cat >"$RUCIO_DIR/alembic.ini" <<EOF
[alembic]
script_location = $site/db/sqla/migrate_repo
sqlalchemy.url = $DB_URL

# Rucio's migrate_repo/env.py loads logging from this file: the sections must exist.
[loggers]
keys = root

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARN
handlers = console

[handler_console]
class = StreamHandler
args = (sys.stderr,)
formatter = generic

[formatter_generic]
format = %(levelname)s [%(name)s] %(message)s
EOF
    cat >"$RUCIO_CFG" <<EOF
# Written by scripts/lake/start.sh. No [policy] package: Rucio's generic
# permissions and schema; lfn2pfn of deterministic RSEs is 'hash'.
[common]
logdir = $LOG_DIR
loglevel = INFO

[database]
default = $DB_URL

[alembic]
cfg = $RUCIO_DIR/alembic.ini

[bootstrap]
# The plain password (used only when the database is created).
userpass_identity = $RUCIO_USERNAME
userpass_pwd = $RUCIO_PASSWORD
userpass_email = root@localhost

[cache]
# Without a reachable memcached Rucio silently runs uncached (list_replicas ~10x slower).
url = 127.0.0.1:$MEMCACHED_PORT
EOF
}

bootstrap_db() {
    : >"$LOG_DIR/bootstrap.log"  # this run's messages only
    RUCIO_CONFIG="$RUCIO_CFG" "$VENV/bin/python" "$HERE/lake_bootstrap.py" db "$DB_URL" \
        </dev/null >>"$LOG_DIR/bootstrap.log" 2>&1 ||
        { show_log "$LOG_DIR/bootstrap.log"; die "Rucio database bootstrap failed"; }
    tail -n 1 "$LOG_DIR/bootstrap.log" | sed 's/^/[lake] /'
}

# stop_orphan_workers PIDFILE: the workers of a gunicorn master that was killed (-9) keep
# the port until their next check of the parent (--timeout / 2 = 150 s): end them.
stop_orphan_workers() {
    local d cmd found=()
    for d in /proc/[0-9]*; do
        cmd="$({ tr '\0' ' ' <"$d/cmdline"; } 2>/dev/null)" || continue   # gone meanwhile
        [[ "$cmd" == *"gunicorn -D -b 127.0.0.1:"*" --pid $1 "* ]] && found+=("${d#/proc/}")
    done
    ((${#found[@]})) || return 0
    log "rucio: ending ${#found[@]} worker(s) of a dead gunicorn master (pids ${found[*]})"
    kill -TERM "${found[@]}" 2>/dev/null || true
    wait_for 10 port_free "$RUCIO_PORT" || kill -KILL "${found[@]}" 2>/dev/null || true
}

port_free() { ! port_open "$1"; }

rucio_ping() { curl -sf -m 5 -o /dev/null "http://127.0.0.1:$RUCIO_PORT/ping"; }

start_rucio() {
    local pidfile="$RUN_DIR/rucio.pid" logf="$LOG_DIR/rucio.log" i
    if pid_alive "$pidfile" "$pidfile" &&
        { config_differs "$RUCIO_CFG" || ! pid_alive "$pidfile" "127.0.0.1:$RUCIO_PORT " ||
            ! pid_alive "$pidfile" " -w $RUCIO_WORKERS "; }; then
        log "rucio: configuration, port or workers changed, restarting"
        stop_pid rucio "$pidfile" "$pidfile"
    fi
    # Rucio does not ping pooled connections (it does for MySQL only): after PostgreSQL came
    # back, each worker would answer 500 once per dead connection.
    if ((PG_STARTED)) && pid_alive "$pidfile" "$pidfile"; then
        log "rucio: restarting (PostgreSQL was restarted under it)"
        stop_pid rucio "$pidfile" "$pidfile"
    fi
    if pid_alive "$pidfile" "$pidfile"; then
        log "rucio: already running (pid $(cat "$pidfile"))"
    else
        stop_orphan_workers "$pidfile"
        port_taken "$RUCIO_PORT" && die "port $RUCIO_PORT is taken by another process (EDGE_LAKE_RUCIO_PORT)"
        rm -f -- "$pidfile"
        # Sync workers: 2 by default on PostgreSQL; 1 on SQLite, which gives
        # 'database is locked' 500s with more.
        # --timeout 300: uncached list_replicas can exceed the default 30 s.
        # --no-control-socket: gunicorn 27 would share ~/.gunicorn/gunicorn.ctl.
        # RUCIO_HOME: Rucio looks for rse-accounts.cfg (S3 keys, see s3-start.sh) in
        # $RUCIO_HOME/etc, $VIRTUAL_ENV/etc, $CONDA_PREFIX/etc: only ours must be there.
        env -u VIRTUAL_ENV -u CONDA_PREFIX RUCIO_HOME="$RUCIO_DIR" \
            RUCIO_CONFIG="$RUCIO_CFG" "$VENV/bin/gunicorn" -D -b "127.0.0.1:$RUCIO_PORT" -w "$RUCIO_WORKERS" \
            --timeout 300 --no-control-socket --pid "$pidfile" --chdir "$RUCIO_DIR" \
            --error-logfile "$logf" --access-logfile "$LOG_DIR/rucio-access.log" \
            rucio.web.rest.flaskapi.v1.main:application </dev/null >>"$LOG_DIR/rucio.stdout" 2>&1 9>&- ||
            { show_log "$LOG_DIR/rucio.stdout"; die "gunicorn did not start"; }
        remember_config "$RUCIO_CFG"
    fi
    # Fail fast if the master dies (bad config, import error) instead of waiting out the timeout.
    for ((i = 0; i < 300; i++)); do
        rucio_ping && break
        if ((i > 15)) && ! pid_alive "$pidfile" "$pidfile"; then
            show_log "$logf"
            die "the Rucio server (gunicorn) exited"
        fi
        sleep 0.2
    done
    rucio_ping || { show_log "$logf"; die "Rucio does not answer http://127.0.0.1:$RUCIO_PORT/ping after 60 s"; }
    log "rucio: answering on http://127.0.0.1:$RUCIO_PORT (pid $(cat "$pidfile"))"
}

bootstrap_catalogue() {
    EDGE_LAKE_RUCIO_URL="http://127.0.0.1:$RUCIO_PORT" EDGE_LAKE_RUCIO_ACCOUNT="$RUCIO_ACCOUNT" \
        EDGE_LAKE_RUCIO_USERNAME="$RUCIO_USERNAME" EDGE_LAKE_RUCIO_PASSWORD="$RUCIO_PASSWORD" \
        EDGE_LAKE_SCOPE="$SCOPE" EDGE_LAKE_BUF_RSE="$BUF_RSE" EDGE_LAKE_LAKE_RSES="$LAKE_RSES" \
        EDGE_LAKE_XROOTD_PORT="$XROOTD_PORT" EDGE_LAKE_XROOTD_HTTP_PORT="$XROOTD_HTTP_PORT" \
        "$VENV/bin/python" "$HERE/lake_bootstrap.py" catalogue </dev/null >>"$LOG_DIR/bootstrap.log" 2>&1 ||
        { show_log "$LOG_DIR/bootstrap.log" 10; die "catalogue bootstrap through the REST API failed"; }
    tail -n 1 "$LOG_DIR/bootstrap.log" | sed 's/^/[lake] /'
}

# ------------------------------------------------------------------ lake.env ---
write_lake_env() {
    local tmp="$LAKE_ENV.tmp"
    cat >"$tmp" <<EOF
# Written by scripts/lake/start.sh: what a client needs to use this lake.
# Shell: set -a; . $LAKE_ENV; set +a
EDGE_LAKE_RUCIO_URL="http://127.0.0.1:$RUCIO_PORT"
EDGE_LAKE_RUCIO_ACCOUNT="$RUCIO_ACCOUNT"
EDGE_LAKE_RUCIO_USERNAME="$RUCIO_USERNAME"
EDGE_LAKE_RUCIO_PASSWORD="$RUCIO_PASSWORD"
EDGE_LAKE_SCOPE="$SCOPE"
EDGE_LAKE_RSES="$BUF_RSE $LAKE_RSES"
EDGE_LAKE_BUF_RSE="$BUF_RSE"
EDGE_LAKE_LAKE_RSES="$LAKE_RSES"
EDGE_LAKE_LAKE_RSE_EXPRESSION="lake=true"
EDGE_LAKE_XROOTD_ROOT_URL="root://127.0.0.1:$XROOTD_PORT"
EDGE_LAKE_XROOTD_HTTP_URL="http://127.0.0.1:$XROOTD_HTTP_PORT"
EDGE_LAKE_DATA_DIR="$DATA_DIR"
EDGE_LAKE_STATE_DIR="$STATE_DIR"
EDGE_LAKE_VENV="$VENV"
EDGE_LAKE_RUCIO_VERSION="$RUCIO_VERSION"
EDGE_LAKE_RUCIO_CONFIG="$RUCIO_CFG"
EDGE_LAKE_RUCIO_PORT="$RUCIO_PORT"
EDGE_LAKE_XROOTD_PORT="$XROOTD_PORT"
EDGE_LAKE_XROOTD_HTTP_PORT="$XROOTD_HTTP_PORT"
EDGE_LAKE_MEMCACHED_PORT="$MEMCACHED_PORT"
EDGE_LAKE_POSTGRES_PORT="$POSTGRES_PORT"
EDGE_LAKE_RUCIO_DB="$RUCIO_DB"
EDGE_LAKE_RUCIO_DB_URL="$DB_URL"
EDGE_LAKE_RUCIO_WORKERS="$RUCIO_WORKERS"
EDGE_LAKE_RUCIO_BULK_MAX="$BULK_MAX"
EOF
    if [[ "$RUCIO_DB" == postgresql ]]; then
        cat >>"$tmp" <<EOF
EDGE_LAKE_LEDGER_URL="postgresql://edge_ledger@127.0.0.1:$POSTGRES_PORT/edge_ledger"
EDGE_LAKE_LEDGER_PASSWORD="$LEDGER_PASSWORD"
EOF
    fi
    mv -f "$tmp" "$LAKE_ENV"
}

# ------------------------------------------------------- agent config ---
# An edge-agent config for this lake: a push rule (the agent uploads to the first lake RSE over
# HTTP and asks Rucio for 2 copies on lake=true) and a register-in-place rule (the buffer is the
# EDGE_BUF RSE that XRootD serves; the agent registers what the DAQ writes there).
write_agent_config() {
    local lake1="${LAKE_RSES%% *}" cfg="$STATE_DIR/edge-agent.toml" tmp
    mkdir -p "$STATE_DIR/daq/push" "$DATA_DIR/data/buf/daq"
    chmod 0755 "$STATE_DIR/daq" "$STATE_DIR/daq/push" "$DATA_DIR/data/buf/daq"
    if ((AS_ROOT)); then chown xrootd: "$DATA_DIR/data/buf/daq" 2>/dev/null || true; fi
    tmp=$(mktemp "$cfg.XXXXXX")
    cat >"$tmp" <<EOF
# edge-agent against the loopback lake started by scripts/lake/start.sh (written by it).
#   edge-agent -c $cfg run
state_dir = "$STATE_DIR/agent-state"
rescan_seconds = 30

[status]
port = 8787

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

[destinations.lake1]
kind = "rse"
rse = "$lake1"
scheme = "http"

# DAQ files written to $STATE_DIR/daq/push are uploaded to $lake1; Rucio is asked for 2 copies on
# lake=true (the second is made by the lake: FTS in production, nobody here unless you play it).
[rules.push]
directory = "$STATE_DIR/daq/push"
completion = ["closed", "stable"]
stable_seconds = 2
scope = "$SCOPE"
name_template = "{night}.{filename}"
dataset_template = "push.{night}"
destinations = ["lake1"]
copies = 2
rse_expression = "lake=true"

# Files written to $DATA_DIR/data/buf/daq are already on the $BUF_RSE RSE: registered in place.
[rules.magic]
directory = "$DATA_DIR/data/buf/daq"
inject = "register"
buffer_rse = "$BUF_RSE"
buffer_url = "root://127.0.0.1:$XROOTD_PORT//data/buf/daq/"
completion = ["closed", "stable"]
stable_seconds = 2
scope = "$SCOPE"
name_template = "magic.{night}.{filename}"
dataset_template = "magic.{night}"
copies = 2
rse_expression = "lake=true"
EOF
    mv -f "$tmp" "$cfg"
    AGENT_CFG="$cfg"
}

# --------------------------------------------------------------------- main ---
# db_state: the database of this state exists (PostgreSQL cluster or SQLite file).
db_state() {
    if [[ "$RUCIO_DB" == postgresql ]]; then [[ -f "$PGDATA/PG_VERSION" ]]; else [[ -f "$RUCIO_DIR/rucio.db" ]]; fi
}

if ((ONLY_RUCIO)); then
    check_release
    if [[ ! -f "$RUCIO_CFG" ]] || ! db_state || ! venv_ready; then
        die "no lake state in $STATE_DIR: run start.sh (without --only-rucio) first"
    fi
    [[ "$RUCIO_DB" != postgresql ]] || start_postgres
    start_memcached
    start_rucio
    log "Rucio is back on http://127.0.0.1:$RUCIO_PORT ($(elapsed) s)"
    exit 0
fi

mkdir -p "$LOG_DIR"
log "state directory $STATE_DIR"
install_packages
prepare_dirs    # before pip: fail in seconds if user xrootd cannot reach STATE_DIR
install_venv
start_xrootd
if [[ -f "$RUCIO_CFG" ]] && ! grep -qxF "default = $DB_URL" "$RUCIO_CFG"; then
    log "rucio: the database is now $RUCIO_DB (EDGE_LAKE_RUCIO_DB): a new, empty catalogue; the old one is kept"
fi
[[ "$RUCIO_DB" != postgresql ]] || start_postgres
start_memcached
write_rucio_config
bootstrap_db
start_rucio
bootstrap_catalogue
write_lake_env
write_agent_config

if [[ "$RUCIO_DB" == postgresql ]]; then
    DB_SHOWN="PostgreSQL 127.0.0.1:$POSTGRES_PORT database rucio, data $PGDATA"
else
    DB_SHOWN="SQLite $RUCIO_DIR/rucio.db"
fi
cat <<EOF
[lake] ready in $(elapsed) s
  Rucio      http://127.0.0.1:$RUCIO_PORT  account $RUCIO_ACCOUNT, userpass $RUCIO_USERNAME/$RUCIO_PASSWORD, scope $SCOPE
             ($RUCIO_WORKERS workers, $DB_SHOWN, log $LOG_DIR/rucio.log)
  XRootD     root://127.0.0.1:$XROOTD_PORT  http://127.0.0.1:$XROOTD_HTTP_PORT  exports /data = $DATA_DIR/data
             (log $LOG_DIR/xrootd.log)
  memcached  127.0.0.1:$MEMCACHED_PORT
  RSEs       $BUF_RSE (buffer=true, non-deterministic, /data/buf)
             ${LAKE_RSES// /, } (lake=true, deterministic, /data/lake1, /data/lake2)
  client env $LAKE_ENV   (set -a; . $LAKE_ENV; set +a)
  agent      edge-agent -c $AGENT_CFG run   (edge-agent check-config $AGENT_CFG first)
  stop       $HERE/stop.sh $STATE_DIR [--purge]
EOF
