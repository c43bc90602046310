# Shared by start.sh, stop.sh and node.sh (sourced, not run): where the state lives, how a daemon is launched
# with a pid file, how a pid file is checked, and how one compute node's slurmd is started in its namespace.

# Same state dir everywhere: the env var, else the one the generated slurm.conf points at, else the default.
STATE="${LLAVA_HPC_SLURM_STATE:-}"
if [ -z "$STATE" ] && [ -r /etc/slurm/slurm.conf ]; then
  STATE="$(sed -n 's|^StateSaveLocation=\(.*\)/ctld$|\1|p' /etc/slurm/slurm.conf | head -n1)"
fi
STATE="$(realpath -m "${STATE:-/var/lib/llava-hpc-slurm}")"
case "$STATE" in /|/etc|/usr|/var|/tmp|/root|/home) echo "[slurm-local] ERROR: refusing state dir $STATE" >&2; exit 1;; esac
BRIDGE=br-llava
HOSTS_MARK="# llava-hpc-slurm"   # marks the /etc/hosts lines start.sh adds (stop.sh removes them)

say() { echo "[slurm-local] $*"; }
die() { echo "[slurm-local] ERROR: $*" >&2; exit 1; }

pidfile() { echo "$STATE/run/$1.pid"; }

running() {  # PID: exists and is not a zombie (pid 1 may be slow to reap orphans)
  [ -r "/proc/$1/stat" ] || return 1
  [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# pid_of ID COMM: prints the pid if our pid file for ID names a live process whose command is COMM.
pid_of() {
  local pf pid; pf="$(pidfile "$1")"
  [ -s "$pf" ] || return 1
  pid="$(cat "$pf")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  running "$pid" || return 1
  echo "$pid"
}
alive() { pid_of "$1" "$2" >/dev/null; }

# launch ID CMD...: run CMD (a daemon in its foreground mode) in its own session, detached, stdout/stderr to
# $STATE/log/ID.out; the pid file is written by the very process that execs CMD (exec keeps the pid through
# nsenter/unshare, which exec too).
launch() {
  local id="$1"; shift
  local pf out; pf="$(pidfile "$id")"; out="$STATE/log/$id.out"
  rm -f "$pf"
  [ -e "$STATE/log/$id.log" ] && echo "=== $(date -Is) starting: $*" >>"$STATE/log/$id.log"
  echo "=== $(date -Is) starting: $*" >>"$out"
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$pf" "$@" </dev/null >>"$out" 2>&1 &
  local i
  for i in $(seq 50); do [ -s "$pf" ] && break; sleep 0.02; done
  [ -s "$pf" ] || die "$id: no pid file after launch"
}

# start_node NODE: slurmd -N NODE inside the node's network namespace, with its own hostname (UTS namespace).
# `nsenter --net` and not `ip netns exec`: the latter mounts a fresh /sys, where slurmd finds no cgroup filesystem.
start_node() {
  launch "slurmd-$1" nsenter --net="/var/run/netns/$1" unshare --uts \
    bash -c 'hostname "$0" && exec slurmd -D -N "$0"' "$1"
  local i
  for i in $(seq 100); do alive "slurmd-$1" slurmd && return 0; sleep 0.05; done   # until the exec chain is done
  die "slurmd-$1 did not start; see $STATE/log/slurmd-$1.out"
}
