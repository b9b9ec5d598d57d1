# Shared by the bench scripts (sourced, not run).

# wait_serving LOG PID SECS: returns once the broker PID, logging to LOG, says
# it is serving; exits the calling script (showing the log if the broker
# stopped) when it stops or is not ready within SECS seconds.
wait_serving() {
  local log=$1 pid=$2 secs=$3
  for _ in $(seq 1 $((secs * 10))); do
    grep -q "joinery is serving" "$log" && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.1
  done
  echo "broker not ready in $secs s" >&2
  exit 1
}

# stop_broker PID: stops the broker PID this script started (SIGTERM, then
# waits for it); nothing if PID is empty or already gone.
stop_broker() {
  local pid=$1
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
}
