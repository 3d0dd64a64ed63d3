//! `torpor dump --pre-copy`: memory copied in rounds while the process writes to it, the
//! process frozen only for the last pages (fixture `precopy.c`). Its pages carry write
//! counters and patterns, and each writer the sum of its counters, so a page restored
//! from a stale copy, or torn, fails the fixture.

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    assert_catches_damage, assert_passes_standalone, assert_running_untraced, close_inherited_fds,
    proc_status, stderr_of, wait_child, Fixture, TORPOR_TIMEOUT,
};
use tempfile::TempDir;

#[test]
fn precopy_fixture_passes_without_torpor() {
    assert_passes_standalone("precopy", &["remap", "8"]);
    assert_passes_standalone("precopy", &["threads", "8"]);
}

#[test]
fn precopy_fixture_catches_damage() {
    assert_catches_damage("precopy", &["remap", "8"], &["page", "sum", "slot"]);
}

/// Dumps MODE with --pre-copy while it writes, checks the summary shows rounds made while
/// it ran, restores it and sees it PASS.
fn survives_pre_copy(mode: &str) {
    let mut f = Fixture::start("precopy", &[mode, "32"]);
    // Let the writers get going.
    sleep(Duration::from_millis(200));
    let images = TempDir::new().expect("image dir");
    let out = f.dump(images.path(), &["--pre-copy", "-v"]);
    let err = stderr_of(&out);
    assert!(out.status.success(), "dump --pre-copy of {mode} failed: {err}");
    let summary = err.lines().find(|l| l.starts_with("torpor: pre-copy: ")).unwrap_or("");
    assert!(summary.contains("while running ("), "no pre-copy rounds reported:\n{err}");
    assert!(err.contains("pre-copy round 1: "), "round 1 not logged:\n{err}");
    f.assert_killed_by_dump();
    f.restore_and_pass(images.path());
}

#[test]
fn a_writing_process_survives_pre_copy() {
    survives_pre_copy("single");
}

#[test]
fn writing_threads_survive_pre_copy() {
    survives_pre_copy("threads");
}

#[test]
fn mappings_made_moved_and_removed_during_pre_copy_are_saved() {
    survives_pre_copy("remap");
}

/// What must be as before after a failed dump: descriptors, blocked signals, and no
/// trace of the write tracking in the memory map.
struct Before {
    fds: Vec<String>,
    sig_blk: Option<String>,
}

fn fd_links(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list fds")
        .filter_map(|e| {
            let e = e.ok()?;
            let link = fs::read_link(e.path()).ok()?;
            Some(format!("{} -> {}", e.file_name().to_string_lossy(), link.display()))
        })
        .collect();
    v.sort();
    v
}

fn before(pid: i32) -> Before {
    Before { fds: fd_links(pid), sig_blk: proc_status(pid, "SigBlk") }
}

/// Asserts the process runs on untraced, exactly as before, and keeps running.
fn assert_untouched(f: &Fixture, before: &Before) {
    let pid = f.pid;
    assert_running_untraced(pid);
    assert_eq!(fd_links(pid), before.fds, "pid {pid}'s descriptors changed");
    assert_eq!(proc_status(pid, "SigBlk"), before.sig_blk, "pid {pid}'s blocked signals");
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let tracked = smaps.lines().filter(|l| l.starts_with("VmFlags:") && l.contains(" uw"));
    assert_eq!(tracked.count(), 0, "mappings of pid {pid} are still write-protected");
    // It goes on writing: each pause between writes is a voluntary context switch.
    let switches = || -> u64 {
        proc_status(pid, "voluntary_ctxt_switches").and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let at = switches();
    sleep(Duration::from_millis(300));
    assert!(switches() > at + 10, "pid {pid} no longer runs");
}

#[test]
fn a_dump_refused_after_pre_copy_leaves_the_process_as_it_was() {
    let mut f =
        Fixture::start_with_env("precopy", &["single", "32"], &[("PRECOPY_HOLD_PIDFD", "1")]);
    sleep(Duration::from_millis(100));
    let was = before(f.pid);
    let images = TempDir::new().expect("image dir");
    let out = f.dump(images.path(), &["--pre-copy", "-v"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "dump should be refused: {err}");
    assert!(err.contains("pre-copy round 1: "), "the refusal came before pre-copy:\n{err}");
    assert!(err.contains("pidfd"), "the refusal does not name the pidfd:\n{err}");
    assert!(!images.path().join("manifest.json").exists(), "a manifest was left");
    assert_untouched(&f, &was);
    f.go();
    let status = f.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "after the refused dump: {status:?}\n{}", f.log_text());
    f.assert_log_passed();
}

#[test]
fn sigterm_during_pre_copy_leaves_the_process_as_it_was() {
    let mut f = Fixture::start("precopy", &["single", "128"]);
    sleep(Duration::from_millis(100));
    let was = before(f.pid);
    let images = TempDir::new().expect("image dir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_torpor"));
    cmd.arg("dump")
        .arg(f.pid.to_string())
        .arg("-D")
        .arg(images.path())
        .arg("--pre-copy")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    close_inherited_fds(&mut cmd);
    let mut dump = cmd.spawn().expect("spawn torpor dump");

    // The page file appears when tracking is set up, just before round 1 copies 128 MiB.
    let pages = images.path().join(format!("pages-{}.img", f.pid));
    let deadline = Instant::now() + TORPOR_TIMEOUT;
    while !pages.exists() {
        assert!(Instant::now() < deadline, "no page file after {TORPOR_TIMEOUT:?}");
        assert!(dump.try_wait().expect("try_wait").is_none(), "dump ended before round 1");
        sleep(Duration::from_millis(1));
    }
    // SAFETY: kill(2) on our own child, which has not been reaped.
    unsafe { libc::kill(dump.id() as i32, libc::SIGTERM) };
    let status = wait_child(&mut dump, TORPOR_TIMEOUT).expect("dump did not stop");
    assert_eq!(status.signal(), Some(libc::SIGTERM), "dump ended with {status:?}");
    assert!(!images.path().join("manifest.json").exists(), "a manifest was left");
    assert!(!pages.exists(), "the page file of the abandoned dump was left");
    assert_untouched(&f, &was);
    f.go();
    let status = f.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "after the interrupted dump: {status:?}\n{}", f.log_text());
    f.assert_log_passed();
}
