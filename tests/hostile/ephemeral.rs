//! NodePublishVolume of inline ephemeral volumes (volume context
//! `csi.storage.k8s.io/ephemeral: "true"`): attributes that are not a
//! size, a pool or a key the driver knows; pools not opened to them;
//! sizes above the pool's limit; ids of the driver's own form, or of a
//! persistent volume; block access; and targets that must not be mounted
//! on, where the volume made for the call must go again. Pool `ssd` is
//! opened to inline volumes up to [`crate::EPHEMERAL_MAX`]; pool `hdd` is
//! not. Every row fails, so afterwards pool `ssd` must be as it was.

use std::collections::HashMap;

use csi_proto as csi;
use tonic::Code::{self, *};

use crate::case::{Case, Req};
use crate::fixture::{Fixture, block, cap, publish, s};

/// The kubelet's id for one volume of one pod.
const KUBELET_ID: &str = "csi-5c2f0e1b0a4f7d2e8b9c3a6d1e0f4b7a2c5d8e1f3a6b9c0d2e5f8a1b4c7d0e3f";

fn row(name: &str, r: csi::NodePublishVolumeRequest, code: Code, parts: &[&str]) -> Case {
    Case::new(format!("ephemeral: {name}"), Req::Publish(r), code, parts)
}

/// An inline publication of `id` at `target` with these attributes.
fn inline(id: &str, target: &str, attributes: &[(&str, &str)]) -> csi::NodePublishVolumeRequest {
    let mut context: HashMap<String, String> = attributes
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    context.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    context.insert("csi.storage.k8s.io/pod.name".into(), "web".into());
    csi::NodePublishVolumeRequest {
        volume_context: context,
        ..publish(id, target)
    }
}

/// A bad size row.
fn size(f: &Fixture, value: &str) -> Case {
    row(
        &format!("size {value:?}"),
        inline(KUBELET_ID, &f.free, &[("pool", "ssd"), ("size", value)]),
        InvalidArgument,
        &["size", value],
    )
}

/// An inline publication in `ssd` at a target that must be refused.
fn at(name: &str, target: &str, code: Code, parts: &[&str]) -> Case {
    row(
        &format!("target {name}"),
        inline(KUBELET_ID, target, &[("pool", "ssd"), ("size", "1Mi")]),
        code,
        parts,
    )
}

pub fn cases(f: &Fixture) -> Vec<Case> {
    let free = f.free.as_str();
    let mut t = vec![
        row(
            "id of the form pool:name",
            inline("ssd:mine", free, &[("pool", "ssd")]),
            InvalidArgument,
            &["<pool>:<name>", "kubelet"],
        ),
        row(
            "id of a persistent volume",
            inline("beta", free, &[("pool", "ssd")]),
            AlreadyExists,
            &["beta", "persistent"],
        ),
        row(
            "pool not opened to inline volumes",
            inline(KUBELET_ID, free, &[("pool", "hdd"), ("size", "1Mi")]),
            InvalidArgument,
            &["hdd", "ephemeral = true", "ssd"],
        ),
        row(
            "unknown pool",
            inline(KUBELET_ID, free, &[("pool", "nvme")]),
            InvalidArgument,
            &["nvme", "hdd, ssd"],
        ),
        row(
            "pool ../ssd",
            inline(KUBELET_ID, free, &[("pool", "../ssd")]),
            InvalidArgument,
            &["../ssd"],
        ),
        row(
            "above the pool's inline limit",
            inline(KUBELET_ID, free, &[("pool", "ssd"), ("size", "9Gi")]),
            InvalidArgument,
            &["9663676416", "max_ephemeral_volume_size"],
        ),
        row(
            "one byte above the limit",
            inline(
                KUBELET_ID,
                free,
                &[
                    ("pool", "ssd"),
                    ("size", &(crate::EPHEMERAL_MAX + 1).to_string()),
                ],
            ),
            InvalidArgument,
            &["max_ephemeral_volume_size"],
        ),
        row(
            "unknown attribute",
            inline(KUBELET_ID, free, &[("pool", "ssd"), ("sise", "1Mi")]),
            InvalidArgument,
            &["sise", "\"pool\", \"size\""],
        ),
        row(
            "directoryPerms not octal",
            inline(
                KUBELET_ID,
                free,
                &[("pool", "ssd"), ("directoryPerms", "999")],
            ),
            InvalidArgument,
            &["999"],
        ),
        row(
            "StorageClass parameter onDelete",
            inline(
                KUBELET_ID,
                free,
                &[("pool", "ssd"), ("onDelete", "archive")],
            ),
            InvalidArgument,
            &["onDelete"],
        ),
        row(
            "block access",
            csi::NodePublishVolumeRequest {
                volume_capability: Some(cap(1, block())),
                ..inline(KUBELET_ID, free, &[("pool", "ssd")])
            },
            InvalidArgument,
            &["block"],
        ),
    ];
    for value in [
        "lots",
        "1.5Gi",
        "-1",
        "0",
        "",
        "1Gb",
        "99999999999Ti",
        "0x10",
    ] {
        t.push(size(f, value));
    }
    t.extend([
        at(
            "symlink to canary",
            &f.to_canary,
            InvalidArgument,
            &["symlink"],
        ),
        at("symlink to /etc", &f.to_etc, InvalidArgument, &["symlink"]),
        at(
            "inside a pool",
            &s(&f.ssd.join("x")),
            InvalidArgument,
            &["pool"],
        ),
        at(
            "a foreign mount",
            &s(&f.foreign),
            FailedPrecondition,
            &["mount"],
        ),
        at(
            "a non-empty directory",
            &s(&f.nonempty),
            FailedPrecondition,
            &["not empty"],
        ),
        at(
            "a regular file",
            &s(&f.file_target),
            InvalidArgument,
            &["not a directory"],
        ),
        at(
            "another volume's target",
            &s(&f.busy),
            FailedPrecondition,
            &[],
        ),
    ]);
    // NodeUnpublishVolume and NodeGetVolumeStats carry no volume context:
    // an id not of the form <pool>:<name> is looked up as an inline one.
    let busy = s(&f.busy);
    t.extend([
        Case::new(
            "ephemeral: unpublish of an unknown inline id, nothing mounted".to_string(),
            Req::Unpublish(KUBELET_ID.into(), f.free.clone()),
            Ok,
            &[],
        ),
        Case::new(
            "ephemeral: unpublish of an unknown inline id at another volume's target".to_string(),
            Req::Unpublish(KUBELET_ID.into(), busy.clone()),
            NotFound,
            &["does not exist"],
        ),
        Case::new(
            "ephemeral: unpublish of a persistent volume's name at its target".to_string(),
            Req::Unpublish("beta".into(), busy.clone()),
            NotFound,
            &["does not exist"],
        ),
        Case::new(
            "ephemeral: stats of an unknown inline id".to_string(),
            Req::Stats(KUBELET_ID.into(), busy),
            NotFound,
            &["does not exist"],
        ),
    ]);
    t
}
