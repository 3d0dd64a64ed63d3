//! Bad input: images made for another torpor, machine or CPU, and command-line arguments
//! that name the wrong thing. Each is refused with one line naming what is wrong, and
//! nothing is left running.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::Command;

use common::{assert_pid_gone, assert_restore_refused, stderr_of, torpor, Fixture};
use tempfile::TempDir;
use torpor_image::{decode_manifest, encode_manifest, Manifest, FORMAT_VERSION};

/// Copies the files of the image in FROM (flat: images have no subdirectories) to TO.
fn copy_image(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).expect("read image dir") {
        let entry = entry.expect("dir entry");
        fs::copy(entry.path(), to.join(entry.file_name())).expect("copy image file");
    }
}

/// Rewrites the manifest of the image in DIR with EDIT, re-signing it so that only the
/// edited field is wrong.
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Manifest)) {
    let path = dir.join("manifest.json");
    let mut m = decode_manifest(&fs::read(&path).expect("manifest"), &path).expect("decode");
    edit(&mut m);
    fs::write(&path, encode_manifest(&m)).expect("write manifest");
}

/// One dump of the counter fixture, and a copy of it with EDIT applied, which restore
/// must refuse naming every item of NAMES.
fn refused_after(edit: impl FnOnce(&mut Manifest), names: &[&str]) {
    let mut f = Fixture::start("counter", &[]);
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());
    let copy = TempDir::new().expect("copy dir");
    copy_image(images.path(), copy.path());
    edit_manifest(copy.path(), edit);
    let line = assert_restore_refused(copy.path(), names);
    eprintln!("refused: {line}");
    assert_pid_gone(f.pid);
    // The untouched image still restores: the refusal came from the edit alone.
    f.restore_and_pass(images.path());
}

#[test]
fn an_image_from_a_newer_torpor_is_refused_naming_the_version() {
    let newer = FORMAT_VERSION + 1;
    refused_after(|m| m.format_version = newer, &["manifest.json", &format!("version {newer}")]);
}

#[test]
fn an_image_from_another_architecture_is_refused_naming_both() {
    let other = if std::env::consts::ARCH == "aarch64" { "x86_64" } else { "aarch64" };
    refused_after(|m| m.arch = other.into(), &[other, std::env::consts::ARCH]);
}

#[test]
fn an_image_needing_cpu_features_this_cpu_lacks_is_refused_naming_them() {
    // Bit 62 of XCR0 is reserved: no CPU enables it, so the image asks for more than
    // this one has.
    refused_after(|m| m.cpu.xfeatures_used |= 1 << 62, &["XSAVE features 0x4000000000000000"]);
}

#[test]
fn an_image_listing_a_missing_file_is_refused_naming_it() {
    refused_after(
        |m| {
            let mut e = m.files[0].clone();
            e.name = "vanished.img".into();
            m.files.push(e);
        },
        &["vanished.img"],
    );
}

/// Runs torpor with ARGS and asserts exit 1 and one line on stderr naming every item of
/// NAMES.
fn assert_fails(args: &[&OsStr], names: &[&str]) -> String {
    let out = torpor(args);
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "torpor {args:?}: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "torpor {args:?}: want one line:\n{stderr}");
    for name in names {
        assert!(stderr.contains(name), "torpor {args:?}: {name} not in: {stderr}");
    }
    stderr
}

#[test]
fn dump_of_a_kernel_thread_is_refused() {
    let tmp = TempDir::new().expect("tempdir");
    let dir = tmp.path().join("img");
    assert_fails(
        &["dump".as_ref(), "2".as_ref(), "-D".as_ref(), dir.as_os_str()],
        &["kernel thread"],
    );
    assert!(!dir.exists(), "a refused dump left {}", dir.display());
}

#[test]
fn dump_of_pids_that_are_no_process_are_refused_naming_them() {
    let tmp = TempDir::new().expect("tempdir");
    let dir = tmp.path().join("img");
    for pid in ["0", "4194304", "2147483647"] {
        let out = torpor(["dump".as_ref(), pid.as_ref(), "-D".as_ref(), dir.as_os_str()]);
        let stderr = stderr_of(&out);
        assert!(matches!(out.status.code(), Some(1 | 2)), "dump {pid}: {stderr}");
        assert!(stderr.contains(pid), "dump {pid}: the pid is not named: {stderr}");
        assert!(!dir.exists(), "a refused dump of {pid} left {}", dir.display());
    }
}

#[test]
fn torpor_refuses_to_dump_itself() {
    let tmp = TempDir::new().expect("tempdir");
    let dir = tmp.path().join("img");
    // The shell execs torpor under its own pid, which it names first.
    let out = Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" dump $$ -D \"$1\"")
        .arg(env!("CARGO_BIN_EXE_torpor"))
        .arg(&dir)
        .output()
        .expect("run sh");
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("torpor itself"), "{stderr}");
}

#[test]
fn an_image_directory_that_is_a_file_is_refused_naming_it() {
    let tmp = TempDir::new().expect("tempdir");
    let file = tmp.path().join("plain-file");
    fs::write(&file, b"not an image").expect("write file");
    let f = Fixture::start("counter", &[]);
    let out = f.dump(&file, &[]);
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("plain-file"), "dump does not name the file: {stderr}");
    common::assert_running_untraced(f.pid);
    assert_eq!(fs::read(&file).unwrap(), b"not an image", "dump wrote over the file");

    for cmd in ["restore", "verify", "inspect"] {
        assert_fails(&[cmd.as_ref(), "-D".as_ref(), file.as_os_str()], &["plain-file"]);
    }
}

#[test]
fn image_paths_with_spaces_newlines_and_unicode_work() {
    let tmp = TempDir::new().expect("tempdir");
    let dir = tmp.path().join("a b\nc – ünïcödé");
    let mut f = Fixture::start("counter", &[]);
    f.dump_ok(&dir);
    let out = torpor(["verify".as_ref(), "-D".as_ref(), dir.as_os_str()]);
    assert!(out.status.success(), "verify: {}", stderr_of(&out));
    f.restore_and_pass(&dir);
}
