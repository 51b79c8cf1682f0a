#!/usr/bin/env bash
# One rank of a N-rank job throws while the others wait: the job must end non-zero, within
# the time bound, with the failing rank's message. usage: expect_abort.sh MPIEXEC N BINARY
set -u
mpiexec=$1 n=$2 bin=$3
start=$(date +%s)
out=$(timeout 60 "$mpiexec" --oversubscribe -n "$n" "$bin" 1 2>&1); rc=$?
secs=$(( $(date +%s) - start ))
echo "$out" | tail -5
echo "exit $rc after ${secs}s"
[[ $rc -ne 0 && $rc -ne 124 ]] || { echo "FAIL: the job did not fail (or hung until the timeout)"; exit 1; }
[[ $secs -le 20 ]] || { echo "FAIL: took ${secs}s"; exit 1; }
grep -q "\[rank 1\] error: injected failure" <<<"$out" || { echo "FAIL: no message from the failing rank"; exit 1; }
! grep -q "passed the barrier" <<<"$out" || { echo "FAIL: a rank passed the barrier"; exit 1; }
echo ok
