#!/usr/bin/env bash
# An MLflow tracking server with a PostgreSQL backend, for sweeps spread over machines (one SQLite
# file cannot be shared between hosts). Both listen on 127.0.0.1 unless told otherwise.
#
#   scripts/tracking_server.sh start | stop | status        (make tracking-server / tracking-server-stop)
#
# Settings (environment variables):
#   TRACKING_SERVER_DIR  where everything lives (default .tracking-server): pgdata/ (the PostgreSQL
#                        cluster, its log server.log), artifacts/ (the server's --artifacts-destination),
#                        pgpass (the database password, mode 600), mlflow.log, mlflow.pid
#   PG_PORT              PostgreSQL's port on 127.0.0.1 (default 5433; PostgreSQL never listens beyond loopback)
#   PG_DB, PG_USER       the database and its owner (default mlflow, mlflow)
#   PG_BIN               PostgreSQL's server binaries (default: pg_config --bindir, else the newest
#                        /usr/lib/postgresql/*/bin, else initdb on PATH)
#   PG_OS_USER           the system user that runs PostgreSQL when this script runs as root
#                        (default postgres; PostgreSQL refuses to run as root)
#   MLFLOW_HOST          the address MLflow listens on (default 127.0.0.1; 0.0.0.0 serves the network:
#                        your explicit choice, behind your cluster's firewall)
#   MLFLOW_PORT          MLflow's port (default 5000)
#   MLFLOW_WORKERS       MLflow's worker processes (default 4)
#   MLFLOW_BIN           the mlflow command (default .venv/bin/mlflow of this repo, else mlflow on PATH)
#   MLFLOW_SERVER_OPTS   extra `mlflow server` options, e.g. "--allowed-hosts mlflow.cluster,10.0.*"
#   START_TIMEOUT        seconds MLflow has to answer /health after start (default 120)
#
# References: docs/tracking.md ("A tracking server for several machines"); PostgreSQL initdb/pg_ctl;
# `mlflow server --help`.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=$(realpath -m "${TRACKING_SERVER_DIR:-.tracking-server}")
PGDATA_DIR="$DIR/pgdata"
PG_PORT=${PG_PORT:-5433}
PG_DB=${PG_DB:-mlflow}
PG_USER=${PG_USER:-mlflow}
MLFLOW_HOST=${MLFLOW_HOST:-127.0.0.1}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-4}
START_TIMEOUT=${START_TIMEOUT:-120}
PID_FILE="$DIR/mlflow.pid"

die() { echo "tracking_server: error: $*" >&2; exit 2; }

[[ $PG_PORT =~ ^[0-9]+$ ]] || die "PG_PORT=$PG_PORT is not a port number"
[[ $MLFLOW_PORT =~ ^[0-9]+$ ]] || die "MLFLOW_PORT=$MLFLOW_PORT is not a port number"
[[ $MLFLOW_WORKERS =~ ^[1-9][0-9]*$ ]] || die "MLFLOW_WORKERS=$MLFLOW_WORKERS: allowed: 1 or more"
[[ $PG_DB =~ ^[a-z_][a-z0-9_]*$ ]] || die "PG_DB=$PG_DB: allowed: lower-case letters, digits and _"
[[ $PG_USER =~ ^[a-z_][a-z0-9_]*$ ]] || die "PG_USER=$PG_USER: allowed: lower-case letters, digits and _"

if [[ -n ${MLFLOW_BIN:-} ]]; then :
elif [[ -x $REPO/.venv/bin/mlflow ]]; then MLFLOW_BIN=$REPO/.venv/bin/mlflow
else MLFLOW_BIN=$(command -v mlflow || true)
fi
PY=$(dirname "${MLFLOW_BIN:-/usr/bin/python3}")/python
[[ -x $PY ]] || PY=python3

find_pg_bin() {
    if [[ -n ${PG_BIN:-} ]]; then echo "$PG_BIN"; return; fi
    if command -v pg_config >/dev/null && [[ -x $(pg_config --bindir)/initdb ]]; then pg_config --bindir; return; fi
    local newest
    newest=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $newest && -x $newest/initdb ]]; then echo "$newest"; return; fi
    if command -v initdb >/dev/null; then dirname "$(command -v initdb)"; return; fi
    echo ""
}

# PostgreSQL refuses to run as root: as root, its commands run as PG_OS_USER (runuser)
as_pg() {
    if [[ $(id -u) == 0 ]]; then runuser -u "$PG_OS_USER" -- "$@"; else "$@"; fi
}

pg_running() { [[ -f $PGDATA_DIR/PG_VERSION ]] && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; }

psql_pg() {  # as the cluster's superuser, over its Unix socket in the data folder (peer authentication)
    as_pg "$PSQL" -h "$PGDATA_DIR" -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 -qAtX "$@"
}

health_url() {
    local host=$MLFLOW_HOST
    [[ $host == 0.0.0.0 || $host == "::" ]] && host=127.0.0.1
    echo "http://$host:$MLFLOW_PORT/health"
}

answers() { "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2).close()" "$(health_url)" 2>/dev/null; }

mlflow_pid() {  # the pid of the server this script started, if it is still an mlflow process
    [[ -f $PID_FILE ]] || return 1
    local pid
    pid=$(cat "$PID_FILE")
    [[ $pid =~ ^[0-9]+$ ]] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q "mlflow.* server" || return 1
    echo "$pid"
}

setup_pg() {
    PG_BIN=$(find_pg_bin)
    [[ -n $PG_BIN && -x $PG_BIN/initdb && -x $PG_BIN/pg_ctl ]] || \
        die "PostgreSQL's server binaries (initdb, pg_ctl) were not found: install Debian's package (apt-get install postgresql) or set PG_BIN"
    PSQL=$PG_BIN/psql
    [[ -x $PSQL ]] || PSQL=$(command -v psql || true)
    [[ -n $PSQL ]] || die "psql was not found: apt-get install postgresql-client"
    if [[ $(id -u) == 0 ]]; then
        PG_OS_USER=${PG_OS_USER:-postgres}
        id "$PG_OS_USER" >/dev/null 2>&1 || \
            die "running as root: PostgreSQL must run as an unprivileged user and PG_OS_USER=$PG_OS_USER does not exist (Debian's postgresql package creates 'postgres'; or: adduser --system $PG_OS_USER)"
    fi
}

start() {
    setup_pg
    "$PY" -c "import psycopg2" 2>/dev/null || \
        die "the PostgreSQL driver psycopg2 is not installed for $MLFLOW_BIN: make tracking-server installs the pin of requirements/cluster.lock"
    mkdir -p "$DIR" "$DIR/artifacts"
    if [[ ! -f $PGDATA_DIR/PG_VERSION ]]; then
        mkdir -p "$PGDATA_DIR"
        [[ $(id -u) == 0 ]] && chown "$PG_OS_USER:" "$PGDATA_DIR"
        chmod 700 "$PGDATA_DIR"
        as_pg test -w "$PGDATA_DIR" || \
            die "user ${PG_OS_USER:-$(id -un)} cannot write $PGDATA_DIR (a parent folder is not open to it: chmod o+x the parents, or set TRACKING_SERVER_DIR)"
        echo "tracking_server: initialising a PostgreSQL cluster in $PGDATA_DIR${PG_OS_USER:+ (run by user $PG_OS_USER)}"
        as_pg "$PG_BIN/initdb" -D "$PGDATA_DIR" --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 \
            --locale=C --no-instructions >"$DIR/initdb.log" 2>&1 || { tail -n 20 "$DIR/initdb.log" >&2; die "initdb failed (log: $DIR/initdb.log)"; }
        # loopback only; the Unix socket in the data folder (no system-wide socket folder needed)
        printf "\n# tracking_server.sh\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\n" \
            "$PGDATA_DIR" | as_pg tee -a "$PGDATA_DIR/postgresql.conf" >/dev/null
    fi
    if ! pg_running; then
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$PGDATA_DIR/server.log" -o "-p $PG_PORT" -w -t 60 start >/dev/null || {
            as_pg tail -n 20 "$PGDATA_DIR/server.log" >&2 || true
            die "PostgreSQL did not start (log: $PGDATA_DIR/server.log; is port $PG_PORT taken? set PG_PORT)"; }
    fi
    local port
    port=$(psql_pg -c "SHOW port") || die "cannot reach PostgreSQL over $PGDATA_DIR (log: $PGDATA_DIR/server.log)"
    [[ $port == "$PG_PORT" ]] || die "PostgreSQL in $PGDATA_DIR already runs on port $port, not PG_PORT=$PG_PORT: stop it first (tracking-server-stop) or use PG_PORT=$port"
    if [[ ! -f $DIR/pgpass ]]; then  # the database password, read by libpq (PGPASSFILE): never on a command line
        (umask 077; echo "127.0.0.1:*:$PG_DB:$PG_USER:$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')" >"$DIR/pgpass")
    fi
    local password
    password=$(cut -d: -f5 "$DIR/pgpass")
    if [[ -z $(psql_pg -c "SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER'") ]]; then
        echo "CREATE ROLE $PG_USER LOGIN PASSWORD '$password'" | psql_pg
    fi
    if [[ -z $(psql_pg -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'") ]]; then
        psql_pg -c "CREATE DATABASE $PG_DB OWNER $PG_USER"
    fi
    if pid=$(mlflow_pid); then
        answers && { echo "tracking_server: MLflow already runs (pid $pid)"; summary; return; }
        die "MLflow (pid $pid) runs but does not answer on $(health_url): make tracking-server-stop, then start again"
    fi
    answers && die "something else already answers on $(health_url): set MLFLOW_PORT"
    [[ -n $MLFLOW_BIN && -x $MLFLOW_BIN ]] || die "mlflow was not found: make setup (or set MLFLOW_BIN)"
    # its own session (setsid): `stop` ends the server and its workers by this process group only
    # shellcheck disable=SC2086
    PGPASSFILE="$DIR/pgpass" setsid "$MLFLOW_BIN" server \
        --backend-store-uri "postgresql+psycopg2://$PG_USER@127.0.0.1:$PG_PORT/$PG_DB" \
        --artifacts-destination "$DIR/artifacts" --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
        ${MLFLOW_SERVER_OPTS:-} >"$DIR/mlflow.log" 2>&1 </dev/null &
    echo $! >"$PID_FILE"
    local waited=0
    until answers; do
        if ! mlflow_pid >/dev/null; then tail -n 20 "$DIR/mlflow.log" >&2; rm -f "$PID_FILE"; die "MLflow exited (log: $DIR/mlflow.log)"; fi
        if (( waited >= START_TIMEOUT )); then stop_mlflow; die "MLflow did not answer on $(health_url) within ${START_TIMEOUT} s (log: $DIR/mlflow.log)"; fi
        sleep 1; waited=$((waited + 1))
    done
    summary
}

summary() {
    local host=$MLFLOW_HOST
    [[ $host == 0.0.0.0 || $host == "::" ]] && host=$(hostname)
    cat <<EOF
tracking_server: MLflow on http://$MLFLOW_HOST:$MLFLOW_PORT, runs in PostgreSQL (127.0.0.1:$PG_PORT, database $PG_DB), artifacts in $DIR/artifacts
  export MLFLOW_TRACKING_URI=http://$host:$MLFLOW_PORT
  export RECBENCH_ARTIFACT_ROOT=mlflow-artifacts:///recbench   # artifacts through the server, not on each worker's disk
  stop: make tracking-server-stop
EOF
}

stop_mlflow() {
    local pid
    if pid=$(mlflow_pid); then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do mlflow_pid >/dev/null || break; sleep 1; done
        if mlflow_pid >/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
        echo "tracking_server: MLflow (pid $pid) stopped"
    fi
    rm -f "$PID_FILE"
}

stop() {
    stop_mlflow
    if [[ -f $PGDATA_DIR/PG_VERSION ]]; then
        setup_pg
        if pg_running; then
            as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w stop >/dev/null
            echo "tracking_server: PostgreSQL ($PGDATA_DIR) stopped"
        fi
    fi
}

status() {
    local code=0
    if pid=$(mlflow_pid); then
        if answers; then echo "MLflow: running (pid $pid) on $(health_url)"; else echo "MLflow: pid $pid, not answering on $(health_url)"; code=1; fi
    else echo "MLflow: not running"; code=1; fi
    if [[ -f $PGDATA_DIR/PG_VERSION ]]; then
        setup_pg
        if pg_running; then echo "PostgreSQL: running ($PGDATA_DIR)"; else echo "PostgreSQL: stopped ($PGDATA_DIR)"; code=1; fi
    else echo "PostgreSQL: no cluster in $PGDATA_DIR"; code=1; fi
    return $code
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start | stop | status (got '${1:-}')" ;;
esac
