#!/usr/bin/env bash
# Prints the embedded default configuration with its bench topic (`bench.load`)
# delivering before sync (`deliver_before_sync = true`), for measuring what that
# setting changes:
#   benches/early-config.sh > /tmp/early.toml
#   AB_CONFIG=/tmp/early.toml benches/ab.sh ./target/release/joinery early lat 5000 1024 rate=1000
#   JOINERY_CONFIG=/tmp/early.toml benches/peers.sh 5 100000 1024
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
out=$(awk '
  { print }
  /^name = "bench.load"$/ { in_bench = 1 }
  in_bench && /^retention = / { print "deliver_before_sync = true"; in_bench = 0; done = 1 }
  END { if (!done) exit 1 }
' "$ROOT/src/default_config.toml") || {
  echo "early-config.sh: the default config no longer has the bench.load topic with a retention" >&2
  exit 1
}
printf '%s\n' "$out"
