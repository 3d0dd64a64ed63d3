//! A process in a namespace of its own, other than the pid namespace `torpor run` makes,
//! would wake in torpor's namespaces: with the host's network, hostname or IPC objects
//! instead of its own. Dump refuses it, naming the pid and the namespace, and leaves the
//! process running untraced.

mod common;

use std::fs;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    assert_running_untraced, close_inherited_fds, stderr_of, torpor, wait_child, wait_pid_gone,
    Restore, READY_TIMEOUT,
};
use tempfile::TempDir;

/// `sleep 600` under `unshare ARGS --fork`, killed with its parent on drop.
struct Unshared {
    unshare: Child,
    pid: i32,
}

impl Unshared {
    /// Starts the `sleep` and waits until it runs in the namespace `kind` (a name under
    /// /proc/PID/ns) that differs from this test's own.
    fn start(args: &[&str], kind: &str) -> Unshared {
        Unshared::start_cmd(args, kind, &["sleep", "600"])
    }

    /// Like `start`, with PROGRAM instead of `sleep`; its process is ready once it is in
    /// the namespace.
    fn start_cmd(args: &[&str], kind: &str, program: &[&str]) -> Unshared {
        let mut cmd = Command::new("unshare");
        cmd.args(args).arg("--fork").args(program);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        close_inherited_fds(&mut cmd);
        let unshare = cmd.spawn().expect("spawn unshare");
        let parent = unshare.id() as i32;
        let mut me = Unshared { unshare, pid: 0 };
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(pid) = child_of(parent) {
                if ns(pid, kind) != ns(std::process::id() as i32, kind) {
                    me.pid = pid;
                    return me;
                }
            }
            sleep(Duration::from_millis(10));
        }
        panic!("unshare {args:?} started no {program:?} in a {kind} namespace of its own");
    }
}

impl Drop for Unshared {
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: kill(2) with a pid this test started and has not reaped (its
            // parent, unshare, waits for it).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        let _ = self.unshare.kill();
        let _ = wait_child(&mut self.unshare, READY_TIMEOUT);
    }
}

/// The child of PARENT once it has become `sleep`.
fn sleeping_child(parent: i32) -> Option<i32> {
    let children = fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    let pid: i32 = children.split_whitespace().next()?.parse().ok()?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "sleep").then_some(pid)
}

fn ns(pid: i32, kind: &str) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok().map(|p| p.to_string_lossy().into())
}

/// Dumps PID and asserts that torpor refused, naming PID, NAME and the namespace's id.
fn assert_dump_refused(pid: i32, name: &str, kind: &str) {
    let images = TempDir::new().expect("image dir");
    let out = torpor(["dump", &pid.to_string(), "-D", &images.path().to_string_lossy()]);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "dump of pid {pid} in its own {name} namespace succeeded");
    let id = ns(pid, kind).expect("namespace link");
    assert!(err.contains(&format!("pid {pid}")), "refusal does not name pid {pid}: {err}");
    assert!(
        err.contains(&format!("{name} namespace of its own ({id})")),
        "refusal does not name the {name} namespace {id}: {err}"
    );
    assert_running_untraced(pid);
}

fn refuses(args: &[&str], name: &str, kind: &str) {
    let p = Unshared::start(args, kind);
    assert_dump_refused(p.pid, name, kind);
}

#[test]
fn dump_refuses_a_network_namespace() {
    refuses(&["--net"], "network", "net");
}

#[test]
fn dump_refuses_a_uts_namespace() {
    refuses(&["--uts"], "UTS (hostname)", "uts");
}

#[test]
fn dump_refuses_an_ipc_namespace() {
    refuses(&["--ipc"], "IPC", "ipc");
}

#[test]
fn dump_refuses_a_user_namespace() {
    refuses(&["--user", "--map-root-user"], "user", "user");
}

#[test]
fn dump_refuses_a_cgroup_namespace() {
    refuses(&["--cgroup"], "cgroup", "cgroup");
}

#[test]
fn dump_refuses_a_time_namespace() {
    refuses(&["--time"], "time", "time");
}

/// A mount namespace with a mount of its own (a tmpfs on /mnt): the refusal names where
/// the mounts differ.
#[test]
fn dump_refuses_a_mount_namespace_with_mounts_of_its_own() {
    let program = ["sh", "-c", "mount -t tmpfs torpor-test /mnt && exec sleep 600"];
    let p = Unshared::start_cmd(&["--mount"], "mnt", &program);
    // Until the shell has mounted and become `sleep`, the mounts may still be the same.
    wait_until("the tmpfs is mounted", || {
        fs::read_to_string(format!("/proc/{}/comm", p.pid)).is_ok_and(|c| c.trim() == "sleep")
    });
    assert_dump_refused(p.pid, "mount", "mnt");
    let images = TempDir::new().expect("image dir");
    let out = torpor(["dump", &p.pid.to_string(), "-D", &images.path().to_string_lossy()]);
    assert!(stderr_of(&out).contains("its mounts differ at /mnt"), "{}", stderr_of(&out));
}

/// A mount namespace that holds the same mounts as torpor's (`unshare --mount` alone, or
/// `ip netns exec`'s, which mounts /sys again) is accepted: the woken process sees the
/// same files. The shell proves it counts on from where it was.
#[test]
fn a_mount_namespace_with_the_same_mounts_wakes_in_torpors() {
    let scratch = TempDir::new().expect("scratch dir");
    let out = scratch.path().join("count");
    let script = format!(
        "i=0; while :; do i=$((i+1)); echo $i > {0}.new; mv {0}.new {0}; sleep 0.05; done",
        out.display()
    );
    let mut p = Unshared::start_cmd(&["--mount"], "mnt", &["sh", "-c", &script]);
    let count = || -> u64 {
        fs::read_to_string(&out).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
    };
    wait_until("the shell counts", || count() > 0);
    let images = TempDir::new().expect("image dir");
    let dump = torpor(["dump", &p.pid.to_string(), "-D", &images.path().to_string_lossy()]);
    assert!(dump.status.success(), "dump: {}", stderr_of(&dump));
    let pid = p.pid;
    p.pid = 0;
    let before = count();
    let mut restore = Restore::spawn(images.path(), &["--detach"]);
    let status = restore.expect_exit("--detach");
    assert!(status.success(), "restore: {status:?}; stderr:\n{}", restore.stderr());
    let woke = std::panic::catch_unwind(|| {
        wait_until("the woken shell counts on", || count() > before + 2);
    });
    // SAFETY: kill(2) with the woken shell's pid, this test's child (the subreaper).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_pid_gone(pid, READY_TIMEOUT);
    if let Err(e) = woke {
        std::panic::resume_unwind(e);
    }
}

/// A tree whose root is in torpor's namespaces but whose descendant is not: the refusal
/// names the descendant, and the whole tree keeps running.
#[test]
fn dump_refuses_a_descendant_in_a_namespace_of_its_own() {
    let mut cmd = Command::new("unshare");
    cmd.args(["--fork", "sh", "-c", "unshare --uts --fork sleep 600; true"]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    close_inherited_fds(&mut cmd);
    // `unshare --fork` with no namespace: a root (`sh`) whose child (the inner `unshare`,
    // which enters the namespace before it forks) and grandchild are in a UTS namespace
    // of their own.
    let mut outer = cmd.spawn().expect("spawn tree");
    let deadline = Instant::now() + READY_TIMEOUT;
    // The tree's pids, root first, as far as they have started.
    let mut pids = Vec::new();
    while Instant::now() < deadline {
        let sh = child_of(outer.id() as i32);
        let inner = sh.and_then(child_of);
        pids = [sh, inner, inner.and_then(sleeping_child)].into_iter().flatten().collect();
        if pids.len() == 3 && ns(pids[2], "uts") != ns(pids[0], "uts") {
            break;
        }
        sleep(Duration::from_millis(10));
    }
    let result = std::panic::catch_unwind(|| {
        assert_eq!(pids.len(), 3, "the tree did not start: {pids:?}");
        assert_dump_refused_member(pids[0], pids[1]);
        assert_running_untraced(pids[2]);
    });
    for pid in pids.iter().rev() {
        // SAFETY: kill(2) with pids of the tree this test started, each not yet reaped
        // by its parent, which the test has not ended yet.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let _ = outer.kill();
    let _ = wait_child(&mut outer, READY_TIMEOUT);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn child_of(parent: i32) -> Option<i32> {
    let children = fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

fn assert_dump_refused_member(root: i32, leaf: i32) {
    let images = TempDir::new().expect("image dir");
    let out = torpor(["dump", &root.to_string(), "-D", &images.path().to_string_lossy()]);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "dump of a tree with pid {leaf} in its own UTS namespace");
    let id = ns(leaf, "uts").expect("namespace link");
    assert!(
        err.contains(&format!("pid {leaf}: is in a UTS (hostname) namespace of its own ({id})")),
        "refusal does not name pid {leaf} and its namespace {id}: {err}"
    );
    assert_running_untraced(root);
    assert_running_untraced(leaf);
}

/// `unshare --pid --fork --mount-proc`: pid 1 of its own pid namespace, in a mount
/// namespace that differs from torpor's only by its own /proc. Restore makes both again,
/// so dump accepts it; the woken shell proves it counts on and still sees itself as pid 1
/// through its own /proc.
#[test]
fn a_pid_namespace_with_its_own_proc_wakes_in_a_new_one() {
    let scratch = TempDir::new().expect("scratch dir");
    let out = scratch.path().join("count");
    let script = format!(
        "i=0; while :; do i=$((i+1)); echo \"$i $(cat /proc/1/comm)\" > {0}.new; \
         mv {0}.new {0}; sleep 0.05; done",
        out.display()
    );
    let mut p = Unshared::start_cmd(&["--pid", "--mount-proc"], "pid", &["sh", "-c", &script]);
    let count = |what: &str| -> u64 {
        let text = fs::read_to_string(&out).unwrap_or_default();
        let mut words = text.split_whitespace();
        let n = words.next().and_then(|w| w.parse().ok());
        assert_eq!(words.next(), Some("sh"), "{what}: pid 1 is not the shell: {text:?}");
        n.unwrap_or_else(|| panic!("{what}: no count in {text:?}"))
    };
    wait_until("the shell counts", || fs::read_to_string(&out).is_ok_and(|t| !t.is_empty()));

    let images = TempDir::new().expect("image dir");
    let dump = torpor(["dump", &p.pid.to_string(), "-D", &images.path().to_string_lossy()]);
    assert!(dump.status.success(), "dump: {}", stderr_of(&dump));
    // The dump ended it: its pid is no longer this test's to kill.
    p.pid = 0;
    let before = count("at the dump");

    let pidfile = scratch.path().join("pid");
    let mut restore =
        Restore::spawn(images.path(), &["--detach", "--pidfile", &pidfile.to_string_lossy()]);
    let status = restore.expect_exit("--detach");
    assert!(status.success(), "restore: {status:?}; stderr:\n{}", restore.stderr());
    let pid: i32 = fs::read_to_string(&pidfile).expect("pidfile").trim().parse().expect("pid");
    let woke = std::panic::catch_unwind(|| {
        wait_until("the woken shell counts on", || count("after restore") > before + 2);
    });
    // SAFETY: kill(2) with the woken pid 1 of its namespace, which takes the namespace
    // down with it; it is this test's child (the subreaper) until reaped below.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_pid_gone(pid, READY_TIMEOUT);
    if let Err(e) = woke {
        std::panic::resume_unwind(e);
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + READY_TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        sleep(Duration::from_millis(10));
    }
}
