#!/usr/bin/env bash
# Short runs through the real agent: N `true` jobs from S CLI submit loops against a fresh
# `muster dev` (DEVARGS passes flags to it); prints when all finished and the Raft counters
# from /metrics before and after. Usage: N=1000 S=16 M=target/release/muster benches/short_runs.sh
set -u
M=$(realpath "${M:-target/release/muster}")
N=${N:-300}; S=${S:-16}; PORT=${PORT:-17070}
D=$(mktemp -d /tmp/e2e.XXXX)
export HOME=$D/home; mkdir -p $HOME
$M dev ${DEVARGS:-} --listen 127.0.0.1:$PORT --data-dir $D/data > $D/dev.log 2>&1 &
DEV=$!
export MUSTER_SERVER=http://127.0.0.1:$PORT
for i in $(seq 100); do $M whoami >/dev/null 2>&1 && break; sleep 0.2; done
mkdir -p $D/code && cd $D/code
m0=$(curl -s $MUSTER_SERVER/metrics | grep -E "^muster_raft_(log_writes|applied_index) " | awk '{print $2}' | tr "\n" " ")
t0=$(date +%s.%N)
per=$((N / S))
for s in $(seq $S); do ( for j in $(seq $per); do $M run submit -- true >/dev/null || echo FAIL; done ) & done
sleep 1; while [ $(jobs -r | wc -l) -gt 1 ]; do sleep 0.05; done
t1=$(date +%s.%N)
for i in $(seq 3000); do  # bounded: 10 minutes
  left=$($M run list -o json 2>/dev/null | python3 -c 'import json,sys; r=json.load(sys.stdin); print(sum(1 for x in r if x["state"] not in ("completed","failed","canceled")), len(r))')
  set -- $left
  [ "$1" = 0 ] && [ "$2" -ge $((per*S)) ] && break
  sleep 0.2
done
t2=$(date +%s.%N)
echo "jobs=$((per*S)) submit_s=$(echo "$t1-$t0"|bc) all_done_s=$(echo "$t2-$t0"|bc) rate=$(echo "$((per*S))/($t2-$t0)"|bc -l | cut -c1-6)"
$M run list -o json | python3 -c 'import json,sys,collections; r=json.load(sys.stdin); print(collections.Counter(x["state"] for x in r))'
m1=$(curl -s $MUSTER_SERVER/metrics | grep -E "^muster_raft_(log_writes|applied_index) " | awk '{print $2}' | tr "\n" " ")
echo "metrics before: $m0 after: $m1 (applied_index log_writes order as printed)"
kill $DEV; wait $DEV 2>/dev/null
echo $D
