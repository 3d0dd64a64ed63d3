//! Stress: one image restored many times, and one process dumped and woken many times.
//! Nothing may pile up: descriptors and mappings of the process, its memory, zombies,
//! guard processes, firewall rules, image size.
//!
//! Slow tier, not part of the default run: `bash tests/stress.sh` (or
//! `cargo test --release --test stress -- --ignored --test-threads=1`).

mod common;

use std::fs;
use std::time::{Duration, Instant};

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use common::{
    assert_running_untraced, become_subreaper, close_inherited_fds, proc_status, stderr_of, torpor,
    wait_child, wait_pid, wait_pid_gone, Fixture, PidWait, Restore, FINISH_TIMEOUT,
};
use tempfile::TempDir;

fn rounds(default: usize) -> usize {
    std::env::var("TORPOR_STRESS_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What a process holds, to compare from round to round.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Footprint {
    fds: usize,
    maps: usize,
    rss_kib: u64,
    threads: usize,
}

fn footprint(pid: i32) -> Footprint {
    let count = |dir: String| fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let kib = |key| {
        proc_status(pid, key)
            .and_then(|v| v.trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Footprint {
        fds: count(format!("/proc/{pid}/fd")),
        maps: fs::read_to_string(format!("/proc/{pid}/maps")).map_or(0, |m| m.lines().count()),
        rss_kib: kib("VmRSS"),
        threads: count(format!("/proc/{pid}/task")),
    }
}

/// Children of this test process (a subreaper: orphans of its torpor runs come to it)
/// that have exited and not been reaped, and guards that outlived their torpor, as
/// `(zombies, guards)`.
fn leftovers() -> (usize, usize) {
    let me = std::process::id().to_string();
    let mut zombies = 0;
    let mut guards = 0;
    for e in fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if proc_status(pid, "PPid").as_deref() != Some(me.as_str()) {
            continue;
        }
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("__guard") {
            guards += 1;
        }
        if proc_status(pid, "State").is_some_and(|s| s.starts_with('Z')) {
            zombies += 1;
        }
    }
    (zombies, guards)
}

/// Waits until torpor has let the restored PID go, then asserts it runs untraced.
fn wait_released(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while proc_status(pid, "TracerPid").as_deref() != Some("0") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_running_untraced(pid);
}

fn assert_same(round: usize, first: &Footprint, now: &Footprint) {
    assert_eq!(
        (now.fds, now.maps, now.threads),
        (first.fds, first.maps, first.threads),
        "round {round}: descriptors, mappings or threads changed: {first:?} -> {now:?}"
    );
    // Resident memory may move by a few pages (the stack, libc's buffers), never grow.
    assert!(
        now.rss_kib <= first.rss_kib + 64,
        "round {round}: resident memory grew: {first:?} -> {now:?}"
    );
}

#[test]
#[ignore = "slow tier: bash tests/stress.sh"]
fn one_image_restored_a_hundred_times() {
    become_subreaper();
    let n = rounds(100);
    let mut f = Fixture::start("counter", &["8"]);
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());
    let mark = f.mark_log();
    let (zombies0, guards0) = leftovers();
    let t0 = Instant::now();
    let mut first: Option<Footprint> = None;
    for round in 0..n {
        let mut r = Restore::spawn(images.path(), &[]);
        r.wait_for_process(&f);
        wait_released(f.pid);
        let now = footprint(f.pid);
        match &first {
            None => first = Some(now),
            Some(first) => assert_same(round, first, &now),
        }
        // SAFETY: kill takes integers; the pid is the restored counter, torpor's child.
        unsafe { libc::kill(f.pid, libc::SIGKILL) };
        let status = r.wait(FINISH_TIMEOUT).expect("restore did not end");
        assert_eq!(status.code(), Some(128 + libc::SIGKILL), "round {round}: {}", r.stderr());
        assert!(wait_pid_gone(f.pid, Duration::from_secs(10)), "round {round}: pid survived");
        // The counter may have printed before it was killed; the image records its log.
        f.rewind_log(&mark);
    }
    let (zombies, guards) = leftovers();
    assert!(zombies <= zombies0 && guards <= guards0, "zombies {zombies}, guards {guards} left");
    eprintln!("{n} restores in {:.1} s", t0.elapsed().as_secs_f64());
    // Still whole after all that.
    f.restore_and_pass(images.path());
}

#[test]
#[ignore = "slow tier: bash tests/stress.sh"]
fn one_process_dumped_and_woken_many_times() {
    become_subreaper();
    let n = rounds(50);
    let mut f = Fixture::start("counter", &["8"]);
    let images = TempDir::new().expect("image dir");
    let (zombies0, guards0) = leftovers();
    let t0 = Instant::now();
    let mut first: Option<(Footprint, u64)> = None;
    for round in 0..n {
        let out = f.dump(images.path(), &[]);
        assert!(out.status.success(), "round {round}: dump: {}", stderr_of(&out));
        if round == 0 {
            f.assert_killed_by_dump();
        } else {
            // A restored counter is this test's child (restore --detach left it here).
            match wait_pid(f.pid, Duration::from_secs(10)) {
                PidWait::Exited(_) => {}
                other => panic!("round {round}: the dumped counter: {other:?}"),
            }
        }
        let image_bytes: u64 = fs::read_dir(images.path())
            .expect("image")
            .flatten()
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .sum();
        let out = torpor(["restore", "--detach", "-D", images.path().to_str().unwrap()]);
        assert!(out.status.success(), "round {round}: restore: {}", stderr_of(&out));
        assert_running_untraced(f.pid);
        let now = footprint(f.pid);
        match &first {
            None => first = Some((now, image_bytes)),
            Some((fp, bytes)) => {
                assert_same(round, fp, &now);
                // The image neither grows from round to round (by a page or so for the
                // log and records at most).
                assert!(
                    image_bytes <= bytes + 64 * 1024,
                    "round {round}: image grew from {bytes} to {image_bytes} bytes"
                );
            }
        }
    }
    let (zombies, guards) = leftovers();
    assert!(zombies <= zombies0 && guards <= guards0, "zombies {zombies}, guards {guards} left");
    eprintln!("{n} dump and restore cycles in {:.1} s", t0.elapsed().as_secs_f64());
    // The counter checks it counted on by one at every step across every cycle.
    f.go();
    match wait_pid(f.pid, FINISH_TIMEOUT) {
        PidWait::Exited(s) => assert!(s.success(), "counter: {s:?}; log:\n{}", f.log_text()),
        other => panic!("counter after go: {other:?}"),
    }
    f.assert_log_passed();
}

/// A number from the clock's low bits: varied enough to spread kills over a dump.
fn jitter(below: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    (nanos / 1000) % below.max(1)
}

/// Guards that outlived their torpor come to this subreaper: reaps them.
fn reap_orphans(except: i32) {
    let me = std::process::id().to_string();
    for e in fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid != except && proc_status(pid, "PPid").as_deref() == Some(me.as_str()) {
            wait_pid(pid, Duration::from_secs(20));
        }
    }
}

/// torpor killed at random moments of dumps (with `--leave-running`, so that a dump that
/// finishes first leaves the process running too). Every process must come out running,
/// untraced, with its mask and mappings, and pass its checks, also when the kill lands
/// while a system call runs inside it: the thread's healing frame puts it back
/// (docs/architecture.md, "When torpor dies").
#[test]
#[ignore = "slow tier: bash tests/stress.sh"]
fn dump_killed_at_random_moments() {
    become_subreaper();
    let n = rounds(50);
    let images = TempDir::new().expect("image dir");
    let dir = images.path().join("img");
    let (mut killed, mut finished, mut lost) = (0, 0, 0);
    for round in 0..n {
        let mut f = Fixture::start("counter", &["16"]);
        let (maps0, sigblk0) = (
            fs::read_to_string(format!("/proc/{}/maps", f.pid)).unwrap(),
            proc_status(f.pid, "SigBlk").unwrap(),
        );
        let err = tempfile::tempfile().expect("tempfile");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_torpor"));
        cmd.args(["dump", &f.pid.to_string(), "-D", dir.to_str().unwrap(), "--leave-running"])
            .args(["--no-sync"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err.try_clone().expect("clone"));
        close_inherited_fds(&mut cmd);
        let mut child = cmd.spawn().expect("spawn torpor");
        std::thread::sleep(Duration::from_micros(jitter(30_000)));
        let _ = child.kill();
        let status = wait_child(&mut child, Duration::from_secs(60)).expect("torpor ended");
        if status.signal() == Some(libc::SIGKILL) {
            killed += 1;
        } else {
            assert!(status.success(), "round {round}: dump {status:?}");
            finished += 1;
        }
        // Whatever the moment, the guard (if torpor had started one) puts the process back.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let back = proc_status(f.pid, "TracerPid").as_deref() == Some("0")
                && proc_status(f.pid, "SigBlk").as_deref() == Some(sigblk0.as_str());
            let state = proc_status(f.pid, "State").unwrap_or_default();
            if back || state.starts_with('Z') || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if proc_status(f.pid, "State").is_some_and(|s| s.starts_with('Z')) {
            let status = f.wait_exit(Duration::from_secs(10));
            lost += 1;
            eprintln!("round {round}: the process died: {status:?}");
        } else {
            let mut text = String::new();
            let mut err = &err;
            std::io::Seek::rewind(&mut err).unwrap();
            std::io::Read::read_to_string(&mut err, &mut text).unwrap();
            assert_running_untraced(f.pid);
            assert_eq!(proc_status(f.pid, "SigBlk"), Some(sigblk0), "round {round}:\n{text}");
            let maps = fs::read_to_string(format!("/proc/{}/maps", f.pid)).unwrap();
            assert_eq!(maps, maps0, "round {round}: mappings changed");
            f.go();
            let status = f.wait_exit(FINISH_TIMEOUT);
            assert!(status.success(), "round {round}: {status:?}; log:\n{}", f.log_text());
            f.assert_log_passed();
        }
        reap_orphans(f.pid);
        let _ = fs::remove_dir_all(&dir);
    }
    eprintln!(
        "{killed} dumps killed at random moments, {finished} finished first; \
         {lost} processes lost"
    );
    assert_eq!(lost, 0, "{lost} of {n} processes died with torpor");
}
