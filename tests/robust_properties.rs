//! Property tests of request validation and id parsing, through the
//! library's public API: whatever a CO sends, names map to safe tokens,
//! ids roundtrip, and no path with `..` or without a root gets through.
//!
//! Case counts stay small by default (256, proptest's own default) so CI
//! is quick; set `PROPTEST_CASES` to search harder.

use std::path::{Component, Path};

use csi_proto as csi;
use hostpath_csi::validate;
use hostpath_csi::volume::id::{
    MAX_POOL_LEN, MAX_TOKEN_LEN, VolumeId, token_for_name, valid_token,
};
use proptest::prelude::*;

/// The shapes a token must never take, whatever produced it.
fn assert_safe_token(t: &str) {
    assert!(valid_token(t), "{t:?} is not a valid token");
    assert!(!t.is_empty() && t.len() <= MAX_TOKEN_LEN, "{t:?}");
    assert!(!t.contains('/'), "{t:?} contains a slash");
    assert!(!t.contains('\0'), "{t:?} contains NUL");
    assert!(!t.starts_with('.'), "{t:?} starts with a dot");
    assert!(t != ".." && t != ".", "{t:?}");
}

/// Names as a CO might send them: any Unicode, path-like pieces, and
/// Kubernetes-style names, mixed so that each kind gets its share.
fn any_name() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z0-9./_-]{0,120}",
        "(\\.\\./|/|\\./|sha256-|[a-zA-Z0-9]{1,8}|\\x00|é){0,12}",
        "pvc-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        ".{90,200}",
    ]
}

/// Pool names the configuration accepts.
fn pool_name() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,29}[a-z0-9])?"
}

proptest! {
    #[test]
    fn every_name_maps_to_one_safe_token(name in any_name()) {
        let t = token_for_name(&name);
        assert_safe_token(&t);
        prop_assert_eq!(&t, &token_for_name(&name), "not deterministic");
        // Plain names stay readable; anything else is hashed.
        if valid_token(&name) && !name.starts_with("sha256-") {
            prop_assert_eq!(&t, &name);
        } else {
            prop_assert!(t.starts_with("sha256-"), "{:?} -> {:?}", name, t);
        }
    }

    #[test]
    fn distinct_names_get_distinct_tokens(a in any_name(), b in any_name()) {
        prop_assume!(a != b);
        prop_assert_ne!(token_for_name(&a), token_for_name(&b), "{:?} and {:?} collide", a, b);
    }

    #[test]
    fn ids_roundtrip_through_their_text(pool in pool_name(), name in any_name()) {
        prop_assume!(pool.len() <= MAX_POOL_LEN);
        let id = VolumeId::for_name(&pool, &name);
        let text = id.to_string();
        // CSI allows ids of at most 128 bytes.
        prop_assert!(text.len() <= 128, "{} is {} bytes", text, text.len());
        let parsed = VolumeId::parse(&text);
        prop_assert_eq!(parsed.as_ref(), Some(&id));
        assert_safe_token(parsed.unwrap().token());
    }

    #[test]
    fn whatever_parses_is_safe_and_canonical(raw in prop_oneof![
        any::<String>(),
        "[a-z0-9:./_-]{0,40}",
        "(hdd|ssd|\\.\\.|/etc|x|:|/|\\.|\\x00|-){0,8}",
    ]) {
        if let Some(id) = VolumeId::parse(&raw) {
            assert_safe_token(id.token());
            prop_assert!(!id.pool().is_empty() && !id.pool().contains('/') && !id.pool().contains('.'));
            // An id is its own canonical text: no two spellings name one volume.
            prop_assert_eq!(id.to_string(), raw);
        }
    }

    #[test]
    fn forged_ids_never_parse(
        pool in pool_name(),
        evil in prop_oneof![
            Just("..".to_string()),
            Just(".".to_string()),
            "\\.[a-z0-9.]{0,20}",
            "[a-z0-9]{0,5}/[a-z0-9./]{0,20}",
            "/[a-z/]{0,20}",
            "[a-z]{1,5}\\x00[a-z]{0,5}",
            "(\\.\\./){1,4}[a-z]{0,8}",
        ],
    ) {
        prop_assert_eq!(VolumeId::parse(&format!("{pool}:{evil}")), None);
        prop_assert_eq!(VolumeId::parse(&format!("{evil}:tok")), None);
    }

    #[test]
    fn node_path_accepts_only_clean_absolute_paths(path in prop_oneof![
        any::<String>(),
        "(/|\\.\\.|\\.|[a-z]{1,6}|\\x00){0,10}",
        "/[a-z0-9/._-]{0,60}",
    ]) {
        match validate::node_path(&path, "target_path") {
            Ok(p) => {
                prop_assert!(p.is_absolute(), "{:?} -> {:?}", path, p);
                prop_assert!(p.as_path() != Path::new("/"), "{:?} accepted as root", path);
                prop_assert!(!path.contains('\0'));
                prop_assert!(!path.split('/').any(|c| c == ".." || c == "."), "{:?} accepted", path);
                for c in p.components() {
                    prop_assert!(
                        matches!(c, Component::RootDir | Component::Normal(_)),
                        "{:?} kept component {:?}", path, c
                    );
                }
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains("target_path"), "message does not name the field: {}", msg);
            }
        }
    }

    /// The other half: a validator that refused everything would pass the
    /// property above, so clean absolute paths must be accepted as given.
    #[test]
    fn node_path_accepts_clean_absolute_paths(path in "(/[a-z0-9_-]{1,8}){1,6}") {
        let p = validate::node_path(&path, "target_path");
        prop_assert_eq!(p.ok().map(|p| p.to_path_buf()), Some(std::path::PathBuf::from(&path)));
    }

    /// Ids built from valid parts parse, so `whatever_parses...` above does
    /// not pass by parsing nothing.
    #[test]
    fn well_formed_ids_parse(pool in pool_name(), token in "[a-z0-9][a-z0-9._-]{0,40}") {
        let raw = format!("{pool}:{token}");
        let id = VolumeId::parse(&raw);
        prop_assert!(id.is_some(), "{} did not parse", raw);
        prop_assert_eq!(id.unwrap().to_string(), raw);
    }

    #[test]
    fn node_path_refuses_dot_dot_and_relative_paths(
        head in "(/[a-z]{1,5}){0,3}",
        dots in prop_oneof![Just(".."), Just(".")],
        tail in "(/[a-z]{1,5}){0,3}/?",
        rel in "[a-z.][a-z./]{0,20}",
    ) {
        let p = format!("{head}/{dots}{tail}");
        prop_assert!(validate::node_path(&p, "target_path").is_err(), "{:?} accepted", p);
        prop_assert!(validate::node_path(&rel, "target_path").is_err(), "{:?} accepted", rel);
    }

    #[test]
    fn volume_names_are_checked_for_size_and_nul(name in prop_oneof![
        any::<String>(),
        "[a-z]{1000,1100}",
        "[a-z]{0,3}\\x00[a-z]{0,3}",
    ]) {
        let ok = validate::volume_name(&name).is_ok();
        let expect = !name.is_empty() && name.len() <= validate::MAX_NAME_LEN && !name.contains('\0');
        prop_assert_eq!(ok, expect, "{:?}", name);
        if let Err(e) = validate::volume_name(&name) {
            prop_assert!(e.to_string().contains("name"), "{}", e);
        }
    }

    #[test]
    fn capacity_ranges_are_accepted_exactly_when_sane(required in any::<i64>(), limit in any::<i64>()) {
        let r = validate::capacity_range(Some(&csi::CapacityRange { required_bytes: required, limit_bytes: limit }));
        let sane = required >= 0 && limit >= 0 && (limit == 0 || required <= limit);
        prop_assert_eq!(r.is_ok(), sane, "{} {}", required, limit);
        match r {
            Ok(range) => {
                prop_assert!(range.contains(range.required));
                if limit > 0 {
                    prop_assert!(!range.contains(limit as u64 + 1));
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("capacity_range"), "{}", e),
        }
    }

    #[test]
    fn only_bind_mount_flags_are_accepted(flags in proptest::collection::vec(
        prop_oneof!["(ro|rw|nosuid|nodev|noexec|noatime|defaults|bind|rbind|relatime)(,(ro|nodev))?", "[a-z=,]{1,12}"],
        0..4,
    )) {
        const KNOWN: &[&str] = &["ro", "rw", "nosuid", "nodev", "noexec", "noatime", "defaults", "bind", "rbind", "relatime"];
        let all_known = flags
            .iter()
            .flat_map(|f| f.split(','))
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .all(|o| KNOWN.contains(&o));
        match validate::mount_flags(&flags) {
            Ok(f) => {
                prop_assert!(all_known, "{:?} accepted", flags);
                prop_assert_eq!(f.read_only, flags.iter().flat_map(|f| f.split(',')).any(|o| o.trim() == "ro"));
            }
            Err(e) => {
                prop_assert!(!all_known, "{:?} refused: {}", flags, e);
                prop_assert!(e.to_string().contains("mount flag"), "{}", e);
            }
        }
    }

    #[test]
    fn unknown_access_modes_are_refused(mode in any::<i32>()) {
        let cap = csi::VolumeCapability {
            access_mode: Some(csi::volume_capability::AccessMode { mode }),
            access_type: Some(csi::volume_capability::AccessType::Mount(Default::default())),
        };
        let known = (1..=7).contains(&mode);
        match validate::capability(&cap) {
            Ok(_) => prop_assert!(known, "mode {} accepted", mode),
            Err(e) => {
                prop_assert!(!known, "mode {} refused: {}", mode, e);
                prop_assert!(e.to_string().contains(&mode.to_string()), "{}", e);
            }
        }
    }
}
