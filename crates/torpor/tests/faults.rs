//! torpor killed in the middle of a dump or a restore, the dumped process vanishing, and
//! an image directory that cannot be written: the process must carry on as it was (and
//! prove it, by passing its own checks afterwards), nothing half-restored may survive,
//! and no partial image may pass for a whole one.
//!
//! The moments are reached with `TORPOR_TEST_KILL_AT=POINT` (torpor kills itself there)
//! and `TORPOR_TEST_KILL_TARGET_AT=POINT` (it kills the dumped process there); the points
//! are listed in docs/security.md.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use common::{
    assert_running_untraced, become_subreaper, close_inherited_fds, free_port, proc_status,
    wait_child, wait_pid, wait_pid_gone, Fixture, PidWait, Restore, FINISH_TIMEOUT, TORPOR_TIMEOUT,
};
use tempfile::TempDir;

/// What a torpor run left: its exit status and everything written to its stderr, by it
/// and by the guard it started (read after the guard is gone).
struct Run {
    status: ExitStatus,
    stderr: String,
    guard: Option<ExitStatus>,
}

/// Runs torpor with ARGS and ENV; when it was killed, waits for the guard its dump
/// started for PID (reparented to this test, a subreaper) to finish.
fn torpor_env(args: &[&str], env: &[(&str, &str)], pid: i32) -> Run {
    become_subreaper();
    let mut err = tempfile::tempfile().expect("tempfile");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_torpor"));
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err.try_clone().expect("clone"));
    close_inherited_fds(&mut cmd);
    let mut child = cmd.spawn().expect("spawn torpor");
    let status = wait_child(&mut child, TORPOR_TIMEOUT).expect("torpor did not finish");
    let guard = (status.signal() == Some(libc::SIGKILL)).then(|| {
        let g = guard_of(&mut err, pid);
        match wait_pid(g, Duration::from_secs(20)) {
            PidWait::Exited(s) => s,
            other => panic!("the guard {g} of the work on {pid}: {other:?}"),
        }
    });
    let mut stderr = String::new();
    err.rewind().expect("rewind");
    err.read_to_string(&mut stderr).expect("read stderr");
    Run { status, stderr, guard }
}

/// The pid of the guard that outlived torpor's dump or restore of PID, from its last message
/// (`torpor (guard N): torpor died ...`) in torpor's stderr ERR, once it is written.
fn guard_of(err: &mut File, pid: i32) -> i32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut text = String::new();
        err.rewind().expect("rewind");
        err.read_to_string(&mut text).expect("read stderr");
        let found = text.lines().find_map(|l| {
            let rest = l.strip_prefix("torpor (guard ")?;
            let (g, msg) = rest.split_once("): ")?;
            msg.starts_with("torpor died").then(|| g.parse().ok())?
        });
        if let Some(g) = found {
            return g;
        }
        assert!(std::time::Instant::now() < deadline, "no guard of pid {pid} reported:\n{text}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn maps(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps")
}

/// Every file of an image with its bytes.
fn image_files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fs::read_dir(dir)
        .expect("image dir")
        .flatten()
        .map(|e| (e.path(), fs::read(e.path()).expect("image file")))
        .collect()
}

/// Asserts that a process torpor died on carries on as it was: running, untraced, with
/// the signal mask and mappings it had, and passing its own checks.
fn assert_carries_on(f: &mut Fixture, maps_before: &str, sigblk_before: &str) {
    assert_running_untraced(f.pid);
    // No descriptor of torpor's is left in it (pre-copy's userfaultfd).
    for fd in fs::read_dir(format!("/proc/{}/fd", f.pid)).expect("fd dir").flatten() {
        let link = fs::read_link(fd.path()).unwrap_or_default();
        assert!(
            !link.to_string_lossy().contains("userfaultfd"),
            "{} left open",
            fd.path().display()
        );
    }
    assert_eq!(proc_status(f.pid, "SigBlk").as_deref(), Some(sigblk_before), "signal mask");
    assert_eq!(maps(f.pid), maps_before, "pid {} mappings changed", f.pid);
    f.go();
    let status = f.wait_exit(FINISH_TIMEOUT);
    assert!(status.success(), "{} exited with {status:?}; log:\n{}", f.name, f.log_text());
    f.assert_log_passed();
}

/// Kills torpor at POINT of a dump of fixture NAME and checks that the fixture carries
/// on and no image is left.
fn dump_killed_at(name: &str, point: &str) {
    dump_killed_at_with(name, point, &[]);
}

/// [`dump_killed_at`] with EXTRA arguments for the dump.
fn dump_killed_at_with(name: &str, point: &str, extra: &[&str]) {
    let mut f = Fixture::start(name, &[]);
    let (maps_before, sigblk) = (maps(f.pid), proc_status(f.pid, "SigBlk").unwrap());
    let images = TempDir::new().expect("tempdir");
    let dir = images.path().join("img");
    let pid = f.pid.to_string();
    let mut args = vec!["dump", &pid, "-D", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let run = torpor_env(&args, &[("TORPOR_TEST_KILL_AT", point)], f.pid);
    assert_eq!(run.status.signal(), Some(libc::SIGKILL), "torpor not killed at {point}");
    let guard = run.guard.unwrap_or_else(|| panic!("no guard outlived torpor:\n{}", run.stderr));
    assert!(guard.success(), "guard failed ({guard:?}):\n{}", run.stderr);
    assert!(run.stderr.contains("runs on as before"), "guard said:\n{}", run.stderr);
    assert!(!dir.exists(), "a partial image is left in {}", dir.display());
    assert_carries_on(&mut f, &maps_before, &sigblk);
}

#[test]
fn dump_killed_while_freezing_threads_leaves_them_running() {
    dump_killed_at("threads", "dump:freezing");
}

#[test]
fn dump_killed_while_running_calls_inside_leaves_the_registers() {
    dump_killed_at("registers", "dump:collecting");
}

/// The moments of one call run inside the process: its registers loaded, the call
/// entered, the call returned with torpor's registers still in place. The thread puts
/// itself back each time (its healing frame, docs/architecture.md "When torpor dies"),
/// with its vector registers, which the fixture checks.
#[test]
fn dump_killed_with_a_call_loaded_leaves_the_registers() {
    dump_killed_at("registers", "remote:loaded");
}

#[test]
fn dump_killed_inside_a_call_leaves_the_registers() {
    dump_killed_at("registers", "remote:entered");
}

#[test]
fn dump_killed_as_a_call_returns_leaves_the_registers() {
    dump_killed_at("registers", "remote:returned");
}

/// The same in a thread blocked in `read`: it goes back to reading and gets the message
/// written after go.
#[test]
fn dump_killed_inside_a_call_of_a_blocked_thread_leaves_it_reading() {
    dump_killed_at("threads_read", "remote:entered@thread");
}

#[test]
fn dump_killed_as_a_call_of_a_blocked_thread_returns_leaves_it_reading() {
    dump_killed_at("threads_read", "remote:returned@thread");
}

/// Pre-copy opens a userfaultfd inside the process and closes it there once torpor holds
/// a copy; killed in between, torpor leaves it open, and the guard closes it.
#[test]
fn dump_killed_with_a_userfaultfd_open_inside_leaves_none() {
    dump_killed_at_with("counter", "dump:uffd-open", &["--pre-copy"]);
}

#[test]
fn dump_killed_while_copying_memory_leaves_the_process_running() {
    dump_killed_at("counter", "dump:memory");
}

#[test]
fn dump_killed_before_the_manifest_leaves_no_image() {
    dump_killed_at("counter", "dump:written");
}

#[test]
fn dump_killed_after_commit_leaves_the_process_and_a_whole_image() {
    let mut f = Fixture::start("counter", &[]);
    let (maps_before, sigblk) = (maps(f.pid), proc_status(f.pid, "SigBlk").unwrap());
    let images = TempDir::new().expect("tempdir");
    let dir = images.path().join("img");
    let pid = f.pid.to_string();
    let run = torpor_env(
        &["dump", &pid, "-D", dir.to_str().unwrap()],
        &[("TORPOR_TEST_KILL_AT", "dump:committed")],
        f.pid,
    );
    assert_eq!(run.status.signal(), Some(libc::SIGKILL));
    assert!(run.guard.is_some_and(|g| g.success()), "guard:\n{}", run.stderr);
    assert!(run.stderr.contains("is complete"), "guard said:\n{}", run.stderr);
    let verify = common::torpor(["verify", "-D", dir.to_str().unwrap()]);
    assert!(verify.status.success(), "verify: {}", common::stderr_of(&verify));
    assert_carries_on(&mut f, &maps_before, &sigblk);
}

#[test]
fn dump_killed_while_ending_a_tree_ends_the_rest() {
    let mut tree = common::FixtureTree::start("tree", &[], &["child", "grandchild", "zombie"]);
    std::thread::sleep(Duration::from_millis(100));
    let root = tree.f.pid;
    let (child, grandchild) = (tree.others[0].1, tree.others[1].1);
    let images = TempDir::new().expect("tempdir");
    let dir = images.path().join("img");
    let run = torpor_env(
        &["dump", &root.to_string(), "-D", dir.to_str().unwrap()],
        &[("TORPOR_TEST_KILL_AT", "dump:killing")],
        root,
    );
    assert_eq!(run.status.signal(), Some(libc::SIGKILL));
    assert!(run.guard.is_some_and(|g| g.success()), "guard:\n{}", run.stderr);
    tree.f.assert_killed_by_dump();
    // The zombie too: its parent's death hands it to this test, which reaps it.
    for pid in [child, grandchild, tree.others[2].1] {
        assert!(wait_pid_gone(pid, Duration::from_secs(10)), "pid {pid} survived");
    }
    // The image was complete before the first process was ended: it wakes the tree.
    tree.f.restore_and_pass(&dir);
}

/// The firewall rules torpor added for PID's connections.
fn lock_rules(pid: i32) -> Vec<String> {
    let out = Command::new("nft").args(["list", "chain", "inet", "torpor", "lock"]).output();
    let tag = format!("\"torpor-{pid}-");
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains(&tag))
            .map(String::from)
            .collect()
    })
    .unwrap_or_default()
}

fn echo(s: &mut TcpStream, r: &mut BufReader<TcpStream>, msg: &str) -> String {
    s.write_all(msg.as_bytes()).expect("send");
    let mut line = String::new();
    r.read_line(&mut line).expect("read the echo");
    line.trim_end().to_string()
}

#[test]
fn dump_killed_with_a_connection_locked_unlocks_and_repairs_it() {
    let port = free_port();
    let mut f = Fixture::start("tcp_echo.py", &[&port.to_string()]);
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the echo server");
    s.set_read_timeout(Some(Duration::from_secs(15))).expect("read timeout");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    assert_eq!(echo(&mut s, &mut r, "hello"), "echo:hello total=5");
    let sigblk = proc_status(f.pid, "SigBlk").unwrap();

    let images = TempDir::new().expect("tempdir");
    let dir = images.path().join("img");
    let run = torpor_env(
        &["dump", &f.pid.to_string(), "-D", dir.to_str().unwrap(), "--tcp-established"],
        &[("TORPOR_TEST_KILL_AT", "dump:locked")],
        f.pid,
    );
    assert_eq!(run.status.signal(), Some(libc::SIGKILL), "stderr:\n{}", run.stderr);
    assert!(run.guard.is_some_and(|g| g.success()), "guard:\n{}", run.stderr);
    assert_eq!(lock_rules(f.pid), Vec::<String>::new(), "rules left behind");
    assert!(!dir.exists(), "a partial image is left");
    assert_running_untraced(f.pid);
    assert_eq!(proc_status(f.pid, "SigBlk"), Some(sigblk));
    // Out of repair mode and not held back: the connection answers.
    assert_eq!(echo(&mut s, &mut r, "again"), "echo:again total=10");
    f.go();
    drop(s);
    let status = f.wait_exit(FINISH_TIMEOUT);
    assert!(status.success(), "{status:?}; log:\n{}", f.log_text());
    f.assert_log_passed();
}

#[test]
fn dumped_process_killed_mid_dump_is_a_clear_failure() {
    for point in ["dump:collecting", "dump:memory"] {
        let mut f = Fixture::start("counter", &["4"]);
        let images = TempDir::new().expect("tempdir");
        let dir = images.path().join("img");
        let run = torpor_env(
            &["dump", &f.pid.to_string(), "-D", dir.to_str().unwrap()],
            &[("TORPOR_TEST_KILL_TARGET_AT", point)],
            f.pid,
        );
        assert_eq!(run.status.code(), Some(1), "{point}: {:?}\n{}", run.status, run.stderr);
        assert!(
            run.stderr.contains(&format!("dump of pid {} failed", f.pid)),
            "{point}: the error does not name the pid:\n{}",
            run.stderr
        );
        assert!(!dir.exists(), "{point}: a partial image is left");
        let status = f.wait_exit(Duration::from_secs(10));
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{point}");
    }
}

/// A small filesystem mounted for one test, unmounted on drop.
struct Mount {
    dir: TempDir,
}

impl Mount {
    fn tmpfs(options: &str) -> Mount {
        let dir = TempDir::new().expect("tempdir");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "torpor-test"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t tmpfs -o {options} failed (this test needs root)");
        Mount { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Dumps a 16 MiB counter into DIR, expects a failure whose message contains WHAT, and
/// checks that the counter carries on.
fn dump_fails_cleanly(dir: &Path, what: &[&str]) -> String {
    let mut f = Fixture::start("counter", &["16"]);
    let (maps_before, sigblk) = (maps(f.pid), proc_status(f.pid, "SigBlk").unwrap());
    let run = torpor_env(&["dump", &f.pid.to_string(), "-D", dir.to_str().unwrap()], &[], f.pid);
    assert_eq!(run.status.code(), Some(1), "{:?}\n{}", run.status, run.stderr);
    for w in what {
        assert!(run.stderr.contains(w), "the error does not say {w:?}:\n{}", run.stderr);
    }
    assert!(run.stderr.contains(&format!("pid {}", f.pid)), "no pid in:\n{}", run.stderr);
    assert_carries_on(&mut f, &maps_before, &sigblk);
    run.stderr
}

#[test]
fn dump_onto_a_full_filesystem_fails_and_removes_the_partial_image() {
    let m = Mount::tmpfs("size=4m,mode=0700");
    let dir = m.path().join("img");
    dump_fails_cleanly(&dir, &["No space left on device", dir.to_str().unwrap()]);
    assert!(!dir.exists(), "the partial image is left in {}", dir.display());
    // Space is given back: only the mount's root is left.
    let used = fs::read_dir(m.path()).expect("mount").count();
    assert_eq!(used, 0, "files left on the full filesystem");
}

#[test]
fn dump_onto_a_read_only_filesystem_fails_before_touching_the_process() {
    let m = Mount::tmpfs("ro,size=1m");
    let dir = m.path().join("img");
    dump_fails_cleanly(&dir, &["Read-only file system", dir.to_str().unwrap()]);
}

#[test]
fn dump_into_an_existing_directory_on_a_full_filesystem_leaves_no_manifest() {
    let m = Mount::tmpfs("size=4m,mode=0700");
    let dir = m.path().join("img");
    fs::create_dir(&dir).expect("mkdir");
    File::create(dir.join("notes.txt")).expect("a file of the user's").write_all(b"mine").unwrap();
    dump_fails_cleanly(&dir, &["No space left on device"]);
    let left: Vec<_> = fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("notes.txt")], "the user's file only");
}

/// Kills torpor at POINT of a restore of DIR: the half-made process must be gone and the
/// image unchanged.
fn restore_killed_at(dir: &Path, pid: i32, point: &str) {
    let before = image_files(dir);
    let run = torpor_env(
        &["restore", "-D", dir.to_str().unwrap()],
        &[("TORPOR_TEST_KILL_AT", point)],
        pid,
    );
    assert_eq!(run.status.signal(), Some(libc::SIGKILL), "{point}: {}", run.stderr);
    assert!(run.guard.is_some_and(|g| g.success()), "{point}: guard:\n{}", run.stderr);
    assert!(run.stderr.contains("processes it had made"), "{point}: guard said:\n{}", run.stderr);
    assert!(wait_pid_gone(pid, Duration::from_secs(10)), "{point}: pid {pid} survived");
    assert!(image_files(dir) == before, "{point}: the image changed");
}

#[test]
fn restore_killed_at_any_point_leaves_nothing_and_the_image_whole() {
    let mut f = Fixture::start("counter", &["4"]);
    let images = TempDir::new().expect("tempdir");
    f.dump_ok(images.path());
    for point in ["restore:created", "restore:memory", "restore:ready"] {
        restore_killed_at(images.path(), f.pid, point);
    }
    // After all that, the image still wakes the process, which passes its checks.
    f.restore_and_pass(images.path());
}

#[test]
fn restore_of_a_tree_killed_while_releasing_leaves_no_part_of_it() {
    let mut tree = common::FixtureTree::start("tree", &[], &["child", "grandchild", "zombie"]);
    std::thread::sleep(Duration::from_millis(100));
    let root = tree.f.pid;
    let others: Vec<i32> = tree.others.iter().map(|o| o.1).collect();
    let images = TempDir::new().expect("tempdir");
    tree.f.dump_ok(images.path());
    let mark = tree.f.mark_log();
    for point in ["restore:memory", "restore:releasing"] {
        restore_killed_at(images.path(), root, point);
        // The zombie too: a dead parent hands it to this test, which reaps it.
        for &pid in &others {
            assert!(wait_pid_gone(pid, Duration::from_secs(10)), "{point}: {pid} survived");
        }
    }
    // A process let go before torpor died may have run a moment before the guard ended
    // it (and written to its log, which the image records): put the log back.
    tree.f.rewind_log(&mark);
    tree.f.restore_and_pass(images.path());
}

#[test]
fn restore_killed_with_a_connection_keeps_it_for_the_next_restore() {
    let port = free_port();
    let mut f = Fixture::start("tcp_echo.py", &[&port.to_string()]);
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the echo server");
    s.set_read_timeout(Some(Duration::from_secs(15))).expect("read timeout");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    assert_eq!(echo(&mut s, &mut r, "hello"), "echo:hello total=5");
    let images = TempDir::new().expect("tempdir");
    let out = f.dump(images.path(), &["--tcp-established"]);
    assert!(out.status.success(), "dump: {}", common::stderr_of(&out));
    f.assert_killed_by_dump();

    for point in ["restore:memory", "restore:ready"] {
        restore_killed_at(images.path(), f.pid, point);
        // The restore never let the connection out of repair mode, so its death said
        // nothing to the peer, and the peer is still held back for the next restore.
        assert!(!lock_rules(f.pid).is_empty(), "{point}: the lock was removed");
    }
    s.write_all(b"during").expect("send while the server hibernates");
    let mut restore = Restore::spawn(images.path(), &[]);
    restore.wait_for_process(&f);
    let mut line = String::new();
    r.read_line(&mut line).expect("the echo of what was sent meanwhile");
    assert_eq!(line.trim_end(), "echo:during total=11");
    assert_eq!(lock_rules(f.pid), Vec::<String>::new(), "rules left after the restore");
    f.go();
    drop(s);
    let status = restore.wait(FINISH_TIMEOUT).expect("restored server never finished");
    assert!(status.success(), "restored server: {status:?}; stderr:\n{}", restore.stderr());
    f.assert_log_passed();
}
