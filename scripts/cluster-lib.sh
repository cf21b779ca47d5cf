# Shared by scripts/cluster-up.sh, scripts/cluster-down.sh and the tests that
# use the local cluster (tests/e2e/pods.sh, scripts/bench-pods.sh). Sourced,
# not run.
#
# The cluster lives in $CLUSTER_DIR (default /var/lib/hostpath-csi-cluster):
#   env                 what a user or a test sources: KUBECONFIG, KUBECTL,
#                       node names, sockets, pool dirs
#   kubeconfig          admin credentials for the API server
#   pki/ logs/ etcd/    certificates, one log per process, etcd's data
#   node<N>/            containerd root, state, socket and config, CNI
#                       config, the kubelet's config and certificates
#   state/              what cluster-down.sh needs to undo (pids, the
#                       iptables chains and mounts we made, which dirs we
#                       created)
# Node 1's kubelet uses the default root /var/lib/kubelet (the Kubernetes
# storage e2e suite looks there; deploy/ needs no path rewrites) and its pools
# are /var/lib/hostpath-csi/<pool>, as deploy/configmap.yaml says. Node 2
# runs in a mount namespace of its own where those two paths are bind mounts
# of node2/kubelet and node2/pools: both nodes see the same host paths, each
# its own contents.
#
# Every process is started inside the cgroup /hostpath-csi-cluster/daemons
# (pids hierarchy) and every pod under /hostpath-csi-cluster/node<N> (the
# kubelets' cgroupRoot), so teardown kills exactly what we started,
# containerd shims and containers included, whatever state a failure left.

CLUSTER_DIR="${CLUSTER_DIR:-/var/lib/hostpath-csi-cluster}"
CL_STATE="$CLUSTER_DIR/state"
CL_CGROUP=hostpath-csi-cluster
CL_POD_CIDR=10.88.0.0/16           # all nodes' pod subnets are inside
CL_SERVICE_CIDR=10.0.0.0/24
CL_API_SERVICE_IP=10.0.0.1
CL_CLOSED_REGISTRY=127.0.0.1:9     # nothing listens: a pull fails at once
CL_CHAIN=HOSTPATH-CSI-CLUSTER      # our iptables chains (filter and nat)

cl_log() { printf '[cluster %s] %s\n' "$(date +%T)" "$*" >&2; }
cl_die() { cl_log "error: $*"; exit 1; }

# cl_node_name N: node N's name, also the address its kubelet serves on (the
# kubelet takes --hostname-override verbatim as the node's InternalIP, and
# refuses loopback addresses in --node-ip).
cl_node_name() { echo "127.0.0.$1"; }
cl_node_dir() { echo "$CLUSTER_DIR/node$1"; }
cl_bridge() { echo "hpc$1"; }
cl_pod_subnet() { echo "10.88.$1.0/24"; }

# ------------------------------------------------------------------ cgroups

# The v1 hierarchies mounted under /sys/fs/cgroup (cgroup v1/v2 hybrid
# here); on a pure v2 machine the one unified hierarchy.
cl_cgroup_hierarchies() {
  local h
  if [[ $(stat -fc %T /sys/fs/cgroup) == cgroup2fs ]]; then
    echo /sys/fs/cgroup
    return
  fi
  for h in /sys/fs/cgroup/*; do
    [[ -d $h && ! -L $h ]] || continue
    case "$(stat -fc %T "$h")" in cgroupfs | cgroup2fs) echo "$h" ;; esac
  done
}

# The hierarchy that tracks our processes for teardown.
cl_track_hierarchy() {
  local h
  for h in /sys/fs/cgroup/pids /sys/fs/cgroup/memory /sys/fs/cgroup; do
    [[ -f $h/cgroup.procs ]] && { echo "$h"; return; }
  done
  cl_die "no cgroup hierarchy to track processes in"
}

# cl_cgroup_make PATH: makes /PATH in every hierarchy, copying cpuset.cpus
# and cpuset.mems down from the parent at each level (a new cpuset cgroup
# starts empty, and the kubelet then fails with "has some missing paths").
cl_cgroup_make() {
  local h part p
  while read -r h; do
    p="$h"
    IFS=/ read -ra parts <<<"$1"
    for part in "${parts[@]}"; do
      [[ -n $part ]] || continue
      local parent="$p"; p="$p/$part"
      [[ -d $p ]] || mkdir "$p"
      if [[ -f $p/cpuset.cpus && -z $(cat "$p/cpuset.cpus") ]]; then
        cat "$parent/cpuset.cpus" >"$p/cpuset.cpus"
        cat "$parent/cpuset.mems" >"$p/cpuset.mems"
      fi
    done
  done < <(cl_cgroup_hierarchies)
}

# cl_cgroup_kill_all: SIGKILL every process in our cgroups (any hierarchy),
# until they are empty, then remove the cgroups deepest first.
cl_cgroup_kill_all() {
  local h round pids
  for round in $(seq 50); do
    pids="$(cat $(find /sys/fs/cgroup/*/"$CL_CGROUP" /sys/fs/cgroup/"$CL_CGROUP" \
      -name cgroup.procs 2>/dev/null) 2>/dev/null | sort -u)"
    [[ -n $pids ]] || break
    # shellcheck disable=SC2086 # one pid per word
    kill -9 $pids 2>/dev/null
    sleep 0.2
  done
  while read -r h; do
    [[ -d $h/$CL_CGROUP ]] || continue
    find "$h/$CL_CGROUP" -depth -type d -exec rmdir {} + 2>/dev/null
    [[ -d $h/$CL_CGROUP ]] && cl_log "warning: could not remove $h/$CL_CGROUP"
  done < <(cl_cgroup_hierarchies)
  return 0
}

# cl_start NAME [--node N] CMD... : runs CMD in the background as a daemon
# of the cluster (its own session, our tracking cgroup, node N's mount
# namespace for N > 1), logging to logs/NAME.log; records its pid.
cl_start() {
  local name="$1"; shift
  local node=1
  if [[ $1 == --node ]]; then node="$2"; shift 2; fi
  local procs; procs="$(cl_track_hierarchy)/$CL_CGROUP/daemons/cgroup.procs"
  local enter=()
  ((node > 1)) && enter=(nsenter "--mount=$CL_STATE/node$node.mntns" --)
  setsid "${enter[@]}" sh -c 'echo $$ >"$0" && exec "$@"' "$procs" "$@" \
    >>"$CLUSTER_DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$CL_STATE/pids/$name"
}

cl_pid() { cat "$CL_STATE/pids/$1" 2>/dev/null; }
cl_running() { local p; p="$(cl_pid "$1")" && [[ -n $p ]] && kill -0 "$p" 2>/dev/null; }

# cl_wait SECONDS WHAT CMD... : retries CMD every 0.5 s until it succeeds.
cl_wait() {
  local timeout="$1" what="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { cl_log "timed out after ${timeout}s waiting for $what"; return 1; }
    sleep 0.5
  done
}

cl_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ------------------------------------------------------------------ network

# cl_iptables_setup: our chains, hooked first into FORWARD and PREROUTING:
#  - pods' traffic to anything beyond the pod network is dropped (no
#    traffic leaves the machine);
#  - the API Service IP (what in-cluster clients are told to use) is
#    forwarded to the API server on 127.0.0.1. This is all of kube-proxy a
#    storage test needs; it requires route_localnet on the bridges.
cl_iptables_setup() {
  local api_port="$1"
  iptables -N "$CL_CHAIN" 2>/dev/null || iptables -F "$CL_CHAIN"
  iptables -A "$CL_CHAIN" -s "$CL_POD_CIDR" -d "$CL_POD_CIDR" -j RETURN
  iptables -A "$CL_CHAIN" -s "$CL_POD_CIDR" -j DROP
  iptables -C FORWARD -j "$CL_CHAIN" 2>/dev/null || iptables -I FORWARD 1 -j "$CL_CHAIN"
  iptables -t nat -N "$CL_CHAIN" 2>/dev/null || iptables -t nat -F "$CL_CHAIN"
  iptables -t nat -A "$CL_CHAIN" -s "$CL_POD_CIDR" -d "$CL_API_SERVICE_IP" -p tcp --dport 443 \
    -j DNAT --to-destination "127.0.0.1:$api_port"
  iptables -t nat -C PREROUTING -j "$CL_CHAIN" 2>/dev/null || iptables -t nat -I PREROUTING 1 -j "$CL_CHAIN"
  echo "$CL_CHAIN" >"$CL_STATE/iptables"
}

# cl_bridge_setup N: node N's bridge, made before the CNI plugin would, so
# route_localnet can be set on it (the DNAT to 127.0.0.1 needs it).
cl_bridge_setup() {
  local br; br="$(cl_bridge "$1")"
  ip link show "$br" >/dev/null 2>&1 || ip link add "$br" type bridge
  ip link set "$br" up
  sysctl -qw "net.ipv4.conf.$br.route_localnet=1"
  echo "$br" >>"$CL_STATE/bridges"
}

# Chains the kubelet adds (iptables and ip6tables; filter, nat, mangle).
CL_KUBELET_CHAINS=(KUBE-FIREWALL KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT KUBE-MARK-DROP
  KUBE-MARK-MASQ KUBE-POSTROUTING)

cl_iptables_teardown() {
  local ipt table chain hook
  for ipt in iptables ip6tables; do
    command -v "$ipt" >/dev/null || continue
    for table in filter nat mangle; do
      # Unhook our chains and the kubelet's from the built-in ones.
      for hook in INPUT OUTPUT FORWARD PREROUTING POSTROUTING; do
        "$ipt" -t "$table" -S "$hook" 2>/dev/null | grep -E -- "-j ($CL_CHAIN|KUBE-[A-Z-]+)\$" |
          while read -r _ rest; do
            # shellcheck disable=SC2086 # the rule's words
            "$ipt" -t "$table" -D $rest 2>/dev/null
          done
      done
      for chain in "$CL_CHAIN" "${CL_KUBELET_CHAINS[@]}"; do
        "$ipt" -t "$table" -F "$chain" 2>/dev/null
      done
      for chain in "$CL_CHAIN" "${CL_KUBELET_CHAINS[@]}"; do
        "$ipt" -t "$table" -X "$chain" 2>/dev/null
      done
    done
  done
  return 0
}

# ------------------------------------------------------------------ mounts

# cl_umount_under DIR: unmounts everything at or below DIR, deepest first
# (lazily when busy), in the current mount namespace.
cl_umount_under() {
  local d="$1" m
  awk -v d="$d" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo |
    sort -r | while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    done
  return 0
}

# cl_detach_loops_under DIR: detaches loop devices whose backing file is
# below DIR (image pools' volumes).
cl_detach_loops_under() {
  local d="$1" dev file
  losetup -n -O NAME,BACK-FILE 2>/dev/null | while read -r dev file; do
    [[ $file == "$d"/* ]] && losetup -d "$dev" 2>/dev/null
  done
  return 0
}
