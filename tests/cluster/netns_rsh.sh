#!/usr/bin/env bash
# An Open MPI rsh agent (OMPI_MCA_plm_rsh_agent) for "nodes" that are network namespaces on
# this machine: `netns_rsh.sh [-options] HOST COMMAND...` runs COMMAND in the namespace that
# owns HOST's address, as ssh would run it on the host. The address-to-namespace map is the
# file named by SHARDTUNE_NETNS_MAP ("ADDRESS NAMESPACE TMPDIR" a line), with the node's own
# TMPDIR, as a separate host has its own /tmp: Open MPI names its session directories after the
# host name, which the namespaces share, and with one /tmp for both about one launch in 30 hung
# (a daemon gone silently before reporting). For a host with no
# namespace it tries what ssh would, a TCP connection to port 22 (10 s at most), and fails as
# ssh does: exit 255, "ssh: connect to host H port 22: <the error>".
set -euo pipefail
while [[ ${1:-} == -* ]]; do shift; done
host=${1:?usage: netns_rsh.sh HOST COMMAND...}
shift
map=${SHARDTUNE_NETNS_MAP:?SHARDTUNE_NETNS_MAP names no address-to-namespace map}
read -r ns tmp < <(awk -v h="$host" '$1 == h { print $2, $3; exit }' "$map") || true
if [[ -z $ns ]]; then
  err=$(timeout 10 bash -c "exec 3<>/dev/tcp/$host/22" 2>&1) && err="no namespace has this address" ||
    { [[ -n $err ]] || err="Connection timed out"; }
  echo "ssh: connect to host $host port 22: ${err##*: }" >&2
  exit 255
fi
[[ -z ${tmp:-} ]] || export TMPDIR=$tmp
exec ip netns exec "$ns" /bin/sh -c "$*"
