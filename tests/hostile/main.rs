//! Hostile input: for every CSI call, a table of bad requests, each row
//! with the status code the CSI spec asks for and the words the message
//! must contain (a sentence a person can act on names the offending field
//! or value). Afterwards nothing outside the pools and targets may have
//! changed, nothing may be mounted on the canary directories that
//! symlinked targets pointed at, and the pools hold only what the rows that
//! succeed made.
//!
//! # Layout
//! - `case.rs`: a row ([`case::Case`]), the request it sends, and the one
//!   runner that sends a table and compares the answers;
//! - `fixture.rs`: what every table runs against (two volumes, one of
//!   them published, a canary tree, symlinks and odd targets, a foreign
//!   mount), the request builders the rows use, and the checks afterwards;
//! - one module per call or group of calls, each a `cases(&Fixture)`
//!   table: `create`, `delete`, `validate`, `list`, `capacity`,
//!   `snapshot`, `group_snapshot`,
//!   `not_offered` (calls this driver does not offer), `publish`,
//!   `ephemeral` (inline ephemeral volumes: attributes, pools, sizes),
//!   `unpublish`, `stats`, `node_expand`, `health` (the CSI 1.13 health
//!   calls), and `undecodable` (bytes no client library would send).
//!
//! Each table is its own test against its own in-process server (the test
//! harness in `tests/common`), so a failure names its call, and one
//! table's successes (volumes made for path-like names) cannot change what
//! another table sees. Mounting the fixture's foreign tmpfs and publishing
//! need root: run as a normal user, each test says so and skips (under the
//! README's test command, which sets `HOSTPATH_CSI_REQUIRE_TOOLS`, it
//! fails instead).

#[path = "../common/mod.rs"]
mod common;
#[path = "../robust_support/mod.rs"]
mod robust_support;

mod capacity;
mod case;
mod create;
mod delete;
mod ephemeral;
mod fixture;
mod group_snapshot;
mod health;
mod list;
mod node_expand;
mod not_offered;
mod publish;
mod snapshot;
mod stats;
mod undecodable;
mod unpublish;
mod validate;

use case::Case;
use fixture::Fixture;
use hostpath_csi::config::{ByteSize, PoolConfig};

/// The largest inline ephemeral volume of pool `ssd`, the one pool of the
/// fixture opened to them (the `ephemeral` table).
pub const EPHEMERAL_MAX: u64 = 64 << 20;

/// The fixture's driver: the harness's two dir pools, `hdd` and `ssd`,
/// with `ssd` opened to inline ephemeral volumes.
async fn harness() -> common::Harness {
    let root = tempfile::Builder::new()
        .prefix("hostpath-csi-test")
        .tempdir()
        .unwrap();
    let dir = |name: &str| root.path().join("pools").join(name);
    let pools = vec![
        PoolConfig::dir("hdd", dir("hdd")),
        PoolConfig {
            ephemeral: true,
            max_ephemeral_volume_size: Some(ByteSize(EPHEMERAL_MAX)),
            ..PoolConfig::dir("ssd", dir("ssd"))
        },
    ];
    common::Harness::with_pool_configs(root, pools).await
}

/// Runs one table against a fresh driver and fixture, then checks that
/// nothing outside the pools and targets changed; panics with every row
/// that did not go as the table says.
async fn hostile(table: &str, cases: fn(&Fixture) -> Vec<Case>) {
    if !common::root_or_skip("the fixture mounts a tmpfs and publishes a volume") {
        return;
    }
    let h = harness().await;
    let f = Fixture::new(&h);
    f.make(&h).await;
    let before = f.snapshot();
    let rows = cases(&f);
    let failures = case::run_table(&h, &rows).await;
    eprintln!(
        "hostile {table}: {} rows, {} failed",
        rows.len(),
        failures.len()
    );
    f.check_untouched(&h, &before, &rows).await;
    f.clean_up(&h).await;
    assert!(
        failures.is_empty(),
        "{table}: {} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume() {
    hostile("CreateVolume", create::cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_volume() {
    hostile("DeleteVolume", delete::cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_volume_capabilities() {
    hostile("ValidateVolumeCapabilities", validate::cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_volumes() {
    hostile("ListVolumes", list::cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_capacity() {
    hostile("GetCapacity", capacity::cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_not_offered() {
    hostile("calls not offered", not_offered::cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots() {
    hostile("snapshots", snapshot::cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_snapshots() {
    hostile("group snapshots", group_snapshot::cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publish_volume() {
    hostile("NodePublishVolume", publish::cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publish_inline_ephemeral_volume() {
    hostile("NodePublishVolume (inline ephemeral)", ephemeral::cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_unpublish_volume() {
    hostile("NodeUnpublishVolume", unpublish::cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_get_volume_stats() {
    hostile("NodeGetVolumeStats", stats::cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_expand_volume() {
    hostile("NodeExpandVolume", node_expand::cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_and_storage_health() {
    hostile("volume and storage health", health::cases).await;
}

/// Requests that cannot be decoded (invalid UTF-8 in a string field, wrong
/// wire types, truncated messages) are malformed arguments: the CSI answer
/// is INVALID_ARGUMENT, naming the field. INTERNAL would tell the CO the
/// plugin is broken, and it would retry the same bytes forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests() {
    hostile("undecodable", undecodable::cases).await;
}

/// The tables together keep at least as many rows and bad requests as the
/// tests they replaced (`tests/robust_hostile.rs`: 184 rows, 161 of them
/// bad requests), so rows cannot quietly go missing; row names are unique,
/// so a failure points at one row.
#[test]
fn the_tables_keep_their_rows() {
    let f = Fixture::unmade(std::path::Path::new("/nonexistent"));
    let tables: [fn(&Fixture) -> Vec<Case>; 14] = [
        create::cases,
        delete::cases,
        validate::cases,
        list::cases,
        capacity::cases,
        not_offered::cases,
        publish::cases,
        unpublish::cases,
        stats::cases,
        node_expand::cases,
        undecodable::cases,
        snapshot::cases,
        ephemeral::cases,
        health::cases,
    ];
    let rows: Vec<Case> = tables.iter().flat_map(|t| t(&f)).collect();
    let bad = rows
        .iter()
        .filter(|c| c.want_code != tonic::Code::Ok)
        .count();
    eprintln!("hostile tables: {} rows, {bad} bad requests", rows.len());
    assert!(rows.len() >= 184, "only {} rows", rows.len());
    assert!(bad >= 161, "only {bad} bad requests");
    let mut names: Vec<&str> = rows.iter().map(|c| c.name.as_str()).collect();
    names.sort();
    let dup = names.windows(2).find(|w| w[0] == w[1]);
    assert!(dup.is_none(), "two rows named {:?}", dup.map(|w| w[0]));
}
