#!/usr/bin/env bash
# Start a real single-node Slurm cluster (munged, MariaDB, slurmdbd, slurmctld, slurmd) on this
# machine, for tests and CI. Debian 12, run as root, no systemd needed. See slurm/local/README.md.
#
#   bash slurm/local/start.sh          # install if needed, configure, start, wait until usable
#   bash slurm/local/stop.sh           # cancel all jobs, stop exactly the daemons started here
#
# Environment:
#   LLAVA_HPC_SLURM_STATE   state dir (pid files, logs, Slurm state, MariaDB data); default /var/lib/llava-hpc-slurm
#   LLAVA_HPC_SLURM_CPUS    CPUs the node advertises (default 8, independent of the real core count)
#   LLAVA_HPC_SLURM_GPUS    fake GPUs on the node (default 2)
#   LLAVA_HPC_SLURM_TIMEOUT seconds to wait for each daemon (default 30)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATES="$HERE/templates"
STATE="${LLAVA_HPC_SLURM_STATE:-/var/lib/llava-hpc-slurm}"
CPUS="${LLAVA_HPC_SLURM_CPUS:-8}"
NGPU="${LLAVA_HPC_SLURM_GPUS:-2}"
WAIT_S="${LLAVA_HPC_SLURM_TIMEOUT:-30}"
CLUSTER="llava-local"
ETC=/etc/slurm
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop.sh uses the reverse
PKGS=(slurmctld slurmd slurm-client munge slurmdbd slurm-wlm-mysql-plugin mariadb-server)
MYSQL_SOCK=/run/mysqld/mysqld.sock

T0=$(date +%s.%N)
say() { echo "[slurm-local] $*"; }
die() { echo "[slurm-local] ERROR: $*" >&2; exit 1; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts system daemons)"
STATE="$(realpath -m "$STATE")"
case "$STATE" in /|/etc|/usr|/var|/tmp|/root|/home) die "refusing state dir $STATE";; esac

# ---------------------------------------------------------------- helpers
pidfile() { echo "$STATE/run/$1.pid"; }

# alive NAME: our pid file exists and names a live process whose command is NAME.
alive() {
  local pf pid; pf="$(pidfile "$1")"
  [ -s "$pf" ] || return 1
  pid="$(cat "$pf")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]   # a zombie is dead
}

logs_of() {
  case "$1" in
    munged) echo "$STATE/log/munged.out $STATE/munge/munged.log" ;;
    mariadbd) echo "$STATE/log/mariadbd.out" ;;
    *) echo "$STATE/log/$1.out $STATE/log/$1.log" ;;
  esac
}

show_logs() {   # the current run's lines only (launch writes a "=== ... starting" marker)
  local f shown=0
  for f in $(logs_of "$1"); do
    [ -s "$f" ] || continue
    [ $shown = 1 ] && [ "${f##*.}" = log ] && continue   # *.log repeats *.out (daemons run with -D)
    echo "----- $f (last 30 lines of this start)" >&2
    awk '/^=== .* starting: /{n=0; delete a} {a[n++]=$0} END{s=n>30?n-30:0; for(i=s;i<n;i++) print a[i]}' "$f" >&2
    shown=1
  done
}

fail_daemon() {   # NAME MESSAGE
  echo "[slurm-local] ERROR: $1: $2" >&2
  show_logs "$1"
  echo "[slurm-local] (daemons already started are left running; 'bash $HERE/stop.sh' stops them)" >&2
  exit 1
}

# launch NAME CMD...: run CMD in the foreground mode of the daemon, in its own session, detached,
# stdout/stderr to $STATE/log/NAME.out; the pid file is written by the very process that execs it.
launch() {
  local name="$1"; shift
  local pf out; pf="$(pidfile "$name")"; out="$STATE/log/$name.out"
  rm -f "$pf"
  local f
  for f in $(logs_of "$name"); do [ -e "$f" ] && echo "=== $(date -Is) starting: $*" >>"$f"; done
  echo "=== $(date -Is) starting: $*" >>"$out"
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$pf" "$@" </dev/null >>"$out" 2>&1 &
  local i
  for i in $(seq 50); do [ -s "$pf" ] && break; sleep 0.02; done
  [ -s "$pf" ] || fail_daemon "$name" "no pid file after launch"
}

# wait_for NAME DESCRIPTION CHECK...: poll CHECK until it succeeds; fail fast if NAME died.
wait_for() {
  local name="$1" what="$2"; shift 2
  local deadline=$(( $(date +%s) + WAIT_S )) out
  while :; do
    if out="$("$@" 2>&1)"; then return 0; fi
    grep -q 'fatal:' <<<"$out" && fail_daemon "$name" "$what failed: $(grep 'error:\|fatal:' <<<"$out" | tail -n 3)"
    alive "$name" || { sleep 0.3; alive "$name" || fail_daemon "$name" "exited while waiting for: $what"; }
    [ "$(date +%s)" -lt "$deadline" ] ||
      fail_daemon "$name" "not ready after ${WAIT_S}s: $what; its last output:"$'\n'"$(tail -n 5 <<<"$out")"
    sleep 0.3
  done
}

node_state() { timeout 5 sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n1; }
node_usable() { case "$(node_state)" in idle|mix|mixed|alloc|allocated) return 0;; *) return 1;; esac; }
node_idle() { [ "$(node_state)" = idle ]; }
sacct_ok() { timeout 10 sacct -n -X -S now-1minutes -o JobID; }
ctld_up() { local o; o="$(timeout 5 scontrol ping 2>&1)"; echo "$o"; grep -q 'is UP' <<<"$o"; }
dbd_up() { timeout 5 sacctmgr -n -P show cluster format=cluster; }
munge_ok() { munge -n </dev/null | unmunge; }
sql() { mariadb --no-defaults -S "$MYSQL_SOCK" -u root "$@"; }
db_up() { sql -e "SELECT 1"; }

all_alive() { local d; for d in "${DAEMONS[@]}"; do alive "$d" || return 1; done; }

node_name() {
  if command -v slurmd >/dev/null 2>&1; then
    slurmd -C 2>/dev/null | sed -n 's/^NodeName=\([^ ]*\).*/\1/p' | head -n1
  fi
}
NODE="$(node_name)"; NODE="${NODE:-$(hostname -s)}"

# ---------------------------------------------------------------- already running?
if all_alive && node_usable && sacct_ok >/dev/null 2>&1; then
  say "already running and healthy (node $NODE: $(node_state); state dir $STATE)"
  exit 0
fi
if [ -d "$STATE/run" ] && ls "$STATE"/run/*.pid >/dev/null 2>&1; then
  say "found a partial/unhealthy previous start: stopping it first"
  LLAVA_HPC_SLURM_STATE="$STATE" bash "$HERE/stop.sh" || true
fi

# ---------------------------------------------------------------- install
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Keep package scripts from starting daemons we would not track (the image usually has this already).
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
  fi
  apt_install() { apt-get install -y -q --no-install-recommends "${missing[@]}"; }
  if ! apt_install; then
    say "apt-get install failed; running apt-get update and retrying"
    apt-get update -q && apt_install || { [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d; die "package installation failed"; }
  fi
  [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  say "installed in $(elapsed) s"
  NODE="$(node_name)"; NODE="${NODE:-$(hostname -s)}"
fi
for u in slurm munge mysql; do
  id "$u" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$u"
done

# ---------------------------------------------------------------- ports
if command -v ss >/dev/null 2>&1; then
  for port in 6817 6818 6819; do
    if [ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]; then
      ss -Hltnp "sport = :$port" >&2 || true
      die "TCP port $port is already in use by a process this script did not start (another Slurm?); stop it first"
    fi
  done
fi

# ---------------------------------------------------------------- folders, fake GPUs, configs
install -d -m 755 "$STATE" "$STATE/run" "$STATE/spool" "$STATE/gpu"
install -d -m 755 -o slurm -g slurm "$STATE/run/slurm" "$STATE/log"
install -d -m 700 -o slurm -g slurm "$STATE/ctld"
install -d -m 700 -o munge -g munge "$STATE/munge"
install -d -m 700 -o mysql -g mysql "$STATE/mysql"
install -d -m 755 -o munge -g munge /run/munge
install -d -m 755 -o mysql -g mysql /run/mysqld
install -d -m 755 "$ETC"

for i in $(seq 0 $((NGPU - 1))); do
  [ -c "$STATE/gpu/nvidia$i" ] || { rm -f "$STATE/gpu/nvidia$i"; mknod -m 666 "$STATE/gpu/nvidia$i" c 1 3; }
done

REALMEM="$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)"
REALMEM="${REALMEM:-$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)}"
MEM=$(( REALMEM > 16384 ? 16384 : REALMEM ))
MINMEM=$(( CPUS * 512 )); [ "$MEM" -ge "$MINMEM" ] || MEM=$MINMEM   # config_overrides: not checked

if [ ! -s "$STATE/dbpass" ]; then
  (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/dbpass")
fi
DBPASS="$(cat "$STATE/dbpass")"

render() {   # TEMPLATE DEST MODE OWNER
  local tmp; tmp="$(mktemp "$2.XXXXXX")"
  sed -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@HOST@|$NODE|g" -e "s|@STATE@|$STATE|g" \
      -e "s|@CPUS@|$CPUS|g" -e "s|@MEM@|$MEM|g" -e "s|@NGPU@|$NGPU|g" \
      -e "s|@LASTGPU@|$((NGPU - 1))|g" -e "s|@DBPASS@|$DBPASS|g" "$TEMPLATES/$1" >"$tmp"
  chmod "$3" "$tmp"; chown "$4" "$tmp"; mv -f "$tmp" "$2"
}
render slurm.conf.in "$ETC/slurm.conf" 644 root:root
render gres.conf.in "$ETC/gres.conf" 644 root:root
render slurmdbd.conf.in "$ETC/slurmdbd.conf" 600 slurm:slurm
say "configs written to $ETC (node $NODE: CPUs=$CPUS RealMemory=$MEM gpu:$NGPU; state $STATE)"

# ---------------------------------------------------------------- munged
if [ ! -s /etc/munge/munge.key ]; then
  install -d -m 700 -o munge -g munge /etc/munge
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
launch munged setpriv --reuid=munge --regid=munge --init-groups \
  munged --foreground --force --socket=/run/munge/munge.socket.2 --pid-file=/run/munge/munged.pid \
  --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed"
wait_for munged "munge -n | unmunge" munge_ok

# ---------------------------------------------------------------- MariaDB
if [ ! -d "$STATE/mysql/mysql" ]; then
  say "initialising MariaDB data dir $STATE/mysql"
  mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" \
    --auth-root-authentication-method=socket --skip-test-db >>"$STATE/log/mariadbd.out" 2>&1 \
    || fail_daemon mariadbd "mariadb-install-db failed"
fi
launch mariadbd mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql" --socket="$MYSQL_SOCK" \
  --pid-file=/run/mysqld/mariadbd.pid --skip-networking --skip-log-bin \
  --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900
wait_for mariadbd "SELECT 1 on $MYSQL_SOCK" db_up
sql <<SQL || fail_daemon mariadbd "creating the slurm database user failed"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE OR REPLACE USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

# ---------------------------------------------------------------- slurmdbd + accounting
launch slurmdbd slurmdbd -D
wait_for slurmdbd "sacctmgr show cluster" dbd_up
if ! timeout 10 sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
  timeout 20 sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail_daemon slurmdbd "sacctmgr add cluster failed"
  say "registered cluster $CLUSTER in accounting"
fi

# ---------------------------------------------------------------- slurmctld + slurmd
launch slurmctld slurmctld -D
wait_for slurmctld "scontrol ping" ctld_up
launch slurmd slurmd -D
deadline=$(( $(date +%s) + WAIT_S )); resumed=0
while ! node_idle; do
  alive slurmd || fail_daemon slurmd "exited while waiting for node $NODE to be idle"
  alive slurmctld || fail_daemon slurmctld "exited while waiting for node $NODE to be idle"
  st="$(node_state)"
  # A node drained/down in an earlier run keeps that state (and reason) in the state dir.
  if [ $resumed = 0 ] && [[ "$st" =~ ^(drain|drng|drained|down|inval|fail) ]]; then
    say "node $NODE is '$st' from an earlier run: resuming it"
    timeout 5 scontrol update nodename="$NODE" state=resume || true
    resumed=1
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    timeout 5 scontrol show node "$NODE" >&2 || true
    fail_daemon slurmd "node $NODE not idle after ${WAIT_S}s (state: ${st:-?})"
  fi
  sleep 0.3
done
wait_for slurmdbd "sacct works" sacct_ok

say "cluster $CLUSTER up in $(elapsed) s: node $NODE idle, partitions: $(timeout 5 sinfo -h -o %P | tr '\n' ' ')"
say "state/logs in $STATE (logs: $STATE/log); stop with: bash $HERE/stop.sh"
