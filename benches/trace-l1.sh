#!/usr/bin/env bash
# Traces one L1 request end to end: curl -> rna hub (SOCKS5 with user/password) -> agent over
# QUIC or TLS/TCP -> the destination (`rnabench serve`) and back, with `strace -ttt` on every
# process, and prints one merged timeline in microseconds from curl's connect(). strace makes
# each system call slower (tens of µs), so read the order and the gaps, not the total; curl's
# own untraced figures are printed first for scale. See docs/performance.md ("L1 with curl").
#
#   benches/trace-l1.sh [quic|tcp]      needs a release build (benches/run.sh makes one)
set -euo pipefail
cd "$(dirname "$0")/.."

transport=${1:-quic}
bin=target/release
for tool in strace curl; do
    command -v "$tool" >/dev/null || { echo "trace-l1.sh: needs $tool" >&2; exit 2; }
done
[ -x "$bin/rna" ] && [ -x "$bin/examples/rnabench" ] ||
    { echo "trace-l1.sh: build first: cargo build --release --bin rna --example rnabench" >&2; exit 2; }

work=$(mktemp -d /dev/shm/rna-trace.XXXXXX)
pids=()
tracers=()
cleanup() {
    # The tracers first (SIGTERM makes strace detach): a traced process killed under strace
    # can leave strace waiting on it. Then SIGKILL, since a hub given SIGTERM would drain for
    # its grace period first.
    for p in "${tracers[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${tracers[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.02; done
    done
    for p in "${pids[@]}" "${tracers[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# Waits (bounded) until FILE has a line matching PATTERN and prints that line.
wait_for() {
    local file=$1 pattern=$2
    for _ in $(seq 1 300); do
        if grep -m1 -- "$pattern" "$file" 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "trace-l1.sh: no '$pattern' in $file" >&2
    cat "$file" >&2
    return 1
}

"$bin/rna" certs init --force --hub-name 127.0.0.1 --dir "$work" >/dev/null
"$bin/rna" certs agent --force bench --dir "$work" >/dev/null
"$bin/rna" token create --tenant bench/trace --scope connect:agentHub --scope proxy \
    --store "$work/tokens.toml" >"$work/token.txt" 2>/dev/null
chmod 600 "$work/token.txt"
token=$(cat "$work/token.txt")

"$bin/examples/rnabench" serve >"$work/serve.out" 2>&1 &
pids+=($!); serve_pid=$!
target=$(wait_for "$work/serve.out" '^listening' | cut -d' ' -f2)

"$bin/rna" hub --listen 127.0.0.1:0 --socks 127.0.0.1:0 --api 127.0.0.1:0 \
    --ca "$work/ca.pem" --cert "$work/hub.pem" --key "$work/hub-key.pem" \
    --tokens "$work/tokens.toml" --log-level info --log-format text >/dev/null 2>"$work/hub.log" &
pids+=($!); hub_pid=$!
serving=$(wait_for "$work/hub.log" 'hub serving')
quic=$(sed -n 's/.* quic=\([^ ]*\).*/\1/p' <<<"$serving")
socks=$(sed -n 's/.* socks=\([^ ]*\).*/\1/p' <<<"$serving")

"$bin/rna" agent --hub "$quic" --name bench --ca "$work/ca.pem" \
    --cert "$work/agent-bench.pem" --key "$work/agent-bench-key.pem" \
    --token-file "$work/token.txt" --transport "$transport" --allow "${target%:*}/32" \
    --metrics off --log-level info --log-format text >/dev/null 2>"$work/agent.log" &
pids+=($!); agent_pid=$!
wait_for "$work/agent.log" 'connected to hub' >/dev/null

request() {
    curl -sS -o /dev/null --noproxy '' --proxy "socks5h://$socks" --proxy-user "bench:$token" \
        -w "$1" "http://$target/bytes/1024"
}
# Warm up (first connections, allocator, caches), then curl's own view of 50 requests.
for _ in $(seq 1 50); do request '' ; done
echo "# transport $transport; curl untraced, time_connect / time_starttransfer (µs), 50 requests:"
for _ in $(seq 1 50); do request '%{time_connect} %{time_starttransfer}\n'; done >"$work/untraced"
p50() { awk -v k="$1" '{ printf "%d\n", $k * 1e6 }' "$work/untraced" | sort -n | sed -n 26p; }
echo "#   connect p50 $(p50 1) µs, first byte p50 $(p50 2) µs"

# strace every server process, then one traced curl.
for p in $hub_pid $agent_pid $serve_pid; do
    strace -f -ttt -qq -e trace=network,read,write,readv,writev,sendmsg,recvmsg,sendmmsg,recvmmsg \
        -o "$work/strace.$p" -p "$p" 2>/dev/null &
    tracers+=($!)
done
# strace -p prints nothing on attach: give the tracers time, and a request to settle on.
sleep 0.5; request '' ; sleep 0.2
for p in $hub_pid $agent_pid $serve_pid; do : >"$work/strace.$p"; done
strace -f -ttt -qq -e trace=network,read,write,readv,writev,sendmsg,recvmsg \
    -o "$work/strace.curl" curl -sS -o /dev/null --noproxy '' --proxy "socks5h://$socks" \
    --proxy-user "bench:$token" "http://$target/bytes/1024"
sleep 0.2

# Merge: process name, time, call; EAGAIN reads and unrelated sockets left out.
{
    sed "s/^/curl /" "$work/strace.curl"
    sed "s/^/hub /" "$work/strace.$hub_pid"
    sed "s/^/agent /" "$work/strace.$agent_pid"
    sed "s/^/dest /" "$work/strace.$serve_pid"
} | grep -a -v -e EAGAIN -e 'resumed>' -e '/etc/' -e 'AF_UNIX' -e 'AF_NETLINK' |
    awk '{ who=$1; tid=$2; t=$3; $1=$2=$3=""; sub(/^ +/, ""); print t, who, $0 }' |
    sort -n | awk -v sp="${socks##*:}" '
        !start && $2 == "curl" && $0 ~ ("connect\\(.*htons\\(" sp "\\)") { start = $1 }
        start { printf "%8.0f  %-5s %s\n", ($1 - start) * 1e6, $2, substr($0, index($0, $3), 150) }'
