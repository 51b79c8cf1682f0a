#!/usr/bin/env bash
# A disk that fills up mid-run: output.dir on a small tmpfs that the test fills while the run
# checkpoints every step. The run ends non-zero with one line naming the file and "No space
# left on device"; no half-written checkpoint is left; the newest complete checkpoint is
# intact and the run resumes from it once space is back. Needs root (mount); exit 77 (CTest:
# skipped) where tmpfs cannot be mounted.
# usage: test_full_disk.sh SHARDTUNE WORKDIR
set -u
st=$1 work=$2
rm -rf "$work" && mkdir -p "$work"
source "$(dirname "$0")/lib.sh"

disk=$work/disk
mkdir -p "$disk"
if ! mount -t tmpfs -o size=4m shardtune-test "$disk" 2>"$work/mount.err"; then
  echo "SKIP: cannot mount a tmpfs: $(cat "$work/mount.err")"
  exit 77
fi
pid=""
cleanup() {
  [[ -n "$pid" ]] && kill -9 "$pid" 2>/dev/null
  umount "$disk" 2>/dev/null || umount -l "$disk"
}
trap cleanup EXIT

cfg=$work/tiny.ini
tiny_run_ini 2 >"$cfg"
run=(train --config "$cfg" --output.dir "$disk/run" --train.steps 1000000 --output.checkpoint_every 1 --train.log_every 1)
"$st" "${run[@]}" >"$work/run.log" 2>&1 &
pid=$!
for _ in $(seq 200); do [[ -d "$disk/run/checkpoints/step_3" ]] && break; sleep 0.05; done
dd if=/dev/zero of="$disk/filler" bs=64k status=none 2>/dev/null  # until the disk is full
for _ in $(seq 200); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
wait $pid; rc=$?
pid=""
line=$(grep -E "error" "$work/run.log" | tail -1)
echo "    exit $rc: $line"
[[ $rc -ne 0 ]] && grep -Eq "$disk/run/.*No space left on device" <<<"$line" &&
  pass "full disk: exit $rc naming the file and the OS's message" || { failed "full disk: exit $rc"; tail -5 "$work/run.log" | sed 's/^/    /'; }
ls "$disk/run/checkpoints" | grep -q '\.tmp$' && failed "a partial checkpoint was left: $(ls "$disk/run/checkpoints")" ||
  pass "no partial checkpoint left ($(ls "$disk/run/checkpoints" | tr '\n' ' '))"
rm -f "$disk/filler"
newest=$(ls "$disk/run/checkpoints" | sort -t_ -k2 -n | tail -1)
expect 0 "resumed from .*$newest at step ${newest#step_}.*stopping at step" -- "$st" "${run[@]}" --train.exit_interval 1
finish
