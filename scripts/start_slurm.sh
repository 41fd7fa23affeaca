#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine, as root, for the Slurm tests (tests/test_slurm.py).
#
# Installs Debian's slurm-wlm and munge if missing, writes a minimal slurm.conf for one node named
# localhost with this machine's CPU count and memory, starts munged, slurmctld and slurmd, and waits
# until `sinfo` shows the node idle. Running it again with the cluster up changes nothing.
# Containers have neither systemd nor a writable cgroup tree, hence no services and no cgroup plugins.
# On failure the last line printed says what failed (CI passes it on to the skipped tests).
set -euo pipefail

fail() { echo "start_slurm: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "must run as root (it installs packages and starts daemons)"

if command -v sinfo >/dev/null && [ "$(sinfo -h -n localhost -o %t 2>/dev/null)" = idle ]; then
    echo "start_slurm: already running"; exit 0
fi

start=$(date +%s)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || fail "slurm-wlm/munge are not installed and there is no apt-get (not Debian?)"
    echo "start_slurm: installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || fail "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || fail "apt-get install slurm-wlm munge failed"
fi

# munge authenticates every Slurm message; its key must be owned by munge and private
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start (see /var/log/munge/munged.log)"
    munge -n | unmunge >/dev/null 2>&1 || fail "munged started but munge -n | unmunge fails"
fi

cpus=$(nproc)
# RealMemory in MiB, a little under the total so slurmd never finds less than configured
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)
mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/slurm
cat > /etc/slurm/slurm.conf <<EOF
# written by scripts/start_slurm.sh: one node, localhost, daemons and jobs as root
ClusterName=lightning-entropy-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# no cgroups in a container: track processes by parent id, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# a cancelled job gets SIGTERM, then SIGKILL after this many seconds
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

pgrep -x slurmctld >/dev/null || slurmctld || fail "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
# -N: this node is 'localhost' in slurm.conf whatever the machine's hostname is
pgrep -x slurmd >/dev/null || slurmd -N localhost || fail "slurmd did not start (see /var/log/slurm/slurmd.log)"

state=""
for _ in $(seq 60); do
    state=$(sinfo -h -n localhost -o %t 2>/dev/null || true)
    case "$state" in
        idle) echo "start_slurm: node localhost idle ($cpus CPUs, ${mem_mb} MiB) after $(( $(date +%s) - start ))s"
              exit 0 ;;
        # a node left down or drained by an earlier start comes back once slurmd has registered
        down*|drain*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
fail "node localhost not idle after 60s (sinfo state: '${state:-none}'; see /var/log/slurm/slurmd.log)"
