//! A CPython interpreter holding a dict of two million entries (fixture `dict.py`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn python_fixture_passes_without_torpor() {
    assert_passes_standalone("dict", &[]);
}

#[test]
fn python_fixture_catches_damage() {
    assert_catches_damage("dict", &[], &["entry"]);
}

#[test]
fn python_dict_survives_dump_and_restore() {
    roundtrip("dict", &[]);
}
