# Shared helpers for Outpost's environment scripts. Sourced, never run.
#
# Paths (all overridable through the environment):
#   OUTPOST_CACHE    built tools, the Python venv, the cargo target dir; kept across runs and clones
#   OUTPOST_ENV_DIR  the running environment: configs, data, pids, logs and the `env` file tests read

set -euo pipefail

OUTPOST_ROOT=${OUTPOST_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
OUTPOST_CACHE=${OUTPOST_CACHE:-/var/cache/outpost}
OUTPOST_ENV_DIR=${OUTPOST_ENV_DIR:-/tmp/outpost-env}
OUTPOST_BIN=$OUTPOST_CACHE/bin
OUTPOST_LOGS=$OUTPOST_ENV_DIR/logs
OUTPOST_PIDS=$OUTPOST_ENV_DIR/pids
export OUTPOST_ROOT OUTPOST_CACHE OUTPOST_ENV_DIR
export PATH="$OUTPOST_BIN:$PATH"

# Loopback ports, chosen away from the usual defaults so that a system-wide
# instance of any of these services never collides with the test one.
ETCD_CLIENT_PORT=${ETCD_CLIENT_PORT:-12379}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-12380}
APISERVER_PORT=${APISERVER_PORT:-16443}
CONTROLLER_MANAGER_PORT=${CONTROLLER_MANAGER_PORT:-17257}
SCHEDULER_PORT=${SCHEDULER_PORT:-17259}
MQTT_PORT=${MQTT_PORT:-11883}
MODBUS_PORT=${MODBUS_PORT:-15020}
MODBUS_RTU_PORT=${MODBUS_RTU_PORT:-15021}
OPCUA_PORT=${OPCUA_PORT:-14840}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-19090}

# Pinned versions. Changing one rebuilds what depends on it.
KUBERNETES_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
PYMODBUS_VERSION=3.16.1
ASYNCUA_VERSION=2.1.0

log() { printf '[outpost-env %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[outpost-env] error: %s\n' "$*" >&2; exit 1; }

# step NAME CMD...: runs one named set-up step; a failure names the step and
# points to its log, and the script exits non-zero.
step() {
  local name=$1; shift
  log "$name ..."
  local t0=$SECONDS
  if ! "$@"; then
    die "step '$name' failed (logs: $OUTPOST_LOGS)"
  fi
  log "$name done ($((SECONDS - t0)) s)"
}

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found (${2:-install it first})"
}

# is_running NAME: the service's pid file names a live process.
is_running() {
  local pidfile=$OUTPOST_PIDS/$1.pid
  [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

# start_bg NAME CMD...: starts a service in the background, detached from the
# calling shell, with its own log file and pid file.
start_bg() {
  local name=$1; shift
  mkdir -p "$OUTPOST_LOGS" "$OUTPOST_PIDS"
  # The service writes its own pid before it execs: setsid may fork, so $!
  # is not always the service's pid.
  local pidfile=$OUTPOST_PIDS/$name.pid
  rm -f "$pidfile"
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$pidfile" "$@" >>"$OUTPOST_LOGS/$name.log" 2>&1 < /dev/null &
  local i
  for i in $(seq 1 50); do [[ -s $pidfile ]] && return 0; sleep 0.05; done
  die "$name did not start (log: $OUTPOST_LOGS/$name.log)"
}

# stop_bg NAME: stops a service started by start_bg, politely then firmly.
stop_bg() {
  local name=$1 pidfile=$OUTPOST_PIDS/$1.pid pid
  [[ -f $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# wait_for NAME SECONDS CMD...: polls CMD until it succeeds; on timeout shows
# the tail of the service's log.
wait_for() {
  local name=$1 timeout_s=$2; shift 2
  local deadline=$((SECONDS + timeout_s))
  until "$@" >/dev/null 2>&1; do
    if ! is_running "$name"; then
      tail -n 20 "$OUTPOST_LOGS/$name.log" >&2 || true
      die "$name exited during start-up (log: $OUTPOST_LOGS/$name.log)"
    fi
    if (( SECONDS >= deadline )); then
      tail -n 20 "$OUTPOST_LOGS/$name.log" >&2 || true
      die "$name not ready after ${timeout_s}s (log: $OUTPOST_LOGS/$name.log)"
    fi
    sleep 0.3
  done
}

# wait_until WHAT SECONDS CMD...: polls CMD (no process to watch) until it
# succeeds, or dies saying what did not happen.
wait_until() {
  local what=$1 timeout_s=$2; shift 2
  local deadline=$((SECONDS + timeout_s))
  until "$@" >/dev/null 2>&1; do
    (( SECONDS >= deadline )) && die "$what: not there after ${timeout_s}s (logs: $OUTPOST_LOGS)"
    sleep 0.5
  done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# port_free NAME PORT: fails with a clear message when something else already
# listens on a port a service is about to take.
port_free() {
  if port_open "$2"; then
    die "cannot start $1: 127.0.0.1:$2 is already in use by another process (ss -ltnp 'sport = :$2' shows which)"
  fi
}

# env_set KEY VALUE: records a fact about the running environment in the env
# file that tests and the main command read.
env_set() {
  local file=$OUTPOST_ENV_DIR/env
  mkdir -p "$OUTPOST_ENV_DIR"
  touch "$file"
  grep -v "^$1=" "$file" > "$file.tmp" || true
  printf '%s=%s\n' "$1" "$2" >> "$file.tmp"
  mv "$file.tmp" "$file"
}
