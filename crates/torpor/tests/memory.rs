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
