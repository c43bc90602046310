#!/usr/bin/env bash
# Restart the local cluster's node daemon (slurmd) started by slurm/local/start.sh, for fault-injection tests.
#
#   bash slurm/local/restart-node.sh            # slurmd stopped and started: running jobs live on (their
#                                               # slurmstepd outlives slurmd), as on a real daemon restart
#   bash slurm/local/restart-node.sh --crash    # a node crash: slurmd and every process of every running job
#                                               # killed with SIGKILL (a power cut), then slurmd started again
#
# Only the slurmd named by start.sh's pid file is touched; the other daemons keep running. After a crash,
# slurmctld finds the jobs missing when the node registers again and requeues them (NODE_FAIL) where they
# allow it (--requeue, which llava-hpc's jobs set).
set -euo pipefail

STATE="${LLAVA_HPC_SLURM_STATE:-}"
if [ -z "$STATE" ] && [ -r /etc/slurm/slurm.conf ]; then
  STATE="$(sed -n 's|^StateSaveLocation=\(.*\)/ctld$|\1|p' /etc/slurm/slurm.conf | head -n1)"
fi
STATE="$(realpath -m "${STATE:-/var/lib/llava-hpc-slurm}")"
PIDFILE="$STATE/run/slurmd.pid"
WAIT_S="${LLAVA_HPC_SLURM_TIMEOUT:-30}"
say() { echo "[slurm-local] $*"; }
die() { echo "[slurm-local] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
crash=0
case "${1:-}" in --crash) crash=1 ;; "") ;; *) die "usage: $0 [--crash]" ;; esac

pid="$(cat "$PIDFILE" 2>/dev/null || true)"
[[ "$pid" =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmd ] ||
  die "no slurmd started by start.sh is running (pid file $PIDFILE)"

descendants() {   # PID -> the pids of all its descendants (children first listed after their parent)
  local child
  for child in $(awk -v p="$1" '$4 == p {print $1}' /proc/[0-9]*/stat 2>/dev/null); do
    echo "$child"; descendants "$child"
  done
}

if [ $crash = 1 ]; then
  # Everything at once, like a power cut: no daemon gets to report anything.
  victims="$pid"
  for step in $(pgrep -x slurmstepd || true); do victims="$victims $step $(descendants "$step" | tr '\n' ' ')"; done
  # shellcheck disable=SC2086
  kill -STOP $victims 2>/dev/null || true
  # shellcheck disable=SC2086
  kill -KILL $victims 2>/dev/null || true
  say "node crash: killed slurmd and $(( $(wc -w <<<"$victims") - 1 )) job process(es)"
else
  kill -TERM "$pid"
  say "slurmd (pid $pid) stopped"
fi
for _ in $(seq 100); do [ -d "/proc/$pid" ] && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || break; sleep 0.1; done

echo "=== $(date -Is) starting: slurmd -D (restart-node.sh)" >>"$STATE/log/slurmd.out"
setsid bash -c 'echo $$ > "$0"; exec "$@"' "$PIDFILE" slurmd -D </dev/null >>"$STATE/log/slurmd.out" 2>&1 &
deadline=$(( $(date +%s) + WAIT_S ))
NODE="$(slurmd -C 2>/dev/null | sed -n 's/^NodeName=\([^ ]*\).*/\1/p' | head -n1)"
until st="$(timeout 5 sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n1)" && [[ "$st" =~ ^(idle|mix|alloc) ]]; do
  [ "$(date +%s)" -lt "$deadline" ] || die "node $NODE not back after ${WAIT_S}s (state: ${st:-?})"
  sleep 0.5
done
say "slurmd started again (pid $(cat "$PIDFILE")); node $NODE is $st"
