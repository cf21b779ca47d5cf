//! A real Kubernetes control plane for the orphan tests: etcd,
//! kube-apiserver and kube-controller-manager (three of its controllers:
//! the PersistentVolume binder, which binds claims and marks Retain PVs
//! Released as in a real cluster; claim protection, without which a
//! deleted claim never goes; the ServiceAccount controller, without which
//! no pod is admitted) on loopback, on free ports, in a temporary directory; no
//! kubelet. The binaries come from `tests/e2e/build-tools.sh` (built once
//! into /var/cache/hostpath-csi-e2e); certificates are made with openssl,
//! as `tests/e2e/run.sh` does.
//!
//! Identities: `admin` (system:masters) sets up the objects, `nobody` (a
//! valid certificate, no RBAC rights) is refused, and `sa` is the node
//! plugin's ServiceAccount with `deploy/rbac.yaml` applied: the report and
//! the scan run as `sa`, so the RBAC rules in `deploy/` are the ones
//! tested.
//!
//! Also the driver binary, run as a child process with given flags.
//! Dropping either stops its processes (and the driver's mounts below its
//! directory are taken off by the test).

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The driver's name.
pub const DRIVER: &str = "hostpath-csi.dev";
/// The topology key of the driver's PVs.
pub const TOPOLOGY_KEY: &str = "topology.hostpath-csi.dev/node";

/// A running control plane.
pub struct ControlPlane {
    /// Everything lives here: certificates, etcd's data, logs, kubeconfigs.
    pub dir: TempDir,
    kubectl: PathBuf,
    procs: Vec<(String, Child)>,
    /// The API server's URL.
    pub server: String,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for (_, p) in self.procs.iter_mut().rev() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Kubernetes binaries by variable name (`KUBE_APISERVER`, ...), from
/// build-tools.sh (which waits for a build in progress, or builds them).
/// `None` when they cannot be had (no Go, say): the test then skips, or
/// fails under HOSTPATH_CSI_REQUIRE_TOOLS.
fn tools() -> Option<HashMap<String, PathBuf>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/build-tools.sh");
    let out = Command::new(&script).stderr(Stdio::inherit()).output();
    let ok = matches!(&out, Ok(o) if o.status.success());
    assert!(
        ok || std::env::var_os("HOSTPATH_CSI_REQUIRE_TOOLS").is_none(),
        "{} failed and HOSTPATH_CSI_REQUIRE_TOOLS is set: {out:?}",
        script.display()
    );
    let out = out.ok().filter(|o| o.status.success())?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
            .collect(),
    )
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("bash")
        .arg("-euc")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and the PV binder; `None` (with a note)
    /// where the binaries cannot be had.
    pub fn start() -> Option<ControlPlane> {
        let Some(tools) = tools() else {
            crate::common::skip(
                "the Kubernetes binaries could not be built (tests/e2e/build-tools.sh)",
            );
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("hostpath-csi-orphans.")
            .tempdir()
            .unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("logs")).unwrap();
        // One CA signs the serving cert and every client cert.
        sh(
            d,
            r#"
            openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=orphans-ca -keyout ca.key -out ca.crt 2>/dev/null
            openssl genrsa -out sa.key 2048 2>/dev/null
            openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
            cert() {
              openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
              if [ -n "${3:-}" ]; then printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$3" >"$1.ext"
              else printf 'extendedKeyUsage=clientAuth\n' >"$1.ext"; fi
              openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
            }
            cert apiserver /CN=kube-apiserver IP:127.0.0.1,DNS:localhost
            cert admin /O=system:masters/CN=orphans-admin
            cert nobody /CN=nobody
            "#,
        );
        let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let server = format!("https://127.0.0.1:{api_port}");
        let mut cp = ControlPlane {
            kubectl: tools["KUBECTL"].clone(),
            procs: Vec::new(),
            server: server.clone(),
            dir,
        };
        let d = cp.dir.path().to_path_buf();
        cp.spawn(
            "etcd",
            &tools["ETCD"],
            &[
                "--name=orphans".into(),
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=orphans=http://127.0.0.1:{peer_port}"),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
        );
        let p = |f: &str| d.join(f).display().to_string();
        cp.spawn(
            "kube-apiserver",
            &tools["KUBE_APISERVER"],
            &[
                format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                "--endpoint-reconciler-type=none".into(),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--authorization-mode=RBAC".into(),
                "--profiling=false".into(),
            ],
        );
        cp.kubeconfig(
            "admin",
            &["--client-certificate=admin.crt", "--client-key=admin.key"],
        );
        cp.kubeconfig(
            "nobody",
            &["--client-certificate=nobody.crt", "--client-key=nobody.key"],
        );
        cp.wait_for("kube-apiserver /readyz", Duration::from_secs(180), |cp| {
            cp.try_kubectl("admin", &["get", "--raw", "/readyz"])
                .is_ok()
        });
        cp.spawn(
            "kube-controller-manager",
            &tools["KUBE_CONTROLLER_MANAGER"],
            &[
                format!("--kubeconfig={}", p("admin.kubeconfig")),
                "--controllers=persistentvolume-binder-controller,persistentvolumeclaim-protection-controller,serviceaccount-controller".into(),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free_port()),
                "--profiling=false".into(),
            ],
        );
        // The node plugin's ServiceAccount and its RBAC, from deploy/.
        cp.kubectl("admin", &["create", "namespace", "hostpath-csi"]);
        let rbac = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/rbac.yaml");
        cp.kubectl(
            "admin",
            &[
                "apply",
                "-n",
                "hostpath-csi",
                "-f",
                &rbac.display().to_string(),
            ],
        );
        let token = cp.kubectl(
            "admin",
            &[
                "create",
                "token",
                "hostpath-csi-node",
                "-n",
                "hostpath-csi",
                "--duration=2h",
            ],
        );
        cp.kubeconfig("sa", &[&format!("--token={}", token.trim())]);
        Some(cp)
    }

    fn spawn(&mut self, name: &str, bin: &Path, args: &[String]) {
        let log = std::fs::File::create(self.dir.path().join(format!("logs/{name}.log"))).unwrap();
        let child = Command::new(bin)
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        self.procs.push((name.to_string(), child));
    }

    /// Writes `<user>.kubeconfig` for the API server with these
    /// credentials (kubectl's `set-credentials` flags, paths relative to
    /// the directory).
    fn kubeconfig(&self, user: &str, creds: &[&str]) {
        let f = format!("--kubeconfig={user}.kubeconfig");
        let run = |args: &[&str]| {
            let out = Command::new(&self.kubectl)
                .arg(&f)
                .args(args)
                .current_dir(self.dir.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let server = format!("--server={}", self.server);
        run(&[
            "config",
            "set-cluster",
            "c",
            &server,
            "--certificate-authority=ca.crt",
            "--embed-certs",
        ]);
        let mut set = vec!["config", "set-credentials", "u"];
        set.extend_from_slice(creds);
        if creds.iter().any(|c| c.starts_with("--client-")) {
            set.push("--embed-certs");
        }
        run(&set);
        run(&["config", "set-context", "x", "--cluster=c", "--user=u"]);
        run(&["config", "use-context", "x"]);
    }

    /// The kubeconfig file of `user` (`admin`, `nobody`, `sa`).
    pub fn kubeconfig_of(&self, user: &str) -> PathBuf {
        self.dir.path().join(format!("{user}.kubeconfig"))
    }

    /// Runs kubectl as `user`; its stdout, or its stderr as the error.
    pub fn try_kubectl(&self, user: &str, args: &[&str]) -> Result<String, String> {
        self.try_kubectl_in(user, args, None)
    }

    fn try_kubectl_in(
        &self,
        user: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, String> {
        let mut child = Command::new(&self.kubectl)
            .arg(format!(
                "--kubeconfig={}",
                self.kubeconfig_of(user).display()
            ))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs kubectl as `user`; panics if it fails.
    pub fn kubectl(&self, user: &str, args: &[&str]) -> String {
        self.try_kubectl(user, args)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    }

    /// `kubectl apply -f -` as admin.
    pub fn apply(&self, yaml: &str) {
        self.try_kubectl_in("admin", &["apply", "-f", "-"], Some(yaml))
            .unwrap_or_else(|e| panic!("kubectl apply: {e}\n{yaml}"));
    }

    /// A JSON query (`kubectl get ... -o json`) as admin.
    pub fn get_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.kubectl("admin", &a)).unwrap()
    }

    /// Polls `ok` every 200 ms until it holds; panics after `limit` with
    /// the tail of every log.
    pub fn wait_for(&self, what: &str, limit: Duration, mut ok: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if ok(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "timed out after {limit:?} waiting for {what}\n{}",
            self.logs()
        );
    }

    /// The last lines of every process's log.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.procs {
            let text = std::fs::read_to_string(self.dir.path().join(format!("logs/{name}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("----- {name} -----\n"));
            for l in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// A Node object named `name` (what a kubelet would register).
    pub fn node(&self, name: &str) {
        self.apply(&format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    {TOPOLOGY_KEY}: {name}\n"
        ));
    }

    /// A PV of the driver for `handle`, pinned to `node`, pre-bound to
    /// `claim` (`namespace/name`) when given, with csi-provisioner's
    /// finalizer when `finalizer`.
    pub fn pv(
        &self,
        name: &str,
        handle: &str,
        node: &str,
        claim: Option<&str>,
        policy: &str,
        finalizer: bool,
    ) {
        let claim_ref = claim.map_or(String::new(), |c| {
            let (ns, n) = c.split_once('/').unwrap();
            format!("  claimRef:\n    namespace: {ns}\n    name: {n}\n")
        });
        let finalizers = if finalizer {
            "  finalizers: [external-provisioner.volume.kubernetes.io/finalizer]\n"
        } else {
            ""
        };
        self.apply(&format!(
            "apiVersion: v1
kind: PersistentVolume
metadata:
  name: {name}
{finalizers}spec:
  capacity: {{storage: 1Mi}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: {policy}
  storageClassName: manual
{claim_ref}  csi: {{driver: {DRIVER}, volumeHandle: '{handle}'}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
        - matchExpressions:
            - {{key: {TOPOLOGY_KEY}, operator: In, values: [{node}]}}
"
        ));
    }

    /// A claim `namespace/name` for the PV `volume`.
    pub fn claim(&self, claim: &str, volume: &str) {
        let (ns, n) = claim.split_once('/').unwrap();
        let _ = self.try_kubectl("admin", &["create", "namespace", ns]);
        self.apply(&format!(
            "apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {n}, namespace: {ns}}}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: manual
  volumeName: {volume}
  resources: {{requests: {{storage: 1Mi}}}}
"
        ));
    }

    /// The phase of PV `name` (empty while it has none).
    pub fn pv_phase(&self, name: &str) -> String {
        self.get_json(&["pv", name])["status"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// The driver binary, running with `args`; killed (SIGKILL) when dropped.
pub struct Driver(pub Child);

impl Driver {
    /// Starts `hostpath-csi serve` with `args`, logging to `log`.
    pub fn start(args: &[String], log: &Path) -> Driver {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        Driver(
            Command::new(env!("CARGO_BIN_EXE_hostpath-csi"))
                .arg("serve")
                .args(args)
                .stdout(f.try_clone().unwrap())
                .stderr(f)
                .spawn()
                .unwrap(),
        )
    }

    /// kill -9, and reaped.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `hostpath-csi orphans` with `args`: (exit code, stdout, stderr).
pub fn orphans_cmd(args: &[String]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hostpath-csi"))
        .arg("orphans")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `f` on a current-thread runtime of its own.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A mount capability, single node writer.
pub fn cap() -> csi_proto::VolumeCapability {
    super::common::mount_cap(csi_proto::volume_capability::access_mode::Mode::SingleNodeWriter)
}

/// CreateVolume as csi-provisioner with --extra-create-metadata calls it.
pub fn create(socket: &Path, name: &str, claim: &str, extra: &[(&str, &str)]) -> String {
    let (ns, n) = claim.split_once('/').unwrap();
    let mut params: std::collections::HashMap<String, String> = [
        ("pool", "hdd"),
        ("csi.storage.k8s.io/pv/name", name),
        ("csi.storage.k8s.io/pvc/name", n),
        ("csi.storage.k8s.io/pvc/namespace", ns),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    params.shrink_to_fit();
    block_on(async {
        let ch = csi_proto::connect(socket).await.unwrap();
        let mut c = csi_proto::controller_client::ControllerClient::new(ch);
        c.create_volume(csi_proto::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi_proto::CapacityRange {
                required_bytes: 1 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap()],
            parameters: params,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
    })
}
