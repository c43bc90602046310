#!/usr/bin/env bash
# Start a real multi-node Slurm cluster on this machine, modelled on a university GPU cluster (Great Lakes-like),
# for tests and CI: munged, MariaDB, slurmdbd and slurmctld on the "login side" (the root network namespace), and
# one slurmd per compute node, each in its own network namespace with its own IP and hostname, reachable over a
# private bridge. Debian 12, run as root, no systemd needed. See slurm/local/README.md.
#
#   bash slurm/local/start.sh          # install if needed, configure, start, wait until usable
#   bash slurm/local/stop.sh           # cancel all jobs, stop exactly the daemons started here, remove the network
#   bash slurm/local/node.sh crash node2   # fault injection on one node (see node.sh)
#
# Environment:
#   LLAVA_HPC_SLURM_STATE   state dir (pid files, logs, Slurm state, MariaDB data); default /var/lib/llava-hpc-slurm
#   LLAVA_HPC_SLURM_NODES   compute nodes (default 2): node1 .. nodeN
#   LLAVA_HPC_SLURM_CPUS    CPUs each node advertises (default 8, independent of the real core count)
#   LLAVA_HPC_SLURM_GPUS    fake GPUs per node (default 2)
#   LLAVA_HPC_SLURM_SUBNET  the bridge's /24 as three octets (default: the first of 10.77.0, 10.78.0, 172.31.77
#                           that no interface or route of this machine uses)
#   LLAVA_HPC_SLURM_TIMEOUT seconds to wait for each daemon (default 30)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=slurm/local/common.sh
. "$HERE/common.sh"
TEMPLATES="$HERE/templates"
NNODES="${LLAVA_HPC_SLURM_NODES:-2}"
CPUS="${LLAVA_HPC_SLURM_CPUS:-8}"
NGPU="${LLAVA_HPC_SLURM_GPUS:-2}"
WAIT_S="${LLAVA_HPC_SLURM_TIMEOUT:-30}"
CLUSTER="llava-local"
ACCOUNT="llava-lab"   # the account every job must name (--account); tests and docs use it
QOS="llava-lab"
ETC=/etc/slurm
SERVICES=(munged mariadbd slurmdbd slurmctld)   # login-side daemons, in start order; stop.sh uses the reverse
PKGS=(slurmctld slurmd slurm-client munge slurmdbd slurm-wlm-mysql-plugin mariadb-server lua5.1)
MYSQL_SOCK=/run/mysqld/mysqld.sock

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages, starts system daemons and makes network namespaces)"
[[ "$NNODES" =~ ^[1-9][0-9]?$ ]] || die "LLAVA_HPC_SLURM_NODES must be 1..99, got $NNODES"
NODES=(); for i in $(seq "$NNODES"); do NODES+=("node$i"); done
NODE_RANGE="node[1-$NNODES]"; [ "$NNODES" = 1 ] && NODE_RANGE=node1

# ---------------------------------------------------------------- helpers
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

fail_daemon() {   # ID MESSAGE
  echo "[slurm-local] ERROR: $1: $2" >&2
  show_logs "$1"
  echo "[slurm-local] (daemons already started are left running; 'bash $HERE/stop.sh' stops them)" >&2
  exit 1
}

# wait_for ID COMM DESCRIPTION CHECK...: poll CHECK until it succeeds; fail fast if the daemon died.
wait_for() {
  local id="$1" comm="$2" what="$3"; shift 3
  local deadline=$(( $(date +%s) + WAIT_S )) out
  while :; do
    if out="$("$@" 2>&1)"; then return 0; fi
    grep -q 'fatal:' <<<"$out" && fail_daemon "$id" "$what failed: $(grep 'error:\|fatal:' <<<"$out" | tail -n 3)"
    alive "$id" "$comm" || { sleep 0.3; alive "$id" "$comm" || fail_daemon "$id" "exited while waiting for: $what"; }
    [ "$(date +%s)" -lt "$deadline" ] ||
      fail_daemon "$id" "not ready after ${WAIT_S}s: $what; its last output:"$'\n'"$(tail -n 5 <<<"$out")"
    sleep 0.3
  done
}

nodes_state() { timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u; }
all_nodes() {   # PATTERN: every node's state matches it
  local states; states="$(nodes_state)"
  [ "$(grep -c . <<<"$states")" = "$NNODES" ] || return 1
  ! grep -qvE " ($1)\$" <<<"$states"
}
sacct_ok() { timeout 10 sacct -n -X -S now-1minutes -o JobID; }
ctld_up() { local o; o="$(timeout 5 scontrol ping 2>&1)"; echo "$o"; grep -q 'is UP' <<<"$o"; }
dbd_up() { timeout 5 sacctmgr -n -P show cluster format=cluster; }
munge_ok() { munge -n </dev/null | unmunge; }
sql() { mariadb --no-defaults -S "$MYSQL_SOCK" -u root "$@"; }
db_up() { sql -e "SELECT 1"; }

healthy() {
  local d n
  for d in "${SERVICES[@]}"; do alive "$d" "$d" || return 1; done
  for n in "${NODES[@]}"; do alive "slurmd-$n" slurmd || return 1; done
  [ -r "$STATE/net" ] && [ "$(sed -n 's/^nodes=//p' "$STATE/net")" = "$NNODES" ] || return 1
  all_nodes 'idle|mix|mixed|alloc|allocated' && sacct_ok >/dev/null 2>&1
}

# ---------------------------------------------------------------- already running?
if healthy; then
  say "already running and healthy ($NNODES nodes: $(nodes_state | tr '\n' ' '); state dir $STATE)"
  exit 0
fi
if { [ -d "$STATE/run" ] && ls "$STATE"/run/*.pid >/dev/null 2>&1; } || [ -e "$STATE/net" ]; then
  say "found a partial/unhealthy previous start: stopping it first"
  LLAVA_HPC_SLURM_STATE="$STATE" bash "$HERE/stop.sh" || true
fi

# ---------------------------------------------------------------- install
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
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

# ---------------------------------------------------------------- network: a bridge, one namespace per node
# Nothing is forwarded or NATed: a node namespace has only the bridge's /24 (no default route), so it reaches the
# controller (the bridge address) and the other nodes, and nothing else -- a compute node without internet.
subnet_free() {   # A.B.C: no address of this machine in A.B.C.0/24 and no route to it but the default one
  ! ip -4 -o addr show | grep -q " $1\." &&
    [ -z "$(ip -4 route show to match "$1.0/24" | grep -v '^default' || true)" ]
}
if [ -n "${LLAVA_HPC_SLURM_SUBNET:-}" ]; then
  SUBNET="$LLAVA_HPC_SLURM_SUBNET"
  subnet_free "$SUBNET" || die "LLAVA_HPC_SLURM_SUBNET=$SUBNET.0/24 is already used on this machine (ip route)"
else
  SUBNET=""
  for candidate in 10.77.0 10.78.0 172.31.77; do subnet_free "$candidate" && { SUBNET="$candidate"; break; }; done
  [ -n "$SUBNET" ] || die "no free /24 for the cluster network; set LLAVA_HPC_SLURM_SUBNET"
fi
CTLD_ADDR="$SUBNET.1"
node_addr() { echo "$SUBNET.$(( 10 + ${1#node} ))"; }

install -d -m 755 "$STATE" "$STATE/run"
{ echo "subnet=$SUBNET"; echo "nodes=$NNODES"; echo "bridge=$BRIDGE"; } >"$STATE/net"   # what stop.sh removes
ip link add "$BRIDGE" type bridge
ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
for n in "${NODES[@]}"; do
  ip netns add "$n"
  ip link add "veth-$n" type veth peer name eth0 netns "$n"
  ip link set "veth-$n" master "$BRIDGE" up
  ip -n "$n" addr add "$(node_addr "$n")/24" dev eth0
  ip -n "$n" link set eth0 up
  ip -n "$n" link set lo up
done
# Names resolve as on a cluster's DNS: MASTER_ADDR=node1, gloo/NCCL resolving their own hostname.
hosts_tmp="$(mktemp /etc/hosts.XXXXXX)"
grep -v "$HOSTS_MARK" /etc/hosts >"$hosts_tmp" || true
for n in "${NODES[@]}"; do echo "$(node_addr "$n") $n $HOSTS_MARK" >>"$hosts_tmp"; done
chmod 644 "$hosts_tmp"; cat "$hosts_tmp" >/etc/hosts; rm -f "$hosts_tmp"   # in place: /etc/hosts may be a mount

# ---------------------------------------------------------------- folders, fake GPUs, configs
install -d -m 755 "$STATE/spool" "$STATE/gpu"
install -d -m 755 -o slurm -g slurm "$STATE/run/slurm" "$STATE/log"
install -d -m 700 -o slurm -g slurm "$STATE/ctld"
install -d -m 700 -o munge -g munge "$STATE/munge"
install -d -m 700 -o mysql -g mysql "$STATE/mysql"
install -d -m 755 -o munge -g munge /run/munge
install -d -m 755 -o mysql -g mysql /run/mysqld
install -d -m 755 "$ETC"

for n in "${NODES[@]}"; do
  install -d -m 755 "$STATE/gpu/$n" "$STATE/spool/$n"
  for i in $(seq 0 $((NGPU - 1))); do
    [ -c "$STATE/gpu/$n/nvidia$i" ] || { rm -f "$STATE/gpu/$n/nvidia$i"; mknod -m 666 "$STATE/gpu/$n/nvidia$i" c 1 3; }
  done
done

REALMEM="$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)"
REALMEM="${REALMEM:-$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)}"
MEM=$(( REALMEM > 16384 ? 16384 : REALMEM ))
MINMEM=$(( CPUS * 512 )); [ "$MEM" -ge "$MINMEM" ] || MEM=$MINMEM   # config_overrides: not checked

if [ ! -s "$STATE/dbpass" ]; then
  (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/dbpass")
fi
DBPASS="$(cat "$STATE/dbpass")"

NODE_LINES=""; GRES_LINES=""
for n in "${NODES[@]}"; do
  NODE_LINES+="NodeName=$n NodeAddr=$(node_addr "$n") CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM Gres=gpu:$NGPU State=UNKNOWN"$'\n'
  GRES_LINES+="NodeName=$n Name=gpu File=$STATE/gpu/$n/nvidia[0-$((NGPU - 1))]"$'\n'
done

render() {   # TEMPLATE DEST MODE OWNER
  local tmp; tmp="$(mktemp "$2.XXXXXX")"
  awk -v nodes="$NODE_LINES" -v gres="$GRES_LINES" '
    /^@NODES@$/ { printf "%s", nodes; next }
    /^@GRES@$/ { printf "%s", gres; next }
    { print }' "$TEMPLATES/$1" |
  sed -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@HOST@|$(hostname -s)|g" -e "s|@STATE@|$STATE|g" \
      -e "s|@CTLD_ADDR@|$CTLD_ADDR|g" -e "s|@NODE_RANGE@|$NODE_RANGE|g" -e "s|@DBPASS@|$DBPASS|g" >"$tmp"
  chmod "$3" "$tmp"; chown "$4" "$tmp"; mv -f "$tmp" "$2"
}
render slurm.conf.in "$ETC/slurm.conf" 644 root:root
render gres.conf.in "$ETC/gres.conf" 644 root:root
render slurmdbd.conf.in "$ETC/slurmdbd.conf" 600 slurm:slurm
render job_submit.lua.in "$ETC/job_submit.lua" 644 root:root
say "configs written to $ETC ($NNODES nodes on $SUBNET.0/24, each CPUs=$CPUS RealMemory=$MEM gpu:$NGPU; state $STATE)"

# ---------------------------------------------------------------- munged
if [ ! -s /etc/munge/munge.key ]; then
  install -d -m 700 -o munge -g munge /etc/munge
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
launch munged setpriv --reuid=munge --regid=munge --init-groups \
  munged --foreground --force --socket=/run/munge/munge.socket.2 --pid-file=/run/munge/munged.pid \
  --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed"
wait_for munged munged "munge -n | unmunge" munge_ok

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
wait_for mariadbd mariadbd "SELECT 1 on $MYSQL_SOCK" db_up
sql <<SQL || fail_daemon mariadbd "creating the slurm database user failed"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE OR REPLACE USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

# ---------------------------------------------------------------- slurmdbd + accounting: cluster, QOS, account, user
launch slurmdbd slurmdbd -D
wait_for slurmdbd slurmdbd "sacctmgr show cluster" dbd_up
mgr() { timeout 20 sacctmgr -i "$@" >/dev/null || fail_daemon slurmdbd "sacctmgr $* failed"; }
has() { [ -n "$(timeout 10 sacctmgr -n -P show "$@" 2>/dev/null)" ]; }
has cluster "$CLUSTER" format=cluster || { mgr add cluster "$CLUSTER"; say "registered cluster $CLUSTER in accounting"; }
# A QOS like a site's (a wall-time cap per job, a cap on queued jobs per user), and the lab's account that every
# job must name. No GPU cap: a per-user one would keep the tests' urgent jobs from preempting their own.
has qos "$QOS" format=name || mgr add qos "$QOS" MaxWall=7-00:00:00 MaxSubmitJobsPerUser=10000 Priority=10
has account "$ACCOUNT" format=account || mgr add account "$ACCOUNT" Cluster="$CLUSTER" Description="llava-hpc test lab" Organization=llava-hpc
has assoc user=root account="$ACCOUNT" format=user || mgr add user root Account="$ACCOUNT" Cluster="$CLUSTER"
mgr modify user where name=root account="$ACCOUNT" set QOS=normal,"$QOS" DefaultQOS="$QOS"

# ---------------------------------------------------------------- slurmctld + one slurmd per node namespace
launch slurmctld slurmctld -D
wait_for slurmctld slurmctld "scontrol ping" ctld_up
for n in "${NODES[@]}"; do start_node "$n"; done
deadline=$(( $(date +%s) + WAIT_S )); resumed=0
while ! all_nodes idle; do
  for n in "${NODES[@]}"; do alive "slurmd-$n" slurmd || fail_daemon "slurmd-$n" "exited while waiting for the nodes to be idle"; done
  alive slurmctld slurmctld || fail_daemon slurmctld "exited while waiting for the nodes to be idle"
  # A node drained/down in an earlier run keeps that state (and reason) in the state dir.
  if [ $resumed = 0 ] && nodes_state | grep -qE ' (drain|drng|drained|down|inval|fail)'; then
    say "nodes $(nodes_state | grep -E ' (drain|drng|drained|down|inval|fail)' | cut -d' ' -f1 | tr '\n' ' ')from an earlier run: resuming"
    timeout 5 scontrol update nodename="$NODE_RANGE" state=resume 2>/dev/null || true
    resumed=1
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    timeout 5 scontrol show node >&2 || true
    fail_daemon "slurmd-${NODES[0]}" "nodes not idle after ${WAIT_S}s: $(nodes_state | tr '\n' ' ')"
  fi
  sleep 0.3
done
wait_for slurmdbd slurmdbd "sacct works" sacct_ok

say "cluster $CLUSTER up in $(elapsed) s: $(nodes_state | tr '\n' ' ')| partitions: $(timeout 5 sinfo -h -o %P | tr '\n' ' ')| account $ACCOUNT"
say "state/logs in $STATE (logs: $STATE/log); stop with: bash $HERE/stop.sh"
