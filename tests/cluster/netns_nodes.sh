# Two or more "nodes" on this machine (sourced, after common.sh): network namespaces whose
# veth ends hang on one bridge, in a private /24 of 10.213.0.0/16 that no interface uses yet.
# Names carry this shell's pid, so parallel runs do not collide.
#   netns_nodes_start N     creates them; sets NODE_NS[i], NODE_ADDR[i] (i = 0..N-1), NODE_SUBNET,
#                           NODE_BRIDGE_ADDR, NODE_MAP (file "ADDRESS NAMESPACE TMPDIR" for
#                           netns_rsh.sh: each node has its own TMPDIR, as hosts have their /tmp);
#                           at exit every process inside them is killed and they are deleted
#   netns_kill_node I       SIGKILLs every process in node I; prints how many
# Needs root and `ip netns`; skips (exit 77) without them.

NODE_NS=() NODE_ADDR=()
netns_nodes_start() {
  local n=$1 i tag=st$$ net=""
  need_root
  command -v ip >/dev/null || skip "no ip command (iproute2)"
  ip netns add "${tag}probe" 2>/dev/null && ip netns del "${tag}probe" || skip "cannot create network namespaces here"
  for i in $(seq 0 249); do
    local x=$(( ($$ + i) % 250 + 1 ))
    ip -o -4 addr show | grep -q " 10\.213\.$x\." || { net=$x; break; }
  done
  [[ -n $net ]] || { echo "no free 10.213.x.0/24"; return 1; }
  NODE_SUBNET=10.213.$net.0/24
  NODE_BRIDGE_ADDR=10.213.$net.254
  NODE_MAP=$(mktemp "/tmp/${tag}-netns-map.XXXX")
  on_exit "rm -f $NODE_MAP"
  ip link add "${tag}br" type bridge || return 1
  on_exit "ip link del ${tag}br 2>/dev/null"
  ip addr add "$NODE_BRIDGE_ADDR/24" dev "${tag}br" && ip link set "${tag}br" up || return 1
  for ((i = 0; i < n; i++)); do
    local ns=${tag}n$i addr=10.213.$net.$((i + 1))
    ip netns add "$ns" || return 1
    on_exit "netns_delete $ns"
    ip link add "${tag}h$i" type veth peer name "${tag}v$i" || return 1
    ip link set "${tag}h$i" master "${tag}br" up &&
      ip link set "${tag}v$i" netns "$ns" &&
      ip -n "$ns" addr add "$addr/24" dev "${tag}v$i" &&
      ip -n "$ns" link set "${tag}v$i" up &&
      ip -n "$ns" link set lo up || return 1
    NODE_NS[i]=$ns NODE_ADDR[i]=$addr
    local tmp
    tmp=$(mktemp -d "/tmp/$ns-tmp.XXXX") && on_exit "rm -rf $tmp"
    echo "$addr $ns $tmp" >>"$NODE_MAP"
  done
  for ((i = 0; i < n; i++)); do  # each node reaches the bridge (mpirun's side); no ping needed
    for _ in $(seq 30); do netns_reaches "${NODE_NS[i]}" "$NODE_BRIDGE_ADDR" && break; sleep 0.2; done
    netns_reaches "${NODE_NS[i]}" "$NODE_BRIDGE_ADDR" || { echo "node $i (${NODE_NS[i]}) cannot reach $NODE_BRIDGE_ADDR"; return 1; }
  done
  echo "nodes: ${NODE_ADDR[*]} in namespaces ${NODE_NS[*]}, bridge ${tag}br $NODE_BRIDGE_ADDR"
}

netns_kill_node() {
  local pids
  pids=$(ip netns pids "${NODE_NS[$1]}" 2>/dev/null | tr '\n' ' ')
  [[ -n $pids ]] && kill -KILL $pids 2>/dev/null
  echo "$pids" | wc -w
}

# Kills what runs inside the namespace (until none is left), then deletes it.
netns_delete() {
  local ns=$1 pids
  for _ in $(seq 20); do
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    [[ -z $pids ]] && break
    kill -KILL $pids 2>/dev/null
    sleep 0.1
  done
  ip netns del "$ns" 2>/dev/null
}

# netns_reaches NS ADDR: a TCP connection from NS to ADDR's port 9 is answered (accepted or
# refused), so packets get there and back.
netns_reaches() {
  local err
  err=$(ip netns exec "$1" timeout 2 bash -c "exec 3<>/dev/tcp/$2/9" 2>&1) && return 0
  [[ $err == *refused* ]]
}
