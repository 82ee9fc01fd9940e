# shellcheck shell=bash disable=SC2034  # the variables are used by the sourcing scripts
# Shared settings and helpers for the lake scripts (sourced, not run).
# Everything here is about where things live and how to tell whether a
# daemon that start.sh launched is still running.

# The Rucio releases CI tests the agent against: the newest, and the newest of the oldest LTS
# series Rucio still maintains (tests/lake.py and scripts/test read these two lines).
RUCIO_NEWEST=41.5.1
RUCIO_OLDEST_LTS=38.6.4

log() { printf '[lake %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[lake] ERROR: %s\n' "$*" >&2; exit 1; }

# Print the end of a log file to stderr (used before die, so CI shows why).
show_log() {
    local f="$1"
    if [[ -s "$f" ]]; then
        printf -- '----- last lines of %s -----\n' "$f" >&2
        tail -n "${2:-30}" "$f" >&2
        printf -- '----- end of %s -----\n' "$f" >&2
    else
        printf '(log %s is empty or missing)\n' "$f" >&2
    fi
}

# set_state_dir DIR: resolve the state directory and every path derived from it.
set_state_dir() {
    STATE_DIR="$(realpath -m -- "${1:-$PWD/.lake}")"
    # The path ends up in an SQLite URL, an XRootD config and lake.env: keep it plain.
    [[ "$STATE_DIR" =~ ^[A-Za-z0-9_./+-]+$ ]] ||
        die "state directory '$STATE_DIR' must contain only letters, digits and _ . / + -"
    [[ "$STATE_DIR" != / ]] || die "refusing to use / as the state directory"
    RUN_DIR="$STATE_DIR/run"        # pid files
    LOG_DIR="$STATE_DIR/log"
    DATA_DIR="$STATE_DIR/xrootd"    # oss.localroot: files are under $DATA_DIR/data/...
    XROOTD_ADMIN="$STATE_DIR/xrootd-admin"
    RUCIO_DIR="$STATE_DIR/rucio"
    RUCIO_CFG="$RUCIO_DIR/rucio.cfg"
    PG_DIR="$STATE_DIR/postgres"    # owned by the user PostgreSQL runs as
    PGDATA="$PG_DIR/data"
    MARKER="$STATE_DIR/.edge-lake"  # proves to stop.sh --purge that this is ours
    LAKE_ENV="$STATE_DIR/lake.env"
    load_settings
    # A venv per Rucio release: two lakes of two series never share (and reinstall) one.
    VENV="${EDGE_LAKE_VENV:-${EDGE_LAKE_VENV_ROOT:-$STATE_DIR}/venv-rucio-$RUCIO_VERSION}"
}

# load_settings: EDGE_LAKE_* from the environment, else from the lake.env of an
# earlier start (so rucio-up.sh / stop.sh find a lake started with other ports),
# else the defaults. Ports are all on 127.0.0.1.
load_settings() {
    local line key value env_db="${EDGE_LAKE_RUCIO_DB-}" env_workers="${EDGE_LAKE_RUCIO_WORKERS+set}" old_db=""
    local env_version="${EDGE_LAKE_RUCIO_VERSION-}" old_version=""
    if [[ -f "$STATE_DIR/lake.env" ]]; then
        while IFS= read -r line; do
            [[ "$line" =~ ^(EDGE_LAKE_[A-Z0-9_]+)=\"([^\"]*)\"$ ]] || continue
            key="${BASH_REMATCH[1]}" value="${BASH_REMATCH[2]}"
            [[ "$key" != EDGE_LAKE_RUCIO_DB ]] || old_db="$value"
            [[ "$key" != EDGE_LAKE_RUCIO_VERSION ]] || old_version="$value"
            [[ -n "${!key+set}" ]] || export "$key=$value"
        done <"$STATE_DIR/lake.env"
    fi
    # The release the lake was made with: its rucio-version file (written before the database),
    # else its lake.env's record, else (a lake of an older start.sh) 41.5.1, the only release
    # that installed. Unless asked for, that one (start.sh refuses another).
    MADE_WITH=""
    [[ ! -s "$STATE_DIR/rucio-version" ]] || old_version="$(<"$STATE_DIR/rucio-version")"
    if [[ -n "$old_version" ]]; then
        MADE_WITH="$old_version"
    elif [[ -f "$STATE_DIR/.edge-lake" ]]; then
        MADE_WITH=41.5.1
    fi
    [[ -n "$env_version" || -z "$MADE_WITH" ]] || export EDGE_LAKE_RUCIO_VERSION="$MADE_WITH"
    # Another database asked for: its default number of workers, not the remembered one.
    if [[ -n "$env_db" && "$env_db" != "$old_db" && -z "$env_workers" ]]; then
        unset EDGE_LAKE_RUCIO_WORKERS
    fi
    RUCIO_PORT="${EDGE_LAKE_RUCIO_PORT:-18000}"
    XROOTD_PORT="${EDGE_LAKE_XROOTD_PORT:-11094}"
    XROOTD_HTTP_PORT="${EDGE_LAKE_XROOTD_HTTP_PORT:-18080}"
    # Not 11211: a system-wide memcached may sit there, and Rucio servers must never
    # share one (cache keys are not namespaced per database).
    MEMCACHED_PORT="${EDGE_LAKE_MEMCACHED_PORT:-21211}"
    # Not 5432: a system cluster (Debian's postgresql package makes one) may sit there.
    POSTGRES_PORT="${EDGE_LAKE_POSTGRES_PORT:-15432}"
    # Rucio's database: postgresql (as in production: several API workers write at once) or
    # sqlite (one file, no server; 'database is locked' 500s with more than one worker).
    RUCIO_DB="${EDGE_LAKE_RUCIO_DB:-postgresql}"
    case "$RUCIO_DB" in
        postgresql) RUCIO_WORKERS="${EDGE_LAKE_RUCIO_WORKERS:-2}" ;;
        sqlite) RUCIO_WORKERS="${EDGE_LAKE_RUCIO_WORKERS:-1}" ;;
        *) die "EDGE_LAKE_RUCIO_DB must be postgresql or sqlite, not '$RUCIO_DB'" ;;
    esac
    [[ "$RUCIO_WORKERS" =~ ^[1-9][0-9]?$ ]] || die "EDGE_LAKE_RUCIO_WORKERS must be a number from 1 to 99"
    RUCIO_ACCOUNT=root
    RUCIO_USERNAME="${EDGE_LAKE_RUCIO_USERNAME:-ddmlab}"
    RUCIO_PASSWORD="${EDGE_LAKE_RUCIO_PASSWORD:-secret}"
    SCOPE="${EDGE_LAKE_SCOPE:-test}"
    BUF_RSE=EDGE_BUF
    LAKE_RSES="EDGE_LAKE1 EDGE_LAKE2"
    # The Rucio server: the newest release by default; CI also runs the oldest LTS series
    # Rucio still supports (the README says which). Each series gets a venv of its own.
    RUCIO_VERSION="${EDGE_LAKE_RUCIO_VERSION:-$RUCIO_NEWEST}"
    [[ "$RUCIO_VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "EDGE_LAKE_RUCIO_VERSION must be a release such as $RUCIO_NEWEST, not '$RUCIO_VERSION'"
    GUNICORN_VERSION=27.0.1
}

# lock_state: one start/stop at a time per state directory (e.g. parallel test
# workers). The lock is fd 9; daemons are started with 9>&- so they don't keep it.
lock_state() {
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/.lock"
    flock -w 300 9 || die "another start.sh/stop.sh holds $STATE_DIR/.lock"
}

# pid_alive PIDFILE WORD: true if the pid file names a live (not zombie) process
# whose command line contains WORD (guards against a recycled pid).
pid_alive() {
    local pidfile="$1" word="$2" pid state
    [[ -s "$pidfile" ]] || return 1
    pid="$(tr -dc 0-9 <"$pidfile")"
    [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
    state="$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$pid/stat" 2>/dev/null)" || return 1
    [[ "$state" != Z && "$state" != X ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$word"
}

# port_open PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# port_taken PORT: still in use after 5 s (a killed gunicorn master's worker
# notices within a second or so and leaves; give it that time).
port_taken() {
    local i
    for ((i = 0; i < 25; i++)); do
        port_open "$1" || return 1
        sleep 0.2
    done
    return 0
}

# stop_pid NAME PIDFILE WORD [SIGNAL]: SIGNAL (default TERM), wait up to 15 s, then SIGKILL.
stop_pid() {
    local name="$1" pidfile="$2" word="$3" sig="${4:-TERM}" pid i
    if ! pid_alive "$pidfile" "$word"; then
        log "$name: not running"
        rm -f -- "$pidfile"
        return 0
    fi
    pid="$(tr -dc 0-9 <"$pidfile")"
    kill -"$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        pid_alive "$pidfile" "$word" || break
        sleep 0.1
    done
    if pid_alive "$pidfile" "$word"; then
        log "$name: still alive after 15 s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f -- "$pidfile"
    log "$name: stopped (pid $pid)"
}

# postgres_pidfile: RUN_DIR/postgres.pid from the postmaster's own lock file (its first
# line is the pid; the other lines hold more digits, which pid_alive would glue on).
postgres_pidfile() {
    local pid=""
    [[ -r "$PGDATA/postmaster.pid" ]] && pid="$(head -n 1 "$PGDATA/postmaster.pid" 2>/dev/null)"
    if [[ "$pid" =~ ^[0-9]+$ ]]; then
        echo "$pid" >"$RUN_DIR/postgres.pid"
    else
        rm -f -- "$RUN_DIR/postgres.pid"
    fi
    echo "$RUN_DIR/postgres.pid"
}

# stop_postgres: a fast shutdown (SIGINT: open sessions, e.g. a Rucio daemon's, are ended;
# SIGTERM would wait for them to leave).
stop_postgres() {
    [[ -d "$PGDATA" && -d "$RUN_DIR" ]] || return 0
    stop_pid postgres "$(postgres_pidfile)" "$PGDATA" INT
}

# load_s3_settings: where s3-start.sh keeps its one-node Ceph, and its ports (127.0.0.1).
load_s3_settings() {
    CEPH_DIR="$STATE_DIR/ceph"
    CEPH_MON_PORT="${EDGE_LAKE_CEPH_MON_PORT:-13300}"       # msgr v2
    CEPH_MON_V1_PORT="${EDGE_LAKE_CEPH_MON_V1_PORT:-16789}"
    CEPH_OSD_PORTS="${EDGE_LAKE_CEPH_OSD_PORTS:-16800-16899}"
    S3_PORT="${EDGE_LAKE_S3_PORT:-17443}"                   # radosgw, TLS only (Rucio signs https URLs)
    S3_RSE=EDGE_S3
    S3_BUCKET="${EDGE_LAKE_S3_BUCKET:-edge-lake}"
    # test keys for a loopback gateway; Rucio holds them (rse-accounts.cfg), the agent never does
    S3_ACCESS_KEY="${EDGE_LAKE_S3_ACCESS_KEY:-EDGELAKETESTACCESS01}"
    S3_SECRET_KEY="${EDGE_LAKE_S3_SECRET_KEY:-edge-lake-test-secret-key-0123456789abcd}"
    CEPH_BLOCK_BYTES=$((20 << 30))                          # sparse: takes only what is written
}
