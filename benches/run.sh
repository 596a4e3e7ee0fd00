#!/usr/bin/env bash
# Benchmarks rna (over QUIC, and over TLS/TCP as `rna-tcp`) against `ssh -R` reverse dynamic
# SOCKS, direct connections and (with --peers all) Rusnel and shadowsocks-rust, A B A B in one
# run. See docs/performance.md.
#
#   benches/run.sh                 full run: 3 rounds, 1 GiB transfers, 10,000 streams
#   benches/run.sh --smoke         seconds: one round, tiny sizes, H1 without loss (CI)
#   benches/run.sh --peers all     also install and compare Rusnel and shadowsocks-rust
#                                  (slow cargo installs, once)
#   benches/run.sh --base PATH     also run another rna binary as system `rna-base` (a change
#                                  against the build before it, in the same run)
#   benches/run.sh -- ARGS         extra arguments for `rnabench suite` (see --help)
#   benches/run.sh -- --systems rna --tests M1-real,S1
#                                  the opt-in fleet tests (minutes each): M1-real (200 real
#                                  `rna agent` processes against the generator), M2 (10,000
#                                  idle agents) and S1 (M2, then kill -9 and restart the hub)
#
# H1 puts 1 % packet loss on each system's hub-agent port with iptables. As root with a
# working `unshare -n`, the whole suite runs in a network namespace of its own (everything
# is on 127.0.0.1), so no rule ever reaches the host's tables; otherwise the rules go on the
# host's loopback by port and are removed on exit, failure included.
#
# Prints one JSON line per (test, system, round), then a table of medians and ratios, and
# writes both to target/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
peers=default
base=
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) smoke=1 ;;
        --peers) peers="$2"; shift ;;
        --peers=*) peers="${1#--peers=}" ;;
        --base) base="$2"; shift ;;
        --) shift; extra=("$@"); break ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        echo "run.sh: need root for: $*" >&2; return 1; fi
}

# Peers: sshd and ssh from Debian packages.
if ! [ -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null || ! command -v ssh-keygen >/dev/null; then
    echo "--- installing openssh" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        openssh-server openssh-client >/dev/null
fi

systems=rna,rna-tcp,ssh,direct
peer_args=()
if [ "$peers" = all ]; then
    rusnel="$PWD/target/bench-peers/bin/rusnel"
    if ! [ -x "$rusnel" ]; then
        echo "--- cargo install rusnel (slow)" >&2
        timeout 3600 cargo install --locked rusnel --root "$PWD/target/bench-peers"
    fi
    ss="$PWD/target/bench-peers/bin"
    if ! [ -x "$ss/sslocal" ] || ! [ -x "$ss/ssserver" ]; then
        echo "--- cargo install shadowsocks-rust (slow)" >&2
        timeout 3600 cargo install --locked shadowsocks-rust --bin sslocal --bin ssserver \
            --root "$PWD/target/bench-peers"
    fi
    systems=rna,rna-tcp,ssh,direct,rusnel,shadowsocks
    peer_args=(--rusnel "$rusnel" --shadowsocks "$ss")
fi
if [ -n "$base" ]; then
    systems="rna,rna-base,${systems#rna,}"
    peer_args+=(--rna-base "$(realpath "$base")")
fi

if [ "$smoke" = 1 ]; then
    echo "--- cargo build (smoke: debug)" >&2
    timeout 1800 cargo build --locked --bin rna --example rnabench
    bin=target/debug
    # H1 runs without loss (no iptables needed) so its code path cannot rot.
    sizes=(--rounds 1 --bulk 4000000 --parallel-bulk 8000000 --l1-count 20 --l2-secs 0.5
           --l2-workers 4 --c1-counts 50 --m1-agents 20 --r1-trials 2 --h1-count 5 --h1-loss 0)
else
    echo "--- cargo build --release" >&2
    timeout 3600 cargo build --locked --release --bin rna --example rnabench
    bin=target/release
    sizes=()
fi

# The file server, hub, agent, sshd and the stream holder each keep up to 10,000 sockets.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

out=target/bench
mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
work=$(mktemp -d /dev/shm/rna-bench.XXXXXX)

# Loss rules H1 left behind if the suite was killed (they carry this comment).
drop_loss_rules() {
    command -v iptables >/dev/null 2>&1 || return 0
    iptables -w -S INPUT 2>/dev/null | grep -- '--comment rnabench-h1' | sed 's/^-A /-D /' |
        while read -r rule; do
            # shellcheck disable=SC2086 # the rule is iptables' own word list
            iptables -w $rule || true
        done
}
cleanup() {
    rm -rf "$work"
    [ "$netns" = 1 ] || [ "$smoke" = 1 ] || drop_loss_rules
}
netns=0
trap cleanup EXIT

# The suite's own network namespace (loopback only) when we can make one.
launch=()
if [ "$smoke" = 0 ] && [ "$(id -u)" -eq 0 ] && unshare -n true 2>/dev/null; then
    netns=1
    launch=(unshare -n sh -c 'ip link set lo up && exec "$@"' rnabench)
fi

{
    echo "# $(date -u) $(uname -srm)"
    echo "# cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
    echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# $(ssh -V 2>&1)"
    echo "# $(curl --version | sed -n 1p)"
    if [ "$netns" = 1 ]; then echo "# network: own namespace (unshare -n), loopback only"
    else echo "# network: host loopback"; fi
} | tee "$out/run-$stamp.txt" >&2

# The whole suite is bounded too: 60 minutes full, 5 minutes for the smoke.
limit=3600
[ "$smoke" = 1 ] && limit=300
timeout --kill-after=10 "$limit" "${launch[@]}" "$bin/examples/rnabench" suite \
    --rna "$bin/rna" --work "$work" --systems "$systems" --out "$out/results-$stamp.jsonl" \
    "${peer_args[@]}" "${sizes[@]}" "${extra[@]}" | tee -a "$out/run-$stamp.txt"
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/run-$stamp.txt" >&2
