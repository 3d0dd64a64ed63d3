//! A process whose working directory was removed under it wakes in a removed directory
//! again: restore enters a new empty one and removes it. The image used to name a path
//! that no longer existed, so the restore failed after the dump had ended the process
//! (fixture `deleted_cwd.c`).

mod common;

use std::time::{Duration, Instant};

use common::{
    assert_catches_damage, assert_passes_standalone, stderr_of, wait_pid_gone, Fixture, Restore,
    FINISH_TIMEOUT,
};
use tempfile::TempDir;

#[test]
fn deleted_cwd_fixture_passes_without_torpor() {
    assert_passes_standalone("deleted_cwd", &["same"]);
    assert_passes_standalone("deleted_cwd", &["parent"]);
}

#[test]
fn deleted_cwd_fixture_catches_damage() {
    assert_catches_damage("deleted_cwd", &["same"], &["enter"]);
}

#[test]
fn a_removed_working_directory_whose_parent_is_gone_too_is_removed_again() {
    let mut f = Fixture::start("deleted_cwd", &["parent"]);
    std::thread::sleep(Duration::from_millis(100));
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());
    f.restore_and_pass(images.path());
    // Its old parent is gone, so restore made the stand-in in the temporary directory.
    let stand_in = std::env::temp_dir().join(format!("torpor-cwd-{}", f.pid));
    assert!(!stand_in.exists(), "{} was left behind by the restore", stand_in.display());
    assert!(!f.path("up").exists(), "restore made the removed parent again");
}

#[test]
fn a_removed_working_directory_survives_two_hibernations() {
    let mut f = Fixture::start("deleted_cwd", &["same"]);
    std::thread::sleep(Duration::from_millis(100));
    let first = TempDir::new().expect("image dir");
    f.dump_ok(first.path());

    let mut restore = Restore::spawn(first.path(), &[]);
    restore.wait_for_process(&f);
    // Once woken, it works in a removed directory of the same name, and the one restore
    // made for it is gone.
    let gone = f.path("gone");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cwd = std::fs::read_link(format!("/proc/{}/cwd", f.pid)).expect("read the cwd");
        if cwd.to_string_lossy().ends_with("/gone (deleted)") && !gone.exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the woken process works in {} (the stand-in exists: {})",
            cwd.display(),
            gone.exists()
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // The woken process, in the directory restore made and removed, hibernates again.
    let second = TempDir::new().expect("image dir");
    let out = f.dump(second.path(), &[]);
    assert!(out.status.success(), "second dump failed: {}", stderr_of(&out));
    assert!(restore.wait(FINISH_TIMEOUT).is_some(), "the first restore did not end");
    assert!(wait_pid_gone(f.pid, FINISH_TIMEOUT), "pid {} still exists", f.pid);
    f.restore_and_pass(second.path());
    assert!(!gone.exists(), "{} was left behind by the restore", gone.display());
}
