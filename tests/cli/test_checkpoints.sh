#!/usr/bin/env bash
# Checkpoints against the real world: output.keep prunes only behind a verified checkpoint; a
# truncated, corrupted or torn newest checkpoint is skipped (with a warning naming the file)
# by output.resume=auto and refused by output.resume=PATH; two runs on one output.dir; kill -9
# at random moments, over and over, never leaves resume=auto without a complete checkpoint and
# the final adapter is bit for bit the uninterrupted one. Format-1 checkpoints still load.
# usage: test_checkpoints.sh SHARDTUNE WORKDIR
set -u
st=$1 work=$2
rm -rf "$work" && mkdir -p "$work"
source "$(dirname "$0")/lib.sh"

cfg=$work/tiny.ini
tiny_run_ini 2 >"$cfg"
expect 0 "done: eval top-1" -- "$st" train --config "$cfg" --output.dir "$work/a"

# output.keep=2 with a checkpoint every step: step_3 and step_4 remain, each with its manifest.
expect 0 "stopping at step 4" -- "$st" train --config "$cfg" --output.dir "$work/b" --output.checkpoint_every 1 \
  --train.exit_interval 4
[[ "$(ls "$work/b/checkpoints" | tr '\n' ' ')" == "step_3 step_4 " ]] && pass "keep=2 left step_3 and step_4" ||
  failed "checkpoints left: $(ls "$work/b/checkpoints")"
for f in manifest.json trainer_state.json optimizer.safetensors rng.safetensors adapter/adapter_model.safetensors; do
  [[ -s "$work/b/checkpoints/step_4/$f" ]] || failed "step_4/$f missing"
done
grep -q '"crc32"' "$work/b/checkpoints/step_4/manifest.json" && pass "the manifest lists CRC-32s" || failed "no crc32 in manifest"
cp -r "$work/b" "$work/b.orig"

# A truncated newest checkpoint: resume=PATH refuses it naming the file; auto warns and takes step_3.
opt=$work/b/checkpoints/step_4/optimizer.safetensors
truncate -s -7 "$opt"
expect 2 "output.resume=.*step_4 is not a complete checkpoint: .*step_4/optimizer.safetensors has [0-9]+ bytes, the manifest says [0-9]+" -- \
  "$st" train --config "$cfg" --output.dir "$work/b" --output.resume "$work/b/checkpoints/step_4"
expect 0 "skipping checkpoint .*step_4: .*optimizer.safetensors has [0-9]+ bytes.*resumed from .*step_3 at step 3.*done" -- \
  "$st" train --config "$cfg" --output.dir "$work/b"
cmp -s "$work/a/adapter/adapter_model.safetensors" "$work/b/adapter/adapter_model.safetensors" &&
  pass "resumed from the older checkpoint: the uninterrupted adapter, bit for bit" || failed "adapter after fallback differs"

# A flipped byte in the adapter: caught by the CRC.
rm -rf "$work/b" && cp -r "$work/b.orig" "$work/b"
f=$work/b/checkpoints/step_4/adapter/adapter_model.safetensors
size=$(stat -c %s "$f")
printf '\xff' | dd of="$f" bs=1 seek=$((size - 5)) conv=notrunc status=none
expect 0 "skipping checkpoint .*step_4: .*adapter_model.safetensors does not match its CRC-32.*resumed from .*step_3" -- \
  "$st" train --config "$cfg" --output.dir "$work/b"
# No manifest (a torn checkpoint) and a stale temporary: neither is taken; the temporary is removed.
rm -rf "$work/b" && cp -r "$work/b.orig" "$work/b"
rm "$work/b/checkpoints/step_4/manifest.json"
mkdir -p "$work/b/checkpoints/step_5.tmp/adapter"
expect 0 "removing .*step_5.tmp.*skipping checkpoint .*step_4: .*manifest.json is missing.*resumed from .*step_3" -- \
  "$st" train --config "$cfg" --output.dir "$work/b"
[[ ! -e "$work/b/checkpoints/step_5.tmp" ]] && pass "stale step_5.tmp removed" || failed "step_5.tmp still there"
# Every checkpoint damaged: a fresh start, said so.
rm -rf "$work/b" && cp -r "$work/b.orig" "$work/b"
truncate -s 0 "$work/b/checkpoints/step_3/trainer_state.json" "$work/b/checkpoints/step_4/trainer_state.json"
expect 0 "skipping checkpoint .*step_4.*skipping checkpoint .*step_3.*done" -- "$st" train --config "$cfg" --output.dir "$work/b"
cmp -s "$work/a/adapter/adapter_model.safetensors" "$work/b/adapter/adapter_model.safetensors" &&
  pass "no good checkpoint: trained from the start" || failed "fresh start adapter differs"

# Format-1 checkpoints (written by the previous release with `tiny_run_ini 2`, committed under
# tests/fixtures/format1): one with a single optimizer.pt resumes; a pp=2 one with an optimizer
# file per stage is refused on pp=1, saying how to resume it.
fixtures=$(dirname "$0")/../fixtures/format1
mkdir -p "$work/f1/checkpoints" "$work/f2/checkpoints"
cp -r "$fixtures/pp1_step_3" "$work/f1/checkpoints/step_3"
cp -r "$fixtures/pp2_step_3" "$work/f2/checkpoints/step_3"
expect 0 "resumed from .*step_3 at step 3.*done" -- "$st" train --config "$cfg" --output.dir "$work/f1"
expect 2 "step_3: checkpoint written with parallel.pp=2, this run uses parallel.pp=1 \(a format-1 checkpoint holds the optimizer state per pipeline stage: resume it with parallel.pp=2" -- \
  "$st" train --config "$cfg" --output.dir "$work/f2"

# Two runs on one output.dir: the second stops at start naming the directory and the holder.
"$st" train --config "$cfg" --output.dir "$work/c" --train.steps 1000000 >"$work/c.log" 2>&1 &
holder=$!
for _ in $(seq 100); do grep -q "train: vit" "$work/c.log" 2>/dev/null && break; sleep 0.1; done
expect 1 "output.dir=$work/c is in use by another run \(pid $holder on .* since .*\)" -- \
  "$st" train --config "$cfg" --output.dir "$work/c"
kill -9 $holder; wait $holder 2>/dev/null
# The kernel released the dead holder's lock.
expect 0 "stopping at step 2" -- "$st" train --config "$cfg" --output.dir "$work/c" --output.resume never --train.exit_interval 2

# kill -9 at random moments of a run that checkpoints every step: every restart finds a
# complete checkpoint (or none yet), and the end is the uninterrupted run, bit for bit.
long=(--train.steps 100 --output.checkpoint_every 1)
# (checkpoints do not change the training: the reference writes none)
expect 0 "done: eval top-1" -- "$st" train --config "$cfg" --output.dir "$work/k_ref" --train.steps 100
RANDOM=7
kills=0 resumes=0
# The delay after start-up is random in [0, 0.3) s: each restart resumes nearer the end, so on
# a fast host longer delays would let the later runs finish before their kill. Up to 12 runs,
# until 6 were killed.
for i in $(seq 12); do
  (( kills >= 6 )) && break
  "$st" train --config "$cfg" --output.dir "$work/k" "${long[@]}" >"$work/k.$i.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do grep -q "train: vit" "$work/k.$i.log" 2>/dev/null && break; sleep 0.05; done
  sleep "0.$((RANDOM % 3))$((RANDOM % 10))"
  if kill -9 $pid 2>/dev/null; then kills=$((kills + 1)); fi
  wait $pid 2>/dev/null
  grep -q "resumed from" "$work/k.$i.log" && resumes=$((resumes + 1))
  if grep -Eq "error|skipping checkpoint" "$work/k.$i.log"; then failed "run $i after a kill -9:"; grep -E "error|skipping" "$work/k.$i.log" | sed 's/^/    /'; fi
done
expect 0 "done: eval top-1" -- "$st" train --config "$cfg" --output.dir "$work/k" "${long[@]}"
torn=$(grep -l "removing .*\.tmp" "$work"/k.*.log | wc -l)
echo "    $kills kills -9 ($torn of them while a checkpoint was being written), $resumes resumed runs"
[[ $kills -ge 4 && $resumes -ge 2 ]] && pass "$kills kills, $resumes resumes" || failed "too few kills ($kills) or resumes ($resumes) to mean anything"
cmp -s "$work/k_ref/adapter/adapter_model.safetensors" "$work/k/adapter/adapter_model.safetensors" &&
  pass "after $kills kills -9 the adapter is bit for bit the uninterrupted one" || failed "adapter after kills differs"

finish
