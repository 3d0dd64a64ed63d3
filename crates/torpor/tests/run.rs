//! `torpor run [--pidfile F] -- CMD...` starts CMD as pid 1 of its own pid namespace and
//! writes CMD's pid as seen from outside into F. A tree dumped from there wakes in a new
//! namespace with the same inner pids, even when its outer pids have been taken; a plain
//! image whose pid is taken is refused with a pointer to `torpor run`.

mod common;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    assert_restore_refused, become_subreaper, close_inherited_fds, fixture, kill_stray, proc_exe,
    proc_status, stderr_of, torpor, wait_child, wait_pid_gone, Fixture, Restore, FINISH_TIMEOUT,
    READY_TIMEOUT, TORPOR_TIMEOUT,
};
use tempfile::TempDir;

const POLL: Duration = Duration::from_millis(10);

/// What holds a pid a test needs taken: a `sleep` the test started under it (killed and
/// reaped on drop), or a process of someone else's that got it first.
struct PidHolder {
    child: Option<Child>,
    name: String,
}

impl Drop for PidHolder {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const NS_LAST_PID: &str = "/proc/sys/kernel/ns_last_pid";

fn last_pid() -> i32 {
    let text = fs::read_to_string(NS_LAST_PID).expect("read ns_last_pid");
    text.trim().parse().expect("ns_last_pid")
}

/// Makes sure PID is taken: as root, writing PID - 1 into `ns_last_pid` right before a
/// fork hands out PID, unless another fork on the machine comes in between.
fn take_pid(pid: i32) -> PidHolder {
    // Tests of this binary run in parallel; their forks must not race each other here.
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..100 {
        if let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) {
            return PidHolder { child: None, name: comm.trim().to_string() };
        }
        let last = last_pid();
        fs::write(NS_LAST_PID, format!("{}", pid - 1)).expect("write ns_last_pid");
        let child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        // Put the allocator back, so that pids freed meanwhile (which other tests may be
        // about to restore) are not handed out again right away.
        fs::write(NS_LAST_PID, format!("{}", last_pid().max(last))).expect("write ns_last_pid");
        let holder = PidHolder { child: Some(child), name: "sleep".into() };
        if holder.child.as_ref().is_some_and(|c| c.id() as i32 == pid) {
            return holder;
        }
    }
    panic!("could not get pid {pid} taken");
}

/// The pids of PID in each pid namespace it is in, outermost first (`NSpid:`).
fn ns_pids(pid: i32) -> Vec<i32> {
    proc_status(pid, "NSpid")
        .unwrap_or_else(|| panic!("pid {pid} is gone"))
        .split_whitespace()
        .map(|p| p.parse().expect("NSpid entry"))
        .collect()
}

/// The pid namespace of PID, as its `ns/pid` link reads.
fn pid_ns(pid: &str) -> PathBuf {
    fs::read_link(format!("/proc/{pid}/ns/pid")).expect("read ns/pid")
}

/// Outer pids of the children of PID's main thread.
fn children(pid: i32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().expect("child pid"))
        .collect()
}

/// Reads a pid from FILE once something has written one, within TORPOR_TIMEOUT.
fn wait_pidfile(file: &Path, writer: &mut Child) -> i32 {
    let deadline = Instant::now() + TORPOR_TIMEOUT;
    loop {
        if let Some(pid) = fs::read_to_string(file).ok().and_then(|s| s.trim().parse().ok()) {
            return pid;
        }
        if let Some(status) = writer.try_wait().expect("try_wait") {
            panic!("exited with {status:?} before writing {}", file.display());
        }
        assert!(Instant::now() < deadline, "{} not written", file.display());
        sleep(POLL);
    }
}

/// Waits until COND holds, or panics with WHAT after TORPOR_TIMEOUT.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TORPOR_TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        sleep(POLL);
    }
}

/// `torpor run --pidfile PIDFILE -- CMD...` with its output and CMD's in WORKDIR/log.
/// On drop, kills `torpor run` and every process recorded in `strays` that still runs
/// the program recorded with it (killing a namespace's first process ends the others).
struct Run {
    run: Child,
    workdir: TempDir,
    pidfile: PathBuf,
    strays: Vec<(i32, PathBuf)>,
}

impl Run {
    fn start<S: AsRef<OsStr>>(cmd: &[S]) -> Run {
        become_subreaper();
        let workdir = tempfile::Builder::new().prefix("torpor-run-").tempdir().expect("workdir");
        let pidfile = workdir.path().join("run.pid");
        let log = File::create(workdir.path().join("log")).expect("create log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_torpor"));
        command
            .arg("run")
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("--")
            .args(cmd)
            .current_dir(workdir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        close_inherited_fds(&mut command);
        let run = command.spawn().expect("spawn torpor run");
        Run { run, workdir, pidfile, strays: Vec::new() }
    }

    /// The pid of CMD as this test sees it, once it runs EXE in a pid namespace of its own.
    fn outer_pid(&mut self, exe: &Path) -> i32 {
        let pid = wait_pidfile(&self.pidfile.clone(), &mut self.run);
        self.strays.push((pid, exe.to_path_buf()));
        wait_until(&format!("pid {pid} never ran {}", exe.display()), || {
            proc_exe(pid).as_deref() == Some(exe)
        });
        assert_ne!(pid_ns(&pid.to_string()), pid_ns("self"), "pid {pid} is in our namespace");
        assert_eq!(ns_pids(pid), [pid, 1], "NSpid of the program torpor run started");
        pid
    }

    fn path(&self, name: &str) -> PathBuf {
        self.workdir.path().join(name)
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// Dumps the tree whose first process is PID, and sees `torpor run` end with it.
    fn dump(&mut self, pid: i32, images: &Path) {
        let out = torpor(["dump".as_ref(), pid.to_string().as_ref(), "-D".as_ref(), images]);
        assert!(out.status.success(), "dump of pid {pid}: {}", stderr_of(&out));
        let status = wait_child(&mut self.run, Duration::from_secs(10));
        assert!(status.is_some(), "torpor run still running after its program was dumped");
        assert!(wait_pid_gone(pid, Duration::from_secs(10)), "pid {pid} still exists");
    }

    /// Restores IMAGES with the restored root's outer pid written to a file; returns the
    /// running restore and that pid, once the root runs EXE.
    fn restore(&mut self, images: &Path, exe: &Path) -> (Restore, i32) {
        let pidfile = self.path("restore.pid");
        let arg = pidfile.to_str().expect("utf-8 path");
        let mut restore = Restore::spawn(images, &["--pidfile", arg]);
        let pid = wait_pidfile(&pidfile, &mut restore.child);
        self.strays.push((pid, exe.to_path_buf()));
        wait_until(&format!("restored pid {pid} never ran {}", exe.display()), || {
            proc_exe(pid).as_deref() == Some(exe)
        });
        (restore, pid)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.run.kill();
        let _ = wait_child(&mut self.run, Duration::from_secs(10));
        for (pid, exe) in &self.strays {
            kill_stray(*pid, exe);
        }
    }
}

/// Waits for a restore to end and asserts it succeeded.
fn assert_restore_succeeds(mut restore: Restore, logs: &str) {
    let status = restore
        .wait(FINISH_TIMEOUT)
        .unwrap_or_else(|| panic!("restore did not finish; logs:\n{logs}"));
    assert!(status.success(), "restore: {status:?}; stderr:\n{}\nlogs:\n{logs}", restore.stderr());
}

fn assert_passed(log: &str, what: &str) {
    let last = log.lines().rev().find(|l| !l.trim().is_empty());
    assert!(
        last == Some("PASS") && !log.lines().any(|l| l.starts_with("FAIL")),
        "{what} did not PASS; log:\n{log}"
    );
}

#[test]
fn a_program_started_by_torpor_run_wakes_while_its_outer_pid_is_taken() {
    let counter = fixture("counter");
    let mut r = Run::start(&[counter.as_os_str(), ".".as_ref()]);
    let pid = r.outer_pid(&counter);
    wait_until("counter not READY", || r.log("log").lines().any(|l| l == "READY pid=1"));
    sleep(Duration::from_millis(100));

    let images = TempDir::new().expect("image dir");
    r.dump(pid, images.path());
    let _holder = take_pid(pid);

    let (restore, woken) = r.restore(images.path(), &counter);
    assert_ne!(woken, pid, "restored under the pid the placeholder holds");
    assert_eq!(ns_pids(woken), [woken, 1], "NSpid of the restored counter");
    fs::write(r.path("go"), "").expect("create go file");
    assert_restore_succeeds(restore, &r.log("log"));
    assert_passed(&r.log("log"), "counter");
}

#[test]
fn a_shell_tree_started_by_torpor_run_wakes_while_an_inner_process_pid_is_taken() {
    let counter = fixture("counter");
    // The shell waits for both counters and exits with the status of the first.
    let script = r#""$0" a > a/log 2>&1 & p=$!; "$0" b > b/log 2>&1 || exit 1; wait $p"#;
    let sh = fs::canonicalize("/bin/sh").expect("canonicalize /bin/sh");
    let mut r = Run::start(&[sh.as_os_str(), "-c".as_ref(), script.as_ref(), counter.as_os_str()]);
    for dir in ["a", "b"] {
        fs::create_dir(r.path(dir)).expect("create counter dir");
    }
    let root = r.outer_pid(&sh);
    let deadline = Instant::now() + READY_TIMEOUT;
    let kids = loop {
        let kids = children(root);
        let ready = ["a/log", "b/log"].iter().all(|l| r.log(l).starts_with("READY pid="));
        if kids.len() == 2 && ready {
            break kids;
        }
        assert!(Instant::now() < deadline, "counters not READY; children {kids:?}");
        sleep(POLL);
    };
    for &kid in &kids {
        r.strays.push((kid, counter.clone()));
        assert_eq!(proc_exe(kid).as_deref(), Some(counter.as_path()), "child {kid} of the shell");
    }
    let inner: Vec<i32> = kids.iter().map(|&k| ns_pids(k)[1]).collect();
    sleep(Duration::from_millis(100));

    let images = TempDir::new().expect("image dir");
    r.dump(root, images.path());
    for &kid in &kids {
        assert!(wait_pid_gone(kid, Duration::from_secs(10)), "pid {kid} still exists");
    }
    let _holder = take_pid(kids[0]);

    let (restore, woken) = r.restore(images.path(), &sh);
    assert_eq!(ns_pids(woken), [woken, 1], "NSpid of the restored shell");
    let mut back = Vec::new();
    wait_until("the counters did not come back under the shell", || {
        back = children(woken);
        back.len() == 2 && back.iter().all(|&k| proc_exe(k).as_deref() == Some(counter.as_path()))
    });
    let mut inner_back: Vec<i32> = back.iter().map(|&k| ns_pids(k)[1]).collect();
    inner_back.sort_unstable();
    let mut inner_before = inner.clone();
    inner_before.sort_unstable();
    assert_eq!(inner_back, inner_before, "inner pids of the counters");
    assert!(!back.contains(&kids[0]), "a counter came back under the pid the placeholder holds");

    for dir in ["a", "b"] {
        fs::write(r.path(dir).join("go"), "").expect("create go file");
    }
    let logs = format!("a:\n{}\nb:\n{}", r.log("a/log"), r.log("b/log"));
    assert_restore_succeeds(restore, &logs);
    assert_passed(&r.log("a/log"), "counter a");
    assert_passed(&r.log("b/log"), "counter b");
}

#[test]
fn restore_of_a_plain_image_whose_pid_is_taken_names_the_holder_and_torpor_run() {
    let mut f = Fixture::start("counter", &[]);
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());
    let holder = take_pid(f.pid);
    let pid = f.pid.to_string();
    assert_restore_refused(images.path(), &[&pid, &holder.name, "torpor run"]);
}
