//! Interval timers and POSIX timers (fixture `timers.c`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn timers_fixture_passes_without_torpor() {
    assert_passes_standalone("timers", &[]);
}

#[test]
fn timers_fixture_catches_damage() {
    assert_catches_damage("timers", &[], &["real", "virtual", "posix", "none", "handler"]);
}

#[test]
fn timers_survive_dump_and_restore() {
    roundtrip("timers", &[]);
}
