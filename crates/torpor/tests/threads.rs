//! A process of eleven threads: workers with thread-local data, a thread blocked in
//! FUTEX_WAIT and one in a nanosleep loop (fixture `threads.c`).

mod common;

use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    assert_catches_damage, assert_passes_standalone, proc_tasks, Fixture, Restore, FINISH_TIMEOUT,
};
use tempfile::TempDir;

#[test]
fn threads_fixture_passes_without_torpor() {
    assert_passes_standalone("threads", &[]);
}

#[test]
fn threads_fixture_catches_damage() {
    assert_catches_damage("threads", &[], &["tls", "tid", "futex"]);
}

/// The main thread's tid and those on the READY line, sorted.
fn reported_tids(f: &Fixture) -> Vec<i32> {
    let mut tids: Vec<i32> = f
        .ready_value("tids")
        .split(',')
        .map(|t| t.parse().unwrap_or_else(|_| panic!("bad tid {t:?} on the READY line")))
        .collect();
    tids.push(f.pid);
    tids.sort_unstable();
    tids
}

#[test]
fn every_thread_comes_back_with_its_tid() {
    let mut f = Fixture::start("threads", &[]);
    let tids = reported_tids(&f);
    assert_eq!(tids.len(), 11, "READY line: {}", f.log_text());
    assert_eq!(proc_tasks(f.pid), tids, "/proc/{}/task before the dump", f.pid);
    sleep(Duration::from_millis(100));
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());

    let mut restore = Restore::spawn(images.path(), &[]);
    restore.wait_for_process(&f);
    // Threads may still be coming back for a moment after the leader runs again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while proc_tasks(f.pid) != tids && Instant::now() < deadline {
        sleep(Duration::from_millis(10));
    }
    assert_eq!(proc_tasks(f.pid), tids, "/proc/{}/task after the restore", f.pid);

    f.go();
    let status = restore
        .wait(FINISH_TIMEOUT)
        .unwrap_or_else(|| panic!("restored threads never finished; log:\n{}", f.log_text()));
    assert!(
        status.success(),
        "restored threads: {status:?}; stderr:\n{}\nlog:\n{}",
        restore.stderr(),
        f.log_text()
    );
    f.assert_log_passed();
}
