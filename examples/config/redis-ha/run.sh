#!/usr/bin/env bash
# A Redis deployment to run and break: one master (17000), two replicas (17001, 17002 — the
# second with replica-priority 0, never promoted), three sentinels (17100-17102,
# down-after-milliseconds 1000), three ha-nodes (API on 17200-17202, ha-node.toml) and the
# redis-writer example, which INCRs a counter every 100 ms through a Router fed by its own
# sentinel monitor.
#
#   examples/config/redis-ha/run.sh          # start everything; Ctrl-C stops it all
#   examples/config/redis-ha/run.sh --demo   # also SIGKILL the master, wait for the writes
#                                            # to resume on the new one, then stop
#
# While it runs: `kill -9 $(cat <dir>/master.pid)`, then watch <dir>/writer.log move to
# 127.0.0.1:17001 and `hactl --url http://127.0.0.1:17200 list`. Needs redis-server and
# redis-sentinel (Debian: apt-get install redis-server redis-sentinel) and cargo.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
demo=0
[ "${1:-}" = "--demo" ] && demo=1

for bin in redis-server redis-sentinel redis-cli; do
    command -v "$bin" >/dev/null 2>&1 || {
        echo "run.sh: $bin is missing (apt-get install redis-server redis-sentinel redis-tools)" >&2
        exit 1
    }
done
(cd "$root" && cargo build -q -p ha-orchestrator --bins && cargo build -q -p ha-examples --example redis-writer)

dir=$(mktemp -d /tmp/redis-ha.XXXXXX)
# shellcheck source=../lib.sh
. "$here/../lib.sh"

redis() { # port [extra args...]
    local port=$1
    shift
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
        --logfile "$dir/redis-$port.log" "$@" &
    pids+=($!)
    echo $! >"$dir/redis-$port.pid"
    wait_for "redis $port up" 10 redis-cli -p "$port" ping
}
redis 17000
cp "$dir/redis-17000.pid" "$dir/master.pid"
redis 17001 --replicaof 127.0.0.1 17000
redis 17002 --replicaof 127.0.0.1 17000 --replica-priority 0
replicas_up() { [ "$(redis-cli -p 17000 info replication | tr -d '\r' | grep -c '^slave[0-9]*:.*state=online')" = 2 ]; }
wait_for "two replicas online" 20 replicas_up

for port in 17100 17101 17102; do
    cat >"$dir/sentinel-$port.conf" <<CONF
port $port
bind 127.0.0.1
dir $dir
logfile $dir/sentinel-$port.log
sentinel announce-ip 127.0.0.1
sentinel monitor mymaster 127.0.0.1 17000 2
sentinel down-after-milliseconds mymaster 1000
sentinel failover-timeout mymaster 3000
sentinel parallel-syncs mymaster 1
CONF
    redis-sentinel "$dir/sentinel-$port.conf" &
    pids+=($!)
done
sees_all() { [ "$(redis-cli -p "$1" sentinel master mymaster | tr -d '\r' | grep -A1 '^num-other-sentinels$' | tail -1)" = 2 ]; }
for port in 17100 17101 17102; do
    wait_for "sentinel $port sees the other two" 30 sees_all "$port"
done

ids=(a b c)
for i in 0 1 2; do
    id=${ids[$i]}
    HA_NODE_ID=$id HA_HTTP_LISTEN=127.0.0.1:$((17200 + i)) \
        "$target/debug/ha-node" --config "$here/ha-node.toml" >"$dir/ha-node-$id.log" 2>&1 &
    pids+=($!)
    wait_for "ha-node $id answers /health" 20 http_ok $((17200 + i)) /health
done

"$target/debug/examples/redis-writer" mymaster 127.0.0.1:17100,127.0.0.1:17101,127.0.0.1:17102 \
    127.0.0.1:17000 127.0.0.1:17001 >"$dir/writer.log" 2>&1 &
pids+=($!)
wait_for "a first write on the master" 20 grep -q 'ok .* on 127.0.0.1:17000' "$dir/writer.log"

echo "run.sh: running in $dir"
echo "  master pid $(cat "$dir/master.pid"); writer log $dir/writer.log"
echo "  $target/debug/hactl --url http://127.0.0.1:17200,http://127.0.0.1:17201,http://127.0.0.1:17202 list"

if ((demo)); then
    kill -9 "$(cat "$dir/master.pid")"
    echo "run.sh: SIGKILLed the master; waiting for the writes to resume"
    wait_for "a write on the new master" 40 grep -q 'ok .* on 127.0.0.1:17001' "$dir/writer.log"
    grep -m1 'ok .* on 127.0.0.1:17001' "$dir/writer.log"
    "$target/debug/hactl" --url http://127.0.0.1:17200,http://127.0.0.1:17201,http://127.0.0.1:17202 list || true
    exit 0
fi
echo "run.sh: Ctrl-C to stop"
wait
