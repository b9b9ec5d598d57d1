#!/usr/bin/env bash
# Instruction counts of the broker (valgrind's callgrind) over one
# `joinery bench` run: counts do not move with machine noise, so two builds
# can be compared function by function where timings cannot tell them apart.
#
# usage: benches/callgrind.sh BINARY [N=30000] [BENCH_ARGS...]
#   e.g. benches/callgrind.sh ./target/release/joinery 30000
#        (BENCH_ARGS default: pub N 1024 window=256 max_secs=500)
#   needs: valgrind (apt-get install valgrind)
#
# The broker runs under callgrind with the embedded default configuration in
# a scratch directory (kept: its path is printed, with cg.out in it); the load
# generator runs natively. Prints the total, the total without SHA-256, and
# the top functions by their own instructions.
#
# Read with care:
# - valgrind hides the CPU's SHA extensions, so ring's SHA-256 runs its
#   software fallback here (about half of all instructions); natively it is a
#   few percent. Hence the "without SHA-256" figure.
# - Totals move by a few percent between runs of one binary: group commits
#   form differently under valgrind's timing, and sled's background threads
#   poll. Compare the counts of the functions a change touches, and take the
#   per-message cost as the difference between two run lengths (e.g. 10000
#   and 30000), which removes start-up and shutdown.
set -euo pipefail

if [ $# -lt 1 ]; then
  sed -n '2,24p' "$0" >&2
  exit 2
fi
BIN=$(realpath "$1")
N=${2:-30000}
shift $(($# >= 2 ? 2 : 1))
if [ $# -eq 0 ]; then set -- pub "$N" 1024 window=256 max_secs=500; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
command -v valgrind >/dev/null || { echo "valgrind is required (apt-get install valgrind)" >&2; exit 1; }
DIR=$(mktemp -d /tmp/joinery-callgrind.XXXXXX)
PID=
cleanup() {
  stop_broker "$PID"
}
trap cleanup EXIT

cp "$ROOT/src/default_config.toml" "$DIR/config.toml"
cd "$DIR" # the development PKI is relative to the working directory
valgrind --tool=callgrind --callgrind-out-file="$DIR/cg.out" \
  "$BIN" serve --config "$DIR/config.toml" >"$DIR/server.log" 2>&1 &
PID=$!
wait_serving "$DIR/server.log" "$PID" 300

timeout 900 "$BIN" bench "$@" >"$DIR/bench.out" 2>"$DIR/bench.err" || true
stop_broker "$PID"
PID=

callgrind_annotate --threshold=100 --auto=no "$DIR/cg.out" >"$DIR/annotate.txt"
awk -v args="$*" -v dir="$DIR" '
  /PROGRAM TOTALS/ { gsub(",", "", $1); total = $1; next }
  /file:function/ { listing = 1; next }
  listing && /^ *[0-9,]+ \(/ {
    n = $1; gsub(",", "", n)
    if ($0 ~ /sha256_block_data_order/) sha += n
    if (shown < 25) { line[++shown] = $0 }
  }
  END {
    printf "bench %s: total %d instructions, %d without SHA-256 (%s)\n", args, total, total - sha, dir
    for (i = 1; i <= shown; i++) {
      l = line[i]
      sub(/\/root\/\.cargo\/registry\/src\/[^\/]+\//, "", l)
      sub(/\/rustc\/[0-9a-f]+\/library\//, "", l)
      print substr(l, 1, 160)
    }
  }' "$DIR/annotate.txt"
