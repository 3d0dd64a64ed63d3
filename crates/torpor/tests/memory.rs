//! Address space: heap, brk, anonymous, shared, read-only, guard, sparse, file-backed,
//! growsdown and stack memory (fixture `memory.c`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn memory_fixture_passes_without_torpor() {
    assert_passes_standalone("memory", &[]);
}

#[test]
fn memory_fixture_catches_damage() {
    assert_catches_damage(
        "memory",
        &[],
        &["heap", "brk", "zero", "guard", "ro", "shared", "filepage", "stack", "grow"],
    );
}

#[test]
fn memory_survives_dump_and_restore() {
    roundtrip("memory", &[]);
}

/// `--no-sync` only skips the syncs: the image must be just as complete, checksummed
/// and restorable (the page cache holds it until writeback).
#[test]
fn memory_survives_dump_without_sync() {
    use common::{stderr_of, torpor, Fixture};
    use std::time::Duration;
    let mut f = Fixture::start("memory", &[]);
    let images = tempfile::TempDir::new().expect("image dir");
    std::thread::sleep(Duration::from_millis(100));
    let out = f.dump(images.path(), &["--no-sync"]);
    assert!(out.status.success(), "dump --no-sync failed: {}", stderr_of(&out));
    f.assert_killed_by_dump();
    let verify = torpor(["verify".as_ref(), "-D".as_ref(), images.path().as_os_str()]);
    assert!(verify.status.success(), "verify after --no-sync: {}", stderr_of(&verify));
    f.restore_and_pass(images.path());
}
