//! A POSIX shared memory object, open and mapped twice (fixture `posix_shm.c`).

mod common;

use std::fs;
use std::path::PathBuf;
use std::thread::sleep;
use std::time::Duration;

use common::{assert_catches_damage, assert_passes_standalone, Fixture};
use tempfile::TempDir;

#[test]
fn posix_shm_fixture_passes_without_torpor() {
    assert_passes_standalone("posix_shm", &[]);
}

#[test]
fn posix_shm_fixture_catches_damage() {
    assert_catches_damage("posix_shm", &[], &["pattern"]);
}

/// Unlinks the fixture's object on drop, for when the fixture does not get to.
struct Unlink(PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn a_posix_shm_object_mapped_twice_stays_one_object_with_its_content() {
    let mut f = Fixture::start("posix_shm", &[]);
    let name = f.ready_value("name");
    assert_eq!(name, format!("/torpor-fixture-{}", f.pid));
    let path = PathBuf::from(format!("/dev/shm{name}"));
    let _unlink = Unlink(path.clone());
    assert!(path.exists(), "{} does not exist", path.display());

    let images = TempDir::new().expect("image dir");
    sleep(Duration::from_millis(100));
    f.dump_ok(images.path());
    f.restore_and_pass(images.path());
    assert!(!path.exists(), "{} is still there after the fixture unlinked it", path.display());
}
