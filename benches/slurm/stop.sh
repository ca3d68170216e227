#!/bin/sh
# Stops the Slurm that benches/slurm/start.sh DIR brought up (slurmd, slurmctld, munged),
# each by the pid in its pid file under DIR: SIGTERM to all, then SIGKILL to any still
# running after 10 s.
#
#   benches/slurm/stop.sh DIR
set -u

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
DIR=$1

pids=
for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
    [ -s "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    case "$pid" in
        '' | *[!0-9]*) continue ;;
    esac
    if kill -TERM "$pid" 2>/dev/null; then
        pids="$pids $pid"
    fi
done

i=0
while [ -n "$pids" ]; do
    left=
    for pid in $pids; do
        if kill -0 "$pid" 2>/dev/null; then
            left="$left $pid"
        fi
    done
    pids=$left
    [ -n "$pids" ] || break
    i=$((i + 1))
    if [ "$i" -gt 100 ]; then
        for pid in $pids; do
            kill -KILL "$pid" 2>/dev/null || true
        done
        break
    fi
    sleep 0.1
done
exit 0
