//! Seccomp filters: a process running under filters (beyond those torpor itself runs
//! under) wakes under the same filters, in every thread; woken without them it would run
//! with its sandbox silently lifted (fixture `seccomp.c`).

mod common;

use common::{assert_passes_standalone, roundtrip, stderr_of, torpor, Fixture};
use tempfile::TempDir;

#[test]
fn seccomp_fixture_passes_without_torpor() {
    assert_passes_standalone("seccomp", &[]);
}

#[test]
fn a_process_under_seccomp_filters_wakes_under_them() {
    roundtrip("seccomp", &[]);
}

#[test]
fn the_image_holds_the_filters_in_order_with_their_flags() {
    let mut f = Fixture::start("seccomp", &[]);
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());
    let out = torpor(["inspect".as_ref(), "--json".as_ref(), images.path().as_os_str()]);
    assert!(out.status.success(), "inspect: {}", stderr_of(&out));
    let tree: serde_json::Value =
        serde_json::from_slice(&std::fs::read(images.path().join("tree.json")).expect("tree"))
            .expect("tree.json");
    let filters = tree["processes"][0]["seccomp"].as_array().expect("seccomp filters saved");
    assert_eq!(filters.len(), 2, "{filters:?}");
    assert_eq!(filters[0]["log"], false, "the first filter has no flag: {filters:?}");
    assert_eq!(filters[1]["log"], true, "the second was installed with LOG: {filters:?}");
    // Four instructions of eight bytes each, in hex.
    assert!(filters.iter().all(|f| f["code"].as_str().map(str::len) == Some(64)), "{filters:?}");
    f.restore_and_pass(images.path());
}
