#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, from Debian 12's packages, for the tests
# (tests/cluster/test_slurm.py) and for trying the SLURM profile without a cluster.
#
#   bash scripts/slurm-local.sh install   # apt packages (idempotent; root)
#   bash scripts/slurm-local.sh start     # munged, mariadbd, slurmdbd, slurmctld, slurmd
#   bash scripts/slurm-local.sh stop      # stop them by their pid files; remove the pid files
#                                         # and the config files this script wrote
#   bash scripts/slurm-local.sh status    # what runs
#
# Needs root and no systemd. No cgroups either: proctrack/linuxproc and task/none. The node
# is declared with more CPUs, memory and (count-only) GPUs than the machine has
# (SlurmdParameters=config_overrides) so that the profile's requests fit; nothing is
# enforced. Every address is 127.0.0.1 (MariaDB binds to it only). Config files written
# here carry a marker line; a slurm.conf without it (a real cluster's) is never touched.
set -euo pipefail

MARK="# written by detprune scripts/slurm-local.sh"
CLUSTER="${DETPRUNE_SLURM_CLUSTER:-detprune}"
ACCOUNT="${DETPRUNE_SLURM_ACCOUNT:-detprune}"
PARTITION="${DETPRUNE_SLURM_PARTITION:-debug}"
NODE_CPUS="${DETPRUNE_SLURM_CPUS:-16}"
NODE_MEM_MB="${DETPRUNE_SLURM_MEM_MB:-64000}"
NODE_GPUS="${DETPRUNE_SLURM_GPUS:-4}"
ETC=/etc/slurm
RUN=/run/slurm
LOGDIR=/var/log/slurm
PKGS=(slurm-wlm slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
BINS=(slurmctld slurmd slurmdbd munged mariadbd sbatch sacct sacctmgr scontrol sinfo)

log() { echo "slurm-local: $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

need_root() { [[ $(id -u) == 0 ]] || die "must run as root"; }

installed() {
    local b
    for b in "${BINS[@]}"; do
        command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || return 1
    done
}

cmd_install() {
    need_root
    if installed; then
        log "packages already installed"
        return 0
    fi
    command -v apt-get >/dev/null || die "apt-get not found (Debian/Ubuntu only)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
    installed || die "packages installed but binaries missing: ${BINS[*]}"
    log "installed ${PKGS[*]}"
}

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every 0.2 s
wait_for() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what"
        sleep 0.2
    done
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_pidfile NAME PIDFILE: SIGTERM, wait up to 20 s, then SIGKILL; remove the pid file
stop_pidfile() {
    local name=$1 pidfile=$2 pid i
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name ($pid) ignored SIGTERM; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $name ($pid)"
    fi
    rm -f "$pidfile"
}

write_configs() {
    local host=$1 dbpass=$2
    if [[ -f $ETC/slurm.conf ]] && ! grep -qF "$MARK" "$ETC/slurm.conf"; then
        die "$ETC/slurm.conf exists and was not written by this script: refusing to touch it"
    fi
    mkdir -p "$ETC"
    cat >"$ETC/slurm.conf" <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
CommunicationParameters=NoInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MinJobAge=600
KillWait=30
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB Gres=gpu:$NODE_GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    # stand-in GPU device files (character devices 1,3 like /dev/null): SLURM schedules and
    # counts them; no process opens them
    local i
    for ((i = 0; i < NODE_GPUS; i++)); do
        [[ -e $RUN/fakegpu$i ]] || mknod "$RUN/fakegpu$i" c 1 3 2>/dev/null || touch "$RUN/fakegpu$i"
    done
    cat >"$ETC/gres.conf" <<EOF
$MARK
NodeName=$host Name=gpu File=$RUN/fakegpu[0-$((NODE_GPUS - 1))]
EOF
    cat >"$ETC/slurmdbd.conf" <<EOF
$MARK
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=$host
DbdPort=6819
SlurmUser=slurm
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGDIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$dbpass
StorageLoc=slurm_acct_db
EOF
    chown slurm:slurm "$ETC/slurmdbd.conf"
    chmod 0600 "$ETC/slurmdbd.conf"
    chmod 0644 "$ETC/slurm.conf" "$ETC/gres.conf"
}

cmd_start() {
    need_root
    installed || die "not installed: run '$0 install' first"
    cmd_stop >/dev/null 2>&1 || true
    local host dbpass
    host=$(hostname -s)
    dbpass=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
    mkdir -p "$RUN" "$LOGDIR" /var/spool/slurmctld /var/spool/slurmd /run/munge /run/mysqld
    chown slurm:slurm "$RUN" "$LOGDIR" /var/spool/slurmctld
    chown munge:munge /run/munge
    chown mysql:mysql /run/mysqld
    write_configs "$host" "$dbpass"

    # munge: the authentication every SLURM message carries
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key missing (reinstall munge)"
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    wait_for 20 munged bash -c 'munge -n | unmunge'

    # MariaDB for slurmdbd, on loopback only
    setsid -f /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 \
        --pid-file=/run/mysqld/mysqld.pid --socket=/run/mysqld/mysqld.sock \
        --log-error=$LOGDIR/mariadb.log </dev/null >/dev/null 2>&1
    wait_for 60 mariadbd mariadb-admin --socket=/run/mysqld/mysqld.sock ping
    wait_for 10 "mariadbd pid file" test -s /run/mysqld/mysqld.pid
    mariadb --socket=/run/mysqld/mysqld.sock -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$dbpass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$dbpass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF

    # accounting daemon, then the cluster and an account in it
    /usr/sbin/slurmdbd
    wait_for 60 slurmdbd sacctmgr -n list cluster
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    if ! sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT"; then
        sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" \
            description="detprune tests" organization=detprune >/dev/null
    fi
    if ! sacctmgr -n -P list assoc user=root format=account | grep -qx "$ACCOUNT"; then
        sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
    fi

    # controller and the node daemon
    /usr/sbin/slurmctld
    wait_for 60 slurmctld scontrol ping
    /usr/sbin/slurmd
    local deadline=$((SECONDS + 60)) state=""
    while ((SECONDS < deadline)); do
        state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
        case $state in
        idle | mixed | allocated) break ;;
        down* | drain* | unknown*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    [[ $state == idle || $state == mixed || $state == allocated ]] ||
        die "node $host is '$state' (see $LOGDIR/slurmd.log, $LOGDIR/slurmctld.log)"
    log "up: cluster $CLUSTER, partition $PARTITION, account $ACCOUNT, node $host" \
        "($NODE_CPUS CPUs, $NODE_MEM_MB MB, $NODE_GPUS GPUs declared)"
}

cmd_stop() {
    need_root
    local i
    if alive "$RUN/slurmctld.pid" && [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
        squeue -h -o %i | xargs -r scancel --full 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
        log "cancelled the jobs still queued or running"
    fi
    stop_pidfile slurmd "$RUN/slurmd.pid"
    stop_pidfile slurmctld "$RUN/slurmctld.pid"
    stop_pidfile slurmdbd "$RUN/slurmdbd.pid"
    stop_pidfile mariadbd /run/mysqld/mysqld.pid
    stop_pidfile munged /run/munge/munged.pid
    rm -f "$RUN"/fakegpu*
    remove_configs
}

# A slurm.conf left behind points every SLURM client at a controller that is gone:
# `scontrol show config`, which Snakemake's SLURM plugin runs whenever Snakemake starts,
# then retries for about 10 s. `start` writes the files again.
remove_configs() {
    local f
    for f in slurm.conf gres.conf slurmdbd.conf; do
        if [[ -f $ETC/$f ]] && grep -qF "$MARK" "$ETC/$f"; then
            rm -f "$ETC/$f"
        fi
    done
}

cmd_status() {
    local name pidfile
    for name in slurmd:$RUN/slurmd.pid slurmctld:$RUN/slurmctld.pid \
        slurmdbd:$RUN/slurmdbd.pid mariadbd:/run/mysqld/mysqld.pid munged:/run/munge/munged.pid; do
        pidfile=${name#*:}
        if alive "$pidfile"; then
            echo "${name%%:*} running ($(cat "$pidfile"))"
        else
            echo "${name%%:*} stopped"
        fi
    done
}

case "${1:-}" in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 {install|start|stop|status}" >&2
    exit 2
    ;;
esac
