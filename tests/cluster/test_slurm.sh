#!/usr/bin/env bash
# launch/slurm.sbatch, unchanged, under a private one-node Slurm cluster (slurm_cluster.sh):
#  - a 2-task job (srun --mpi=pmix) trains the tiny ViT to COMPLETED, its adapter within 1e-6
#    of a plain mpirun run of the same config, placement taken from Slurm (SLURM_LOCALID);
#  - preemption: `scancel --signal=USR1 JOB` mid-run -> the ranks finish the step, write
#    checkpoints/step_N and exit 0 (COMPLETED); `scontrol requeue JOB` runs the same script
#    again, it resumes (output.resume=auto) and ends with the uninterrupted job's adapter, bit
#    for bit (same mesh);
#  - a config failing pre-flight: the job ends FAILED within 60 s with the one-line error.
# usage: test_slurm.sh SHARDTUNE TESTKIT MPIEXEC WORKDIR   (exit 77: skipped, prerequisites missing)
set -uo pipefail
st=$(realpath "$1") kit=$(realpath "$2") mpiexec=$3 work=$4
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
source "$here/common.sh"
source "$here/slurm_cluster.sh"
source "$repo/tests/cli/lib.sh"
deadline 270
rm -rf "$work" && mkdir -p "$work" && work=$(cd "$work" && pwd)
export OMP_NUM_THREADS=1 SHARDTUNE=$st

slurm_cluster_start "$work/cluster" || { echo "FAIL: the Slurm cluster did not start"; exit 1; }

# Long enough (about 100 ms a step on 2 cores) for a signal to land mid-run.
steps=200
cfg=$work/tiny.ini
tiny_run_ini 2 >"$cfg"
sed -i "s/^steps = .*/steps = $steps/" "$cfg"

# job_field JOB FIELD: a field of `scontrol show job` (JobState, ExitCode, Restarts, ...).
job_field() { scontrol -o show job "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p"; }
# wait_job JOB SECS [RESTARTS]: waits until the job is in a final state (after at least
# RESTARTS requeues); prints the state, or TIMEOUT_WAITING.
wait_job() {
  local i s
  for ((i = 0; i < $2 * 5; i++)); do
    s=$(job_field "$1" JobState)
    if [[ $s =~ ^(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|PREEMPTED|BOOT_FAIL|DEADLINE)$ ]] &&
       (( $(job_field "$1" Restarts) >= ${3:-0} )); then
      echo "$s"; return
    fi
    sleep 0.2
  done
  echo "TIMEOUT_WAITING ($(job_field "$1" JobState), reason $(job_field "$1" Reason))"
}
submit() {  # submit NAME [sbatch options] -- [shardtune overrides]: prints the job id
  local name=$1; shift
  local opts=()
  while [[ $1 != -- ]]; do opts+=("$1"); shift; done
  shift
  (cd "$repo" && sbatch --parsable --job-name="st-$name" --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 \
    --time=10 --output="$work/$name.out" "${opts[@]}" launch/slurm.sbatch "$cfg" "$@")
}
check_state() {  # check_state WANT GOT WHAT
  [[ $2 == "$1" ]] && pass "$3: $2" || { failed "$3: $2, want $1"; tail -20 "$work/$4.out" 2>/dev/null | sed 's/^/    /'; }
}

# 1. A whole job, and the same run under mpirun.
j1=$(submit whole -- --output.dir "$work/whole") || failed "sbatch whole"
expect 0 "done: eval top-1" -- "$mpiexec" --oversubscribe -n 2 "$st" train --config "$cfg" --output.dir "$work/mpirun"
check_state COMPLETED "$(wait_job "$j1" 240)" "uninterrupted job" whole
grep -q "train: .* on world=2 dp=2 tp=1 pp=1" "$work/whole.out" && pass "job's mesh world=2 dp=2" ||
  failed "job's mesh is not world=2 dp=2: $(grep -m1 'train:' "$work/whole.out")"
grep -q "local rank from SLURM_LOCALID" "$work/whole.out" && grep -q "rank 1: node 0 (host .*), local rank 1, tp 0 dp 1 pp 0" "$work/whole.out" &&
  pass "placement from Slurm: $(grep -m1 'local rank from' "$work/whole.out" | sed 's/.*placement: //')" ||
  failed "placement lines: $(grep -E 'placement|rank [0-9]+: node' "$work/whole.out" | sed 's/.*\] //' | tr '\n' ';')"
expect 0 "<= 1e-06" -- "$kit" compare "$work/whole/adapter/adapter_model.safetensors" "$work/mpirun/adapter/adapter_model.safetensors" "*" 1e-6
diff_line=$("$kit" compare "$work/whole/adapter/adapter_model.safetensors" "$work/mpirun/adapter/adapter_model.safetensors" "*" 1e-6 2>&1 | tail -1)
echo "figure: Slurm job vs mpirun adapter: $diff_line"

# 2. Preempted by USR1 to the steps, requeued, resumed.
j2=$(submit preempt --requeue --open-mode=append -- --output.dir "$work/preempt" --train.log_every 1) || failed "sbatch preempt"
for _ in $(seq 600); do grep -q "step 10/$steps" "$work/preempt.out" 2>/dev/null && break; sleep 0.1; done
grep -q "step 10/$steps" "$work/preempt.out" && pass "preempted job is training" || failed "no step 10 line in preempt.out"
scancel --signal=USR1 "$j2"
check_state COMPLETED "$(wait_job "$j2" 120)" "USR1: the job exits 0" preempt
stop=$(sed -n "s/.*stopping at step \([0-9]*\) (signal).*/\1/p" "$work/preempt.out" | head -1)
if [[ -n $stop && $stop -lt $steps && -f $work/preempt/checkpoints/step_$stop/trainer_state.json ]]; then
  pass "USR1 stopped the job at step $stop of $steps with checkpoints/step_$stop"
else
  failed "no signal stop with a checkpoint: $(grep -E 'stopping|error' "$work/preempt.out" | head -3)"
fi
[[ $(job_field "$j2" ExitCode) == 0:0 ]] && pass "exit code 0:0" || failed "exit code $(job_field "$j2" ExitCode)"
t0=$(date +%s.%N)
scontrol requeue "$j2" && pass "scontrol requeue $j2" || failed "scontrol requeue $j2"
# Slurm holds a requeued job back (EligibleTime 121 s ahead) before it may start again; a
# site would wait that out. The test moves the start to now 2 s after the job is pending
# again: a start in the second of the requeue fails ("Job credential revoked"), and a
# StartTime in the future waits for the scheduler's next periodic pass (up to a minute),
# whereas the update itself starts a pass.
for _ in $(seq 100); do [[ $(job_field "$j2" JobState) == PENDING ]] && break; sleep 0.1; done
echo "figure: requeued at $(date -d @"${t0%.*}" +%T), pending with Slurm's EligibleTime $(job_field "$j2" EligibleTime | cut -dT -f2)"
sleep 2
scontrol update JobId="$j2" StartTime=now || failed "scontrol update JobId=$j2 StartTime=now"
check_state COMPLETED "$(wait_job "$j2" 240 1)" "requeued job" preempt
grep -q "resumed from .*step_$stop at step $stop" "$work/preempt.out" && pass "requeued job resumed at step $stop" ||
  failed "requeued job did not resume from step_$stop"
cmp -s "$work/whole/adapter/adapter_model.safetensors" "$work/preempt/adapter/adapter_model.safetensors" &&
  pass "preempted + requeued adapter is bit for bit the uninterrupted job's" || failed "preempted + requeued adapter differs"
# Requeue to the first step after the resume, from the log's own time stamps.
first=$(sed -n "/resumed from/,\$p" "$work/preempt.out" | grep -m1 -E "\[rank 0\] \[info\] step [0-9]+/$steps" |
  sed -n 's/^\[\([0-9-]* [0-9:.]*\)\].*/\1/p')
[[ -n $first ]] && echo "figure: requeue to the first resumed step (step $((stop + 1))) done: $(awk -v a="$t0" -v b="$(date -d "$first" +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"

# 3. A config that fails pre-flight: FAILED at once, the error in the output file.
t0=$(date +%s.%N)
j3=$(submit bad -- --output.dir "$work/bad" --peft.method loha) || failed "sbatch bad"
check_state FAILED "$(wait_job "$j3" 60)" "bad config" bad
echo "figure: bad config job FAILED after $(since "$t0") s"
grep -q "peft.method.*loha\|loha.*peft.method" "$work/bad.out" && pass "error names peft.method=loha: $(grep -m1 loha "$work/bad.out")" ||
  failed "no error naming loha in bad.out: $(head -3 "$work/bad.out")"
[[ $(job_field "$j3" ExitCode) != 0:0 ]] && pass "exit code $(job_field "$j3" ExitCode)" || failed "bad job exit code 0:0"

finish
