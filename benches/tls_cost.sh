#!/usr/bin/env bash
# What mutual TLS costs: the same `joinery bench` runs against two brokers with
# the embedded default configuration, one serving mTLS (127.0.0.1:7543) and one
# serving loopback-only plaintext (127.0.0.1:7544, [tls] insecure_plaintext_agency),
# alternated so machine drift hits both alike. Prints each run and the medians.
#
# usage: benches/tls_cost.sh [rounds=5] [count=100000] [size=1024]
#   env: JOINERY (default ./target/release/joinery)
#        KEEP_DATA=1 (keep the two brokers' scratch data dirs, several GB, instead of removing them)
set -euo pipefail
ROUNDS=${1:-5}; N=${2:-100000}; S=${3:-1024}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
JOINERY=$(realpath "${JOINERY:-$ROOT/target/release/joinery}")
WORK=$(mktemp -d /tmp/joinery-tls-cost.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  if [ "${KEEP_DATA:-0}" = 1 ]; then echo "data kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

start() { # start <name> <port> <metrics port> [extra [tls] lines]
  local dir=$WORK/$1; mkdir -p "$dir"
  sed -e "s/127.0.0.1:7443/127.0.0.1:$2/" "$ROOT/src/default_config.toml" > "$dir/joinery.toml"
  if [ -n "${4:-}" ]; then
    sed -i "s/^dev_pki = true$/dev_pki = true\n$4/" "$dir/joinery.toml"
  fi
  printf '\n[metrics]\nlisten = "127.0.0.1:%s"\n' "$3" >> "$dir/joinery.toml"
  (cd "$dir" && exec "$JOINERY" serve --config joinery.toml > serve.log 2>&1) &
  pids+=($!)
  for _ in $(seq 100); do grep -q "joinery is serving" "$dir/serve.log" && return; sleep 0.1; done
  cat "$dir/serve.log"; exit 1
}
start tls 7543 9563
start plain 7544 9564 'insecure_plaintext_agency = "council-demo"'

run() { # run <name> <addr> <mode args...>
  local name=$1 addr=$2; shift 2
  (cd "$WORK/$name" && "$JOINERY" bench "$@" --addr "$addr" 2>/dev/null) \
    | python3 -c 'import json,sys; o=json.load(sys.stdin); print(o["rate"]["msgs_per_s"])'
}
: > "$WORK/results"
for r in $(seq "$ROUNDS"); do
  for test in "pub $N $S window=256" "consume $N $S prefetch=256"; do
    t=$(run tls https://127.0.0.1:7543 $test max_secs=120)
    p=$(run plain http://127.0.0.1:7544 $test max_secs=120)
    echo "round $r ${test%% *}: mtls $t msg/s, plaintext $p msg/s" | tee -a "$WORK/results"
  done
done
python3 - "$WORK/results" <<'EOF'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    m = re.match(r"round \d+ (\w+): mtls ([\d.]+) msg/s, plaintext ([\d.]+)", line)
    if m:
        runs.setdefault(m[1], ([], []))
        runs[m[1]][0].append(float(m[2])); runs[m[1]][1].append(float(m[3]))
for test, (tls, plain) in runs.items():
    mt, mp = statistics.median(tls), statistics.median(plain)
    print(f"{test}: median mtls {mt:,.0f} msg/s, plaintext {mp:,.0f} msg/s, "
          f"mTLS costs {100 * (1 - mt / mp):.1f}% (ranges {min(tls):,.0f}-{max(tls):,.0f} / {min(plain):,.0f}-{max(plain):,.0f})")
EOF
