#!/usr/bin/env bash
# One `joinery bench` run against a fresh broker, for comparing two builds:
# call it alternately with each build's binary, several times, and compare
# the lines it prints (this machine drifts by the hour, so only runs made
# side by side compare).
#
# usage: benches/ab.sh BINARY LABEL BENCH_ARGS...
#   e.g. for i in 1 2 3; do
#          benches/ab.sh /tmp/old old pub 200000 1024 window=256
#          benches/ab.sh ./target/release/joinery new pub 200000 1024 window=256
#        done
#   env: AB_ENV (extra environment for the broker, e.g. "MIMALLOC_PURGE_DELAY=0")
#        AB_CONFIG (a config file to run instead of the embedded default, e.g.
#        benches/deliver-before-sync.toml)
#
# The broker runs the embedded default configuration (or AB_CONFIG) in a scratch directory
# (removed afterwards) and is stopped by its own PID. Prints one line: the
# label, the bench's JSON line, the broker's CPU (cs: hundredths of a second,
# utime + stime from /proc), the load generator's CPU, and the broker's group
# commits (flushes, publishes) from its log.
set -euo pipefail

if [ $# -lt 3 ]; then
  sed -n '2,18p' "$0" >&2
  exit 2
fi
BIN=$(realpath "$1")
LABEL=$2
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
DIR=$(mktemp -d /tmp/joinery-ab.XXXXXX)
PID=
cleanup() {
  stop_broker "$PID"
  rm -rf "$DIR"
}
trap cleanup EXIT

cp "${AB_CONFIG:-$ROOT/src/default_config.toml}" "$DIR/config.toml"
cd "$DIR" # the development PKI is relative to the working directory
# shellcheck disable=SC2086 # AB_ENV is a list of NAME=value words
env ${AB_ENV:-} "$BIN" serve --config "$DIR/config.toml" >"$DIR/server.log" 2>&1 &
PID=$!
wait_serving "$DIR/server.log" "$PID" 20

/usr/bin/time -f "client_cpu_s=%U+%S" -o "$DIR/client.time" \
  "$BIN" bench "$@" >"$DIR/bench.out" 2>"$DIR/bench.err"
read -r U S < <(awk '{print $14, $15}' "/proc/$PID/stat")
stop_broker "$PID"
PID=
echo "$LABEL $(cat "$DIR/bench.out") cpu_cs=$((U + S)) $(cat "$DIR/client.time") $(grep -o 'flushes=[0-9]* publishes=[0-9]*' "$DIR/server.log" | tail -1 || true)"
