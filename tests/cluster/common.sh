# Shared by the cluster tests (sourced): skipping, package installation, and the processes
# and network objects a test started, so that it stops exactly those, whatever the outcome.
#   skip MSG                       prints "SKIPPED: MSG" and exits 77 (CTest's SKIP_RETURN_CODE)
#   need_root                      skips unless running as root
#   ensure_packages PKG...         apt-get installs the missing ones; returns 1 when it cannot
#   started PID                    at exit: TERM the pid, KILL it if still there after 10 s
#   on_exit CMD                    at exit: run CMD (both kinds newest first, as one stack)
#   undo_all                       does the exit actions now
#   since T0                       seconds since T0 (a `date +%s.%N` value), one decimal

skip() { echo "SKIPPED: $*"; exit 77; }
need_root() { [[ $(id -u) -eq 0 ]] || skip "needs root (runs daemons and creates network namespaces)"; }

ensure_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null || return 1
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # No daemon is started by the packages' scripts when policy-rc.d forbids it (containers);
  # the tests start their own either way.
  apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1; }
}

# One stack of undo actions, run newest first at exit: a stopped daemon's jobs are
# cancelled before the daemon is stopped, a namespace's processes before the namespace goes.
_undo=()
started() { _undo+=("_stop_pid $1"); }
on_exit() { _undo+=("$1"); }

_stop_pid() {
  local pid=$1
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "pid $pid ignored SIGTERM for 10 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

undo_all() {
  local i
  for ((i = ${#_undo[@]} - 1; i >= 0; i--)); do eval "${_undo[i]}" || true; done
  _undo=()
}

_cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  undo_all
  exit "$rc"
}
trap _cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# A free TCP port on this machine (not listening now), from a range that depends on the pid.
free_port() {
  local p=$(( 20000 + ($$ * 7 + ${1:-0} * 13 + RANDOM) % 20000 ))
  while ss -Htln "sport = :$p" | grep -q .; do p=$((p + 1)); done
  echo "$p"
}

# deadline SECS: after SECS the test fails (exit 124) and still cleans up: a watchdog sends
# SIGTERM to this shell and to its direct children (a foreground command would otherwise
# hold the trap back). Keep SECS below CTest's TIMEOUT, whose SIGKILL no trap survives.
deadline() {
  local main=$$ secs=$1
  (
    sleep "$secs" >/dev/null 2>&1 &
    sleeper=$!
    trap 'kill $sleeper 2>/dev/null; exit 0' TERM
    wait $sleeper
    echo "FAIL: the test ran past its ${secs} s deadline"
    kill -TERM "$main" 2>/dev/null
    sleep 2
    pkill -TERM -P "$main" 2>/dev/null
  ) &
  started $!
  trap 'exit 124' TERM
}
