//! GetCapacity: unknown pools and malformed capabilities are
//! INVALID_ARGUMENT; capabilities the driver cannot serve and topology of
//! another node are answered with 0, not an error.

use std::collections::HashMap;

use csi_proto as csi;
use tonic::Code::{self, *};

use crate::case::{Case, Req};
use crate::fixture::{Fixture, block, cap, capacity, mount, mount_flags};

fn row(name: &str, r: csi::GetCapacityRequest, code: Code, parts: &[&str]) -> Case {
    Case::new(format!("capacity: {name}"), Req::Capacity(r), code, parts)
}

pub fn cases(_: &Fixture) -> Vec<Case> {
    let hdd = &[("pool", "hdd")];
    vec![
        row(
            "unknown pool",
            capacity(&[("pool", "nvme")], vec![]),
            InvalidArgument,
            &["nvme", "pool"],
        ),
        row(
            "pool ..",
            capacity(&[("pool", "..")], vec![]),
            InvalidArgument,
            &["pool"],
        ),
        row(
            "pool hdd/../ssd",
            capacity(&[("pool", "hdd/../ssd")], vec![]),
            InvalidArgument,
            &["pool", "hdd", "ssd"],
        ),
        row(
            "unknown mode",
            capacity(hdd, vec![cap(77, mount())]),
            InvalidArgument,
            &["77"],
        ),
        row(
            "no access type",
            capacity(hdd, vec![cap(1, None)]),
            InvalidArgument,
            &["access_type"],
        ),
        row(
            "no access mode",
            capacity(
                hdd,
                vec![csi::VolumeCapability {
                    access_mode: None,
                    access_type: mount(),
                }],
            ),
            InvalidArgument,
            &["access_mode"],
        ),
        row(
            "mount flag suid",
            capacity(hdd, vec![cap(1, mount_flags(&["suid"]))]),
            InvalidArgument,
            &["suid"],
        ),
        row(
            "multi-node is 0",
            capacity(hdd, vec![cap(5, mount())]),
            Ok,
            &[],
        ),
        row(
            "block is served",
            capacity(hdd, vec![cap(1, block())]),
            Ok,
            &[],
        ),
        row(
            "another node is 0",
            csi::GetCapacityRequest {
                accessible_topology: Some(csi::Topology {
                    segments: HashMap::from([(
                        "topology.hostpath-csi.dev/node".into(),
                        "other".into(),
                    )]),
                }),
                ..capacity(hdd, vec![])
            },
            Ok,
            &[],
        ),
    ]
}
