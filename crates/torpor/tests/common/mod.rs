//! Helpers shared by the integration tests: build the fixture programs in
//! `tests/fixtures/`, run them, drive `torpor dump` and `torpor restore`, and reap every
//! process they started, even when a test fails half way.
//!
//! A fixture runs as `NAME WORKDIR` with stdin on /dev/null and stdout and stderr on one
//! regular file, `WORKDIR/log`; it prints `READY pid=N`, waits for `WORKDIR/go`, then
//! prints `PASS` or `FAIL: ...` (see `tests/fixtures/fixture.h`).
//!
//! Every wait has a deadline so that a broken torpor fails the test instead of hanging it.

// Each test binary uses only some of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use tempfile::TempDir;

/// How long a fixture may take from start to `READY` (the Python one builds a big dict).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one `torpor` command may run before the test gives up on it.
pub const TORPOR_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a fixture may take from `go` to its exit.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

const POLL: Duration = Duration::from_millis(10);

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Makes this test process a child subreaper, once: processes that `torpor restore
/// --detach` leaves behind are then reparented to the test, which can reap them.
pub fn become_subreaper() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER: {}", std::io::Error::last_os_error());
    });
}

/// Compiles `tests/fixtures/NAME.c` into the cargo target dir, once per test binary, and
/// returns the path of the program.
///
/// The binary is replaced only when its bytes change, so a concurrent test run never
/// pulls the executable from under a dumped image.
pub fn fixture(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }

    let src = fixtures_dir().join(format!("{name}.c"));
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    fs::create_dir_all(&out_dir).expect("create fixture dir");
    let out = out_dir.join(name);
    let tmp = out_dir.join(format!("{name}.{}.tmp", std::process::id()));
    let cc = Command::new("cc")
        .args(["-O1", "-g", "-Wall", "-Wextra", "-o"])
        .arg(&tmp)
        .arg(&src)
        .arg("-lrt")
        .output()
        .expect("run cc");
    assert!(
        cc.status.success(),
        "cc {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&cc.stderr)
    );
    let fresh = fs::read(&tmp).expect("read compiled fixture");
    if fs::read(&out).ok().as_deref() == Some(&fresh[..]) {
        fs::remove_file(&tmp).expect("remove duplicate fixture build");
    } else {
        fs::rename(&tmp, &out).expect("install fixture");
    }
    let out = out.canonicalize().expect("canonicalize fixture");
    built.insert(name.to_string(), out.clone());
    out
}

/// The path of a file in `tests/fixtures/`.
pub fn fixture_source(file: &str) -> PathBuf {
    fixtures_dir().join(file)
}

/// The program and leading arguments for fixture NAME, and, for a compiled one, what
/// `/proc/PID/exe` must show. NAME is `NAME.c` compiled, or the Python script `NAME.py`
/// when there is no C source or when NAME itself ends in `.py`. (Which interpreter
/// `python3` ends up running, through whatever wrappers PATH holds, is only known once
/// it runs.)
fn fixture_program(name: &str) -> (PathBuf, Vec<PathBuf>, Option<PathBuf>) {
    let script = match name.strip_suffix(".py") {
        Some(_) => fixtures_dir().join(name),
        None => fixtures_dir().join(format!("{name}.py")),
    };
    let c_source = fixtures_dir().join(format!("{name}.c"));
    if name.ends_with(".py") || (script.exists() && !c_source.exists()) {
        return ("python3".into(), vec!["-u".into(), script], None);
    }
    let program = fixture(name);
    (program.clone(), vec![], Some(program))
}

/// The target of `/proc/PID/exe`, if PID is a live process.
pub fn proc_exe(pid: i32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// The value of a `Key:` line of `/proc/PID/status`.
pub fn proc_status(pid: i32, key: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// Asserts that PID is running, neither stopped nor traced.
pub fn assert_running_untraced(pid: i32) {
    let state = proc_status(pid, "State").unwrap_or_else(|| panic!("pid {pid} is gone"));
    assert!(!state.starts_with(['T', 't', 'Z', 'X']), "pid {pid} is in state {state}");
    assert_eq!(proc_status(pid, "TracerPid").as_deref(), Some("0"), "pid {pid} is traced");
}

/// The first line of a fixture log that is `READY` or starts with `READY `.
pub fn ready_line(log: &str) -> Option<&str> {
    log.lines().find(|l| *l == "READY" || l.starts_with("READY "))
}

/// The value of a `KEY=VALUE` word on a READY line.
pub fn ready_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().skip(1).find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The thread ids of PID, as `/proc/PID/task` lists them, sorted.
pub fn proc_tasks(pid: i32) -> Vec<i32> {
    let mut tids: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    tids.sort_unstable();
    tids
}

/// Waits for a child with a deadline; None if it is still running.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(POLL);
    }
}

/// Outcome of waiting for a process that is not a `std::process::Child`.
#[derive(Debug)]
pub enum PidWait {
    Exited(ExitStatus),
    NotOurChild,
    TimedOut,
}

/// Waits for PID with waitpid(2), which works for processes reparented to this subreaper.
pub fn wait_pid(pid: i32, timeout: Duration) -> PidWait {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer for the duration of the call.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid {
            return PidWait::Exited(ExitStatus::from_raw(status));
        }
        if rc < 0 {
            return PidWait::NotOurChild;
        }
        if Instant::now() >= deadline {
            return PidWait::TimedOut;
        }
        sleep(POLL);
    }
}

/// Waits until no live process has PID, reaping it if it became our zombie; false on
/// timeout.
pub fn wait_pid_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let state = proc_status(pid, "State");
        match state.as_deref() {
            None => return true,
            Some(s) if s.starts_with('Z') => {
                if let PidWait::NotOurChild = wait_pid(pid, Duration::ZERO) {
                    // Someone else's zombie: not running, which is all that is asked.
                    return true;
                }
            }
            Some(_) => {}
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(POLL);
    }
}

/// Kills PID if it still runs EXE (so that a reused pid is left alone), then reaps it.
pub fn kill_stray(pid: i32, exe: &Path) {
    if proc_exe(pid).as_deref() == Some(exe) {
        // SAFETY: kill(2) takes plain integers; the exe check above makes sure the pid
        // still belongs to the program this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_pid_gone(pid, Duration::from_secs(10));
    }
}

/// Makes CMD close every descriptor above stderr before it executes: a test binary
/// inherits some (cargo's jobserver pipe, for one) that a fixture must not hold.
pub fn close_inherited_fds(cmd: &mut Command) {
    // SAFETY: the hook runs between fork and exec and only makes one system call, which
    // is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs a command with stdin on /dev/null and stdout/stderr captured in unnamed files
/// (never pipes), killing it after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let mut out = tempfile::tempfile().expect("tempfile");
    let mut err = tempfile::tempfile().expect("tempfile");
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone"))
        .stderr(err.try_clone().expect("clone"));
    close_inherited_fds(&mut cmd);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let status = wait_child(&mut child, timeout);
    let read_back = |f: &mut File| {
        let mut v = Vec::new();
        f.rewind().expect("rewind");
        f.read_to_end(&mut v).expect("read output");
        v
    };
    let (stdout, stderr) = (read_back(&mut out), read_back(&mut err));
    match status {
        Some(status) => Output { status, stdout, stderr },
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
    }
}

/// Runs the torpor binary with ARGS and returns what it did.
pub fn torpor<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    torpor_with_env(args, &[])
}

/// Runs the torpor binary with ARGS and extra environment variables.
pub fn torpor_with_env<I, S>(args: I, env: &[(&str, &str)]) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    become_subreaper();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_torpor"));
    cmd.args(args).envs(env.iter().copied());
    run_with_timeout(cmd, TORPOR_TIMEOUT)
}

pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Size and modification time of a file, to put back after a run wrote to it.
pub struct FileMark {
    len: u64,
    modified: SystemTime,
}

/// A process under test, with its own work directory and log; killed and reaped on drop,
/// and so is anything torpor restored under its pid.
pub struct Fixture {
    pub name: String,
    pub child: Child,
    pub pid: i32,
    /// What `/proc/PID/exe` points to while the program runs.
    pub exe: PathBuf,
    pub workdir: TempDir,
    pub log: PathBuf,
    pub started: Instant,
}

impl Fixture {
    /// Starts fixture NAME as `NAME WORKDIR ARGS...` and waits for its READY line.
    pub fn start(name: &str, args: &[&str]) -> Fixture {
        Fixture::start_with_env(name, args, &[])
    }

    /// Like `start`, with extra environment variables.
    pub fn start_with_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Fixture {
        let (program, lead, exe) = fixture_program(name);
        Fixture::launch(name, &program, &lead, exe, args, env)
    }

    /// Starts a fixture that some interpreter runs, as `PROGRAM LEAD... WORKDIR ARGS...`,
    /// and waits for its READY line; `exe` is then whatever the process runs.
    pub fn start_interpreted<L: AsRef<OsStr>>(
        name: &str,
        program: &Path,
        lead: &[L],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Fixture {
        Fixture::launch(name, program, lead, None, args, env)
    }

    fn launch<L: AsRef<OsStr>>(
        name: &str,
        program: &Path,
        lead: &[L],
        exe: Option<PathBuf>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Fixture {
        let workdir = tempfile::Builder::new()
            .prefix(&format!("torpor-{name}-"))
            .tempdir()
            .expect("create workdir");
        let mut cmd = Command::new(program);
        cmd.args(lead).arg(workdir.path()).args(args).env_remove("FIXTURE_BREAK");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut f = Fixture::spawn(name, cmd, exe.clone().unwrap_or_default(), workdir);
        f.wait_ready();
        let running = proc_exe(f.pid).expect("fixture exe");
        match exe {
            Some(exe) => assert_eq!(running, exe, "{name} runs another program"),
            None => f.exe = running,
        }
        f
    }

    /// Starts any program the same way (stdio, workdir as cwd) without waiting for READY.
    pub fn start_program(program: &Path, args: &[&str]) -> Fixture {
        let name = program.file_name().expect("program name").to_string_lossy().into_owned();
        let exe = program.canonicalize().expect("canonicalize program");
        let workdir = tempfile::Builder::new()
            .prefix(&format!("torpor-{name}-"))
            .tempdir()
            .expect("create workdir");
        let mut cmd = Command::new(program);
        cmd.args(args);
        let f = Fixture::spawn(&name, cmd, exe, workdir);
        let deadline = Instant::now() + READY_TIMEOUT;
        while proc_exe(f.pid).as_deref() != Some(&f.exe) {
            assert!(Instant::now() < deadline, "{} never started", program.display());
            sleep(POLL);
        }
        f
    }

    fn spawn(name: &str, mut cmd: Command, exe: PathBuf, workdir: TempDir) -> Fixture {
        become_subreaper();
        let log = workdir.path().join("log");
        let file = File::create(&log).expect("create log");
        cmd.current_dir(workdir.path())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log"))
            .stderr(file);
        close_inherited_fds(&mut cmd);
        let started = Instant::now();
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let pid = child.id() as i32;
        Fixture { name: name.to_string(), child, pid, exe, workdir, log, started }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let log = self.log_text();
            if let Some(line) = ready_line(&log) {
                if let Some(pid) = ready_field(line, "pid") {
                    assert_eq!(pid, self.pid.to_string(), "{} reported another pid", self.name);
                }
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("{} exited with {status:?} before READY; log:\n{log}", self.name);
            }
            assert!(Instant::now() < deadline, "{} not READY after {READY_TIMEOUT:?}", self.name);
            sleep(POLL);
        }
    }

    /// The value of `KEY=VALUE` on the fixture's READY line, which it has printed.
    pub fn ready_value(&self, key: &str) -> String {
        let log = self.log_text();
        let line = ready_line(&log).unwrap_or_else(|| panic!("{} has no READY line", self.name));
        match ready_field(line, key) {
            Some(v) => v.to_string(),
            None => panic!("{}: no {key}= on the READY line: {line}", self.name),
        }
    }

    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.workdir.path().join(name)
    }

    /// Tells the fixture to run its final checks.
    pub fn go(&self) {
        File::create(self.path("go")).expect("create go file");
    }

    /// Takes the go file away again, before restoring an image a second time.
    pub fn ungo(&self) {
        let _ = fs::remove_file(self.path("go"));
    }

    /// Waits for the originally started process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_child(&mut self.child, timeout).unwrap_or_else(|| {
            panic!("{} still running after {timeout:?}; log:\n{}", self.name, self.log_text())
        })
    }

    /// Asserts the log ends with PASS and has no FAIL line.
    pub fn assert_log_passed(&self) {
        let log = self.log_text();
        let last = log.lines().rev().find(|l| !l.trim().is_empty());
        assert!(
            last == Some("PASS") && !log.lines().any(|l| l.starts_with("FAIL")),
            "{} did not PASS; log:\n{log}",
            self.name
        );
    }

    pub fn mark_log(&self) -> FileMark {
        let meta = fs::metadata(&self.log).expect("stat log");
        FileMark { len: meta.len(), modified: meta.modified().expect("mtime") }
    }

    /// Cuts the log back to MARK, size and mtime, so the image's view of it holds again.
    pub fn rewind_log(&self, mark: &FileMark) {
        let f = OpenOptions::new().write(true).open(&self.log).expect("open log");
        f.set_len(mark.len).expect("truncate log");
        f.set_modified(mark.modified).expect("set log mtime");
    }

    /// Asserts the original process died of SIGKILL (as `torpor dump` leaves it), reaps
    /// it, and asserts its pid is free.
    pub fn assert_killed_by_dump(&mut self) {
        let status = self.wait_exit(Duration::from_secs(10));
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{} after dump: {status:?}", self.name);
        assert!(proc_exe(self.pid).is_none(), "pid {} still exists after dump", self.pid);
    }

    /// `torpor dump PID -D DIR EXTRA...`.
    pub fn dump(&self, dir: &Path, extra: &[&str]) -> Output {
        let pid = self.pid.to_string();
        let mut args: Vec<&OsStr> = vec!["dump".as_ref(), pid.as_ref(), "-D".as_ref()];
        args.push(dir.as_os_str());
        args.extend(extra.iter().map(OsStr::new));
        torpor(args)
    }

    /// Dumps into DIR and asserts success and that the process is gone.
    pub fn dump_ok(&mut self, dir: &Path) {
        self.dump_ok_with(dir, &[]);
    }

    /// Dumps into DIR with EXTRA arguments and asserts success and that the process is
    /// gone.
    pub fn dump_ok_with(&mut self, dir: &Path, extra: &[&str]) {
        let out = self.dump(dir, extra);
        assert!(out.status.success(), "dump of {} failed: {}", self.name, stderr_of(&out));
        self.assert_killed_by_dump();
    }

    /// Restores DIR (with the restored process as a child of `torpor restore`), checks it
    /// comes back under the same pid running the same program, says go, and asserts that
    /// restore exits 0 and the log ends with PASS.
    pub fn restore_and_pass(&self, images: &Path) {
        let mut restore = Restore::spawn(images, &[]);
        restore.wait_for_process(self);
        self.go();
        let status = restore.wait(FINISH_TIMEOUT).unwrap_or_else(|| {
            panic!("restore of {} did not finish; log:\n{}", self.name, self.log_text())
        });
        assert!(
            status.success(),
            "restore of {} exited with {status:?}; stderr:\n{}\nlog:\n{}",
            self.name,
            restore.stderr(),
            self.log_text()
        );
        self.assert_log_passed();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = wait_child(&mut self.child, Duration::from_secs(10));
        kill_stray(self.pid, &self.exe);
    }
}

/// A running `torpor restore -D DIR`, killed and reaped on drop.
pub struct Restore {
    pub child: Child,
    out: File,
    err: File,
}

impl Restore {
    pub fn spawn(images: &Path, extra: &[&str]) -> Restore {
        Restore::spawn_with_env(images, extra, &[])
    }

    /// Like `spawn`, with extra environment variables.
    pub fn spawn_with_env(images: &Path, extra: &[&str], env: &[(&str, &str)]) -> Restore {
        become_subreaper();
        let out = tempfile::tempfile().expect("tempfile");
        let err = tempfile::tempfile().expect("tempfile");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_torpor"));
        cmd.arg("restore")
            .arg("-D")
            .arg(images)
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone"))
            .stderr(err.try_clone().expect("clone"));
        close_inherited_fds(&mut cmd);
        let child = cmd.spawn().expect("spawn torpor restore");
        Restore { child, out, err }
    }

    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    pub fn stderr(&self) -> String {
        let mut s = String::new();
        let mut f = self.err.try_clone().expect("clone");
        f.rewind().expect("rewind");
        let _ = f.read_to_string(&mut s);
        s
    }

    pub fn stdout(&self) -> String {
        let mut s = String::new();
        let mut f = self.out.try_clone().expect("clone");
        f.rewind().expect("rewind");
        let _ = f.read_to_string(&mut s);
        s
    }

    /// Waits until the fixture's pid runs the fixture's program again.
    pub fn wait_for_process(&mut self, f: &Fixture) {
        let deadline = Instant::now() + TORPOR_TIMEOUT;
        while proc_exe(f.pid).as_deref() != Some(&f.exe) {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "restore of {} exited with {status:?} before pid {} came back; \
                     stderr:\n{}\nlog:\n{}",
                    f.name,
                    f.pid,
                    self.stderr(),
                    f.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "pid {} not running {} after {TORPOR_TIMEOUT:?}",
                f.pid,
                f.exe.display()
            );
            sleep(POLL);
        }
    }

    /// Waits for an exit that must come soon, e.g. a refusal; panics otherwise.
    pub fn expect_exit(&mut self, what: &str) -> ExitStatus {
        self.wait(TORPOR_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "restore {what}: still running after {TORPOR_TIMEOUT:?}; stderr:\n{}",
                self.stderr()
            )
        })
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = wait_child(&mut self.child, Duration::from_secs(10));
    }
}

/// The standard round trip: start NAME, dump it, restore it under the same pid, and see
/// it PASS.
pub fn roundtrip(name: &str, args: &[&str]) {
    let mut f = Fixture::start(name, args);
    let images = TempDir::new().expect("image dir");
    // Let the fixture settle into its wait loop.
    sleep(Duration::from_millis(100));
    f.dump_ok(images.path());
    f.restore_and_pass(images.path());
}

/// A port on 127.0.0.1 that nothing listens on right now, below the kernel's ephemeral
/// range (a port from that range could become some connection's source port while a
/// dumped server's port is free). Never the same port twice in one test binary: tests run
/// in parallel, and a port freed by one test's dump must still be free at its restore.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Each test binary starts at its own place in the range.
    let start = std::process::id() % 12000;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < 12000, "no free port left between 20000 and 32000");
        let port = 20000 + ((start + n * 7) % 12000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A fixture whose READY line names more processes of its tree (`child=PID` and so on).
/// Those are killed and reaped on drop as well, should a test stop before the fixture
/// reaps them itself.
pub struct FixtureTree {
    pub f: Fixture,
    /// The READY line's keys and the pids they name.
    pub others: Vec<(String, i32)>,
}

impl FixtureTree {
    /// Starts fixture NAME and reads the pids of KEYS from its READY line.
    pub fn start(name: &str, args: &[&str], keys: &[&str]) -> FixtureTree {
        let f = Fixture::start(name, args);
        let others = keys
            .iter()
            .map(|k| {
                let pid = f.ready_value(k).parse().unwrap_or_else(|e| panic!("{k}= pid: {e}"));
                (k.to_string(), pid)
            })
            .collect();
        FixtureTree { f, others }
    }

    /// Dumps the whole tree, asserts every process of it is gone, restores it and sees the
    /// root PASS.
    pub fn roundtrip(&mut self) {
        self.roundtrip_with(&[]);
    }

    /// [`FixtureTree::roundtrip`] with EXTRA arguments to `torpor dump`.
    pub fn roundtrip_with(&mut self, extra: &[&str]) {
        let images = TempDir::new().expect("image dir");
        // Let the processes settle into their wait loops.
        sleep(Duration::from_millis(100));
        self.f.dump_ok_with(images.path(), extra);
        for (key, pid) in &self.others {
            assert!(
                wait_pid_gone(*pid, Duration::from_secs(10)),
                "{key} (pid {pid}) still exists after the dump"
            );
        }
        self.f.restore_and_pass(images.path());
    }
}

impl Drop for FixtureTree {
    fn drop(&mut self) {
        for (_, pid) in self.others.iter().rev() {
            kill_stray(*pid, &self.f.exe);
        }
    }
}

/// Runs NAME without torpor, says go, and asserts it PASSes.
pub fn assert_passes_standalone(name: &str, args: &[&str]) {
    let mut f = Fixture::start(name, args);
    sleep(Duration::from_millis(200));
    f.go();
    let status = f.wait_exit(FINISH_TIMEOUT);
    assert!(status.success(), "{name} exited with {status:?}; log:\n{}", f.log_text());
    f.assert_log_passed();
}

/// For each name in BREAKS, runs NAME with FIXTURE_BREAK set so that it damages that part
/// of its state at go, and asserts the fixture notices (exit 1 and a FAIL line).
pub fn assert_catches_damage(name: &str, args: &[&str], breaks: &[&str]) {
    for what in breaks {
        let mut f = Fixture::start_with_env(name, args, &[("FIXTURE_BREAK", what)]);
        sleep(Duration::from_millis(50));
        f.go();
        let status = f.wait_exit(FINISH_TIMEOUT);
        let log = f.log_text();
        assert_eq!(
            status.code(),
            Some(1),
            "{name} with FIXTURE_BREAK={what} exited with {status:?} (2 = unknown name); log:\n{log}"
        );
        assert!(log.contains("\nFAIL: "), "{name} with FIXTURE_BREAK={what}; log:\n{log}");
    }
}

/// How long a restore that must be refused may take to say so.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(30);

/// Restores IMAGES expecting a refusal: exit 1 and one line on stderr that names every
/// item of NAMES. Returns that line.
pub fn assert_restore_refused(images: &Path, names: &[&str]) -> String {
    let mut restore = Restore::spawn(images, &[]);
    let status = restore.wait(REFUSAL_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "restore of {} still running after {REFUSAL_TIMEOUT:?}; stderr:\n{}",
            images.display(),
            restore.stderr()
        )
    });
    let stderr = restore.stderr();
    let dir = images.display();
    assert_eq!(status.code(), Some(1), "restore of {dir}: {status:?}; stderr:\n{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "want one line on stderr, got:\n{stderr}");
    for name in names {
        assert!(stderr.contains(name), "stderr does not name {name}: {stderr}");
    }
    stderr
}

/// Asserts that, after a short grace period, no process runs under PID.
pub fn assert_pid_gone(pid: i32) {
    assert!(wait_pid_gone(pid, Duration::from_secs(5)), "pid {pid} still runs {:?}", proc_exe(pid));
}

/// The start time of PID in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// The firewall rules torpor holds for connections to or from `port` (other tests lock
/// connections of their own at the same time).
pub fn lock_rules(port: u16) -> String {
    let out = Command::new("nft").args(["list", "chain", "inet", "torpor", "lock"]).output();
    let (sport, dport) = (format!("sport {port} "), format!("dport {port} "));
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains("drop") && (l.contains(&sport) || l.contains(&dport)))
            .collect::<Vec<_>>()
            .join("\n")
    })
    .unwrap_or_default()
}
