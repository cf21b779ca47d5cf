//! Retried calls racing the driver's startup sweep of leftovers (see
//! `retried_calls_do_not_race_the_startup_sweep`).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use csi_proto as csi;
use csi_proto::controller_client::ControllerClient;
use csi_proto::volume_capability::access_mode::Mode;
use tonic::{Code, Status};

use crate::MIB;
use crate::common::mount_cap;
use crate::robust_support::{self, Driver, PoolSpec, Workdir, pool_dir};

/// Calls `call` until it succeeds (50 tries, 10 ms apart), recording in
/// `errors` every failure other than ABORTED ("busy, retry") and a call
/// that never succeeded.
pub async fn retry_as_a_co<T, Fut>(
    errors: &Mutex<Vec<String>>,
    what: &str,
    mut call: impl FnMut() -> Fut,
) where
    Fut: Future<Output = Result<T, Status>>,
{
    for _ in 0..50 {
        match call().await {
            Ok(_) => return,
            Err(s) if s.code() == Code::Aborted => {}
            Err(s) => {
                errors
                    .lock()
                    .unwrap()
                    .push(format!("{what}: {:?}: {}", s.code(), s.message()))
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    errors
        .lock()
        .unwrap()
        .push(format!("{what}: never succeeded in 50 tries"));
}

/// One restart over a pool full of leftovers; returns the failures.
pub async fn sweep_scenario() -> Vec<String> {
    use hostpath_csi::config::PoolKind;
    use hostpath_csi::volume::record::Record;

    const N: usize = 120;
    let work = Workdir::new("hostpath-csi-sweep");
    let root = work.path().to_path_buf();
    let pools = [PoolSpec::dir("a"), PoolSpec::dir("b")];
    let pool = pool_dir(&root, "a");
    std::fs::create_dir_all(&pool).unwrap();
    for i in 0..N {
        // An interrupted delete: record kept, data parked, with enough
        // files that removing them takes a moment.
        let name = format!("parked-{i}");
        let record = Record {
            name: name.clone(),
            kind: PoolKind::Dir,
            capacity_bytes: MIB as u64,
            parameters: BTreeMap::from([("pool".to_string(), "a".to_string())]),
            created_unix: 0,
            content_source: None,
            access: Default::default(),
            root: Default::default(),
            ephemeral: None,
        };
        std::fs::write(
            pool.join(format!(".{name}.meta")),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
        let parked = pool.join(format!(".{name}.deleting"));
        std::fs::create_dir_all(parked.join("sub")).unwrap();
        for f in 0..40 {
            std::fs::write(parked.join("sub").join(f.to_string()), b"x").unwrap();
        }
        // An interrupted create: the record was being written.
        std::fs::write(pool.join(format!(".fresh-{i}.meta.tmp")), b"{\"na").unwrap();
    }

    let mut driver = Driver::spawn(&root, &pools);
    driver.wait_ready(Duration::from_secs(20)).await;
    let socket = driver.socket.clone();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let socket = socket.clone();
        let errors = Arc::clone(&errors);
        tasks.push(tokio::spawn(async move {
            let c = ControllerClient::new(robust_support::connect_once(&socket).await.unwrap());
            for i in (t..N).step_by(8) {
                let del = csi::DeleteVolumeRequest {
                    volume_id: format!("a:parked-{i}"),
                    secrets: Default::default(),
                };
                let create = csi::CreateVolumeRequest {
                    name: format!("fresh-{i}"),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: MIB,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
                    parameters: HashMap::from([("pool".to_string(), "a".to_string())]),
                    ..Default::default()
                };
                // As a CO would: retry until it works, but note every
                // failure that is not "busy, retry".
                let what = format!("delete {i}");
                retry_as_a_co(&errors, &what, || {
                    let (mut c, del) = (c.clone(), del.clone());
                    async move { c.delete_volume(del).await }
                })
                .await;
                let what = format!("create {i}");
                retry_as_a_co(&errors, &what, || {
                    let (mut c, create) = (c.clone(), create.clone());
                    async move { c.create_volume(create).await }
                })
                .await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    let mut left: Vec<String> = std::fs::read_dir(&pool)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    // Exactly the fresh volumes and their records: every parked volume
    // and every half-written record gone.
    let mut want: Vec<String> = (0..N)
        .flat_map(|i| [format!("fresh-{i}"), format!(".fresh-{i}.meta")])
        .collect();
    want.sort();
    assert_eq!(left, want, "the pool after the retried calls");
    driver.kill();
    errors
}
