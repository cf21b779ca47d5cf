#!/usr/bin/env bash
# Tears down what scripts/cluster-up.sh made, whatever state it is in (also
# after a failed or interrupted cluster-up): every process in the cluster's
# cgroups (control plane, containerd and its shims, kubelets, containers),
# the mounts under /var/lib/kubelet, /var/lib/hostpath-csi and the cluster
# dir, the pools' loop devices, the network namespaces containerd made, the
# bridges, our iptables chains and the kubelet's, the cgroups, and the dirs.
# Safe to run twice.
#
# Usage (as root): scripts/cluster-down.sh     (CLUSTER_DIR as for cluster-up)
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/cluster-lib.sh
source "$here/cluster-lib.sh"
[[ $(id -u) -eq 0 ]] || cl_die "run as root"
if [[ ! -d $CL_STATE ]]; then
  cl_log "no cluster in $CLUSTER_DIR"
  exit 0
fi

# 1. Processes: gently first (the kubelet and containerd exit cleanly), then
#    everything left in our cgroups, shims and containers included.
for f in "$CL_STATE"/pids/*; do
  [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null
done
sleep 1
cl_cgroup_kill_all

# 2. Mounts, in each node's own namespace first, then on the host.
shopt -s nullglob
for ns in "$CL_STATE"/node*.mntns; do
  nsenter --mount="$ns" -- bash -c "$(declare -f cl_umount_under);
    cl_umount_under /var/lib/kubelet; cl_umount_under /var/lib/hostpath-csi
    cl_umount_under /run/containerd; cl_umount_under /run/netns; cl_umount_under '$CLUSTER_DIR'" 2>/dev/null
  umount "$ns" 2>/dev/null || umount -l "$ns"
done
started="$CL_STATE/started"
# The network namespaces containerd made for our pods (it names them
# cni-<uuid>; only those made since cluster-up started).
for ns in /run/netns/cni-*; do
  if [[ -e $started && $ns -nt $started ]]; then
    umount "$ns" 2>/dev/null || umount -l "$ns" 2>/dev/null
    rm -f "$ns"
  fi
done
cl_umount_under /var/lib/kubelet
cl_umount_under /var/lib/hostpath-csi
cl_umount_under "$CLUSTER_DIR/node1"
for d in "$CLUSTER_DIR"/node*; do cl_umount_under "$d"; done
cl_detach_loops_under /var/lib/hostpath-csi
cl_detach_loops_under "$CLUSTER_DIR"
# containerd 1.6 keeps some state under /run/containerd whatever its config
# says; a task's rootfs may still be mounted there.
cl_umount_under /run/containerd
mountpoint -q "$CL_STATE" && { umount "$CL_STATE" 2>/dev/null || umount -l "$CL_STATE"; }

# 3. Network.
cl_iptables_teardown
for f in "$CL_STATE"/bridges; do
  while read -r br; do ip link del "$br" 2>/dev/null; done <"$f"
done

# 4. Directories we created.
[[ -e $CL_STATE/made-var-lib-kubelet ]] && rm -rf --one-file-system /var/lib/kubelet
[[ -e $CL_STATE/made-var-lib-hostpath-csi ]] && rm -rf --one-file-system /var/lib/hostpath-csi
[[ -e $CL_STATE/made-run-containerd ]] && rm -rf --one-file-system /run/containerd
[[ -e $CL_STATE/made-run-netns ]] && rmdir /run/netns 2>/dev/null
# What is left mounted is reported, and the dir kept, rather than deleted
# through a mount.
left="$(awk -v d="$CLUSTER_DIR" 'index($5, d) == 1 || index($5, "/var/lib/kubelet") == 1 {print $5}' /proc/self/mountinfo)"
if [[ -n $left ]]; then
  cl_log "still mounted (kept $CLUSTER_DIR):"
  echo "$left" >&2
  exit 1
fi
rm -rf --one-file-system "$CLUSTER_DIR"
cl_log "cluster in $CLUSTER_DIR torn down"
