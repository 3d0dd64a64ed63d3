//! Descriptors and filesystem context (fixture `files.c`), and what restore does when a
//! file the image refers to changed in between.

mod common;

use std::fs::OpenOptions;
use std::io::Write;

use common::{
    assert_catches_damage, assert_passes_standalone, assert_pid_gone, assert_restore_refused,
    roundtrip, Fixture,
};
use tempfile::TempDir;

#[test]
fn files_fixture_passes_without_torpor() {
    assert_passes_standalone("files", &[]);
}

#[test]
fn files_fixture_catches_damage() {
    assert_catches_damage(
        "files",
        &[],
        &["offset", "append", "cloexec", "unshared", "deleted", "cwd", "umask"],
    );
}

#[test]
fn files_survive_dump_and_restore() {
    roundtrip("files", &[]);
}

#[test]
fn restore_refuses_when_an_open_file_changed() {
    let mut f = Fixture::start("files", &[]);
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());

    // half.txt is open read-only at offset 4096 in the image.
    let mut file = OpenOptions::new().append(true).open(f.path("half.txt")).expect("open");
    file.write_all(b"!").expect("append a byte");
    drop(file);

    assert_restore_refused(images.path(), &["half.txt"]);
    assert_pid_gone(f.pid);
}
