//! An unmodified shell pipeline, dumped while data flows through its pipe: bash, the
//! subshell writing numbers, and `sha256sum` reading them.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use common::{Fixture, Restore, FINISH_TIMEOUT};
use tempfile::TempDir;
use torpor_image::ImageReader;

const COUNT: u32 = 400;

/// What `sha256sum` prints for the numbers 1..=COUNT, one per line, on its stdin.
fn expected_sum() -> String {
    let numbers: String = (1..=COUNT).map(|i| format!("{i}\n")).collect();
    let mut sum = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sha256sum");
    sum.stdin.take().expect("stdin").write_all(numbers.as_bytes()).expect("feed sha256sum");
    let out = sum.wait_with_output().expect("sha256sum");
    assert!(out.status.success(), "sha256sum: {:?}", out.status);
    String::from_utf8(out.stdout).expect("sha256sum output")
}

#[test]
fn a_shell_pipeline_finishes_its_work_after_restore() {
    let want = expected_sum();
    let script =
        format!("for i in $(seq 1 {COUNT}); do echo $i; sleep 0.01; done | sha256sum > out");
    // Relative: the work dir is the shell's working directory.
    let mut f = Fixture::start_program(Path::new("/bin/bash"), &["-c", &script]);
    sleep(Duration::from_millis(1000).saturating_sub(f.started.elapsed()));
    assert!(
        f.child.try_wait().expect("try_wait").is_none(),
        "the pipeline ended within a second; log:\n{}",
        f.log_text()
    );

    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());
    let tree = ImageReader::open(images.path())
        .and_then(|r| r.read_tree())
        .unwrap_or_else(|e| panic!("cannot read the image: {e}"));
    assert!(
        tree.processes.len() >= 3,
        "the image holds {} processes, want bash, the subshell and sha256sum at least",
        tree.processes.len()
    );
    assert!(!f.path("out").exists() || fs::read(f.path("out")).expect("read out").is_empty());

    let mut restore = Restore::spawn(images.path(), &[]);
    let status = restore.wait(FINISH_TIMEOUT).unwrap_or_else(|| {
        panic!("restored pipeline did not finish; stderr:\n{}", restore.stderr())
    });
    assert!(
        status.success(),
        "restored pipeline: {status:?}; stderr:\n{}\nlog:\n{}",
        restore.stderr(),
        f.log_text()
    );
    let got = fs::read_to_string(f.path("out")).expect("read out");
    assert_eq!(got, want, "sha256sum of the numbers; log:\n{}", f.log_text());
}
