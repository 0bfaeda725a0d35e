#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs the servers the tests start
# (redis-server, redis-sentinel, PostgreSQL, libfaketime) if they are missing, then runs every test.
# Idempotent: a machine that has everything installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    missing+=(postgresql)
fi
# pg_dump/pg_restore for ha-dr's database backups, pg_basebackup for its PITR base backups.
command -v pg_dump >/dev/null 2>&1 || missing+=(postgresql-client)
command -v pg_basebackup >/dev/null 2>&1 || missing+=(postgresql-client)
# libfaketime steps a running PostgreSQL server's wall clock (ha-election's clock-step tests).
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || missing+=(libfaketime)
if ((${#missing[@]})); then
    echo "scripts/test.sh: installing ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${missing[@]}"
fi

# The testkit starts its own servers on free ports; the packages' own services are not used.
# Cross-process tests run the real `ha-node`/`hactl` binaries: build them first (a test cannot
# build another package's binaries, and a stale one is refused).
cargo build -p ha-orchestrator --bins
if command -v cargo-nextest >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    cargo test --workspace --no-fail-fast --lib --bins --tests --examples
fi
# nextest does not run doc tests; doc examples must compile and pass too.
cargo test --workspace --doc
