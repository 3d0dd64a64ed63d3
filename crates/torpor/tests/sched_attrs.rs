//! Where and how a process runs: child subreaper, transparent huge pages off, OOM score
//! adjustment, and per thread CPU affinity, I/O priority and timer slack (fixture
//! `sched_attrs.c`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn sched_attrs_fixture_passes_without_torpor() {
    assert_passes_standalone("sched_attrs", &[]);
}

#[test]
fn sched_attrs_fixture_catches_damage() {
    assert_catches_damage(
        "sched_attrs",
        &[],
        &["subreaper", "thp", "oom", "affinity", "ioprio", "slack"],
    );
}

#[test]
fn sched_attrs_survive_dump_and_restore() {
    roundtrip("sched_attrs", &[]);
}
