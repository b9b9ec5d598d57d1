#!/usr/bin/env bash
# benches/footprint.sh — joinery's resource FOOTPRINT, measured reproducibly.
#
#   benches/footprint.sh [BINARY] [WORKDIR]
#     BINARY   joinery release binary (default ./target/release/joinery)
#     WORKDIR  scratch directory under /tmp (default /tmp/joinery-footprint);
#              emptied first, left behind afterwards with the data dir,
#              serve-*.log, bench-*.json and sizes.tsv (raw data-dir sizes).
#
# Environment knobs (defaults in brackets):
#   FP_BACKLOG [1000000]       messages in the backlog of phases b-d
#   FP_SIZE [1024]             payload bytes per message
#   FP_REUSE_ROUNDS [10]       disk-reuse rounds (phase e)
#   FP_REUSE_N [100000]        messages published+acked per round
#   FP_CPU_N [100000]          messages in the CPU-per-message run (phase f)
#   FP_RECLAIM_WAIT [30]       idle seconds for sled to reclaim after the drain
#   FP_AUDIT [1]               0: run with [audit] enabled = false, to tell the
#                              audit log's growth from the queues' (not a
#                              production setting: the design requires the log)
#
# The broker runs with the embedded default config (src/default_config.toml)
# except for two ports, so as not to collide with a broker on 7443/9464:
#   [broker] listen = 127.0.0.1:17443, [metrics] listen = 127.0.0.1:19464.
# Only the broker PID this script started is ever signalled.
#
# Output: one line per figure, `footprint <name> <value> <unit>`, on stdout;
# progress on stderr.
#
# Phases
#   a  idle RSS, 5 s after /readyz says ready, fresh data dir, no traffic
#   b  1M x 1 KiB backlog with one `bench pub` (rate), RSS at the end and
#      after 10 s idle, data-dir size against live bytes
#   c  SIGTERM; the live keys and values counted by `joinery usage` (on a copy
#      of the data dir), against the data dir's size; restart on the backlog:
#      start-up to ready, RSS after start-up
#   d  drain the backlog with a real consumer (`joinery subscribe`, acks),
#      data-dir size after the drain and after FP_RECLAIM_WAIT s idle
#   e  disk reuse: FP_REUSE_ROUNDS x `bench consume FP_REUSE_N` (each publishes
#      and acks N), data-dir size after every round — it must plateau
#   f  server CPU (utime+stime, /proc/<pid>/stat) over one `bench consume`
#      run, per message (one publish + one delivery + one ack)
set -euo pipefail

BIN=${1:-./target/release/joinery}
WORK=${2:-/tmp/joinery-footprint}
BACKLOG=${FP_BACKLOG:-1000000}
SIZE=${FP_SIZE:-1024}
REUSE_ROUNDS=${FP_REUSE_ROUNDS:-10}
REUSE_N=${FP_REUSE_N:-100000}
CPU_N=${FP_CPU_N:-100000}
RECLAIM_WAIT=${FP_RECLAIM_WAIT:-30}
AUDIT=${FP_AUDIT:-1}
GRPC_PORT=17443
OPS_PORT=19464
ADDR="https://127.0.0.1:${GRPC_PORT}"
READYZ="http://127.0.0.1:${OPS_PORT}/readyz"
SUB=council-demo.bench

# Live bytes per backlog message, from the storage layout (src/storage/keys.rs,
# records.rs, audit/blocks.rs) for a bench message with a SIZE-byte payload:
#   envelope: payload BenchPayload{data} (SIZE+3) + field overhead 3
#             + message_id uuid 38 + message_type 25 + sender 14
#             + created_at 13 + marking 2                     = SIZE + 98
#   one receiving subscription, retention expiry: the message is inline in
#   its pending entry `p sub seq` (no topic copy, no expiry-index entry):
#             key 13 + entry 12 + header 112 + envelope      = SIZE + 235
#   audit record of the publish (kept 7 years), in a block: ~4 + ~213 = ~217
# (peek reports payload_bytes = SIZE + 3 for the BenchPayload.)
# These estimates are printed in phase b while the broker runs; phase c counts
# the real keys and values with `joinery usage` while it is stopped, and the
# disk-against-live figures of phase c come from that count.
LIVE_QUEUE_PER_MSG=$((SIZE + 235))
LIVE_AUDIT_PUB_PER_MSG=217

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEFAULT_CONFIG="${SCRIPT_DIR}/../src/default_config.toml"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
fig() { printf 'footprint %s %s %s\n' "$1" "$2" "$3"; }
now_ns() { date +%s%N; }
secs_since() { awk -v a="$1" -v b="$(now_ns)" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }

[[ -x "$BIN" ]] || die "no executable joinery binary at $BIN"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
[[ -f "$DEFAULT_CONFIG" ]] || die "missing $DEFAULT_CONFIG"
case "$WORK" in /tmp/?*) ;; *) die "WORKDIR must be under /tmp (got $WORK)" ;; esac
command -v curl >/dev/null || die "curl is required"
for port in "$GRPC_PORT" "$OPS_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port is already in use"
    fi
done

rm -rf "$WORK"
mkdir -p "$WORK"
DATA="$WORK/joinery-data"
PKI="$DATA/pki"
CONF="$WORK/joinery.toml"
SIZES="$WORK/sizes.tsv"
CLI=(--addr "$ADDR" --pki-dir "$PKI")

# The embedded default config with only the two listeners moved.
sed 's/^listen = "127\.0\.0\.1:7443"$/listen = "127.0.0.1:'"$GRPC_PORT"'"/' \
    "$DEFAULT_CONFIG" >"$CONF"
grep -q "^listen = \"127.0.0.1:${GRPC_PORT}\"" "$CONF" || die "could not set [broker] listen"
grep -q '^\[metrics\]' "$CONF" && die "default config already has [metrics]; adjust the script"
printf '\n[metrics]\nlisten = "127.0.0.1:%s"\n' "$OPS_PORT" >>"$CONF"
if [[ "$AUDIT" == 0 ]]; then
    grep -q '^\[audit\]' "$CONF" && die "default config already has [audit]; adjust the script"
    printf '\n[audit]\nenabled = false\n' >>"$CONF"
fi
"$BIN" check-config --config "$CONF" >&2

free_kb=$(df -Pk /tmp | awk 'NR == 2 { print $4 }')
need_kb=$(((BACKLOG * (SIZE + 1000) * 4) / 1024))
((free_kb > need_kb)) || die "/tmp has ${free_kb} KiB free; this run needs about ${need_kb} KiB"

PID=""
RUN=0
cleanup() {
    if [[ -n "$PID" ]] && kill -0 "$PID" 2>/dev/null; then
        log "stopping broker $PID"
        kill -TERM "$PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$PID" 2>/dev/null && kill -KILL "$PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- measurement helpers ---------------------------------------------------
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
rss_mb() { awk -v kb="$(status_kb "$PID" VmRSS)" 'BEGIN { printf "%.1f", kb / 1024 }'; }
hwm_mb() { awk -v kb="$(status_kb "$PID" VmHWM)" 'BEGIN { printf "%.1f", kb / 1024 }'; }
rollup_mb() { awk -v k="$1:" '$1 == k { printf "%.1f", $2 / 1024 }' "/proc/$PID/smaps_rollup"; }
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$PID/stat"; }
clk_tck=$(getconf CLK_TCK)

# RSS and its breakdown (anonymous, of which transparent huge pages; file).
report_rss() { # name
    fig "$1" "$(rss_mb)" MB
    fig "${1}_anon" "$(rollup_mb Anonymous)" MB
    fig "${1}_anon_hugepages" "$(rollup_mb AnonHugePages)" MB
    fig "${1}_file" "$(rollup_mb Pss_File)" MB
}

dir_bytes() { du -sb --exclude=pki "$DATA" | awk '{ print $1 }'; }
dir_alloc_bytes() { du -sk --exclude=pki "$DATA" | awk '{ printf "%.0f", $1 * 1024 }'; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
record_size() { # label -> prints the apparent size in bytes
    local apparent alloc
    apparent=$(dir_bytes)
    alloc=$(dir_alloc_bytes)
    printf '%s\t%s\t%s\t%s\n' "$(date +%s)" "$1" "$apparent" "$alloc" >>"$SIZES"
    echo "$apparent"
}
report_size() { # name
    local b
    b=$(record_size "$1")
    fig "$1" "$(mb "$b")" MB
    fig "${1}_allocated" "$(mb "$(tail -n1 "$SIZES" | cut -f4)")" MB
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }

# count_live <data dir> <name> [queue]: `joinery usage` on a stopped broker's
# data dir (table on stderr); the live bytes it counts, and the last size
# recorded against them (also against the queue state alone with `queue`).
count_live() {
    local dir=$1 name=$2 json="$WORK/usage-$2.json" queue all disk
    "$BIN" usage --data-dir "$dir" >&2
    "$BIN" usage --data-dir "$dir" --json >"$json"
    queue=$(json_field "$json" queue_bytes)
    all=$(json_field "$json" live_bytes)
    disk=$(tail -n1 "$SIZES" | cut -f3)
    fig "live_queue_bytes_counted_$name" "$(mb "$queue")" MB
    fig "live_with_audit_bytes_counted_$name" "$(mb "$all")" MB
    [[ "${3:-}" != queue ]] || fig "disk_${name}_vs_counted_live_queue" "$(ratio "$disk" "$queue")" x
    fig "disk_${name}_vs_counted_live_with_audit" "$(ratio "$disk" "$all")" x
}

depth() {
    timeout 30 "$BIN" stats --json "${CLI[@]}" 2>/dev/null |
        grep -o "\"depth\":[0-9]*,\"in_flight\":[0-9]*,\"name\":\"$SUB\"" |
        sed 's/^"depth":\([0-9]*\),.*/\1/' || true
}

# Starts the broker; sets PID and STARTED_NS. Its log: serve-RUN.log.
start_broker() {
    RUN=$((RUN + 1))
    SERVE_LOG="$WORK/serve-$RUN.log"
    STARTED_NS=$(now_ns)
    (cd "$WORK" && exec "$BIN" serve --config "$CONF") >"$SERVE_LOG" 2>&1 &
    PID=$!
    log "broker started, pid $PID (log $SERVE_LOG)"
}

# Waits (at most $1 s) until /readyz says ready; sets READY_SECS, and
# SERVING_SECS when the log line "joinery is serving" was first seen.
wait_ready() {
    local limit=$1 deadline r
    deadline=$(($(date +%s) + limit))
    READY_SECS="" SERVING_SECS=""
    while (($(date +%s) < deadline)); do
        kill -0 "$PID" 2>/dev/null || { cat "$SERVE_LOG" >&2; die "broker exited during start-up"; }
        if [[ -z "$SERVING_SECS" ]] && grep -q "joinery is serving" "$SERVE_LOG"; then
            SERVING_SECS=$(secs_since "$STARTED_NS")
        fi
        r=$(curl -s -m 2 "$READYZ" 2>/dev/null || true)
        if [[ "$r" == ready* ]]; then
            READY_SECS=$(secs_since "$STARTED_NS")
            [[ -n "$SERVING_SECS" ]] || SERVING_SECS=$READY_SECS
            return 0
        fi
        sleep 0.02
    done
    die "broker not ready after ${limit}s"
}

# Waits until a gRPC call over mTLS succeeds (at most $1 s); sets GRPC_SECS.
wait_grpc() {
    local deadline=$(($(date +%s) + $1))
    while (($(date +%s) < deadline)); do
        if timeout 10 "$BIN" stats "${CLI[@]}" >/dev/null 2>&1; then
            GRPC_SECS=$(secs_since "$STARTED_NS")
            return 0
        fi
        sleep 0.05
    done
    die "gRPC not answering after $1 s"
}

stop_broker() { # SIGTERM, bounded wait; sets STOP_SECS
    local t0
    t0=$(now_ns)
    kill -TERM "$PID"
    for _ in $(seq 600); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$PID" 2>/dev/null; then
        log "broker $PID still running 60 s after SIGTERM; killing it"
        kill -KILL "$PID"
    fi
    wait "$PID" 2>/dev/null || true
    STOP_SECS=$(secs_since "$t0")
    PID=""
}

json_field() { # file, dotted path (rate.msgs_per_s)
    local file=$1 path=$2
    case "$path" in
        rate.*) grep -o '"rate":{[^}]*}' "$file" | grep -o "\"${path#rate.}\":[0-9.]*" | cut -d: -f2 ;;
        *) grep -o "\"$path\":[^,}]*" "$file" | head -n1 | cut -d: -f2 ;;
    esac
}

bench() { # label, args...: one bench run, its JSON line kept in bench-<label>.json
    local label=$1
    shift
    timeout 1800 "$BIN" bench "$@" "${CLI[@]}" >"$WORK/bench-$label.json" 2>"$WORK/bench-$label.err" ||
        { cat "$WORK/bench-$label.err" >&2; die "bench $label failed"; }
    grep -q '"error"' "$WORK/bench-$label.json" && die "bench $label: $(cat "$WORK/bench-$label.json")"
    grep -q '"timed_out":true' "$WORK/bench-$label.json" && log "WARNING: bench $label timed out"
    return 0
}

phase_start() { PHASE_T0=$(now_ns); log "phase $1"; }
phase_end() { fig "phase_${1}_secs" "$(secs_since "$PHASE_T0")" s; }

printf 'epoch\tlabel\tapparent_bytes\tallocated_bytes\n' >"$SIZES"
log "binary $BIN ($(stat -c %s "$BIN") bytes), config $CONF, work dir $WORK"

# --- a: idle RSS --------------------------------------------------------------
phase_start "a: idle RSS"
start_broker
wait_ready 30
fig startup_empty_ready "$READY_SECS" s
sleep 5
report_rss rss_idle
fig threads_idle "$(status_kb "$PID" Threads)" count
phase_end a

# --- b: 1M backlog --------------------------------------------------------------
phase_start "b: build the backlog ($BACKLOG x $SIZE B)"
bench pub pub "$BACKLOG" "$SIZE" window=256 max_secs=1200
fig backlog_publish_rate "$(json_field "$WORK/bench-pub.json" rate.msgs_per_s)" msg/s
fig backlog_publish_secs "$(json_field "$WORK/bench-pub.json" rate.secs)" s
published=$(json_field "$WORK/bench-pub.json" rate.done)
fig backlog_published "$published" msgs
report_rss rss_backlog_end
fig rss_backlog_peak "$(hwm_mb)" MB
sleep 10
report_rss rss_backlog_idle10s
d=$(depth)
fig backlog_depth "$d" msgs
live_queue=$((d * LIVE_QUEUE_PER_MSG))
live_all=$((d * (LIVE_QUEUE_PER_MSG + LIVE_AUDIT_PUB_PER_MSG)))
fig live_queue_bytes "$(mb "$live_queue")" MB
fig live_with_audit_bytes "$(mb "$live_all")" MB
report_size disk_backlog
disk=$(tail -n1 "$SIZES" | cut -f3)
fig disk_backlog_vs_live_queue "$(ratio "$disk" "$live_queue")" x
fig disk_backlog_vs_live_with_audit "$(ratio "$disk" "$live_all")" x
fig sled_size_on_disk_backlog "$(mb "$(curl -s -m 5 "http://127.0.0.1:${OPS_PORT}/metrics" |
    awk '$1 == "joinery_storage_bytes" { printf "%.0f", $2 }')")" MB
phase_end b

# --- c: restart with the backlog ----------------------------------------------
phase_start "c: SIGTERM and restart on the backlog"
stop_broker
fig shutdown_secs "$STOP_SECS" s
report_size disk_after_shutdown
# Count the live keys and values on a copy: opening the store itself would
# replay and flush its journal before the restart whose start-up is timed.
cp -a "$DATA" "$WORK/usage-copy"
count_live "$WORK/usage-copy" backlog queue
rm -rf "$WORK/usage-copy"
sync
start_broker
wait_ready 300
fig startup_backlog_ready "$READY_SECS" s
fig startup_backlog_log_serving "$SERVING_SECS" s
fig startup_backlog_cpu "$(awk -v t="$(cpu_ticks)" -v c="$clk_tck" 'BEGIN { printf "%.2f", t / c }')" s
wait_grpc 60
fig startup_backlog_grpc_answers "$GRPC_SECS" s
report_rss rss_after_restart
sleep 5
report_rss rss_after_restart_5s
fig depth_after_restart "$(depth)" msgs
phase_end c

# --- d: drain -------------------------------------------------------------------
phase_start "d: drain the backlog with acks"
d_before=$(depth)
t0=$(now_ns)
timeout 1800 "$BIN" subscribe --subscription "$SUB" --agency council-demo "${CLI[@]}" \
    --count "$d_before" --max-in-flight 1000 --idle-timeout 10s >/dev/null 2>"$WORK/drain.err" ||
    log "WARNING: subscribe exited with $? (see $WORK/drain.err)"
drain_secs=$(secs_since "$t0")
fig drain_secs "$drain_secs" s
fig drain_rate "$(awk -v n="$d_before" -v s="$drain_secs" 'BEGIN { printf "%.0f", n / s }')" msg/s
for _ in $(seq 60); do
    d=$(depth)
    [[ "$d" == 0 ]] && break
    sleep 1
done
fig depth_after_drain "$d" msgs
report_rss rss_after_drain
report_size disk_after_drain
sleep "$RECLAIM_WAIT"
report_size "disk_after_drain_idle${RECLAIM_WAIT}s"
report_rss "rss_after_drain_idle${RECLAIM_WAIT}s"
phase_end d

# --- e: disk reuse ----------------------------------------------------------------
phase_start "e: disk reuse, $REUSE_ROUNDS x bench consume $REUSE_N"
first=""
for round in $(seq "$REUSE_ROUNDS"); do
    bench "reuse-$round" consume "$REUSE_N" "$SIZE" prefetch=256 max_secs=600
    sleep 2
    b=$(record_size "reuse_round_$round")
    [[ -n "$first" ]] || first=$b
    fig "disk_reuse_round_$round" "$(mb "$b")" MB
    log "round $round: $(json_field "$WORK/bench-reuse-$round.json" rate.msgs_per_s) msg/s consumed, data dir $(mb "$b") MB"
done
last=$b
fig disk_reuse_growth_total "$(mb $((last - first)))" MB
if ((REUSE_ROUNDS > 1)); then
    fig disk_reuse_growth_per_round \
        "$(awk -v a="$first" -v b="$last" -v n="$REUSE_ROUNDS" 'BEGIN { printf "%.1f", (b - a) / (n - 1) / 1048576 }')" MB/round
fi
fig disk_reuse_messages_total "$((REUSE_ROUNDS * REUSE_N))" msgs
fig disk_reuse_live_equivalent "$(mb $((REUSE_ROUNDS * REUSE_N * LIVE_QUEUE_PER_MSG)))" MB
report_rss rss_after_reuse
phase_end e

# --- f: CPU per message -----------------------------------------------------------
phase_start "f: server CPU per message over bench consume $CPU_N"
c0=$(cpu_ticks)
t0=$(now_ns)
bench cpu consume "$CPU_N" "$SIZE" prefetch=256 max_secs=600
c1=$(cpu_ticks)
wall=$(secs_since "$t0")
n=$(json_field "$WORK/bench-cpu.json" rate.done)
fig cpu_run_messages "$n" msgs
fig cpu_run_wall "$wall" s
fig cpu_run_server_cpu "$(awk -v t=$((c1 - c0)) -v c="$clk_tck" 'BEGIN { printf "%.2f", t / c }')" s
fig cpu_per_message "$(awk -v t=$((c1 - c0)) -v c="$clk_tck" -v n="$n" 'BEGIN { printf "%.1f", t / c * 1e6 / n }')" us
fig cpu_run_consume_rate "$(json_field "$WORK/bench-cpu.json" rate.msgs_per_s)" msg/s
prefill=$(grep -o '"prefill":{[^}]*}' "$WORK/bench-cpu.json" | grep -o '"secs":[0-9.]*' | cut -d: -f2 || true)
fig cpu_run_prefill_secs "$(awk -v s="$prefill" 'BEGIN { printf "%.3f", s }')" s
phase_end f

stop_broker
fig shutdown_final_secs "$STOP_SECS" s
report_size disk_final
# What is live at the end (the queues are drained: mostly the audit log,
# kept for its retention), counted with the broker stopped.
count_live "$DATA" final
log "done; raw sizes in $SIZES, logs and bench JSON in $WORK"
