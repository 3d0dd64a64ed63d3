//! File locks: `flock`, POSIX and open file description locks come back held, and a
//! restore whose lock another process has taken meanwhile fails naming it, with nothing
//! left running (fixture `locks.c`).

mod common;

use std::os::fd::AsRawFd;

use common::{
    assert_catches_damage, assert_passes_standalone, assert_pid_gone, roundtrip, stderr_of, torpor,
    Fixture,
};
use tempfile::TempDir;

#[test]
fn locks_fixture_passes_without_torpor() {
    assert_passes_standalone("locks", &[]);
}

#[test]
fn locks_fixture_catches_damage() {
    assert_catches_damage("locks", &[], &["lost"]);
}

#[test]
fn file_locks_of_every_kind_are_held_again() {
    roundtrip("locks", &[]);
}

#[test]
fn a_lock_taken_by_another_process_meanwhile_fails_the_restore() {
    let mut f = Fixture::start("locks", &[]);
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());

    // Someone else takes the flock lock while the program sleeps.
    let other = std::fs::File::open(f.path("flock.lock")).expect("open flock.lock");
    // SAFETY: flock takes a descriptor this test owns and an operation.
    let rc = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0, "the test could not take the lock: {}", std::io::Error::last_os_error());
    let out = torpor(["restore".as_ref(), "-D".as_ref(), images.path().as_os_str()]);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "restore succeeded although the lock was taken");
    assert!(
        err.contains("flock write lock") && err.contains("flock.lock"),
        "the failure does not name the lock and its file:\n{err}"
    );
    assert_pid_gone(f.pid);

    // Once it is free again the same image wakes with every lock.
    drop(other);
    f.restore_and_pass(images.path());
}
