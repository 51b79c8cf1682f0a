#!/usr/bin/env bash
# launch/run_multinode.sh over TCP between two "nodes" (network namespaces on a bridge,
# netns_nodes.sh; Open MPI's rsh agent enters them, netns_rsh.sh), 2 ranks a node, tp=2:
#  (a) every tp group inside one node: ShardTune's placement lines, the namespaces the rank
#      processes really run in (ip netns pids), and no "spans nodes" warning; the warning
#      does appear with round-robin placement (--map-by node);
#  (b) the adapter equals the single-node mpiexec run's (same mesh, within 1e-6);
#  (c) killing every process of one node ends the job on the other within 30 s, non-zero,
#      with a message naming the lost node's ranks;
#  (d) the same command then resumes from the last checkpoint, bit for bit the uninterrupted run;
#  and a hostfile naming an unreachable host ends within 60 s with Open MPI's error.
# usage: test_multinode.sh SHARDTUNE TESTKIT MPIEXEC WORKDIR   (exit 77: skipped, prerequisites missing)
set -uo pipefail
st=$(realpath "$1") kit=$(realpath "$2") mpiexec=$3 work=$4
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
source "$here/common.sh"
source "$here/netns_nodes.sh"
source "$repo/tests/cli/lib.sh"
deadline 270
rm -rf "$work" && mkdir -p "$work" && work=$(cd "$work" && pwd)

netns_nodes_start 2 || { echo "FAIL: could not make the namespaces"; exit 1; }
hosts=$work/hosts.txt
printf "%s slots=2\n" "${NODE_ADDR[@]}" >"$hosts"
export OMP_NUM_THREADS=1 SHARDTUNE=$st SHARDTUNE_NETNS_MAP=$NODE_MAP \
  OMPI_MCA_plm_rsh_agent=$here/netns_rsh.sh OMPI_MCA_plm_rsh_no_tree_spawn=1 \
  OMPI_MCA_oob_tcp_if_include=$NODE_SUBNET OMPI_MCA_btl_tcp_if_include=$NODE_SUBNET \
  MPIRUN_ARGS="--mca btl tcp,self"
run=("$repo/launch/run_multinode.sh" "$hosts" 4)

steps=100
cfg=$work/tiny.ini
tiny_run_ini 2 >"$cfg"
sed -i "s/^steps = .*/steps = $steps/" "$cfg"
printf "[output]\ncheckpoint_every = 10\n" >>"$cfg"

# Single node (this namespace, shared memory) and two nodes (TCP), the same mesh.
expect 0 "done: eval top-1" -- "$mpiexec" --oversubscribe -n 4 "$st" train --config "$cfg" --parallel.tp 2 --output.dir "$work/single"
"${run[@]}" "$cfg" --parallel.tp 2 --output.dir "$work/multi" >"$work/multi.log" 2>&1
rc=$?
[[ $rc -eq 0 ]] && grep -q "done: eval top-1" "$work/multi.log" && pass "two-node run" ||
  { failed "two-node run exit $rc"; tail -15 "$work/multi.log" | sed 's/^/    /'; }
grep -q "on world=4 dp=2 tp=2 pp=1" "$work/multi.log" && pass "mesh dp=2 tp=2" || failed "mesh is not dp=2 tp=2"
grep -q "placement: 4 rank(s) on 2 node(s)" "$work/multi.log" && pass "4 ranks on 2 nodes" ||
  failed "placement summary: $(grep placement "$work/multi.log")"
for want in "rank 0: node 0 .*local rank 0, tp 0 dp 0 pp 0" "rank 1: node 0 .*local rank 1, tp 1 dp 0 pp 0" \
            "rank 2: node 1 .*local rank 0, tp 0 dp 1 pp 0" "rank 3: node 1 .*local rank 1, tp 1 dp 1 pp 0"; do
  grep -q "$want" "$work/multi.log" && pass "placement /$want/" || failed "no placement line /$want/"
done
! grep -q "spans nodes" "$work/multi.log" && pass "no tp group spans nodes" || failed "$(grep -m1 'spans nodes' "$work/multi.log")"
expect 0 "<= 1e-06" -- "$kit" compare "$work/multi/adapter/adapter_model.safetensors" "$work/single/adapter/adapter_model.safetensors" "*" 1e-6
cmp -s "$work/multi/adapter/adapter_model.safetensors" "$work/single/adapter/adapter_model.safetensors" &&
  echo "figure: two-node adapter is bit for bit the single-node one" ||
  echo "figure: two-node vs single-node adapter: $("$kit" compare "$work/multi/adapter/adapter_model.safetensors" "$work/single/adapter/adapter_model.safetensors" "*" 1e-6 2>&1 | tail -1)"

# Round robin (the old --map-by node) splits both tp groups, and ShardTune says so.
SHARDTUNE_MAP_BY=node "${run[@]}" "$cfg" --parallel.tp 2 --train.steps 1 --output.dir "$work/rr" >"$work/rr.log" 2>&1
[[ $(grep -c "spans nodes" "$work/rr.log") -eq 2 ]] && grep -q "rank 1: node 1 " "$work/rr.log" &&
  pass "round robin warned: $(grep -m1 'spans nodes' "$work/rr.log" | sed 's/.*\] //' | cut -c1-60)..." ||
  { failed "round robin placement not warned"; grep -E "rank [0-9]: node|spans|error" "$work/rr.log" | head -6 | sed 's/^/    /'; }

# A node lost mid-run.
"${run[@]}" "$cfg" --parallel.tp 2 --output.dir "$work/lost" >"$work/lost.log" 2>&1 &
job=$!
started $job
for _ in $(seq 600); do grep -q "step 20/$steps" "$work/lost.log" && break; sleep 0.1; done
grep -q "step 20/$steps" "$work/lost.log" && pass "the run reached step 20" || failed "no step 20 line in lost.log"
# Which ranks run in which namespace, from the processes themselves.
for i in 0 1; do
  ranks=$(for p in $(ip netns pids "${NODE_NS[i]}"); do
            tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | sed -n 's/^OMPI_COMM_WORLD_RANK=//p'
          done | sort -n | tr '\n' ' ')
  want=$([[ $i -eq 0 ]] && echo "0 1 " || echo "2 3 ")
  [[ $ranks == "$want" ]] && pass "node $i (${NODE_NS[i]}) runs ranks $ranks" || failed "node $i runs ranks '$ranks', want '$want'"
done
t0=$(date +%s.%N)
killed=$(netns_kill_node 1)
for _ in $(seq 300); do kill -0 $job 2>/dev/null || break; sleep 0.1; done
secs=$(since "$t0")
if kill -0 $job 2>/dev/null; then
  failed "the job still runs 30 s after node 1 was lost"
else
  wait $job; rc=$?
  echo "figure: node 1 lost ($killed processes killed): the job ended ${secs} s later, exit $rc"
  [[ $rc -ne 0 ]] && pass "lost node: exit $rc" || failed "lost node: exit 0"
  grep -q "run_multinode.sh: lost node ${NODE_ADDR[1]} (ranks 2-3)" "$work/lost.log" &&
    pass "message names the lost ranks: $(grep -m1 'lost node' "$work/lost.log")" ||
    { failed "no message naming ranks 2 and 3"; tail -12 "$work/lost.log" | sed 's/^/    /'; }
fi
left=$(ip netns pids "${NODE_NS[0]}" | wc -l)
[[ $left -eq 0 ]] && pass "nothing left running on node 0" || failed "$left processes left on node 0"
last=$(ls "$work/lost/checkpoints" 2>/dev/null | sed -n 's/^step_\([0-9]*\)$/\1/p' | sort -n | tail -1)
[[ -n $last ]] && pass "last checkpoint step_$last" || failed "no checkpoint written before the loss"
# The same command again resumes.
expect 0 "resumed from .*step_$last at step $last.*done: eval top-1" -- "${run[@]}" "$cfg" --parallel.tp 2 --output.dir "$work/lost"
cmp -s "$work/lost/adapter/adapter_model.safetensors" "$work/multi/adapter/adapter_model.safetensors" &&
  pass "resumed adapter is bit for bit the uninterrupted two-node run's" || failed "resumed adapter differs from the uninterrupted run's"

# A hostfile naming a host nobody answers for (an unused address of the nodes' subnet).
printf "%s slots=2\n%s slots=2\n" "${NODE_ADDR[0]}" "${NODE_SUBNET%.0/24}.99" >"$work/bad_hosts.txt"
t0=$(date +%s.%N)
out=$(timeout 90 "$repo/launch/run_multinode.sh" "$work/bad_hosts.txt" 4 "$cfg" --parallel.tp 2 --output.dir "$work/unreachable" 2>&1)
rc=$?
secs=$(since "$t0")
echo "figure: unreachable host: exit $rc after ${secs} s"
if [[ $rc -ne 0 && $rc -ne 124 ]] && awk -v s="$secs" 'BEGIN { exit !(s <= 60) }' && grep -q "ORTE was unable to reliably start" <<<"$out"; then
  pass "unreachable host: Open MPI's error after ${secs} s ($(grep -m1 'ssh: connect' <<<"$out"))"
else
  failed "unreachable host: exit $rc after ${secs} s"; tail -12 <<<"$out" | sed 's/^/    /'
fi
left=$(ip netns pids "${NODE_NS[0]}" | wc -l)
[[ $left -eq 0 ]] && pass "nothing left running on node 0" || failed "$left processes left on node 0"

finish
