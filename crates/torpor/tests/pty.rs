//! Pseudo-terminal pairs owned inside the dumped tree (fixture `pty.c`): the master in
//! the parent, the slave the controlling terminal of a child in its own session, bytes
//! queued both ways. They come back under the same `/dev/pts` number with their modes,
//! window size, queued bytes, controlling session and foreground group; a second pair
//! with its packet, exclusive and lock modes. A pair with one side outside the tree is
//! refused.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::thread::sleep;
use std::time::Duration;

use common::{
    assert_catches_damage, assert_passes_standalone, assert_restore_refused,
    assert_running_untraced, stderr_of, torpor, Fixture, FixtureTree, FINISH_TIMEOUT,
};
use tempfile::TempDir;

const BREAKS: &[&str] = &["termios", "winsize", "ctty", "output", "input", "packet"];

/// Held by each test of this file for its whole run. The kernel hands out the lowest free
/// `/dev/pts` number, so a pair another test opens between a dump and its restore would
/// take the number the restore needs.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn pty_fixture_passes_without_torpor() {
    let _serial = one_at_a_time();
    assert_passes_standalone("pty", &[]);
}

#[test]
fn pty_fixture_catches_damage() {
    let _serial = one_at_a_time();
    assert_catches_damage("pty", &[], BREAKS);
}

#[test]
fn a_pty_pair_inside_the_tree_comes_back_with_its_name_modes_data_and_session() {
    let _serial = one_at_a_time();
    let mut t = FixtureTree::start("pty", &[], &["child"]);
    t.roundtrip();
}

#[test]
fn dump_leave_running_keeps_the_bytes_queued_in_a_pty() {
    let _serial = one_at_a_time();
    let mut t = FixtureTree::start("pty", &[], &["child"]);
    sleep(Duration::from_millis(100));
    let images = TempDir::new().expect("image dir");
    let out = t.f.dump(images.path(), &["--leave-running"]);
    assert!(out.status.success(), "dump --leave-running: {}", stderr_of(&out));
    assert_running_untraced(t.f.pid);
    assert_running_untraced(t.others[0].1);
    t.f.go();
    let status = t.f.wait_exit(FINISH_TIMEOUT);
    assert!(status.success(), "after dump --leave-running: {status:?}; log:\n{}", t.f.log_text());
    t.f.assert_log_passed();
}

/// Opens new pairs until one is `/dev/pts/index`; returns them all, to hold.
fn take_pts(index: u32) -> Vec<OwnedFd> {
    let mut held = Vec::new();
    for _ in 0..4096 {
        // SAFETY: a NUL-terminated path and flags; returns a new descriptor or -1.
        let fd = unsafe { libc::open(c"/dev/ptmx".as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
        assert!(fd >= 0, "open /dev/ptmx: {}", std::io::Error::last_os_error());
        // SAFETY: just returned, owned by nobody else.
        let f = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut n: libc::c_int = 0;
        // SAFETY: TIOCGPTN writes one int.
        assert_eq!(unsafe { libc::ioctl(f.as_raw_fd(), libc::TIOCGPTN, &mut n) }, 0);
        held.push(f);
        if n as u32 == index {
            return held;
        }
        assert!((n as u32) < index, "/dev/pts/{index} is taken by someone else");
    }
    panic!("never got /dev/pts/{index}");
}

#[test]
fn restore_refuses_a_pts_number_in_use_then_wakes_once_it_is_free() {
    let _serial = one_at_a_time();
    let mut t = FixtureTree::start("pty", &[], &["child"]);
    let pts = t.f.ready_value("pts");
    let index: u32 = pts.trim_start_matches("/dev/pts/").parse().expect("pts number");
    let images = TempDir::new().expect("image dir");
    sleep(Duration::from_millis(100));
    t.f.dump_ok(images.path());

    let held = take_pts(index);
    let holder = format!("(pid {})", std::process::id());
    assert_restore_refused(images.path(), &[&pts, "in use", &holder]);
    drop(held);
    t.f.restore_and_pass(images.path());
}

#[test]
fn dump_refuses_a_pty_master_whose_slave_is_not_in_the_tree() {
    let _serial = one_at_a_time();
    let mut f = Fixture::start("pty", &["alone"]);
    let pts = f.ready_value("pts");
    let images = TempDir::new().expect("image dir");
    let out = f.dump(images.path(), &[]);
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "dump of a lone master: {stderr}");
    let pid = format!("pid {}", f.pid);
    for want in [pid.as_str(), "fd 3", &pts, "master"] {
        assert!(stderr.contains(want), "the refusal does not name {want}: {stderr}");
    }
    assert_running_untraced(f.pid);
    f.go();
    let status = f.wait_exit(FINISH_TIMEOUT);
    assert!(status.success(), "after the refusal: {status:?}; log:\n{}", f.log_text());
    f.assert_log_passed();
}

#[test]
fn dump_refuses_a_pty_slave_whose_master_is_outside_the_tree() {
    let _serial = one_at_a_time();
    let mut t = FixtureTree::start("pty", &[], &["child"]);
    let pts = t.f.ready_value("pts");
    let child = t.others[0].1;
    let images = TempDir::new().expect("image dir");
    let out = torpor(["dump", &child.to_string(), "-D", images.path().to_str().unwrap()]);
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "dump of the child alone: {stderr}");
    let (pid, parent) = (format!("pid {child}"), format!("(pid {})", t.f.pid));
    for want in [pid.as_str(), "fd 0", &pts, "master", &parent, "--shell-job"] {
        assert!(stderr.contains(want), "the refusal does not name {want}: {stderr}");
    }
    assert_running_untraced(child);
    t.f.go();
    let status = t.f.wait_exit(FINISH_TIMEOUT);
    assert!(status.success(), "after the refusal: {status:?}; log:\n{}", t.f.log_text());
    t.f.assert_log_passed();
}
