//! Seccomp filters cannot be saved yet: a process running under filters that torpor does
//! not run under itself must be refused by dump, named, and left running under them; woken
//! without them it would run with its sandbox silently lifted (fixture `seccomp.c`).

mod common;

use std::time::Duration;

use common::{assert_passes_standalone, assert_running_untraced, stderr_of, Fixture};
use tempfile::TempDir;

#[test]
fn seccomp_fixture_passes_without_torpor() {
    assert_passes_standalone("seccomp", &[]);
}

#[test]
fn dump_refuses_a_process_under_seccomp_filters_and_leaves_it_filtered() {
    let mut f = Fixture::start("seccomp", &[]);
    for extra in [&[][..], &["--leave-running"][..]] {
        let images = TempDir::new().expect("image dir");
        let out = f.dump(images.path(), extra);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "dump {extra:?} should be refused: {err}");
        assert!(
            err.contains(&format!("pid {}", f.pid)) && err.contains("seccomp filters"),
            "the refusal does not name the pid and its seccomp filters:\n{err}"
        );
        assert!(!images.path().join("manifest.json").exists(), "a manifest was left");
        assert_running_untraced(f.pid);
    }
    f.go();
    let status = f.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "after the refused dump: {status:?}\n{}", f.log_text());
    f.assert_log_passed();
}
