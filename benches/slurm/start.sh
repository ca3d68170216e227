#!/bin/sh
# Brings up a one-node Slurm (munged, slurmctld, slurmd) whose every file lives in DIR.
#
#   benches/slurm/start.sh DIR        # then: export SLURM_CONF=DIR/slurm.conf
#   benches/slurm/stop.sh DIR
#
# Needs Debian's `slurm-wlm` and `munge` (`apt-get install -y slurm-wlm munge`); installs
# nothing itself. Meant for root in a container without systemd: no cgroup plugins
# (proctrack/linuxproc, task/none), no accounting, SlurmUser=SlurmdUser=root.
#
# Environment (all optional):
#   SLURM_BENCH_CTLD_PORT  slurmctld's port (default 6817)
#   SLURM_BENCH_SLURMD_PORT slurmd's port (default 6818)
#   SLURM_BENCH_DEBUG      SlurmctldDebug/SlurmdDebug level (default error: the benchmark
#                          should not pay for per-job info lines; use info or debug to debug)
#   SLURM_BENCH_SCHED      SchedulerParameters (default batch_sched_delay=0,sched_min_interval=0)
#   SLURM_BENCH_WAIT       seconds to wait for the node to be idle (default 30)
#
# Prints `export SLURM_CONF=DIR/slurm.conf` on its last line of standard output.
set -eu

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
for cmd in munged slurmctld slurmd sinfo; do
    if ! command -v "$cmd" >/dev/null 2>&1; then
        echo "$cmd not on PATH: install slurm-wlm and munge (Debian)" >&2
        exit 3
    fi
done

mkdir -p "$1"
DIR=$(cd "$1" && pwd)
HOST=$(hostname -s)
CPUS=$(nproc)
# MiB, as slurmd -C counts it (MemTotal rounded down).
MEM=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 }' /proc/meminfo)
CTLD_PORT=${SLURM_BENCH_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_BENCH_SLURMD_PORT:-6818}
DEBUG=${SLURM_BENCH_DEBUG:-error}
SCHED=${SLURM_BENCH_SCHED:-batch_sched_delay=0,sched_min_interval=0}
WAIT=${SLURM_BENCH_WAIT:-30}

mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/log"
# munged refuses a socket or key directory others may write to (and warns unless all may
# traverse the socket's).
chmod 0711 "$DIR"
chmod 0711 "$DIR/munge"

# The munge key (what authenticates every Slurm message): a fresh one per directory.
KEY="$DIR/munge/munge.key"
if [ ! -s "$KEY" ]; then
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="$KEY" --force
    else
        dd if=/dev/urandom of="$KEY" bs=1024 count=1 2>/dev/null
    fi
fi
chmod 0400 "$KEY"
SOCKET="$DIR/munge/munge.socket.2"

cat >"$DIR/slurm.conf" <<EOF
# Written by benches/slurm/start.sh for muster's vs-slurm benchmark: one node, this host.
ClusterName=musterbench
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=$DEBUG
SlurmdDebug=$DEBUG
# No cgroups in this container: plain /proc process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
# No accounting storage, no completion records.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Scheduling: schedule batch jobs at submit time, no throttling of the scheduler.
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=$SCHED
ReturnToService=2
# Nothing to mail; unset, slurmctld logs an error at start.
MailProg=/bin/true
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=bench Nodes=$HOST OverSubscribe=FORCE:32 Default=YES MaxTime=INFINITE State=UP
EOF

export SLURM_CONF="$DIR/slurm.conf"

# Each daemon forks into the background; none may keep the caller's stdout or stderr open
# (a caller reading them to the end would wait forever), so their start-up messages go to
# DIR/log/start.log, shown if one fails to start.
daemon() {
    if ! "$@" </dev/null >>"$DIR/log/start.log" 2>&1; then
        echo "$1 failed to start:" >&2
        cat "$DIR/log/start.log" >&2
        exit 1
    fi
}
# --force: start even over a stale socket a killed run left behind.
daemon munged --force \
    --socket="$SOCKET" \
    --key-file="$KEY" \
    --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed"
daemon slurmctld -f "$SLURM_CONF"
daemon slurmd -f "$SLURM_CONF"

# Bounded: the node must show up idle.
i=0
while :; do
    state=$(sinfo -h -N -o '%t' 2>/dev/null | head -n 1 || true)
    if [ "$state" = "idle" ]; then
        break
    fi
    i=$((i + 1))
    if [ "$i" -gt $((WAIT * 5)) ]; then
        echo "the Slurm node is not idle after ${WAIT} s (state: ${state:-none}); logs in $DIR/log" >&2
        exit 1
    fi
    sleep 0.2
done
echo "export SLURM_CONF=$SLURM_CONF"
