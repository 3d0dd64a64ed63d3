//! A PostgreSQL server (postmaster, its helper processes and a client's backend) with a
//! table its exited backends read into the shared buffer pool: hibernated with a client
//! connection open, it wakes with the table, the connection and new connections working.
//!
//! Needs PostgreSQL's server (Debian: apt-get install postgresql), run as its `postgres`
//! user.

mod common;

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    become_subreaper, close_inherited_fds, free_port, proc_exe, run_with_timeout, stderr_of,
    torpor, wait_child, wait_pid_gone, Restore, FINISH_TIMEOUT, READY_TIMEOUT,
};
use tempfile::TempDir;

const ROWS: u64 = 100_000;

/// The directory of PostgreSQL's server programs (`initdb`, `postgres`).
fn pg_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("postgres").is_file())
        .collect();
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!("PostgreSQL's server is not installed (Debian: apt-get install postgresql)")
    })
}

/// The uid and gid of the `postgres` user.
fn postgres_user() -> (u32, u32) {
    let name = CString::new("postgres").unwrap();
    // SAFETY: getpwnam takes a C string and returns a pointer to static storage or null;
    // the fields are copied out at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!pw.is_null(), "no postgres user (Debian: apt-get install postgresql)");
    // SAFETY: checked non-null above.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// A command run as the `postgres` user.
fn as_postgres(program: &Path) -> Command {
    let (uid, gid) = postgres_user();
    let mut cmd = Command::new(program);
    cmd.uid(uid).gid(gid);
    close_inherited_fds(&mut cmd);
    cmd
}

/// `psql` as a client over TCP, running SQL and giving its unaligned output.
fn psql(port: u16, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new("psql");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-AtX"]).args([
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        sql,
    ]);
    close_inherited_fds(&mut cmd);
    let out = run_with_timeout(cmd, READY_TIMEOUT);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(stderr_of(&out))
    }
}

/// A postmaster of the test's own, in a fresh data directory; killed on drop.
struct Postgres {
    dir: TempDir,
    child: Child,
    pid: i32,
    port: u16,
    exe: PathBuf,
}

impl Postgres {
    fn start() -> Postgres {
        become_subreaper();
        let bin = pg_bin();
        let (uid, gid) = postgres_user();
        let dir = TempDir::new().expect("data dir");
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the data dir");
        let data = dir.path().join("data");
        let mut init = as_postgres(&bin.join("initdb"));
        init.args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"]).arg(&data);
        let out = run_with_timeout(init, READY_TIMEOUT);
        assert!(out.status.success(), "initdb: {}", stderr_of(&out));

        let port = free_port();
        let log = File::create(dir.path().join("log")).expect("create the log");
        let mut cmd = as_postgres(&bin.join("postgres"));
        cmd.arg("-D").arg(&data).args(["-p", &port.to_string(), "-k"]).arg(dir.path());
        cmd.args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log"))
            .stderr(log);
        let child = cmd.spawn().expect("start postgres");
        let pid = child.id() as i32;
        let pg = Postgres { dir, child, pid, port, exe: bin.join("postgres") };
        let deadline = Instant::now() + READY_TIMEOUT;
        while let Err(e) = psql(port, "select 1") {
            assert!(Instant::now() < deadline, "postgres not answering: {e}\n{}", pg.log());
            sleep(Duration::from_millis(100));
        }
        pg
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// The postmaster's processes: itself and its children.
    fn processes(&self) -> Vec<i32> {
        let children = fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.pid))
            .unwrap_or_default();
        std::iter::once(self.pid)
            .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
            .collect()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        for pid in self.processes().into_iter().rev() {
            if proc_exe(pid).as_deref() == Some(&self.exe) {
                // SAFETY: kill takes plain integers.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            wait_pid_gone(pid, Duration::from_secs(10));
        }
        let _ = self.child.kill();
        let _ = wait_child(&mut self.child, Duration::from_secs(10));
    }
}

/// A psql session kept open over one TCP connection, fed a statement at a time.
struct Session {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<std::process::ChildStdout>,
}

impl Session {
    fn open(port: u16) -> Session {
        let mut cmd = Command::new("psql");
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-AtqX"])
            .args(["-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        close_inherited_fds(&mut cmd);
        let mut child = cmd.spawn().expect("start psql");
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Session { child, stdin, out }
    }

    /// Runs a statement that prints one line, and returns it.
    fn query(&mut self, sql: &str) -> String {
        writeln!(self.stdin, "{sql}").expect("send to psql");
        self.stdin.flush().expect("flush psql's input");
        let mut line = String::new();
        let n = self.out.read_line(&mut line).expect("read psql's output");
        assert!(n > 0, "psql ended instead of answering {sql:?}");
        line.trim_end().to_string()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = wait_child(&mut self.child, Duration::from_secs(10));
    }
}

#[test]
fn postgres_keeps_its_tables_shared_buffers_and_a_client_connection() {
    let mut pg = Postgres::start();
    // Each psql -c is a backend that reads the catalogs and the table into the shared
    // buffers, then exits: those pages are in no page table the dump sees.
    psql(pg.port, "create table t(x int primary key)").expect("create table");
    psql(pg.port, &format!("insert into t select generate_series(1, {ROWS})")).expect("insert");
    assert_eq!(psql(pg.port, "select sum(x) from t").unwrap(), (ROWS * (ROWS + 1) / 2).to_string());
    let mut session = Session::open(pg.port);
    assert_eq!(session.query("select 'before', count(*) from t;"), format!("before|{ROWS}"));

    let processes = pg.processes();
    assert!(processes.len() >= 5, "postmaster and helpers: {processes:?}");
    let images = TempDir::new().expect("image dir");
    let pid = pg.pid.to_string();
    let out = torpor(
        ["dump", &pid, "-D"]
            .map(std::ffi::OsStr::new)
            .into_iter()
            .chain([images.path().as_os_str(), "--tcp-established".as_ref()]),
    );
    assert!(out.status.success(), "dump of postgres: {}\nlog:\n{}", stderr_of(&out), pg.log());
    let status = wait_child(&mut pg.child, Duration::from_secs(10)).expect("postmaster gone");
    assert!(!status.success(), "postmaster after the dump: {status:?}");
    for p in &processes {
        assert!(wait_pid_gone(*p, Duration::from_secs(10)), "pid {p} still there after dump");
    }

    let mut restore = Restore::spawn(images.path(), &[]);
    let deadline = Instant::now() + FINISH_TIMEOUT;
    while proc_exe(pg.pid).as_deref() != Some(&pg.exe) {
        if let Some(status) = restore.child.try_wait().expect("try_wait") {
            panic!("restore ended with {status:?}: {}", restore.stderr());
        }
        assert!(Instant::now() < deadline, "postgres not back: {}", restore.stderr());
        sleep(Duration::from_millis(20));
    }
    assert_eq!(
        session.query("select 'after', count(*) from t;"),
        format!("after|{ROWS}"),
        "on the connection opened before the dump"
    );
    assert_eq!(session.query("insert into t values (0) returning x;"), "0");
    let sum = psql(pg.port, "select count(*), sum(x) from t")
        .unwrap_or_else(|e| panic!("a new connection after the restore: {e}\nlog:\n{}", pg.log()));
    assert_eq!(sum, format!("{}|{}", ROWS + 1, ROWS * (ROWS + 1) / 2));
    psql(pg.port, "create table u as select * from t").expect("write after the restore");

    drop(session);
    // A fast shutdown: the restored postmaster stops its helpers and exits 0.
    // SAFETY: kill takes plain integers.
    unsafe { libc::kill(pg.pid, libc::SIGINT) };
    let status = restore.wait(FINISH_TIMEOUT).expect("restored postgres did not stop");
    assert!(status.success(), "restored postgres: {status:?}\n{}\n{}", restore.stderr(), pg.log());
}
