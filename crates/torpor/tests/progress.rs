//! The progress bar appears while a dump, a verify or a restore runs on a terminal, never when
//! stderr is a pipe or a file; `--log-file` takes the logs off stderr.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

use common::{
    close_inherited_fds, stderr_of, torpor, wait_pid, Fixture, PidWait, FINISH_TIMEOUT,
    TORPOR_TIMEOUT,
};
use tempfile::TempDir;

/// What the bar's template always prints.
const BAR_MARK: &str = " left";

/// Runs torpor with ARGS, its stderr on the slave side of a new pseudo-terminal, and
/// returns its exit code and everything it wrote there.
fn torpor_on_a_terminal(args: &[&str]) -> (Option<i32>, String) {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let (master, slave): (OwnedFd, OwnedFd) = (pty.master, pty.slave);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_torpor"));
    cmd.args(args)
        .env("TORPOR_PROGRESS_DELAY_MS", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave));
    close_inherited_fds(&mut cmd);
    let mut child = cmd.spawn().expect("spawn torpor");
    drop(cmd);
    // Read until the slave is closed by the child's exit (EIO on the master).
    let reader = std::thread::spawn(move || {
        let mut f = File::from(master);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let status = common::wait_child(&mut child, TORPOR_TIMEOUT).expect("torpor finished");
    (status.code(), reader.join().expect("reader"))
}

#[test]
fn dump_and_restore_show_progress_on_a_terminal() {
    let mut f = Fixture::start("tree", &[]);
    let images = TempDir::new().unwrap();
    let dir = images.path().to_str().unwrap();
    let pid = f.pid.to_string();
    let (code, out) = torpor_on_a_terminal(&["dump", &pid, "-D", dir]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("saving pid {pid}")) && out.contains(BAR_MARK), "{out:?}");
    assert!(out.contains("MiB"), "the bar counts bytes: {out:?}");
    assert!(out.contains(&format!("torpor: pid {pid} saved to")), "{out:?}");
    f.assert_killed_by_dump();

    let (code, out) = torpor_on_a_terminal(&["verify", "-D", dir]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("checking ") && out.contains(BAR_MARK), "{out:?}");

    let (code, out) = torpor_on_a_terminal(&["restore", "-D", dir, "--detach"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("waking ") && out.contains(BAR_MARK), "{out:?}");
    assert!(out.contains(&format!("torpor: pid {pid} woken from")), "{out:?}");

    f.go();
    match wait_pid(f.pid, FINISH_TIMEOUT) {
        PidWait::Exited(s) => assert!(s.success(), "restored tree: {s:?}"),
        other => panic!("restored tree: {other:?}"),
    }
    f.assert_log_passed();
}

#[test]
fn no_progress_when_stderr_is_not_a_terminal_or_quiet() {
    let f = Fixture::start("tree", &[]);
    let images = TempDir::new().unwrap();
    let dir = images.path().to_str().unwrap();
    let pid = f.pid.to_string();

    // stderr on a pipe.
    let out = Command::new(env!("CARGO_BIN_EXE_torpor"))
        .args(["dump", &pid, "-D", dir, "--leave-running"])
        .env("TORPOR_PROGRESS_DELAY_MS", "0")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run torpor");
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("saving") && !err.contains('\r') && !err.contains('\x1b'), "{err:?}");
    assert!(err.contains("saved to"), "the summary line is still printed: {err:?}");

    // A terminal, but --quiet: nothing at all.
    let images2 = TempDir::new().unwrap();
    let (code, out) = torpor_on_a_terminal(&[
        "-q",
        "dump",
        &pid,
        "-D",
        images2.path().to_str().unwrap(),
        "--leave-running",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.is_empty(), "--quiet printed {out:?}");
    drop(f);
}

#[test]
fn log_file_takes_the_logs() {
    let f = Fixture::start("tree", &[]);
    let tmp = TempDir::new().unwrap();
    let log = tmp.path().join("torpor.log");
    let images = tmp.path().join("img");
    let pid = f.pid.to_string();
    let out = torpor([
        "-v",
        "--log-file",
        log.to_str().unwrap(),
        "dump",
        &pid,
        "-D",
        images.to_str().unwrap(),
        "--leave-running",
    ]);
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    let logged = std::fs::read_to_string(&log).expect("the log file exists");
    assert!(logged.contains(&format!("dump of pid {pid} into")), "{logged}");
    assert!(logged.contains(&format!("dump of pid {pid} done")), "{logged}");
    assert!(!err.contains("INFO"), "logs went to stderr too: {err}");
    assert!(err.contains("saved to"), "{err}");

    let out = torpor(["--log-file", "/nonexistent-dir/x.log", "check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("/nonexistent-dir/x.log"), "{}", stderr_of(&out));
}
