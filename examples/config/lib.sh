# Shared by the run.sh scripts of this directory (sourced after `dir` is set): the child
# processes to stop on exit, polling with a deadline, and an HTTP status probe.

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    # A script whose servers are not children (started by an agent, say) stops them here,
    # once the children are gone (an agent still running would start them again).
    if declare -F stop_servers >/dev/null; then stop_servers; fi
    echo "run.sh: stopped; logs in $dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Polls `$@` every 100 ms for up to $deadline seconds.
wait_for() {
    local what=$1 deadline=$2
    shift 2
    local end=$((SECONDS + deadline))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= end)); then
            echo "run.sh: $what did not happen within ${deadline}s" >&2
            return 1
        fi
        sleep 0.1
    done
}

# port path: whether `GET path` on 127.0.0.1:port answers 200.
http_ok() (
    exec 3<>"/dev/tcp/127.0.0.1/$1"
    printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
    head -1 <&3 | grep -q ' 200 '
)
