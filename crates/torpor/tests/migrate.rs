//! `torpor migrate` and `torpor serve` between two network namespaces of this machine.
//!
//! Each test builds its own little network: namespace A (the source), B (the
//! destination) and H (the clients), A and B each joined by a veth pair to a bridge in H.
//! A workload started in A under `torpor run` (so in a pid namespace of its own, whose
//! pids are free wherever it wakes) is migrated by `torpor migrate` run in A to `torpor
//! serve` in B, and must prove afterwards that it arrived whole, or, when the migration
//! fails, that it runs on in A untouched. Namespaces and processes go when the test
//! ends, whether it passed or not.

mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    assert_running_untraced, become_subreaper, close_inherited_fds, fixture, proc_status,
    run_with_timeout, stderr_of, wait_child, wait_pid_gone, READY_TIMEOUT, TORPOR_TIMEOUT,
};
use tempfile::TempDir;

const TORPOR: &str = env!("CARGO_BIN_EXE_torpor");
/// The addresses: A's and B's own (the migration goes between them), the clients' in H,
/// and the service address that moves with the process.
const ADDR_A: &str = "10.88.0.1";
const ADDR_B: &str = "10.88.0.2";
const ADDR_H: &str = "10.88.0.254";
const SERVICE: &str = "10.88.0.100";
const PORT: u16 = 7000;

/// Runs a command that must succeed (network setup).
fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("run a setup command");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Three network namespaces and the processes started in them; all removed on drop.
struct Net {
    a: String,
    b: String,
    h: String,
    /// Processes to kill on drop (pids as this test sees them).
    pids: Vec<i32>,
    children: Vec<Child>,
}

impl Net {
    fn new() -> Net {
        become_subreaper();
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!("tmig{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let net = Net {
            a: format!("{tag}a"),
            b: format!("{tag}b"),
            h: format!("{tag}h"),
            pids: Vec::new(),
            children: Vec::new(),
        };
        for ns in [&net.a, &net.b, &net.h] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let h = net.h.as_str();
        sh(&["ip", "-n", h, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", h, "addr", "add", &format!("{ADDR_H}/24"), "dev", "br0"]);
        sh(&["ip", "-n", h, "link", "set", "br0", "up"]);
        for (ns, port, addr) in [(&net.a, "pa", ADDR_A), (&net.b, "pb", ADDR_B)] {
            sh(&[
                "ip", "-n", h, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ]);
            sh(&["ip", "-n", h, "link", "set", port, "master", "br0", "up"]);
            sh(&["ip", "-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    /// `ip netns exec NS` followed by ARGS.
    fn exec(ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program]);
        cmd
    }

    /// Starts `torpor serve --once` in B with EXTRA options; returns when it listens.
    fn serve(&mut self, dir: &Path, extra: &[&str]) -> Served {
        let b = self.b.clone();
        self.serve_in(&b, ADDR_B, dir, extra)
    }

    /// Starts `torpor serve --once` in network namespace NS, listening on ADDR. It
    /// stays in this test's mount namespace (`nsenter --net`, not `ip netns exec`, whose
    /// mount namespace would end with serve and leave the woken process's files on
    /// detached mounts).
    fn serve_in(&mut self, ns: &str, addr: &str, dir: &Path, extra: &[&str]) -> Served {
        let log = dir.join(format!("serve-{ns}.log"));
        let work = dir.join(format!("incoming-{ns}"));
        fs::create_dir_all(&work).expect("create serve's work dir");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}")).arg(TORPOR);
        cmd.args(["serve", "--listen", &format!("{addr}:{PORT}"), "--once", "--work-dir"])
            .arg(&work)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create serve log"));
        close_inherited_fds(&mut cmd);
        let child = cmd.spawn().expect("start torpor serve");
        let pid = child.id() as i32;
        self.children.push(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        while !fs::read_to_string(&log).unwrap_or_default().contains("waiting for migrations") {
            assert!(Instant::now() < deadline, "serve never listened: {}", text(&log));
            assert!(
                proc_status(pid, "State").is_some_and(|s| !s.starts_with('Z')),
                "serve exited: {}",
                text(&log)
            );
            sleep(Duration::from_millis(10));
        }
        Served { pid, log, work }
    }

    /// Starts PROGRAM ARGS in A under `torpor run` (its own pid namespace), its output in
    /// LOG; returns its pid as this test sees it.
    fn start_in_a(&mut self, log: &Path, program: &Path, args: &[&str]) -> i32 {
        let pidfile = log.with_extension("pid");
        let mut cmd = Net::exec(&self.a, TORPOR);
        cmd.args(["run", "-q", "--pidfile"])
            .arg(&pidfile)
            .arg("--")
            .arg(program)
            .args(args)
            .current_dir(log.parent().expect("log dir"))
            .stdin(Stdio::null())
            .stdout(File::create(log).expect("create workload log"))
            .stderr(File::create(log.with_extension("run")).expect("create run log"));
        close_inherited_fds(&mut cmd);
        let child = cmd.spawn().expect("start torpor run");
        self.children.push(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        let pid = loop {
            if let Some(pid) = fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse().ok())
            {
                break pid;
            }
            assert!(Instant::now() < deadline, "torpor run never wrote its pid file");
            sleep(Duration::from_millis(10));
        };
        self.pids.push(pid);
        pid
    }

    /// `torpor migrate PID --to B` run in A, with EXTRA options.
    fn migrate(&self, pid: i32, extra: &[&str]) -> Output {
        let mut cmd = Net::exec(&self.a, TORPOR);
        cmd.args(["migrate", &pid.to_string(), "--to", &format!("{ADDR_B}:{PORT}")]).args(extra);
        run_with_timeout(cmd, TORPOR_TIMEOUT)
    }

    /// The name of the network namespace PID is in, among this test's.
    fn netns_of(&self, pid: i32) -> Option<&str> {
        let of = |p: &str| fs::metadata(p).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        let ino = of(&format!("/proc/{pid}/ns/net"))?;
        [&self.a, &self.b, &self.h]
            .into_iter()
            .find(|ns| of(&format!("/run/netns/{ns}")) == Some(ino))
            .map(|s| s.as_str())
    }

    /// The processes in network namespace NS.
    fn pids_in(&self, ns: &str) -> Vec<i32> {
        let procs = fs::read_dir("/proc").into_iter().flatten().flatten();
        let pids = procs.filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok());
        pids.filter(|&p| self.netns_of(p) == Some(ns)).collect()
    }

    /// A TCP connection made from H.
    fn connect_from_h(&self, addr: &str) -> std::io::Result<TcpStream> {
        let ns = File::open(format!("/run/netns/{}", self.h))?;
        let addr = addr.to_string();
        // A thread of its own joins H: the socket it makes stays H's wherever it is used.
        std::thread::spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            let s = TcpStream::connect(&addr)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            Ok(s)
        })
        .join()
        .expect("connect thread")
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for &pid in &self.pids {
            // SAFETY: kill takes integers; these pids were started or woken by this test
            // (each the first process of its own pid namespace, which takes its tree along).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_pid_gone(pid, Duration::from_secs(10));
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = wait_child(c, Duration::from_secs(10));
        }
        // Whatever else still runs in the namespaces was started or woken there by this
        // test (a migration that hung before it named the pid, say).
        for ns in [&self.a, &self.b, &self.h] {
            for pid in self.pids_in(ns) {
                // SAFETY: kill takes integers; the process is in this test's namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                wait_pid_gone(pid, Duration::from_secs(10));
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A running `torpor serve`.
struct Served {
    pid: i32,
    log: PathBuf,
    work: PathBuf,
}

impl Served {
    /// Waits for serve to exit (it was started with --once); its exit status.
    fn wait(&self, net: &mut Net) -> std::process::ExitStatus {
        let child =
            net.children.iter_mut().find(|c| c.id() as i32 == self.pid).expect("serve child");
        wait_child(child, TORPOR_TIMEOUT)
            .unwrap_or_else(|| panic!("serve still running: {}", text(&self.log)))
    }

    /// Bytes received so far into the image being migrated.
    fn received(&self) -> u64 {
        let sessions = fs::read_dir(&self.work).into_iter().flatten().flatten();
        let files = sessions
            .flat_map(|s| fs::read_dir(s.path().join("image")).into_iter().flatten().flatten());
        files.filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum()
    }

    fn leftovers(&self) -> Vec<String> {
        let sessions = fs::read_dir(&self.work).into_iter().flatten().flatten();
        sessions.map(|s| s.file_name().to_string_lossy().into_owned()).collect()
    }
}

fn text(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Waits for the fixture log LOG to end in PASS (it was told to go).
fn assert_passes(log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = text(log);
        if t.lines().any(|l| l.starts_with("FAIL")) {
            panic!("the workload failed:\n{t}");
        }
        if t.lines().any(|l| l == "PASS") {
            return;
        }
        assert!(Instant::now() < deadline, "the workload never passed:\n{t}");
        sleep(Duration::from_millis(20));
    }
}

/// The pid the migration summary says the process has on the destination.
fn woken_pid(err: &str) -> i32 {
    let line = err
        .lines()
        .find(|l| l.contains(" migrated to "))
        .unwrap_or_else(|| panic!("no summary: {err}"));
    let after = line.split("(pid ").nth(1).unwrap_or_else(|| panic!("no pid in: {line}"));
    after
        .split(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in: {line}"))
}

/// Starts the `precopy` fixture (pages written all the time, each with its counter and
/// pattern) of MIB MiB in A; returns its directory, log and pid.
fn memory_workload(net: &mut Net, mib: &str) -> (TempDir, PathBuf, i32) {
    let dir = TempDir::new().expect("workload dir");
    let log = dir.path().join("log");
    let pid = net.start_in_a(
        &log,
        &fixture("precopy"),
        &[dir.path().to_str().expect("utf-8"), "single", mib],
    );
    let deadline = Instant::now() + READY_TIMEOUT;
    while !text(&log).contains("READY") {
        assert!(Instant::now() < deadline, "workload not READY: {}", text(&log));
        sleep(Duration::from_millis(10));
    }
    (dir, log, pid)
}

#[test]
fn a_writing_process_migrates_between_namespaces_and_keeps_its_memory() {
    let mut net = Net::new();
    let (dir, log, pid) = memory_workload(&mut net, "256");
    let serve = net.serve(dir.path(), &["--insecure"]);
    // Let the writers get going, so that pre-copy has pages written under it.
    sleep(Duration::from_millis(200));
    let out = net.migrate(pid, &["--insecure"]);
    let err = stderr_of(&out);
    assert!(out.status.success(), "migrate failed: {err}\nserve: {}", text(&serve.log));
    // What the report asks for: the pause and the bytes moved.
    eprintln!("{err}");
    assert!(err.contains("frozen") && err.contains(" sent ("), "no pause or bytes reported: {err}");
    assert!(err.contains("pre-copy: "), "no pre-copy figures: {err}");
    assert!(serve.wait(&mut net).success(), "serve: {}", text(&serve.log));
    assert!(text(&serve.log).contains("arrived from"), "serve: {}", text(&serve.log));
    assert!(serve.leftovers().is_empty(), "serve left {:?}", serve.leftovers());

    // Gone from A, running in B.
    assert!(wait_pid_gone(pid, Duration::from_secs(10)), "pid {pid} still runs in A");
    let there = woken_pid(&err);
    net.pids.push(there);
    assert_running_untraced(there);
    assert_eq!(net.netns_of(there), Some(net.b.as_str()), "pid {there} is not in B");
    assert_eq!(
        proc_status(there, "NSpid").as_deref().map(|s| s.ends_with("\t1")),
        Some(true),
        "not pid 1 of its namespace"
    );
    fs::write(dir.path().join("go"), "").expect("say go");
    assert_passes(&log);
}

/// A Redis client: one connection, commands in RESP, answers read line by line.
struct Client {
    r: BufReader<TcpStream>,
}

impl Client {
    fn call(&mut self, args: &[&str]) -> String {
        let mut cmd = format!("*{}\r\n", args.len());
        for a in args {
            cmd += &format!("${}\r\n{a}\r\n", a.len());
        }
        self.r.get_mut().write_all(cmd.as_bytes()).expect("send to redis");
        let mut line = String::new();
        self.r.read_line(&mut line).expect("answer from redis");
        if let Some(n) = line.strip_prefix('$').and_then(|n| n.trim().parse::<usize>().ok()) {
            let mut bulk = vec![0; n + 2];
            self.r.read_exact(&mut bulk).expect("bulk answer from redis");
            return String::from_utf8_lossy(&bulk[..n]).into_owned();
        }
        line.trim_end().to_string()
    }
}

#[test]
fn redis_and_its_client_connection_move_with_the_service_address() {
    let redis = Path::new("/usr/bin/redis-server");
    assert!(redis.exists(), "redis-server is not installed (apt-get install redis-server)");
    let mut net = Net::new();
    sh(&["ip", "-n", &net.a, "addr", "add", &format!("{SERVICE}/24"), "dev", "eth0"]);
    let dir = TempDir::new().expect("redis dir");
    let log = dir.path().join("log");
    let args = [
        "--port",
        "6379",
        "--bind",
        "0.0.0.0",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        "--daemonize",
        "no",
        "--enable-debug-command",
        "yes",
    ];
    let pid = net.start_in_a(&log, redis, &args);
    let service = format!("{SERVICE}:6379");
    let deadline = Instant::now() + READY_TIMEOUT;
    let stream = loop {
        match net.connect_from_h(&service) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "redis not answering: {e}; {}", text(&log))
            }
        }
        sleep(Duration::from_millis(20));
    };
    let mut client = Client { r: BufReader::new(stream) };
    assert_eq!(client.call(&["DEBUG", "POPULATE", "300000", "key", "64"]), "+OK");
    assert_eq!(client.call(&["SET", "migrated", "not yet"]), "+OK");

    // The address moves while the process is frozen: A gives it up, B takes it, and the
    // clients forget where it was.
    let (a, h) = (&net.a, &net.h);
    let before = format!(
        "ip -n {a} addr del {SERVICE}/24 dev eth0 && ip addr add {SERVICE}/24 dev eth0 && ip -n {h} neigh flush all"
    );
    let back =
        format!("ip addr del {SERVICE}/24 dev eth0; ip -n {a} addr add {SERVICE}/24 dev eth0");
    let serve = net.serve(
        dir.path(),
        &["--insecure", "--before-restore", &before, "--after-failed-restore", &back],
    );
    // A second client keeps asking all through the migration: while the process is
    // frozen and its address moves, its requests must only wait, never fail.
    let mut busy = Client { r: BufReader::new(net.connect_from_h(&service).expect("connect")) };
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pinger = {
        let done = std::sync::Arc::clone(&done);
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !done.load(Ordering::Relaxed) {
                assert_eq!(busy.call(&["INCR", "pings"]), format!(":{}", n + 1));
                n += 1;
                sleep(Duration::from_millis(2));
            }
            n
        })
    };
    sleep(Duration::from_millis(50));
    let out = net.migrate(pid, &["--insecure", "--tcp-established"]);
    let err = stderr_of(&out);
    assert!(out.status.success(), "migrate failed: {err}\nserve: {}", text(&serve.log));
    eprintln!("{err}");
    assert!(serve.wait(&mut net).success(), "serve: {}", text(&serve.log));
    sleep(Duration::from_millis(300));
    done.store(true, Ordering::Relaxed);
    let pings = pinger.join().expect("the busy client failed during the migration");
    assert_eq!(client.call(&["GET", "pings"]), pings.to_string());
    let there = woken_pid(&err);
    net.pids.push(there);
    assert_eq!(net.netns_of(there), Some(net.b.as_str()), "redis is not in B");
    assert!(wait_pid_gone(pid, Duration::from_secs(10)), "redis still runs in A");

    // Neither side still holds the connection's peer back.
    for ns in [&net.a, &net.b] {
        let rules = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "list", "ruleset"])
            .output()
            .expect("nft list ruleset");
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert!(!rules.contains("drop"), "firewall rules left in {ns}:\n{rules}");
    }

    // The same connection carries on, with every key.
    assert_eq!(client.call(&["GET", "migrated"]), "not yet");
    assert_eq!(client.call(&["DBSIZE"]), ":300002", "the keys, \"migrated\" and \"pings\"");
    assert_eq!(client.call(&["SET", "migrated", "yes"]), "+OK");
    // And the listening port is B's now.
    let mut fresh =
        Client { r: BufReader::new(net.connect_from_h(&service).expect("new connection")) };
    assert_eq!(fresh.call(&["GET", "migrated"]), "yes");
    assert_eq!(fresh.call(&["GET", "key:299999"]).len(), 64);
}

/// Starts a migration of a 48 MiB workload over a link slowed to 100 Mbit/s (so it takes
/// seconds), lets CUT break it once some MiB arrived, and checks that the process runs on
/// in A, untraced, with its memory intact.
fn cut_during_pre_copy(extra: &[&str], cut: impl FnOnce(&mut Net, &Served)) -> String {
    let mut net = Net::new();
    sh(&[
        "ip", "netns", "exec", &net.a, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
        "100mbit", "burst", "64kb", "latency", "400ms",
    ]);
    let (dir, log, pid) = memory_workload(&mut net, "48");
    let serve = net.serve(dir.path(), &["--insecure", "--timeout", "2"]);
    let mut cmd = Net::exec(&net.a, TORPOR);
    cmd.args(["migrate", &pid.to_string(), "--to", &format!("{ADDR_B}:{PORT}"), "--insecure"])
        .args(extra);
    let mig_err = dir.path().join("migrate.err");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&mig_err).expect("migrate log"));
    close_inherited_fds(&mut cmd);
    let mut migrate = cmd.spawn().expect("start migrate");
    let deadline = Instant::now() + Duration::from_secs(30);
    while serve.received() < 8 << 20 {
        assert!(Instant::now() < deadline, "the image never arrived: {}", text(&serve.log));
        assert!(
            migrate.try_wait().expect("try_wait").is_none(),
            "migrate ended early: {}",
            text(&mig_err)
        );
        sleep(Duration::from_millis(5));
    }
    cut(&mut net, &serve);
    let status = wait_child(&mut migrate, TORPOR_TIMEOUT).expect("migrate never ended");
    let err = text(&mig_err);
    assert!(!status.success(), "migrate succeeded through a cut: {err}");
    assert!(err.contains("runs on here"), "the failure does not say the process runs on: {err}");
    assert_running_untraced(pid);
    assert_eq!(net.netns_of(pid), Some(net.a.as_str()));
    fs::write(dir.path().join("go"), "").expect("say go");
    assert_passes(&log);
    err
}

#[test]
fn a_destination_killed_during_pre_copy_leaves_the_process_running_at_the_source() {
    let err = cut_during_pre_copy(&[], |_, serve| {
        // SAFETY: kill takes integers; the pid is serve, started by this test.
        unsafe { libc::kill(serve.pid, libc::SIGKILL) };
    });
    assert!(err.contains("connection to"), "the cause is not named: {err}");
}

#[test]
fn a_network_cut_during_pre_copy_times_out_and_leaves_the_process_running() {
    let err = cut_during_pre_copy(&["--timeout", "2"], |net, serve| {
        // The cable goes: no reset reaches either end, only silence.
        sh(&["ip", "-n", &net.h, "link", "set", "pa", "down"]);
        // The destination gives the migration up and removes what it received.
        assert!(!serve.wait(net).success(), "serve: {}", text(&serve.log));
        assert!(serve.leftovers().is_empty(), "serve left {:?}", serve.leftovers());
    });
    assert!(err.contains("timed out"), "no timeout named: {err}");
}

#[test]
fn a_destination_refusing_at_the_commit_leaves_the_process_running_at_the_source() {
    let mut net = Net::new();
    let (dir, log, pid) = memory_workload(&mut net, "16");
    let serve =
        net.serve(dir.path(), &["--insecure", "--before-restore", "echo no room here >&2; exit 3"]);
    let out = net.migrate(pid, &["--insecure"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "migrate: {err}");
    assert!(
        err.contains("refused the migration") && err.contains("--before-restore"),
        "cause not named: {err}"
    );
    assert!(!serve.wait(&mut net).success());
    assert!(serve.leftovers().is_empty(), "serve left {:?}", serve.leftovers());
    assert_running_untraced(pid);
    fs::write(dir.path().join("go"), "").expect("say go");
    assert_passes(&log);
}

#[test]
fn migrate_and_serve_refuse_to_run_without_tls_unless_told() {
    for args in
        [&["migrate", "1", "--to", "127.0.0.1:1"][..], &["serve", "--listen", "127.0.0.1:0"]]
    {
        let out = common::torpor(args);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        for flag in ["--tls-cert", "--tls-key", "--tls-ca", "--insecure"] {
            assert!(err.contains(flag), "{args:?}: the refusal does not name {flag}: {err}");
        }
    }
}

/// PEM files for mutual TLS: a CA, B's certificate for its address, A's client
/// certificate, and a client certificate from a CA nobody trusts.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose as Eku, IsCa, KeyPair,
        };
        let dir = TempDir::new().expect("pki dir");
        let write =
            |name: &str, pem: String| fs::write(dir.path().join(name), pem).expect("write pem");
        let ca = |name: &str| {
            let key = KeyPair::generate().expect("ca key");
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let cert = p.self_signed(&key).expect("ca cert");
            write(&format!("{name}.pem"), cert.pem());
            (cert, key)
        };
        let (ca_cert, ca_key) = ca("ca");
        let (rogue_cert, rogue_key) = ca("rogue-ca");
        let leaf = |name: &str, san: &str, eku: Eku, by: (&rcgen::Certificate, &KeyPair)| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(vec![san.to_string()]).expect("params");
            p.extended_key_usages = vec![eku];
            let cert = p.signed_by(&key, by.0, by.1).expect("sign");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        };
        leaf("dest", ADDR_B, Eku::ServerAuth, (&ca_cert, &ca_key));
        leaf("source", "source.test", Eku::ClientAuth, (&ca_cert, &ca_key));
        leaf("rogue", "source.test", Eku::ClientAuth, (&rogue_cert, &rogue_key));
        Pki { dir }
    }

    fn args(&self, who: &str) -> Vec<String> {
        let p = |f: String| self.dir.path().join(f).to_string_lossy().into_owned();
        vec![
            "--tls-cert".into(),
            p(format!("{who}.pem")),
            "--tls-key".into(),
            p(format!("{who}.key")),
            "--tls-ca".into(),
            p("ca.pem".into()),
        ]
    }
}

#[test]
fn a_migration_over_mutual_tls_arrives_and_a_stranger_is_refused() {
    let pki = Pki::new();
    let mut net = Net::new();
    let (dir, log, pid) = memory_workload(&mut net, "16");
    let dest = pki.args("dest");
    let dest: Vec<&str> = dest.iter().map(String::as_str).collect();

    // A source whose certificate no trusted CA signed gets nothing through.
    let serve = net.serve(dir.path(), &dest);
    let rogue = pki.args("rogue");
    let rogue: Vec<&str> = rogue.iter().map(String::as_str).collect();
    let out = net.migrate(pid, &rogue);
    assert_eq!(out.status.code(), Some(1), "a stranger migrated: {}", stderr_of(&out));
    assert!(!serve.wait(&mut net).success());
    assert!(text(&serve.log).contains("TLS handshake"), "serve: {}", text(&serve.log));
    assert_running_untraced(pid);

    let serve = net.serve(dir.path(), &dest);
    let source = pki.args("source");
    let source: Vec<&str> = source.iter().map(String::as_str).collect();
    let out = net.migrate(pid, &source);
    let err = stderr_of(&out);
    assert!(out.status.success(), "migrate over TLS failed: {err}\nserve: {}", text(&serve.log));
    assert!(serve.wait(&mut net).success(), "serve: {}", text(&serve.log));
    let there = woken_pid(&err);
    net.pids.push(there);
    assert_eq!(net.netns_of(there), Some(net.b.as_str()));
    fs::write(dir.path().join("go"), "").expect("say go");
    assert_passes(&log);
}

#[test]
fn a_process_woken_lazily_on_the_destination_keeps_its_memory() {
    let mut net = Net::new();
    let (dir, log, pid) = memory_workload(&mut net, "64");
    let serve = net.serve(dir.path(), &["--insecure", "--lazy"]);
    sleep(Duration::from_millis(200));
    let out = net.migrate(pid, &["--insecure"]);
    let err = stderr_of(&out);
    assert!(out.status.success(), "migrate failed: {err}\nserve: {}", text(&serve.log));
    eprintln!("{err}");
    let there = woken_pid(&err);
    net.pids.push(there);
    assert_eq!(net.netns_of(there), Some(net.b.as_str()));
    // serve --once ends when every page is loaded, and the image goes with it.
    assert!(serve.wait(&mut net).success(), "serve: {}", text(&serve.log));
    assert!(text(&serve.log).contains("loading its memory"), "serve: {}", text(&serve.log));
    assert!(serve.leftovers().is_empty(), "serve left {:?}", serve.leftovers());
    fs::write(dir.path().join("go"), "").expect("say go");
    assert_passes(&log);
}

#[test]
fn a_failed_restore_after_the_hook_runs_the_undo_hook_and_the_source_runs_on() {
    let mut net = Net::new();
    let (dir, log, pid) = memory_workload(&mut net, "16");
    // The hook changes a file the process has open: the restore must refuse it.
    let changed = format!("printf x >> {}", log.display());
    let undone = dir.path().join("undone");
    let undo = format!("touch {}", undone.display());
    let hooks = ["--insecure", "--before-restore", &changed, "--after-failed-restore", &undo];
    let serve = net.serve(dir.path(), &hooks);
    let out = net.migrate(pid, &["--insecure"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "migrate: {err}");
    assert!(
        err.contains("has changed since the dump"),
        "the restore's refusal is not passed on: {err}"
    );
    assert!(!serve.wait(&mut net).success());
    assert!(undone.exists(), "--after-failed-restore did not run: {}", text(&serve.log));
    assert!(serve.leftovers().is_empty(), "serve left {:?}", serve.leftovers());
    assert!(net.pids_in(&net.b).is_empty(), "something runs in B after a failed restore");
    assert_running_untraced(pid);
    fs::write(dir.path().join("go"), "").expect("say go");
    assert_passes(&log);
}

#[test]
fn a_woken_process_migrates_on_and_back() {
    let mut net = Net::new();
    let (dir, log, pid) = memory_workload(&mut net, "16");
    let serve = net.serve(dir.path(), &["--insecure"]);
    let out = net.migrate(pid, &["--insecure"]);
    assert!(out.status.success(), "to B: {}\nserve: {}", stderr_of(&out), text(&serve.log));
    assert!(serve.wait(&mut net).success());
    let there = woken_pid(&stderr_of(&out));
    net.pids.push(there);

    // And back from B to A, as a migration started in B.
    let a = net.a.clone();
    let serve = net.serve_in(&a, ADDR_A, dir.path(), &["--insecure"]);
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", net.b)).arg(TORPOR);
    cmd.args(["migrate", &there.to_string(), "--to", &format!("{ADDR_A}:{PORT}"), "--insecure"]);
    let out = run_with_timeout(cmd, TORPOR_TIMEOUT);
    let err = stderr_of(&out);
    assert!(out.status.success(), "back to A: {err}\nserve: {}", text(&serve.log));
    assert!(serve.wait(&mut net).success());
    let back = woken_pid(&err);
    net.pids.push(back);
    assert!(wait_pid_gone(there, Duration::from_secs(10)), "pid {there} still runs in B");
    assert_eq!(net.netns_of(back), Some(net.a.as_str()));
    fs::write(dir.path().join("go"), "").expect("say go");
    assert_passes(&log);
}

#[test]
fn a_source_torpor_killed_while_the_process_is_frozen_leaves_it_running() {
    let mut net = Net::new();
    let (dir, log, pid) = memory_workload(&mut net, "16");
    let serve = net.serve(dir.path(), &["--insecure"]);
    // torpor migrate dies (SIGKILL) with the image written and the process frozen; its
    // guard must put the process back, and the destination must drop what it got.
    let mut cmd = Net::exec(&net.a, TORPOR);
    cmd.args(["migrate", &pid.to_string(), "--to", &format!("{ADDR_B}:{PORT}"), "--insecure"])
        .env("TORPOR_TEST_KILL_AT", "dump:written");
    let out = run_with_timeout(cmd, TORPOR_TIMEOUT);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(libc::SIGKILL),
        "migrate was not killed at the test point: {}",
        stderr_of(&out)
    );
    assert!(!serve.wait(&mut net).success(), "serve: {}", text(&serve.log));
    assert!(serve.leftovers().is_empty(), "serve left {:?}", serve.leftovers());
    let deadline = Instant::now() + Duration::from_secs(10);
    while proc_status(pid, "TracerPid").as_deref() != Some("0") {
        assert!(Instant::now() < deadline, "pid {pid} still traced after torpor died");
        sleep(Duration::from_millis(10));
    }
    assert_running_untraced(pid);
    fs::write(dir.path().join("go"), "").expect("say go");
    assert_passes(&log);
}

#[test]
fn a_process_of_the_hosts_pid_namespace_keeps_its_pid_in_the_destinations_own() {
    let mut net = Net::new();
    // Started plainly in A, not under torpor run: its image needs its very pid, which
    // the source's frozen copy holds on this machine. serve runs in a pid namespace of
    // its own, where every pid is free; its first process stays so that the namespace
    // (and the woken process in it) outlives serve.
    let dir = TempDir::new().expect("workload dir");
    let log = dir.path().join("log");
    let mut cmd = Net::exec(&net.a, fixture("precopy").to_str().expect("utf-8"));
    cmd.args([dir.path().to_str().expect("utf-8"), "single", "16"])
        .stdin(Stdio::null())
        .stdout(File::create(&log).expect("create log"))
        .stderr(Stdio::null());
    close_inherited_fds(&mut cmd);
    let child = cmd.spawn().expect("start the workload");
    let pid = child.id() as i32;
    net.children.push(child);
    let deadline = Instant::now() + READY_TIMEOUT;
    while !text(&log).contains("READY") {
        assert!(Instant::now() < deadline, "workload not READY: {}", text(&log));
        sleep(Duration::from_millis(10));
    }

    let serve_log = dir.path().join("serve.log");
    let serve = format!(
        "{TORPOR} serve --listen {ADDR_B}:{PORT} --once --insecure --work-dir {}; exec sleep 600",
        dir.path().display()
    );
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", net.b))
        .args(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", &serve])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&serve_log).expect("serve log"));
    close_inherited_fds(&mut cmd);
    net.children.push(cmd.spawn().expect("start serve"));
    while !text(&serve_log).contains("waiting for migrations") {
        assert!(Instant::now() < deadline, "serve never listened: {}", text(&serve_log));
        sleep(Duration::from_millis(10));
    }

    let out = net.migrate(pid, &["--insecure"]);
    let err = stderr_of(&out);
    assert!(out.status.success(), "migrate failed: {err}\nserve: {}", text(&serve_log));
    // Inside serve's namespace the process has its pid from A.
    assert_eq!(woken_pid(&err), pid, "{err}");
    let woken = net.pids_in(&net.b.clone());
    let there = woken
        .iter()
        .copied()
        .find(|&p| proc_status(p, "NSpid").is_some_and(|s| s.ends_with(&format!("\t{pid}"))))
        .unwrap_or_else(|| panic!("no process in B has pid {pid} in its namespace"));
    assert_running_untraced(there);
    fs::write(dir.path().join("go"), "").expect("say go");
    assert_passes(&log);
}
