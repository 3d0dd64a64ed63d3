//! A JVM with four worker threads and a HashMap of a million entries (fixture
//! `Workers.java`, compiled here with `javac`).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::Duration;

use common::{fixture_source, Fixture, FINISH_TIMEOUT};
use tempfile::TempDir;

/// Compiles `Workers.java` once per test binary and returns the class directory.
///
/// A class file is replaced only when its bytes change, so a concurrent test run never
/// sees one half written.
fn classes() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let fixtures = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
        let dir = fixtures.join("java");
        let tmp = fixtures.join(format!("java.{}.tmp", std::process::id()));
        fs::create_dir_all(&dir).expect("create class dir");
        let out = Command::new("javac")
            .arg("-d")
            .arg(&tmp)
            .arg(fixture_source("Workers.java"))
            .output()
            .expect("run javac");
        assert!(out.status.success(), "javac failed:\n{}", String::from_utf8_lossy(&out.stderr));
        for entry in fs::read_dir(&tmp).expect("read javac output") {
            let entry = entry.expect("dir entry");
            let fresh = fs::read(entry.path()).expect("read class file");
            let installed = dir.join(entry.file_name());
            if fs::read(&installed).ok().as_deref() != Some(&fresh[..]) {
                fs::rename(entry.path(), installed).expect("install class file");
            }
        }
        fs::remove_dir_all(&tmp).expect("remove javac output");
        dir.canonicalize().expect("canonicalize class dir")
    })
}

fn start(env: &[(&str, &str)]) -> Fixture {
    let cp = classes();
    let lead = [
        "-Xmx256m".as_ref(),
        "-XX:+UseSerialGC".as_ref(),
        "-Xshare:off".as_ref(),
        "-cp".as_ref(),
        cp.as_os_str(),
        "Workers".as_ref(),
    ];
    Fixture::start_interpreted("Workers", Path::new("java"), &lead, &[], env)
}

fn go_and_pass(f: &mut Fixture) {
    f.go();
    let status = f.wait_exit(FINISH_TIMEOUT);
    assert!(status.success(), "Workers exited with {status:?}; log:\n{}", f.log_text());
    f.assert_log_passed();
}

#[test]
fn java_fixture_passes_without_torpor() {
    let mut f = start(&[]);
    sleep(Duration::from_millis(200));
    go_and_pass(&mut f);
}

#[test]
fn java_fixture_catches_damage() {
    for what in ["entry", "stall"] {
        let mut f = start(&[("FIXTURE_BREAK", what)]);
        f.go();
        let status = f.wait_exit(FINISH_TIMEOUT);
        let log = f.log_text();
        assert_eq!(status.code(), Some(1), "FIXTURE_BREAK={what}: {status:?}; log:\n{log}");
        assert!(log.contains("\nFAIL: "), "FIXTURE_BREAK={what}; log:\n{log}");
    }
}

#[test]
fn a_jvm_with_threads_and_a_big_heap_survives_dump_and_restore() {
    let mut f = start(&[]);
    sleep(Duration::from_millis(200));
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());
    f.restore_and_pass(images.path());
}
