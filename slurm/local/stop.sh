#!/usr/bin/env bash
# Stop the local Slurm cluster started by slurm/local/start.sh: cancel all jobs, stop exactly the daemons start.sh
# started (by the pids in its pid files; never by name) in reverse order, then remove the node namespaces, the
# bridge and the /etc/hosts lines it added. Safe to run when nothing is running. Keeps state, logs and the
# accounting database.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=slurm/local/common.sh
. "$HERE/common.sh"
RUN="$STATE/run"

if [ ! -d "$RUN" ] && [ ! -e "$STATE/net" ]; then
  say "nothing to stop (no $RUN)"
  exit 0
fi

# 1. Cancel every job while slurmctld is still up (a job's slurmstepd outlives a killed slurmd).
if alive slurmctld slurmctld && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
  jobs="$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')"
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    timeout 15 scancel $jobs 2>/dev/null || true
    deadline=$(( $(date +%s) + 15 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
      [ -z "$(timeout 5 squeue -h -t RUNNING,COMPLETING,SUSPENDED -o %A 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi

# 2. Stop daemons in reverse start order: SIGTERM, then SIGKILL after a timeout. Node daemons first, all at once.
stop_ids() {   # COMM GRACE ID...: signal all, then wait for all
  local comm="$1" grace="$2"; shift 2
  local id pid pids=() ids=()
  for id in "$@"; do
    if pid="$(pid_of "$id" "$comm")"; then
      kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid"); ids+=("$id")
    elif [ -e "$(pidfile "$id")" ]; then
      say "$id: not running (removing stale pid file)"; rm -f "$(pidfile "$id")"
    fi
  done
  local deadline=$(( $(date +%s) + grace )) i
  for i in "${!pids[@]}"; do
    while running "${pids[$i]}" && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
    if running "${pids[$i]}" && [ "$(cat "/proc/${pids[$i]}/comm" 2>/dev/null)" = "$comm" ]; then
      say "${ids[$i]} (pid ${pids[$i]}) ignored SIGTERM for ${grace}s: sending SIGKILL"
      kill -KILL "${pids[$i]}" 2>/dev/null || true
      for _ in $(seq 25); do running "${pids[$i]}" || break; sleep 0.2; done
    fi
    rm -f "$(pidfile "${ids[$i]}")"
    say "${ids[$i]} (pid ${pids[$i]}) stopped"
  done
}
node_ids=()
for pf in "$RUN"/slurmd-*.pid; do [ -e "$pf" ] && node_ids+=("$(basename "$pf" .pid)"); done
[ "${#node_ids[@]}" -gt 0 ] && stop_ids slurmd 15 "${node_ids[@]}"
stop_ids slurmctld 15 slurmctld
stop_ids slurmdbd 15 slurmdbd
stop_ids mariadbd 40 mariadbd
stop_ids munged 15 munged

# 3. The network start.sh made: node namespaces (their veth ends go with them), the bridge, the /etc/hosts lines.
if [ -r "$STATE/net" ]; then
  nodes="$(sed -n 's/^nodes=//p' "$STATE/net")"
  for i in $(seq "${nodes:-0}"); do
    # Anything still running in a node (a job's orphan) goes with it: a namespace is not removed while in use.
    for pid in $(ip netns pids "node$i" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "node$i" 2>/dev/null || true
  done
  ip link del "$(sed -n 's/^bridge=//p' "$STATE/net")" 2>/dev/null || true
  rm -f "$STATE/net"
fi
if grep -q "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
  kept="$(grep -v "$HOSTS_MARK" /etc/hosts)"
  printf '%s\n' "$kept" >/etc/hosts   # in place: /etc/hosts may be a mount
fi
say "stopped (state and logs kept in $STATE; start again with: bash $HERE/start.sh)"
