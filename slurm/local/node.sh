#!/usr/bin/env bash
# Fault injection on one compute node of the local cluster started by slurm/local/start.sh.
#
#   bash slurm/local/node.sh crash NODE     # a power cut: SIGKILL to the node's slurmd and to every process in the
#                                           # node's namespace (slurmstepd, job tasks); the node stays down
#   bash slurm/local/node.sh start NODE     # start the node's slurmd again and wait until the node answers
#   bash slurm/local/node.sh restart NODE   # slurmd stopped (SIGTERM) and started again: running jobs live on
#                                           # (their slurmstepd outlives slurmd), as on a daemon restart
#   bash slurm/local/node.sh restart NODE --crash   # crash, then start at once
#
# Only the slurmd named by start.sh's pid file and the processes of that node's namespace are touched. After a
# crash, slurmctld marks the node down after SlurmdTimeout (or finds the jobs missing when it registers again) and
# requeues the jobs that asked for --requeue (NODE_FAIL); llava-hpc's checkpointable stages do.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=slurm/local/common.sh
. "$HERE/common.sh"
WAIT_S="${LLAVA_HPC_SLURM_TIMEOUT:-30}"

usage() { die "usage: $0 {crash|start|restart [--crash]} NODE"; }
[ "$(id -u)" = 0 ] || die "must run as root"
action="${1:-}"; node="${2:-}"; flag="${3:-}"
[[ "$node" =~ ^node[0-9]+$ ]] || usage
[ -e "/var/run/netns/$node" ] || die "no network namespace $node: is the local cluster running (bash $HERE/start.sh)?"

crash() {
  # Everything at once, like a power cut: stop first so nothing gets to report, then kill.
  local victims; victims="$(ip netns pids "$node" | tr '\n' ' ')"
  # shellcheck disable=SC2086
  [ -n "$victims" ] && { kill -STOP $victims 2>/dev/null || true; kill -KILL $victims 2>/dev/null || true; }
  for _ in $(seq 100); do [ -z "$(ip netns pids "$node")" ] && break; sleep 0.1; done
  rm -f "$(pidfile "slurmd-$node")"
  say "$node crashed: killed $(wc -w <<<"$victims") process(es) (slurmd, job steps, tasks)"
}

stop_slurmd() {
  local pid
  pid="$(pid_of "slurmd-$node" slurmd)" || die "no slurmd started by start.sh runs on $node"
  kill -TERM "$pid"
  for _ in $(seq 100); do running "$pid" || break; sleep 0.1; done
  say "$node: slurmd (pid $pid) stopped"
}

start() {
  alive "slurmd-$node" slurmd && die "$node: slurmd already runs"
  start_node "$node"
  local deadline=$(( $(date +%s) + WAIT_S )) st
  # Answering again: no longer "*" (not responding) and not down (ReturnToService=2 returns it on registration).
  until st="$(timeout 5 sinfo -h -N -n "$node" -o %t 2>/dev/null | head -n1)" && [[ "$st" =~ ^(idle|mix|alloc|comp)$ ]]; do
    alive "slurmd-$node" slurmd || die "$node: slurmd exited; see $STATE/log/slurmd-$node.log"
    [ "$(date +%s)" -lt "$deadline" ] || die "$node not back after ${WAIT_S}s (state: ${st:-?})"
    sleep 0.5
  done
  say "$node: slurmd started (pid $(cat "$(pidfile "slurmd-$node")")); node is $st"
}

case "$action" in
  crash) [ -z "$flag" ] || usage; crash ;;
  start) [ -z "$flag" ] || usage; start ;;
  restart)
    case "$flag" in --crash) crash ;; "") stop_slurmd ;; *) usage ;; esac
    start ;;
  *) usage ;;
esac
