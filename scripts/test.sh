#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs the servers the tests start
# (redis-server, redis-sentinel, PostgreSQL, etcd, libfaketime) and `protoc` (which building
# the `etcd` feature needs) if they are missing, then runs every test, with the `etcd`
# features on.
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
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
if ((${#missing[@]})); then
    echo "scripts/test.sh: installing ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${missing[@]}"
fi

# The testkit starts its own servers on free ports; the packages' own services are not used.
# Cross-process tests run the real `ha-node`/`hactl` binaries: build them first (a test cannot
# build another package's binaries, and a stale one is refused). They are built with the same
# features as the tests, so the tests never see a binary of another feature set.
# `etcd` is not a default feature of ha-election/ha-orchestrator (it needs protoc): name it.
features=(--features ha-election/etcd,ha-orchestrator/etcd,ha-examples/etcd)
cargo build -p ha-orchestrator --bins --features ha-election/etcd,ha-orchestrator/etcd
if command -v cargo-nextest >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "${features[@]}"
else
    cargo test --workspace --no-fail-fast --lib --bins --tests --examples "${features[@]}"
fi
# nextest does not run doc tests; doc examples must compile and pass too.
cargo test --workspace --doc "${features[@]}"
