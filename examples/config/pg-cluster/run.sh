#!/usr/bin/env bash
# A PostgreSQL cluster to run and break: three PostgreSQL servers (17310 primary, 17311 and
# 17312 streaming replicas through slots), a redis-server for the leases (17300) and three
# ha-nodes (API on 17320-17322, node-N.toml), each with an agent beside its own database.
#
#   examples/config/pg-cluster/run.sh          # start everything; Ctrl-C stops it all
#   examples/config/pg-cluster/run.sh --demo   # also kill the primary's node (its ha-node
#                                              # and its postmaster, SIGKILL), wait for a new
#                                              # primary to take a commit, start node-1's
#                                              # ha-node again and wait until its agent has
#                                              # rewound and started the old primary as a
#                                              # replica of the new one, then stop
#
# Each node runs node-N.toml plus a rejoin section written here
# ([replication.agent.settings.rejoin]: the data directory and the `pg_ctl start` command
# depend on the temporary directory): a database that is down while another member leads is
# started as a standby, a former primary rewound first.
#
# While it runs: `hactl --url http://127.0.0.1:17320,http://127.0.0.1:17321,http://127.0.0.1:17322
# list` shows each member's role, timeline and lag; `curl -i 127.0.0.1:17321/primary` is what
# a load balancer asks. Needs PostgreSQL's server binaries (Debian: postgresql), psql,
# redis-server and cargo. Run as root, PostgreSQL runs as the `postgres` user.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
demo=0
[ "${1:-}" = "--demo" ] && demo=1

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$pgbin" ] || pgbin=$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")
for bin in "$pgbin/initdb" "$pgbin/postgres" "$pgbin/pg_basebackup"; do
    [ -x "$bin" ] || { echo "run.sh: $bin is missing (apt-get install postgresql)" >&2; exit 1; }
done
for bin in psql redis-server redis-cli; do
    command -v "$bin" >/dev/null 2>&1 || {
        echo "run.sh: $bin is missing (apt-get install postgresql-client redis-server redis-tools)" >&2
        exit 1
    }
done
(cd "$root" && cargo build -q -p ha-orchestrator --bins)

dir=$(mktemp -d /tmp/pg-cluster.XXXXXX)
as_pg() { # runs "$@" as the postgres user when we are root
    if [ "$(id -u)" -eq 0 ]; then
        setpriv --reuid=postgres --regid=postgres --init-groups "$@"
    else
        "$@"
    fi
}
[ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
# shellcheck source=../lib.sh
. "$here/../lib.sh"
sql() { psql -h 127.0.0.1 -p "$1" -U postgres -d postgres -Atq -c "$2"; }

redis-server --port 17300 --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
    --logfile "$dir/redis.log" &
pids+=($!)
wait_for "redis up" 10 redis-cli -p 17300 ping

# How member n's PostgreSQL starts, one word per line: here, and by its agent when it rejoins.
start_words() { # n
    printf '%s\n' "$pgbin/pg_ctl" start -w -D "$dir/pg$1" -l "$dir/pg$1.log" \
        -o "-p $((17309 + $1)) -k $dir"
}
postmaster() { # n port
    local words
    mapfile -t words < <(start_words "$1")
    as_pg "${words[@]}" >/dev/null
    wait_for "postgres $1 answers" 30 sql "$2" "SELECT 1"
}
stop_servers() {
    for n in 1 2 3; do
        [ -f "$dir/pg$n/postmaster.pid" ] &&
            as_pg "$pgbin/pg_ctl" stop -D "$dir/pg$n" -m immediate >/dev/null 2>&1
    done
    return 0
}
as_pg "$pgbin/initdb" -D "$dir/pg1" -U postgres --auth=trust -E UTF8 --locale=C >"$dir/initdb.log"
cat >>"$dir/pg1/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
wal_log_hints = on
CONF
cat >>"$dir/pg1/pg_hba.conf" <<CONF
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
CONF
postmaster 1 17310
sql 17310 "CREATE TABLE demo (id bigserial PRIMARY KEY, node text, at timestamptz DEFAULT now())"
for n in 2 3; do
    as_pg "$pgbin/pg_basebackup" -h 127.0.0.1 -p 17310 -U postgres -D "$dir/pg$n" \
        -R -X stream -C -S "pg_cluster_$n"
    postmaster "$n" $((17309 + n))
done
streaming() { [ "$(sql 17310 "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")" = 2 ]; }
wait_for "two replicas streaming" 30 streaming

# node-N.toml and where this run keeps member N's database.
for n in 1 2 3; do
    {
        cat "$here/node-$n.toml"
        echo
        echo "[replication.agent.settings.rejoin]"
        echo "enabled = true"
        echo "data_dir = \"$dir/pg$n\""
        echo "bin_dir = \"$pgbin\""
        mapfile -t words < <(start_words "$n")
        printf 'start_command = ['
        sep=""
        for word in "${words[@]}"; do
            printf '%s"%s"' "$sep" "$word"
            sep=", "
        done
        echo "]"
        [ "$(id -u)" -eq 0 ] && echo 'run_as = "postgres"'
    } >"$dir/node-$n.toml"
done

node() { # n
    "$target/debug/ha-node" --config "$dir/node-$1.toml" >"$dir/ha-node-$1.log" 2>&1 &
    pids+=($!)
    echo $! >"$dir/ha-node-$1.pid"
    wait_for "ha-node $1 answers /health" 20 http_ok $((17319 + $1)) /health
}
# The primary's node first: it leads (after one ttl of looking) before the others campaign.
node 1
wait_for "node-1 leads" 20 http_ok 17320 /leader
node 2
node 3
wait_for "node-1's database takes writes" 20 http_ok 17320 /primary
sql 17310 "INSERT INTO demo (node) VALUES ('node-1')"

urls=http://127.0.0.1:17320,http://127.0.0.1:17321,http://127.0.0.1:17322
echo "run.sh: running in $dir"
echo "  $target/debug/hactl --url $urls list"
"$target/debug/hactl" --url "$urls" list || true

if ((demo)); then
    pm=$(head -1 "$dir/pg1/postmaster.pid")
    kids=$(pgrep -P "$pm" || true)
    kill -9 "$(cat "$dir/ha-node-1.pid")" "$pm" $kids 2>/dev/null || true
    killed=$SECONDS
    echo "run.sh: SIGKILLed node-1 (its ha-node and its postmaster); waiting for a new primary"
    new_primary() { http_ok 17321 /primary || http_ok 17322 /primary; }
    wait_for "a new primary" 30 new_primary
    port=17311
    http_ok 17321 /primary || port=17312
    wait_for "a commit on the new primary" 10 sql "$port" "INSERT INTO demo (node) VALUES ('after')"
    echo "run.sh: port $port took a commit about $((SECONDS - killed)) s after the kill"
    "$target/debug/hactl" --url "$urls" list || true
    # node-1 comes back: its agent finds its database down while another member leads,
    # rewinds it (it was the primary) and starts it as a standby of the new primary.
    restarted=$SECONDS
    node 1
    rejoined() {
        [ "$(sql 17310 "SELECT status FROM pg_stat_wal_receiver")" = streaming ]
    }
    wait_for "node-1's database streaming from the new primary" 60 rejoined
    echo "run.sh: node-1's database rejoined as a replica $((SECONDS - restarted)) s after its node started"
    "$target/debug/hactl" --url "$urls" list || true
    exit 0
fi
echo "run.sh: Ctrl-C to stop"
wait
