//! Situations in which torpor must refuse cleanly: the pid is taken, the image is damaged,
//! the image does not fit on its filesystem.

mod common;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    assert_pid_gone, assert_restore_refused, assert_running_untraced, proc_exe, proc_start_time,
    stderr_of, wait_pid, wait_pid_gone, Fixture, PidWait, Restore, FINISH_TIMEOUT,
};
use tempfile::TempDir;

#[test]
fn restore_refuses_a_pid_that_is_taken() {
    let mut f = Fixture::start("signals", &[]);
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());

    // Restore once, detached: the restored process now holds the pid.
    let scratch = TempDir::new().expect("scratch dir");
    let pidfile = scratch.path().join("pid");
    let mut first = Restore::spawn(images.path(), &["--detach", "--pidfile", path_str(&pidfile)]);
    let status = first.expect_exit("--detach");
    assert!(status.success(), "restore --detach: {status:?}; stderr:\n{}", first.stderr());
    let written = fs::read_to_string(&pidfile).expect("read pidfile");
    assert_eq!(written.trim(), f.pid.to_string(), "pidfile");
    if proc_exe(f.pid).as_deref() != Some(f.exe.as_path()) {
        let fate = match wait_pid(f.pid, Duration::ZERO) {
            PidWait::Exited(status) => format!("it ended with {status:?}"),
            other => format!("{other:?}"),
        };
        panic!("detached process is not running: {fate}; log:\n{}", f.log_text());
    }
    let started = proc_start_time(f.pid);

    let pid = f.pid.to_string();
    assert_restore_refused(images.path(), &[&pid, "signals"]);
    assert_eq!(proc_start_time(f.pid), started, "the detached process was replaced");

    // The detached process was reparented to this subreaper and still passes.
    f.go();
    match wait_pid(f.pid, FINISH_TIMEOUT) {
        PidWait::Exited(status) => assert!(status.success(), "detached process: {status:?}"),
        PidWait::NotOurChild => assert!(wait_pid_gone(f.pid, FINISH_TIMEOUT), "never exited"),
        PidWait::TimedOut => panic!("detached process still running; log:\n{}", f.log_text()),
    }
    f.assert_log_passed();
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    FlipByte,
    Truncate,
    Remove,
}

#[test]
fn restore_refuses_a_damaged_image_naming_the_file() {
    let mut f = Fixture::start("counter", &[]);
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());

    let files = files_under(images.path());
    assert!(!files.is_empty(), "dump wrote no files");
    for rel in &files {
        for damage in [Damage::FlipByte, Damage::Truncate, Damage::Remove] {
            let copy = TempDir::new().expect("copy dir");
            copy_tree(images.path(), copy.path());
            let target = copy.path().join(rel);
            let mut bytes = fs::read(&target).expect("read image file");
            match damage {
                Damage::FlipByte if bytes.is_empty() => bytes.push(0x5a),
                Damage::FlipByte => {
                    let mid = bytes.len() / 2;
                    bytes[mid] ^= 0xff;
                }
                Damage::Truncate if bytes.is_empty() => continue,
                Damage::Truncate => bytes.truncate(bytes.len() / 2),
                Damage::Remove => {}
            }
            match damage {
                Damage::Remove => fs::remove_file(&target).expect("remove image file"),
                _ => fs::write(&target, &bytes).expect("write image file"),
            }

            let name = rel.file_name().expect("file name").to_string_lossy().into_owned();
            eprintln!("damage {damage:?} to {}", rel.display());
            assert_restore_refused(copy.path(), &[&name]);
            assert_pid_gone(f.pid);
        }
    }
}

#[test]
fn dump_into_a_full_filesystem_fails_and_leaves_the_process_running() {
    let Some(tmpfs) = Tmpfs::mount("size=1m") else {
        eprintln!("mounting tmpfs is not allowed here; nothing to test");
        return;
    };
    let mut f = Fixture::start("counter", &["16"]);
    let out = f.dump(&tmpfs.dir.path().join("img"), &[]);
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "dump into 1 MiB: {:?}; {stderr}", out.status);
    assert!(stderr.to_lowercase().contains("space"), "no word about space: {stderr}");

    assert!(f.child.try_wait().expect("try_wait").is_none(), "process exited after failed dump");
    assert_running_untraced(f.pid);
    f.go();
    let status = f.wait_exit(FINISH_TIMEOUT);
    assert!(status.success(), "after failed dump: {status:?}; log:\n{}", f.log_text());
    f.assert_log_passed();
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Regular files under DIR, as paths relative to it, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for entry in fs::read_dir(dir.join(&rel)).expect("read_dir") {
            let entry = entry.expect("dir entry");
            let rel = rel.join(entry.file_name());
            if entry.file_type().expect("file type").is_dir() {
                todo.push(rel);
            } else {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

fn copy_tree(from: &Path, to: &Path) {
    for rel in files_under(from) {
        let dest = to.join(&rel);
        fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        fs::copy(from.join(&rel), dest).expect("copy image file");
    }
}

/// A small tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs with OPTIONS; None if this process may not mount.
    fn mount(options: &str) -> Option<Tmpfs> {
        let dir = TempDir::new().expect("mount point");
        let target = CString::new(dir.path().as_os_str().as_bytes()).expect("path");
        let options = CString::new(options).expect("options");
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "mount tmpfs: {err}");
            return None;
        }
        Some(Tmpfs { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.dir.path().as_os_str().as_bytes()).expect("path");
        // SAFETY: target is a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}
