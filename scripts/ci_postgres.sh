#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for the sweep's postgres tests and print its URL.
#
#   export RNNSEARCH_TEST_POSTGRES_URL="$(scripts/ci_postgres.sh)"
#   pytest -m postgres tests/test_search_postgres.py
#
# Installs Debian's `postgresql` package if it is missing (needs root and the Debian mirror), creates a cluster
# in $RNNSEARCH_PG_DIR (default /tmp/rnnsearch-pg) listening on 127.0.0.1:$RNNSEARCH_PG_PORT (default 55432) only,
# with trust authentication (a test server: never expose it), starts it if it is not running, creates the
# database rnnsearch_test, and prints postgresql://postgres@127.0.0.1:PORT/rnnsearch_test on stdout (everything
# else goes to stderr). Idempotent: a second call reuses the running server. Stop it with
#   scripts/ci_postgres.sh stop
# The Python driver is the `postgres` extra: pip install 'rnnsearch[postgres]' (psycopg2-binary).
set -euo pipefail

DIR=${RNNSEARCH_PG_DIR:-/tmp/rnnsearch-pg}
PORT=${RNNSEARCH_PG_PORT:-55432}
DB=rnnsearch_test

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "ci_postgres: installing Debian's postgresql package" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
fi
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)

# initdb and postgres refuse to run as root: use the `postgres` account the package created.
as_owner() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi
}

if [ "${1:-}" = stop ]; then
  as_owner "'$BIN/pg_ctl' -D '$DIR' -m fast stop" >&2 || true
  exit 0
fi

if [ ! -f "$DIR/PG_VERSION" ]; then
  mkdir -p "$DIR"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$DIR"
  as_owner "'$BIN/initdb' -D '$DIR' -U postgres -A trust -E UTF8" >&2
fi
if ! as_owner "'$BIN/pg_ctl' -D '$DIR' status" >/dev/null 2>&1; then
  as_owner "'$BIN/pg_ctl' -D '$DIR' -l '$DIR/server.log' -w -t 60 \
    -o \"-c listen_addresses=127.0.0.1 -p $PORT -k '$DIR' -c max_connections=100\" start" >&2
fi
if ! as_owner "'$BIN/psql' -h 127.0.0.1 -p $PORT -U postgres -tAc \"SELECT 1 FROM pg_database WHERE datname='$DB'\"" \
    | grep -q 1; then
  as_owner "'$BIN/createdb' -h 127.0.0.1 -p $PORT -U postgres $DB" >&2
fi
echo "postgresql://postgres@127.0.0.1:$PORT/$DB"
