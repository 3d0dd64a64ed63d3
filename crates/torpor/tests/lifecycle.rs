//! Whole-process scenarios: an unmodified system program, restoring one image twice, and
//! dumping with `--leave-running`.

mod common;

use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use common::{assert_running_untraced, Fixture, Restore};
use tempfile::TempDir;

#[test]
fn sleep_finishes_after_its_remaining_time() {
    const TOTAL: f64 = 4.0;
    let mut f = Fixture::start_program(Path::new("/bin/sleep"), &["4"]);
    sleep(Duration::from_millis(1500).saturating_sub(f.started.elapsed()));
    let images = TempDir::new().expect("image dir");
    let dump_at = f.started.elapsed().as_secs_f64();
    f.dump_ok(images.path());

    let restore_at = f.started.elapsed().as_secs_f64();
    let mut restore = Restore::spawn(images.path(), &[]);
    restore.wait_for_process(&f);
    let status = restore.wait(Duration::from_secs(20)).expect("restored sleep never finished");
    let took = f.started.elapsed().as_secs_f64() - restore_at;
    assert!(status.success(), "restored sleep: {status:?}; stderr:\n{}", restore.stderr());

    // Never before the original deadline; and not a fresh 4 s either (that would be
    // longer than what was left at the dump plus the restore's own overhead).
    let earliest = TOTAL - restore_at - 0.25;
    let latest = TOTAL - dump_at + 1.2;
    assert!(
        earliest <= took && took <= latest,
        "restored sleep ran {took:.2} s, want {earliest:.2}..{latest:.2} (dumped at {dump_at:.2} s)"
    );
}

#[test]
fn one_image_restores_twice() {
    let mut f = Fixture::start("counter", &[]);
    let images = TempDir::new().expect("image dir");
    sleep(Duration::from_millis(100));
    f.dump_ok(images.path());
    let mark = f.mark_log();

    f.restore_and_pass(images.path());

    // The first run appended to the log; give the second one the file the image saw.
    f.rewind_log(&mark);
    f.ungo();
    f.restore_and_pass(images.path());
}

#[test]
fn leave_running_dump_keeps_the_process_running_untraced() {
    // The signals fixture holds pending signals that a careless dump would consume.
    let mut f = Fixture::start("signals", &[]);
    let images = TempDir::new().expect("image dir");
    let out = f.dump(images.path(), &["--leave-running"]);
    assert!(out.status.success(), "dump --leave-running: {}", common::stderr_of(&out));
    assert!(f.child.try_wait().expect("try_wait").is_none(), "process exited after dump");
    assert_running_untraced(f.pid);
    sleep(Duration::from_millis(300));
    assert_running_untraced(f.pid);
    let mark = f.mark_log();

    f.go();
    let status = f.wait_exit(common::FINISH_TIMEOUT);
    assert!(status.success(), "after --leave-running: {status:?}; log:\n{}", f.log_text());
    f.assert_log_passed();

    // The image is still good once the original is gone.
    f.rewind_log(&mark);
    f.ungo();
    f.restore_and_pass(images.path());
}

/// The `[vdso]` line's start address in a process's memory map.
fn vdso_start(pid: i32) -> Option<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let line = maps.lines().find(|l| l.ends_with("[vdso]"))?;
    u64::from_str_radix(line.split('-').next()?, 16).ok()
}

/// After a reboot into another kernel the saved vDSO is not the running one: restore
/// leaves the running vDSO elsewhere and makes the saved entry points jump into it. The
/// counter reads CLOCK_MONOTONIC through libc's cached vDSO pointer all along, so it can
/// only PASS if calls through the old addresses still work.
#[test]
fn vdso_calls_reach_the_running_kernel_through_jumps() {
    let mut f = Fixture::start("counter", &[]);
    let images = TempDir::new().expect("image dir");
    sleep(Duration::from_millis(100));
    let saved_vdso = vdso_start(f.pid).expect("the fixture has a vDSO");
    f.dump_ok(images.path());

    let mut restore = Restore::spawn(images.path(), &["--force-vdso-jumps"]);
    restore.wait_for_process(&f);
    let now_vdso = vdso_start(f.pid).expect("the restored process has a vDSO");
    assert_ne!(now_vdso, saved_vdso, "the running vDSO should not have moved onto the saved one");
    sleep(Duration::from_millis(300));
    f.go();
    let status = restore.wait(Duration::from_secs(30)).expect("restored counter never finished");
    assert!(status.success(), "restored counter: {status:?}; stderr:\n{}", restore.stderr());
    f.assert_log_passed();
}

/// Ctrl-C on `torpor dump` while it works inside the process must not leave the process
/// stopped halfway through one of torpor's calls: whenever the interruption lands, the
/// process runs on untraced and intact.
#[test]
fn interrupting_a_dump_leaves_the_process_whole() {
    let mut f = Fixture::start("counter", &["64"]);
    sleep(Duration::from_millis(100));
    let images = TempDir::new().expect("image dir");
    for delay_ms in [1u64, 5, 20] {
        let mut dump = std::process::Command::new(env!("CARGO_BIN_EXE_torpor"))
            .args(["dump", &f.pid.to_string(), "-D"])
            .arg(images.path())
            .arg("--leave-running")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start torpor dump");
        sleep(Duration::from_millis(delay_ms));
        // SAFETY: kill takes integers; the pid is our own child's.
        unsafe { libc::kill(dump.id() as i32, libc::SIGINT) };
        let _ = dump.wait();
        assert_running_untraced(f.pid);
    }
    f.go();
    let status = f.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "counter after interrupted dumps: {status:?}; log:\n{}",
        f.log_text()
    );
    f.assert_log_passed();
}
