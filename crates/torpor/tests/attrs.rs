//! Process attributes: pid, session, limits, personality, prctl settings, nice value and
//! credentials (fixture `attrs.c`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn attrs_fixture_passes_without_torpor() {
    assert_passes_standalone("attrs", &[]);
}

#[test]
fn attrs_fixture_catches_damage() {
    assert_catches_damage(
        "attrs",
        &[],
        &["rlimit", "personality", "name", "pdeathsig", "dumpable", "nice", "groups"],
    );
}

#[test]
fn attrs_survive_dump_and_restore() {
    roundtrip("attrs", &[]);
}
