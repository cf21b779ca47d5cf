//! Bytes no client library would send: invalid UTF-8 in string fields,
//! wrong wire types, truncated messages. They are malformed arguments
//! (INVALID_ARGUMENT naming the field), never INTERNAL, which a CO would
//! retry forever.

use std::collections::HashMap;

use csi_proto::volume_capability::access_mode::Mode;
use tonic::Code::{self, *};

use crate::case::{Case, Req};
use crate::common::mount_cap;
use crate::fixture::{Fixture, map, s};

const CREATE: &str = "/csi.v1.Controller/CreateVolume";

fn row(name: &str, method: &'static str, bytes: Vec<u8>, code: Code, parts: &[&str]) -> Case {
    Case::new(format!("raw {name}"), Req::Raw(method, bytes), code, parts)
}

/// Field `tag` as length-delimited raw bytes.
fn field(tag: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::bytes::encode(tag, &bytes.to_vec(), &mut out);
    out
}

/// A message field holding another message.
fn message_field(tag: u32, m: &impl prost::Message) -> Vec<u8> {
    field(tag, &m.encode_to_vec())
}

/// A `map<string, string>` field with raw keys and values.
fn raw_map(tag: u32, key: &[u8], value: &[u8]) -> Vec<u8> {
    field(tag, &[field(1, key), field(2, value)].concat())
}

/// A string-map field.
fn map_field(tag: u32, pairs: &HashMap<String, String>) -> Vec<u8> {
    let mut m = Vec::new();
    prost::encoding::hash_map::encode(
        prost::encoding::string::encode,
        prost::encoding::string::encoded_len,
        prost::encoding::string::encode,
        prost::encoding::string::encoded_len,
        tag,
        pairs,
        &mut m,
    );
    m
}

pub fn cases(f: &Fixture) -> Vec<Case> {
    let good_cap = message_field(3, &mount_cap(Mode::SingleNodeWriter));
    let pool_hdd = map_field(4, &map(&[("pool", "hdd")]));
    let create = |name: &[u8]| [field(1, name), good_cap.clone(), pool_hdd.clone()].concat();
    vec![
        row(
            "create: non-UTF-8 name",
            CREATE,
            create(b"\xff\xfe.."),
            InvalidArgument,
            &["name"],
        ),
        row(
            "create: overlong UTF-8 '/'",
            CREATE,
            create(b"\xc0\xaf"),
            InvalidArgument,
            &["name"],
        ),
        row(
            "create: surrogate",
            CREATE,
            create(b"\xed\xa0\x80"),
            InvalidArgument,
            &["name"],
        ),
        row(
            "create: non-UTF-8 parameter",
            CREATE,
            [
                field(1, b"raw"),
                good_cap.clone(),
                raw_map(4, b"pool", b"hdd\xff"),
            ]
            .concat(),
            InvalidArgument,
            &["parameters"],
        ),
        row(
            "create: truncated",
            CREATE,
            vec![0x0a, 0x10, b'a'],
            InvalidArgument,
            &["name"],
        ),
        row(
            "create: varint where a message belongs",
            CREATE,
            vec![0x10; 1].into_iter().chain([0xff; 11]).collect(),
            InvalidArgument,
            &["capacity_range"],
        ),
        row(
            "delete: non-UTF-8 id",
            "/csi.v1.Controller/DeleteVolume",
            field(1, b"hdd:\xff"),
            InvalidArgument,
            &["volume_id"],
        ),
        row(
            "validate: non-UTF-8 id",
            "/csi.v1.Controller/ValidateVolumeCapabilities",
            [
                field(1, b"hdd:\xff"),
                message_field(3, &mount_cap(Mode::SingleNodeWriter)),
            ]
            .concat(),
            InvalidArgument,
            &["volume_id"],
        ),
        row(
            "publish: non-UTF-8 target",
            "/csi.v1.Node/NodePublishVolume",
            [
                field(1, f.alpha.as_bytes()),
                field(4, b"/tmp/\xff\xfe"),
                message_field(5, &mount_cap(Mode::SingleNodeWriter)),
            ]
            .concat(),
            InvalidArgument,
            &["target_path"],
        ),
        row(
            "unpublish: non-UTF-8 target",
            "/csi.v1.Node/NodeUnpublishVolume",
            [field(1, f.alpha.as_bytes()), field(2, b"/tmp/\xff")].concat(),
            InvalidArgument,
            &["target_path"],
        ),
        row(
            "stats: non-UTF-8 path",
            "/csi.v1.Node/NodeGetVolumeStats",
            [
                field(1, f.beta.as_bytes()),
                field(2, &[s(&f.busy).as_bytes(), b"\xff"].concat()),
            ]
            .concat(),
            InvalidArgument,
            &["volume_path"],
        ),
        row(
            "list: non-UTF-8 token",
            "/csi.v1.Controller/ListVolumes",
            field(2, b"\x80"),
            InvalidArgument,
            &["starting_token"],
        ),
        row(
            "list: wrong wire type",
            "/csi.v1.Controller/ListVolumes",
            field(1, b"abc"),
            InvalidArgument,
            &["max_entries"],
        ),
        row(
            "unknown method",
            "/csi.v1.Controller/FormatDisk",
            vec![],
            Unimplemented,
            &[],
        ),
        row(
            "unknown service",
            "/csi.v9.Disk/Format",
            vec![],
            Unimplemented,
            &[],
        ),
    ]
}
