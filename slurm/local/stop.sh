#!/usr/bin/env bash
# Stop the local Slurm cluster started by slurm/local/start.sh: cancel all jobs, then stop exactly
# the daemons start.sh started (by the pids in its pid files; never by name), in reverse order.
# Safe to run when nothing is running. Keeps state, logs and the accounting database.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
say() { echo "[slurm-local] $*"; }

# Same state dir as start.sh: env var, else the one the generated slurm.conf points at, else default.
STATE="${LLAVA_HPC_SLURM_STATE:-}"
if [ -z "$STATE" ] && [ -r /etc/slurm/slurm.conf ]; then
  STATE="$(sed -n 's|^StateSaveLocation=\(.*\)/ctld$|\1|p' /etc/slurm/slurm.conf | head -n1)"
fi
STATE="$(realpath -m "${STATE:-/var/lib/llava-hpc-slurm}")"
RUN="$STATE/run"
STOP_ORDER=(slurmd slurmctld slurmdbd mariadbd munged)

pid_of() {   # NAME -> prints the pid if our pid file names a live process whose command is NAME
  local pf="$RUN/$1.pid" pid
  [ -s "$pf" ] || return 1
  pid="$(cat "$pf")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || return 1
  running "$pid" || return 1
  echo "$pid"
}

running() {  # PID: exists and is not a zombie (pid 1 may be slow to reap orphans)
  [ -r "/proc/$1/stat" ] || return 1
  [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

if [ ! -d "$RUN" ]; then
  say "nothing to stop (no $RUN)"
  exit 0
fi

# 1. Cancel every job while slurmctld is still up (a job's slurmstepd outlives a killed slurmd).
if pid_of slurmctld >/dev/null && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
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

# 2. Stop daemons in reverse start order: SIGTERM, then SIGKILL after a timeout.
for name in "${STOP_ORDER[@]}"; do
  pf="$RUN/$name.pid"
  if ! pid="$(pid_of "$name")"; then
    [ -e "$pf" ] && { say "$name: not running (removing stale pid file)"; rm -f "$pf"; }
    continue
  fi
  case "$name" in mariadbd) grace=40 ;; *) grace=15 ;; esac
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$(( $(date +%s) + grace ))
  while running "$pid" && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
  if running "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
    say "$name (pid $pid) ignored SIGTERM for ${grace}s: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 25); do running "$pid" || break; sleep 0.2; done
  fi
  rm -f "$pf"
  say "$name (pid $pid) stopped"
done
say "stopped (state and logs kept in $STATE; start again with: bash $HERE/start.sh)"
