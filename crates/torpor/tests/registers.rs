//! CPU state: ymm0-15, general-purpose and x87 registers, MXCSR, the x87 control word and
//! thread-local storage (fixture `registers.c`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn registers_fixture_passes_without_torpor() {
    assert_passes_standalone("registers", &[]);
}

#[test]
fn registers_fixture_catches_damage() {
    assert_catches_damage("registers", &[], &["ymm", "gpr", "x87", "mxcsr", "fcw", "tls"]);
}

#[test]
fn registers_survive_dump_and_restore() {
    roundtrip("registers", &[]);
}
