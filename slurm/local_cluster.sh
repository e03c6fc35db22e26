#!/usr/bin/env bash
# A real one-node SLURM on this machine, for the tests in tests/test_slurm_real.py (CI runs it from
# .ci/run; a contributor runs it by hand). Needs root: it installs slurm-wlm and munge with apt-get
# when they are missing, writes /etc/slurm/slurm.conf (one node: this host at 127.0.0.1, CPUs = nproc),
# keeps state, spool, pid and log files under $SLURM_DIR, and starts munged, slurmctld and slurmd.
#
#   bash slurm/local_cluster.sh start    # idempotent: a running cluster is left as it is
#   bash slurm/local_cluster.sh status   # sinfo, and exit 1 when the node is not up
#   bash slurm/local_cluster.sh stop
set -euo pipefail
DIR="${SLURM_DIR:-/tmp/mbv3-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# written by slurm/local_cluster.sh"
NODE="$(hostname -s 2>/dev/null || echo localhost)"
WAIT_S="${SLURM_WAIT_S:-60}"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

logs() {
  for f in "$DIR"/munged.log "$DIR"/slurmctld.log "$DIR"/slurmd.log; do
    [ -f "$f" ] && { echo "--- $f (last 30 lines)"; tail -n 30 "$f"; }
  done >&2
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_up() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)$'; }

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed, and installing them needs root"
  echo "installing slurm-wlm and munge (apt-get)"
  # No service may start from the packages' scripts (no init system here; this script starts them).
  local policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy"
  fi
  export DEBIAN_FRONTEND=noninteractive
  local ok=0
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null && ok=1
  if [ "$ok" = 0 ]; then
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null && ok=1
  fi
  [ -n "$policy" ] && rm -f "$policy"
  [ "$ok" = 1 ] || die "apt-get install slurm-wlm munge failed"
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to replace a real cluster's configuration"
  fi
  local cpus mem
  cpus="$(nproc)"
  # Half the memory in whole GiB (MiB): below what is free, and the same on every start. No job asks for
  # memory here, so the figure only has to be one slurmd accepts.
  mem="$(awk '/^MemTotal:/ {print int($2 / 1048576 / 2) * 1024}' /proc/meminfo)"
  mkdir -p /etc/slurm "$DIR/state" "$DIR/spool"
  cat > "$CONF.new" <<EOF
$MARK: a one-node test cluster
ClusterName=mbv3
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s;
# tests/test_slurm_real.py counts on 10 s)
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
JobRequeue=1
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
MinJobAge=300
KillWait=30
Waittime=0
SchedulerParameters=sched_interval=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  [ -s /etc/munge/munge.key ] || {
    if command -v mungekey >/dev/null; then mungekey --create --force; else
      dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
  }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  mkdir -p "$DIR/munge" && chown munge:munge "$DIR/munge" && chmod 700 "$DIR/munge"
  runuser -u munge -- munged --log-file="$DIR/munge/munged.log" --pid-file="$DIR/munge/munged.pid" \
    || { tail -n 20 "$DIR/munge/munged.log" >&2 2>/dev/null; die "munged did not start"; }
  ln -sf "$DIR/munge/munged.log" "$DIR/munged.log"
}

start() {
  install
  [ "$(id -u)" = 0 ] || die "starting the daemons and writing $CONF needs root (sudo bash $0 start)"
  mkdir -p "$DIR"
  write_conf
  if cmp -s "$CONF.new" "$CONF"; then
    rm "$CONF.new"
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && node_up; then
      echo "SLURM is already running: node $NODE is up"; return
    fi
  else
    if alive "$DIR/slurmctld.pid" || alive "$DIR/slurmd.pid"; then
      echo "$CONF changed: restarting slurmctld and slurmd (queued jobs are kept in $DIR/state)"
      stop_slurm
    fi
    mv "$CONF.new" "$CONF"
  fi
  start_munge
  alive "$DIR/slurmctld.pid" || slurmctld || { logs; die "slurmctld did not start"; }
  alive "$DIR/slurmd.pid" || slurmd || { logs; die "slurmd did not start"; }
  local t0=$SECONDS
  until node_up; do
    if (( SECONDS - t0 > WAIT_S )); then
      sinfo -N >&2 || true
      logs
      die "node $NODE did not become idle within ${WAIT_S}s (logs above; state in $DIR)"
    fi
    # A node left down or drained by an earlier run (its state is kept in $DIR/state) is resumed.
    if sinfo -h -N -n "$NODE" -o %T 2>/dev/null | grep -qE '^(down|drain)'; then
      scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
    fi
    sleep 1
  done
  echo "SLURM is up: node $NODE idle ($(nproc) CPUs) after $((SECONDS - t0)) s; state and logs in $DIR"
}

kill_pidfiles() {
  local f pid
  for f in "$@"; do
    alive "$f" || continue
    pid="$(cat "$f")"
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
  done
}

stop_slurm() { kill_pidfiles "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; }

stop() {
  stop_slurm
  kill_pidfiles "$DIR/munge/munged.pid"
  echo "SLURM stopped (state and logs kept in $DIR)"
}

status() {
  sinfo -N 2>/dev/null || { echo "slurmctld is not answering" >&2; exit 1; }
  node_up || { echo "node $NODE is not up" >&2; exit 1; }
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 start|stop|status" ;;
esac
