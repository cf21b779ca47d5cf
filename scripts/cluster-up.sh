#!/usr/bin/env bash
# Brings up a local Kubernetes cluster on this machine, on loopback only, and
# installs hostpath-csi into it the way a user does (`kubectl apply -k`):
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler (built from
#   the Go module proxy by tests/e2e/build-tools.sh), and per node Debian's
#   containerd with the CNI bridge plugin and a kubelet, with the images of
#   scripts/images.sh imported. No image is ever pulled: every registry
#   resolves to a closed port on 127.0.0.1, and pods cannot reach anything
#   beyond the pod network.
#
# Usage (as root):  scripts/cluster-up.sh        then   scripts/cluster-down.sh
# Environment:
#   CLUSTER_DIR   where everything lives (default /var/lib/hostpath-csi-cluster)
#   NODES         1 (default) or 2: the second kubelet runs in a mount
#                 namespace of its own, see scripts/cluster-lib.sh
#   SNAPSHOTS     1 (default): the cluster supports VolumeSnapshots, as a
#                 user sets that up (README, "Snapshots, restores and
#                 clones"): the CRDs and the snapshot controller from
#                 deploy/snapshot-controller are installed with the cluster,
#                 and the default install adds deploy/components/snapshots
#                 (csi-snapshotter in the node plugin's pod, its RBAC, the
#                 VolumeSnapshotClass). 0 leaves all of that out.
#   INSTALL       the kustomization to install (default deploy/, with
#                 components/snapshots unless SNAPSHOTS=0); `none`
#                 installs nothing (a test mounts its pools first)
#   IMAGES        extra images for scripts/images.sh (e.g. local-path)
#   HOSTPATH_CSI_BIN  a driver binary to put in the node image instead of
#                 `cargo build --release`'s
# When it is done it prints how to use the cluster: `source $CLUSTER_DIR/env`
# sets KUBECONFIG and puts kubectl on the PATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=scripts/cluster-lib.sh
source "$here/cluster-lib.sh"
NODES="${NODES:-1}"
SNAPSHOTS="${SNAPSHOTS:-1}"
INSTALL="${INSTALL:-default}"
t0=$SECONDS

[[ $(id -u) -eq 0 ]] || cl_die "run as root (containerd, the kubelet, mounts, iptables)"
[[ $NODES == 1 || $NODES == 2 ]] || cl_die "NODES must be 1 or 2"
[[ $SNAPSHOTS == 0 || $SNAPSHOTS == 1 ]] || cl_die "SNAPSHOTS must be 0 or 1"
if [[ -d $CL_STATE ]]; then
  cl_die "a cluster is already set up in $CLUSTER_DIR: scripts/cluster-down.sh first"
fi
if [[ -e /var/lib/kubelet && -n "$(ls -A /var/lib/kubelet 2>/dev/null)" ]]; then
  cl_die "/var/lib/kubelet exists and is not empty: is a kubelet already running on this machine?"
fi
for cmd in containerd ctr runc iptables ip nsenter unshare openssl jq python3 curl; do
  command -v "$cmd" >/dev/null ||
    cl_die "$cmd is missing (apt-get install containerd runc containernetworking-plugins iptables util-linux openssl jq busybox-static debootstrap)"
done
[[ -x /usr/lib/cni/bridge ]] || cl_die "the CNI plugins are missing (apt-get install containernetworking-plugins)"

mkdir -p "$CL_STATE/pids" "$CLUSTER_DIR/logs" "$CLUSTER_DIR/pki" "$CLUSTER_DIR/etcd"
# Everything below is undone by cluster-down.sh, also after a failure here.
[[ -e /var/lib/kubelet ]] || touch "$CL_STATE/made-var-lib-kubelet"
[[ -e /var/lib/hostpath-csi ]] || touch "$CL_STATE/made-var-lib-hostpath-csi"
[[ -e /run/containerd ]] || touch "$CL_STATE/made-run-containerd"
[[ -e /run/netns ]] || touch "$CL_STATE/made-run-netns"
touch "$CL_STATE/started"
on_exit() {
  local rc=$?
  if ((rc != 0)); then
    cl_log "cluster-up failed; the last lines of each log:"
    for f in "$CLUSTER_DIR"/logs/*.log; do
      [[ -f $f ]] && { echo "----- $(basename "$f")" >&2; tail -n 15 "$f" >&2; }
    done
    if [[ -z ${CLUSTER_KEEP:-} ]]; then
      cl_log "tearing down (set CLUSTER_KEEP=1 to keep it for a look)"
      "$here/cluster-down.sh" >&2 || true
    fi
  fi
  exit "$rc"
}
trap on_exit EXIT

# ------------------------------------------------------------------ builds
cl_log "building the components (cached after the first run)"
extra=()
[[ " ${IMAGES:-} " == *" local-path "* ]] && extra=(localpath)
"$repo/tests/e2e/build-tools.sh" "${extra[@]}" >"$CLUSTER_DIR/tools.env" 2>"$CLUSTER_DIR/logs/build-tools.log" ||
  { tail -n 30 "$CLUSTER_DIR/logs/build-tools.log" >&2; cl_die "building the Go components failed"; }
# shellcheck disable=SC1091
source "$CLUSTER_DIR/tools.env"
if [[ -z ${HOSTPATH_CSI_BIN:-} ]]; then
  (cd "$repo" && cargo build --release --quiet -p hostpath-csi) || cl_die "cargo build --release failed"
  HOSTPATH_CSI_BIN="${CARGO_TARGET_DIR:-$repo/target}/release/hostpath-csi"
fi
export HOSTPATH_CSI_BIN TOOLS_ENV="$CLUSTER_DIR/tools.env"
snapshot_images=()
((SNAPSHOTS)) && snapshot_images=(csi-snapshotter snapshot-controller)
# shellcheck disable=SC2086 # IMAGES is a list of words
"$here/images.sh" pause busybox hostpath-csi csi-provisioner csi-resizer "${snapshot_images[@]}" mariadb ${IMAGES:-} \
  >"$CLUSTER_DIR/images.list" 2>"$CLUSTER_DIR/logs/images.log" ||
  { tail -n 30 "$CLUSTER_DIR/logs/images.log" >&2; cl_die "building the images failed"; }
cl_log "components and images ready after $((SECONDS - t0)) s"

# ------------------------------------------------------------------ PKI
# One CA signs everything: serving certs, client certs, cluster signing.
pki="$CLUSTER_DIR/pki"
cert() { # NAME SUBJECT [SAN]
  openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.csr" 2>/dev/null
  if [[ -n ${3:-} ]]; then
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$3" >"$pki/$1.ext"
  else
    printf 'extendedKeyUsage=clientAuth\n' >"$pki/$1.ext"
  fi
  openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 30 \
    -extfile "$pki/$1.ext" -out "$pki/$1.crt" 2>/dev/null
}
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=hostpath-csi-cluster-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
cert apiserver "/CN=kube-apiserver" "IP:127.0.0.1,IP:$CL_API_SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
cert admin "/O=system:masters/CN=cluster-admin"
cert kcm "/CN=system:kube-controller-manager"
cert scheduler "/CN=system:kube-scheduler"
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
for n in $(seq "$NODES"); do cert "node$n" "/O=system:nodes/CN=system:node:$(cl_node_name "$n")"; done

ETCD_PORT=$(cl_free_port); ETCD_PEER_PORT=$(cl_free_port); API_PORT=$(cl_free_port)
API="https://127.0.0.1:$API_PORT"
kubeconfig() { # FILE CERT-NAME
  "$KUBECTL" config --kubeconfig="$1" set-cluster local --server="$API" \
    --certificate-authority="$pki/ca.crt" --embed-certs >/dev/null
  "$KUBECTL" config --kubeconfig="$1" set-credentials u --client-certificate="$pki/$2.crt" \
    --client-key="$pki/$2.key" --embed-certs >/dev/null
  "$KUBECTL" config --kubeconfig="$1" set-context local --cluster=local --user=u >/dev/null
  "$KUBECTL" config --kubeconfig="$1" use-context local >/dev/null
}
kubeconfig "$CLUSTER_DIR/kubeconfig" admin
kubeconfig "$pki/kcm.kubeconfig" kcm
kubeconfig "$pki/scheduler.kubeconfig" scheduler
for n in $(seq "$NODES"); do kubeconfig "$pki/node$n.kubeconfig" "node$n"; done
export KUBECONFIG="$CLUSTER_DIR/kubeconfig"
k() { "$KUBECTL" "$@"; }

# ------------------------------------------------------------------ cgroups, namespaces
cl_cgroup_make "$CL_CGROUP/daemons"
for n in $(seq "$NODES"); do cl_cgroup_make "$CL_CGROUP/node$n"; done

mkdir -p /var/lib/kubelet /var/lib/hostpath-csi
for n in $(seq 2 "$NODES"); do
  # Node N's mount namespace, kept alive by a bind mount of its nsfs file
  # (which must sit on a private mount).
  nd="$(cl_node_dir "$n")"
  mkdir -p "$nd/kubelet" "$nd/pools"
  if ! mountpoint -q "$CL_STATE"; then
    mount --bind "$CL_STATE" "$CL_STATE"
    mount --make-private "$CL_STATE"
  fi
  touch "$CL_STATE/node$n.mntns"
  unshare --mount="$CL_STATE/node$n.mntns" --propagation private true
  nsenter --mount="$CL_STATE/node$n.mntns" -- sh -ec "
    mount --bind '$nd/kubelet' /var/lib/kubelet
    # Shared now, so the kubelet does not bind it onto itself a second time
    # (containerd would then find the private mount below first).
    mount --make-rshared /var/lib/kubelet
    mount --bind '$nd/pools' /var/lib/hostpath-csi
    mkdir -p '$nd/run-containerd' /run/containerd
    mount --bind '$nd/run-containerd' /run/containerd"
done
# The pools' parent must be a shared mount for deploy/'s HostToContainer
# propagation (this machine's / is private), in every node's namespace.
for n in $(seq "$NODES"); do
  enter=(); ((n > 1)) && enter=(nsenter "--mount=$CL_STATE/node$n.mntns" --)
  # One mount, made shared (containerd checks the first mount it finds at
  # the path, so a shared bind on top of a private one would not do).
  "${enter[@]}" sh -ec 'mountpoint -q /var/lib/hostpath-csi ||
      mount --bind /var/lib/hostpath-csi /var/lib/hostpath-csi
    mount --make-rshared /var/lib/hostpath-csi'
done

# ------------------------------------------------------------------ control plane
cl_log "starting etcd, kube-apiserver ($API), kube-controller-manager, kube-scheduler"
cl_start etcd "$ETCD" --name local --data-dir "$CLUSTER_DIR/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "local=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --log-level warn
cl_wait 60 "etcd" curl -sf "http://127.0.0.1:$ETCD_PORT/health"
cl_start kube-apiserver "$KUBE_APISERVER" \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
  --endpoint-reconciler-type=none \
  --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" \
  --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
  --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
  --service-account-issuer=https://kubernetes.default.svc \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --service-cluster-ip-range="$CL_SERVICE_CIDR" \
  --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
  --allow-privileged=true --profiling=false --v=1
cl_wait 120 "kube-apiserver" k get --raw /readyz
cl_start kube-controller-manager "$KUBE_CONTROLLER_MANAGER" \
  --kubeconfig="$pki/kcm.kubeconfig" \
  --authentication-kubeconfig="$pki/kcm.kubeconfig" --authorization-kubeconfig="$pki/kcm.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$(cl_free_port)" \
  --controllers='*' --use-service-account-credentials=true --leader-elect=false \
  --root-ca-file="$pki/ca.crt" --service-account-private-key-file="$pki/sa.key" \
  --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
  --profiling=false --v=1
cl_start kube-scheduler "$KUBE_SCHEDULER" \
  --kubeconfig="$pki/scheduler.kubeconfig" \
  --authentication-kubeconfig="$pki/scheduler.kubeconfig" --authorization-kubeconfig="$pki/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$(cl_free_port)" --leader-elect=false --profiling=false --v=1
cl_iptables_setup "$API_PORT"

# ------------------------------------------------------------------ nodes
start_node() {
  local n="$1" nd name br
  nd="$(cl_node_dir "$n")"; name="$(cl_node_name "$n")"; br="$(cl_bridge "$n")"
  mkdir -p "$nd/containerd" "$nd/cni" "$nd/cni-data" "$nd/pod-logs" "$nd/kubelet-pki"
  cl_bridge_setup "$n"
  # One bridge per node, host-local addresses from the node's /24. No
  # loopback plugin in the chain, no masquerading (nothing may leave).
  jq -n --arg br "$br" --arg subnet "$(cl_pod_subnet "$n")" --arg data "$nd/cni-data" '{
    cniVersion: "0.4.0", name: "hostpath-csi-cluster",
    plugins: [{type: "bridge", bridge: $br, isGateway: true, ipMasq: false,
               ipam: {type: "host-local", ranges: [[{subnet: $subnet}]],
                      routes: [{dst: "0.0.0.0/0"}], dataDir: $data}}]}' \
    >"$nd/cni/10-bridge.conflist"
  # _default covers every registry where containerd knows it; the common
  # ones are named too.
  local reg
  for reg in _default docker.io registry.k8s.io k8s.gcr.io gcr.io quay.io ghcr.io registry-1.docker.io; do
    mkdir -p "$nd/registry.d/$reg"
    printf 'server = "http://%s"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' \
      "$CL_CLOSED_REGISTRY" "$CL_CLOSED_REGISTRY" >"$nd/registry.d/$reg/hosts.toml"
  done
  cat >"$nd/containerd/config.toml" <<EOF
version = 2
root = "$nd/containerd/root"
state = "$nd/containerd/state"
[grpc]
  address = "$nd/containerd.sock"
[ttrpc]
  address = ""
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10.1"
  # The kubelet asks for oom_score_adj -998; without CAP_SYS_RESOURCE runc
  # then fails every sandbox ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nd/cni"
  [plugins."io.containerd.grpc.v1.cri".registry]
    # Every registry: a closed port on loopback, so a missing image fails
    # at once with its name in the error and nothing leaves the machine.
    config_path = "$nd/registry.d"
EOF
  cl_start "containerd-node$n" --node "$n" containerd --config "$nd/containerd/config.toml"
  cl_wait 60 "containerd of node $n" ctr -a "$nd/containerd.sock" version
  local a
  while read -r a; do
    ctr -a "$nd/containerd.sock" -n k8s.io images import "$a" >/dev/null ||
      cl_die "importing $a into node $n's containerd failed"
  done <"$CLUSTER_DIR/images.list"

  local kport hport
  kport=$(cl_free_port); hport=$(cl_free_port)
  cat >"$nd/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $name
port: $kport
healthzBindAddress: 127.0.0.1
healthzPort: $hport
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: /$CL_CGROUP/node$n
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$nd/containerd.sock
imageServiceEndpoint: unix://$nd/containerd.sock
podLogsDir: $nd/pod-logs
resolvConf: /etc/resolv.conf
# Hand-imported images can never be pulled again: never collect them, and
# never evict for disk pressure on a shared test machine.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "0%", nodefs.available: "0%", nodefs.inodesFree: "0%", imagefs.available: "0%"}
maxPods: 250
serializeImagePulls: false
EOF
  cl_start "kubelet-node$n" --node "$n" "$KUBELET" --config="$nd/kubelet.yaml" \
    --kubeconfig="$pki/node$n.kubeconfig" --cert-dir="$nd/kubelet-pki" \
    --hostname-override="$name" --v=1
}
for n in $(seq "$NODES"); do start_node "$n"; done
node_ready() {
  [[ "$(k get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]
}
for n in $(seq "$NODES"); do
  cl_wait 120 "node $(cl_node_name "$n") Ready" node_ready "$(cl_node_name "$n")" || exit 1
done

# ------------------------------------------------------------------ env and install
{
  echo "# source this file to use the cluster (made by scripts/cluster-up.sh)"
  echo "export KUBECONFIG=$CLUSTER_DIR/kubeconfig"
  echo "export PATH=$(dirname "$KUBECTL"):\$PATH"
  echo "alias kubectl=$KUBECTL"
  echo "KUBECTL=$KUBECTL"
  echo "CLUSTER_DIR=$CLUSTER_DIR"
  echo "CLUSTER_NODES=$NODES"
  echo "API_PORT=$API_PORT"
  for n in $(seq "$NODES"); do
    echo "NODE${n}_NAME=$(cl_node_name "$n")"
    echo "NODE${n}_CONTAINERD=$(cl_node_dir "$n")/containerd.sock"
  done
  sed 's/^/export /' "$CLUSTER_DIR/tools.env"
} >"$CLUSTER_DIR/env"

if ((SNAPSHOTS)); then
  # Cluster-wide and shared by every CSI driver (many distributions ship
  # them): the CRDs, then the controller, labelling each content with its
  # source's node (--enable-distributed-snapshotting).
  cl_log "installing the VolumeSnapshot CRDs and the snapshot controller (deploy/snapshot-controller)"
  { k apply -k "$repo/deploy/snapshot-controller/crds" &&
    k wait --for condition=established --timeout=60s crd/volumesnapshots.snapshot.storage.k8s.io \
      crd/volumesnapshotcontents.snapshot.storage.k8s.io crd/volumesnapshotclasses.snapshot.storage.k8s.io &&
    k apply -k "$repo/deploy/snapshot-controller"; } >"$CLUSTER_DIR/logs/install-snapshots.log" 2>&1 ||
    { cat "$CLUSTER_DIR/logs/install-snapshots.log" >&2; cl_die "installing deploy/snapshot-controller failed"; }
  snapshot_controller_ready() {
    local want got
    want="$(k get deploy -n kube-system snapshot-controller -o jsonpath='{.spec.replicas}')"
    got="$(k get deploy -n kube-system snapshot-controller -o jsonpath='{.status.readyReplicas}')"
    [[ -n $want && $got == "$want" ]]
  }
  cl_wait 120 "the snapshot controller running" snapshot_controller_ready ||
    { k get pods -n kube-system -o wide >&2; k get events -n kube-system >&2; exit 1; }
fi

if [[ $INSTALL == default ]]; then
  INSTALL="$repo/deploy"
  if ((SNAPSHOTS)); then
    # deploy/ plus the snapshots component, as the README tells a user to
    # write it (kustomize wants relative paths).
    INSTALL="$CLUSTER_DIR/install"
    mkdir -p "$INSTALL"
    printf 'resources:\n  - %s\ncomponents:\n  - %s\n' \
      "$(realpath --relative-to="$INSTALL" "$repo/deploy")" \
      "$(realpath --relative-to="$INSTALL" "$repo/deploy/components/snapshots")" >"$INSTALL/kustomization.yaml"
  fi
fi
if [[ $INSTALL != none ]]; then
  cl_log "installing: kubectl apply -k $INSTALL"
  k apply -k "$INSTALL" >"$CLUSTER_DIR/logs/install.log" 2>&1 ||
    { cat "$CLUSTER_DIR/logs/install.log" >&2; cl_die "kubectl apply -k $INSTALL failed"; }
  ds_ready() {
    local s
    s="$(k get ds -n hostpath-csi hostpath-csi-node -o jsonpath='{.status.desiredNumberScheduled} {.status.numberReady}')"
    [[ $s == "$NODES $NODES" ]]
  }
  cl_wait 180 "the node plugin running on every node" ds_ready ||
    { k get pods -A -o wide >&2; k get events -A >&2; exit 1; }
fi

cl_log "cluster up after $((SECONDS - t0)) s"
cat <<EOF
The cluster is up ($NODES node(s): $(for n in $(seq "$NODES"); do printf '%s ' "$(cl_node_name "$n")"; done)).
  source $CLUSTER_DIR/env      # KUBECONFIG and kubectl
  kubectl get pods -A
Images are imported from archives: give your pods imagePullPolicy IfNotPresent
or Never; a missing image fails at once (every registry is a closed port).
Import more with: ctr -a $(cl_node_dir 1)/containerd.sock -n k8s.io images import IMAGE.tar
Tear down with:   scripts/cluster-down.sh
EOF
if ((SNAPSHOTS)); then
  echo "VolumeSnapshots: the CRDs and the snapshot controller (deploy/snapshot-controller) are installed."
fi
