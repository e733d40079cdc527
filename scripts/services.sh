#!/usr/bin/env bash
# The real servers the scale-out tests run against, on loopback: a throwaway PostgreSQL 15
# cluster (Debian's package) on port 54329 and moto's S3-compatible server (PyPI's moto[server])
# on port 54330. Installs what is missing, starts what is not running, and is quick and
# idempotent otherwise. Prints the environment the tests read; `eval "$(scripts/services.sh)"`
# sets it in the calling shell. `scripts/services.sh stop` stops both.
#
# State (the cluster, logs, pid files) lives in /tmp/ampserve-services (AMPSERVE_SERVICES_DIR):
# outside the checkout, whose folders the unprivileged PostgreSQL user may not be able to
# enter, and shared by every checkout on the machine, like the fixed ports.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_PORT="${AMPSERVE_PG_PORT:-54329}"
S3_PORT="${AMPSERVE_S3_PORT:-54330}"
STATE="${AMPSERVE_SERVICES_DIR:-/tmp/ampserve-services}"
PGDATA="$STATE/pg"
mkdir -p "$STATE"

if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
log() { echo "services: $*" >&2; }

pg_bin() {
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return; }
  done
  return 1
}

# PostgreSQL refuses to run as root: the cluster belongs to an unprivileged user.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi
}

if [ "${1:-}" = stop ]; then
  if BIN="$(pg_bin)" && [ -f "$PGDATA/postmaster.pid" ]; then
    PG_USER="$(stat -c %U "$PGDATA")"
    as_pg "$BIN/pg_ctl" -D "$PGDATA" -m fast stop >&2 || true
  fi
  if [ -f "$STATE/moto.pid" ]; then
    kill "$(cat "$STATE/moto.pid")" 2>/dev/null || true
    rm -f "$STATE/moto.pid"
  fi
  exit 0
fi

# --- PostgreSQL ---------------------------------------------------------------------------
if ! BIN="$(pg_bin)"; then
  log "installing postgresql (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  if ! "${SUDO[@]}" apt-get install -y --no-install-recommends postgresql; then
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" apt-get install -y --no-install-recommends postgresql
  fi
  BIN="$(pg_bin)"
fi
if [ "$(id -u)" -eq 0 ]; then
  PG_USER=postgres
  id "$PG_USER" >/dev/null 2>&1 || useradd --system --no-create-home "$PG_USER"
  chown "$PG_USER" "$STATE"
else
  PG_USER="$(id -un)"
fi
if [ ! -f "$PGDATA/PG_VERSION" ]; then
  log "initdb $PGDATA"
  rm -rf "$PGDATA"
  as_pg "$BIN/initdb" -D "$PGDATA" -U ampserve --auth=trust -E UTF8 --no-locale >"$STATE/initdb.log"
  {
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $PG_PORT"
    echo "unix_socket_directories = '$STATE'"
    echo "max_connections = 300"
    # A throwaway test cluster: durability is not what is tested here.
    echo "fsync = off"
    echo "synchronous_commit = off"
    echo "full_page_writes = off"
  } >>"$PGDATA/postgresql.conf"
fi
if ! as_pg "$BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
  log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
  as_pg "$BIN/pg_ctl" -D "$PGDATA" -l "$STATE/pg.log" -w -t 60 start >&2
fi
for _ in $(seq 1 60); do
  "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break
  sleep 0.5
done
"$BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" || { log "PostgreSQL did not start (see $STATE/pg.log)"; exit 1; }
if ! "$BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U ampserve -d postgres -tAc \
  "SELECT 1 FROM pg_database WHERE datname = 'ampserve'" | grep -q 1; then
  "$BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U ampserve ampserve
fi

# --- S3 (moto) ----------------------------------------------------------------------------
if ! command -v moto_server >/dev/null; then
  log "installing moto[server] (pip)"
  python3 -m pip install --quiet 'moto[server]'
fi
s3_up() { curl -s -o /dev/null "http://127.0.0.1:$S3_PORT/moto-api/" 2>/dev/null; }
if ! s3_up; then
  log "starting moto_server on 127.0.0.1:$S3_PORT"
  nohup moto_server -H 127.0.0.1 -p "$S3_PORT" >"$STATE/moto.log" 2>&1 &
  echo $! >"$STATE/moto.pid"
  for _ in $(seq 1 60); do s3_up && break; sleep 0.5; done
  s3_up || { log "moto_server did not start (see $STATE/moto.log)"; exit 1; }
fi
# The buckets the tests use (moto keeps them in memory: made again after each start).
for b in ampserve-test ampserve; do
  curl -s -o /dev/null -X PUT "http://127.0.0.1:$S3_PORT/$b"
done

cat <<EOF
export AMPSERVE_TEST_DATABASE_URL=postgres://ampserve@127.0.0.1:$PG_PORT/ampserve
export AMPSERVE_TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ALLOW_HTTP=true
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_REGION=us-east-1
EOF
