//! Shared memory whose pages no page table of the dumped process holds: a child that has
//! exited filled them (fixture `shmem_orphan.c`). The memory object, not the process's
//! page map, says what it holds.

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn shmem_orphan_fixture_passes_without_torpor() {
    assert_passes_standalone("shmem_orphan", &[]);
}

#[test]
fn shmem_orphan_fixture_catches_damage() {
    assert_catches_damage("shmem_orphan", &[], &["pattern"]);
}

#[test]
fn shared_memory_filled_by_a_process_gone_comes_back_whole() {
    roundtrip("shmem_orphan", &[]);
}
