//! Command-line contract of the torpor binary: exit codes and error messages.

mod common;

use common::{stderr_of, torpor};
use tempfile::TempDir;

#[test]
fn dump_of_a_missing_pid_fails_naming_it() {
    let dir = TempDir::new().expect("tempdir");
    let images = dir.path().join("img");
    let out = torpor(["dump".as_ref(), "999999".as_ref(), "-D".as_ref(), images.as_os_str()]);
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "want one line on stderr, got:\n{stderr}");
    assert!(stderr.contains("999999"), "stderr does not name the pid: {stderr}");
}

#[test]
fn restore_of_a_missing_image_dir_fails_naming_it() {
    let dir = TempDir::new().expect("tempdir");
    let images = dir.path().join("no-such-image");
    let out = torpor(["restore".as_ref(), "-D".as_ref(), images.as_os_str()]);
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no-such-image"), "stderr does not name the dir: {stderr}");
}

#[test]
fn missing_or_malformed_arguments_are_usage_errors() {
    let cases: &[&[&str]] = &[
        &[],
        &["dump"],
        &["dump", "1"],
        &["dump", "-D", "x"],
        &["dump", "not-a-pid", "-D", "x"],
        &["dump", "1", "-D", "x", "--external", "tcp:127.0.0.1:80"],
        &["dump", "1", "-D", "x", "--external", "unix:relative.sock"],
        &["dump", "1", "-D", "x", "--external"],
        &["restore"],
        &["no-such-command"],
    ];
    for args in cases {
        let out = torpor(*args);
        assert_eq!(out.status.code(), Some(2), "torpor {args:?}: {}", stderr_of(&out));
    }
}

#[test]
fn check_passes_on_this_machine() {
    let out = torpor(["check"]);
    assert!(out.status.success(), "torpor check: {:?}\n{}", out.status, stderr_of(&out));
}

#[test]
fn failures_say_what_to_do_next() {
    let dir = TempDir::new().expect("tempdir");
    let missing = dir.path().join("no-such-image");
    for (args, next) in [
        (vec!["dump".as_ref(), "999999".as_ref(), "-D".as_ref(), missing.as_os_str()], "ps -p"),
        (vec!["restore".as_ref(), "-D".as_ref(), missing.as_os_str()], "torpor list"),
        (vec!["verify".as_ref(), "-D".as_ref(), dir.path().as_os_str()], "torpor inspect"),
        (vec!["list".as_ref(), missing.as_os_str()], "give the directory"),
    ] {
        let out = torpor(&args);
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: want one line: {stderr}");
        assert!(stderr.contains(next), "{args:?}: no next step ({next}) in: {stderr}");
    }
}
