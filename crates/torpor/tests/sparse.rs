//! A process that reserves terabytes of address space and touches a few pages of it, as
//! MariaDB does (8 TiB): dump read the page map entry of every page of every mapping, 8
//! bytes a page, and kept MariaDB frozen for 13 s; it now asks the kernel for the
//! populated parts only (fixture `sparse.c`, 33 TiB mapped).

mod common;

use std::time::{Duration, Instant};

use common::{assert_catches_damage, assert_passes_standalone, Fixture};
use tempfile::TempDir;

/// Far above what a dump of a few pages takes, far below what reading the page map of
/// 33 TiB takes (about a minute here).
const LIMIT: Duration = Duration::from_secs(10);

#[test]
fn sparse_fixture_passes_without_torpor() {
    assert_passes_standalone("sparse", &[]);
}

#[test]
fn sparse_fixture_catches_damage() {
    assert_catches_damage("sparse", &[], &["middle"]);
}

#[test]
fn a_few_pages_in_terabytes_of_mappings_are_saved_quickly() {
    let mut f = Fixture::start("sparse", &[]);
    std::thread::sleep(Duration::from_millis(100));
    let images = TempDir::new().expect("image dir");
    let t = Instant::now();
    f.dump_ok(images.path());
    let took = t.elapsed();
    assert!(took < LIMIT, "the dump took {took:?}, more than {LIMIT:?}");
    f.restore_and_pass(images.path());
}
