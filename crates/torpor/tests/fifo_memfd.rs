//! A named pipe holding unread data and a sealed memfd mapped shared (fixture
//! `fifo_memfd.c`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn fifo_memfd_fixture_passes_without_torpor() {
    assert_passes_standalone("fifo_memfd", &[]);
}

#[test]
fn fifo_memfd_fixture_catches_damage() {
    assert_catches_damage("fifo_memfd", &[], &["fifo", "memfd", "seals"]);
}

#[test]
fn a_fifo_keeps_its_unread_data_and_a_memfd_its_content_mapping_name_and_seals() {
    roundtrip("fifo_memfd", &[]);
}
