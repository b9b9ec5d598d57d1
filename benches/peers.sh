#!/usr/bin/env bash
# joinery beside NATS JetStream and RabbitMQ in one peerbench run (README "Performance").
#
# usage: benches/peers.sh [reps=3] [count=100000] [size=1024]
#   env: PEERBENCH (default ../shared/peerbench)  JOINERY (default ./target/release/joinery)
#        PEERS (default "nats rabbit-classic rabbit-cq2 rabbit-quorum joinery")
#        JOINERY_CONFIG (a config file for joinery serve; default: the embedded one)
#        JOINERY_ADDR (default https://127.0.0.1:7443; http://... for a plaintext broker)
#        KEEP_DATA=1 (keep joinery's scratch data dir, ~1.5 GB, instead of removing it)
# needs: nats-server and rabbitmq-server (apt), the peerbench client built as its
# README says, and `cargo build --release`. Everything listens on 127.0.0.1 and is
# stopped by PID. The JSONL results and the summary table go to $OUT_DIR.
set -euo pipefail
REPS=${1:-3}; N=${2:-100000}; S=${3:-1024}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERBENCH=${PEERBENCH:-$ROOT/../shared/peerbench}
JOINERY=$(realpath "${JOINERY:-$ROOT/target/release/joinery}")
PEERS=${PEERS:-"nats rabbit-classic rabbit-cq2 rabbit-quorum joinery"}
PB=${PB:-/tmp/peerbench}
OUT_DIR=${OUT_DIR:-$PB/results}
STAMP=$(date +%Y%m%dT%H%M%S)
WORK=$(mktemp -d /tmp/joinery-peers.XXXXXX)
mkdir -p "$PB/run" "$OUT_DIR"

joinery_pid=""
cleanup() {
  if [ -n "$joinery_pid" ] && kill -0 "$joinery_pid" 2>/dev/null; then
    kill -TERM "$joinery_pid"
    for _ in $(seq 100); do kill -0 "$joinery_pid" 2>/dev/null || break; sleep 0.1; done
  fi
  [ -z "${servers:-}" ] || "$PEERBENCH/servers.sh" stop $servers >/dev/null 2>&1 || true
  if [ "${KEEP_DATA:-0}" = 1 ]; then echo "joinery data kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

servers=""
case " $PEERS " in *" nats "*) servers="nats";; esac
case " $PEERS " in *" rabbit-"*) servers="$servers rabbit";; esac
[ -z "$servers" ] || "$PEERBENCH/servers.sh" start $servers

# joinery: a fresh data dir (and development PKI) in $WORK.
cd "$WORK"
if [ -n "${JOINERY_CONFIG:-}" ]; then
  "$JOINERY" serve --config "$JOINERY_CONFIG" > serve.log 2>&1 &
else
  "$JOINERY" serve > serve.log 2>&1 &
fi
joinery_pid=$!
echo "$joinery_pid" > "$PB/run/joinery.pid"
for _ in $(seq 100); do grep -q "joinery is serving" serve.log && break; sleep 0.1; done
grep -q "joinery is serving" serve.log || { cat serve.log; exit 1; }
echo "joinery pid $joinery_pid ($("$JOINERY" --version)), data in $WORK/joinery-data"

# run_all.sh runs "$JOINERY_BENCH pub|consume|lat ..." from this directory, so
# the default --pki-dir (joinery-data/pki) finds the development certificates.
export JOINERY_BENCH="$JOINERY bench --addr ${JOINERY_ADDR:-https://127.0.0.1:7443}"
OUT="$OUT_DIR/run-$STAMP.jsonl" PEERS="$PEERS" PB="$PB" \
  "$PEERBENCH/run_all.sh" "$REPS" "$N" "$S"
echo "{\"joinery_end\":{\"rss_kb\":$(awk '/VmRSS/{print $2}' /proc/$joinery_pid/status),\"data_kb\":$(du -sk joinery-data | cut -f1)}}" \
  | tee -a "$OUT_DIR/run-$STAMP.jsonl"
python3 "$PEERBENCH/summarize.py" "$OUT_DIR/run-$STAMP.jsonl" | tee "$OUT_DIR/run-$STAMP.md"
echo "results: $OUT_DIR/run-$STAMP.jsonl, table: $OUT_DIR/run-$STAMP.md"
