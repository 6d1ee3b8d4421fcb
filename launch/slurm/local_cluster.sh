#!/usr/bin/env bash
# One-host Slurm cluster on loopback for the launch tests (and for trying the sbatch scripts locally).
#
#   launch/slurm/local_cluster.sh [start]   install (Debian packages) if missing, configure, start, wait for the node
#   launch/slurm/local_cluster.sh stop      stop the daemons this script started
#   launch/slurm/local_cluster.sh status    exit 0 when the cluster answers and the node is usable
#
# Runs as root without systemd: munged, slurmctld and slurmd are started directly. Idempotent: `start`
# with the cluster already up does nothing. Refuses to touch a slurm.conf it did not write.
# Env: AERIE_SLURM_STATE (state, logs and pid files; default /var/tmp/aerie-slurm),
#      AERIE_SLURM_CPUS (CPUs the node advertises; default max(nproc, 2)), AERIE_SLURM_WAIT (seconds; default 60).
set -euo pipefail

STATE=${AERIE_SLURM_STATE:-/var/tmp/aerie-slurm}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# written by aerie launch/slurm/local_cluster.sh"
CPUS=${AERIE_SLURM_CPUS:-$(( $(nproc) > 2 ? $(nproc) : 2 ))}
WAIT=${AERIE_SLURM_WAIT:-60}
NODE=localhost

log() { echo "local_cluster: $*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (starts munged, slurmctld and slurmd)"

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    [ ${#missing[@]} -eq 0 ] && return
    command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is missing; install ${missing[*]}"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

write_conf() {
    if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; not overwriting it"
    fi
    mkdir -p "$CONF_DIR" "$STATE"/{ctld,slurmd,log,run}
    local tmp
    tmp=$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")
    cat >"$tmp" <<EOF
$MARKER
ClusterName=aerie-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=30
MinJobAge=600
InactiveLimit=0
SchedulerParameters=sched_interval=1
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    chmod 644 "$tmp"
    mv -f "$tmp" "$CONF"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged
    else
        munged --force
    fi
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

running() {  # pidfile daemon: the pid file names a live process of that daemon
    [ -f "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]
}

node_state() {
    sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1
}

cluster_up() {
    running "$STATE/run/slurmctld.pid" slurmctld && running "$STATE/run/slurmd.pid" slurmd || return 1
    case "$(node_state)" in idle*|mix*|alloc*|comp*) return 0 ;; *) return 1 ;; esac
}

start() {
    if [ -f "$CONF" ] && grep -qF "$MARKER" "$CONF" && cluster_up; then
        log "already running (node $NODE: $(node_state))"
        return
    fi
    install_packages
    write_conf
    start_munge
    running "$STATE/run/slurmctld.pid" slurmctld || slurmctld -i
    running "$STATE/run/slurmd.pid" slurmd || slurmd -N "$NODE"
    local state=""
    for _ in $(seq $((WAIT * 2))); do
        state=$(node_state)
        case "$state" in
            idle*|mix*|alloc*) log "up (node $NODE: $state, $CPUS CPUs)"; return ;;
            drain*|down*|fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node $NODE not idle after ${WAIT}s (state '$state'); logs in $STATE/log"
}

stop_daemon() {  # pidfile name
    local pidfile=$1 pid
    running "$pidfile" "$2" || return 0
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    log "$2 (pid $pid) ignored SIGTERM; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    stop_daemon "$STATE/run/slurmd.pid" slurmd
    stop_daemon "$STATE/run/slurmctld.pid" slurmctld
    log "stopped (munged left running)"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) cluster_up ;;
    *) die "usage: $0 [start|stop|status]" ;;
esac
