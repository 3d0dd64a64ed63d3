//! Signal dispositions, blocked mask, alternate stack and pending signals, including
//! queued real-time ones (fixture `signals.c`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn signals_fixture_passes_without_torpor() {
    assert_passes_standalone("signals", &[]);
}

#[test]
fn signals_fixture_catches_damage() {
    assert_catches_damage("signals", &[], &["action", "mask", "altstack", "lost", "order"]);
}

#[test]
fn signals_survive_dump_and_restore() {
    roundtrip("signals", &[]);
}
