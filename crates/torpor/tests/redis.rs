//! A Redis server holding 200,000 keys and a client connection of the test's own: with
//! `--tcp-established` the connection lives through the dump and the restore without the
//! client noticing; without it dump refuses and leaves Redis serving.
//!
//! Needs `redis-server` and `redis-cli` on PATH.

mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    assert_running_untraced, close_inherited_fds, free_port, stderr_of, wait_child, Fixture,
    Restore, FINISH_TIMEOUT, READY_TIMEOUT,
};
use tempfile::TempDir;

const KEYS: usize = 200_000;

/// One reply of the Redis protocol, as far as these tests need it.
#[derive(Debug, PartialEq)]
enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<String>),
}

/// A client connection to Redis, speaking its protocol over one TCP connection.
struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(port: u16) -> std::io::Result<Client> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Client { stream, reader })
    }

    fn local_port(&self) -> u16 {
        self.stream.local_addr().expect("local address").port()
    }

    fn send(&mut self, args: &[&str]) {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req += &format!("${}\r\n{a}\r\n", a.len());
        }
        self.stream.write_all(req.as_bytes()).unwrap_or_else(|e| panic!("send {args:?}: {e}"));
    }

    fn line(&mut self, what: &str) -> String {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("{what}: Redis closed the connection"),
            Ok(_) => line.trim_end_matches("\r\n").to_string(),
            Err(e) => panic!("{what}: {e}"),
        }
    }

    fn call(&mut self, args: &[&str]) -> Reply {
        self.send(args);
        let what = format!("reply to {args:?}");
        let line = self.line(&what);
        let (kind, rest) = line.split_at(1);
        match kind {
            "+" => Reply::Status(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Int(rest.parse().unwrap_or_else(|e| panic!("{what}: {line}: {e}"))),
            "$" if rest == "-1" => Reply::Bulk(None),
            "$" => {
                let len: usize = rest.parse().unwrap_or_else(|e| panic!("{what}: {line}: {e}"));
                let mut body = vec![0; len + 2];
                self.reader.read_exact(&mut body).unwrap_or_else(|e| panic!("{what}: {e}"));
                body.truncate(len);
                Reply::Bulk(Some(String::from_utf8_lossy(&body).into_owned()))
            }
            _ => panic!("{what}: unexpected reply {line:?}"),
        }
    }

    /// Asserts the data set is all there: its size and a key from its middle.
    fn assert_keys(&mut self, when: &str) {
        assert_eq!(self.call(&["DBSIZE"]), Reply::Int(KEYS as i64), "DBSIZE {when}");
        let want = Reply::Bulk(Some("v12345".into()));
        assert_eq!(self.call(&["GET", "k12345"]), want, "GET k12345 {when}");
    }

    /// Asserts that nothing has arrived on the connection, neither data nor its end: the
    /// server side has said nothing since the last reply.
    fn assert_quiet(&mut self, when: &str) {
        assert!(self.reader.buffer().is_empty(), "unread reply bytes {when}");
        self.stream.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 1];
        let got = self.stream.peek(&mut byte);
        self.stream.set_nonblocking(false).expect("blocking");
        match got {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Ok(0) => panic!("{when}: the connection was closed"),
            Ok(_) => panic!("{when}: Redis sent something unasked: {byte:?}"),
            Err(e) => panic!("{when}: the connection failed: {e}"),
        }
    }

    /// SHUTDOWN NOSAVE: Redis closes the connection instead of replying.
    fn shutdown(mut self) {
        self.send(&["SHUTDOWN", "NOSAVE"]);
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "SHUTDOWN NOSAVE answered {rest:?}"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "after SHUTDOWN: {e}"),
        }
    }
}

/// A redis-server on 127.0.0.1 at a port of its own, with no persistence, loaded with
/// KEYS keys `kN` = `vN`; killed on drop (through the Fixture).
struct Redis {
    f: Fixture,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = free_port();
        let program = which("redis-server");
        let args = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ];
        let f = Fixture::start_program(&program, &args);
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut client = loop {
            match Client::connect(port) {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "redis-server not answering on port {port}: {e}; log:\n{}",
                        f.log_text()
                    );
                    sleep(Duration::from_millis(20));
                }
            }
        };
        assert_eq!(client.call(&["PING"]), Reply::Status("PONG".into()), "first PING");
        let redis = Redis { f, port };
        redis.load();
        redis
    }

    /// Loads the keys with `redis-cli --pipe`, the way data sets are bulk loaded.
    fn load(&self) {
        let cmds = self.f.path("keys.resp");
        let mut text = String::with_capacity(KEYS * 40);
        for i in 0..KEYS {
            let (k, v) = (format!("k{i}"), format!("v{i}"));
            text += &format!("*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n", k.len(), v.len());
        }
        fs::write(&cmds, text).expect("write the commands");
        let out = self.f.path("redis-cli.out");
        let mut cmd = Command::new(which("redis-cli"));
        cmd.args(["-p", &self.port.to_string(), "--pipe"])
            .stdin(File::open(&cmds).expect("open the commands"))
            .stdout(File::create(&out).expect("create redis-cli output"))
            .stderr(Stdio::null());
        close_inherited_fds(&mut cmd);
        let mut child = cmd.spawn().expect("spawn redis-cli");
        let status = wait_child(&mut child, READY_TIMEOUT).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!("redis-cli --pipe still running after {READY_TIMEOUT:?}")
        });
        let report = fs::read_to_string(&out).unwrap_or_default();
        assert!(status.success(), "redis-cli --pipe: {status:?}\n{report}");
        assert!(report.contains(&format!("errors: 0, replies: {KEYS}")), "redis-cli: {report}");
    }

    fn client(&self) -> Client {
        Client::connect(self.port).unwrap_or_else(|e| {
            panic!("connect to Redis on port {}: {e}; log:\n{}", self.port, self.f.log_text())
        })
    }
}

/// The full path of PROGRAM on PATH.
fn which(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{program} is not installed (Debian: apt-get install redis-server)")
        })
}

#[test]
fn redis_keeps_its_data_and_a_client_connection_across_dump_and_restore() {
    let mut redis = Redis::start();
    let mut client = redis.client();
    assert_eq!(client.call(&["PING"]), Reply::Status("PONG".into()));

    let images = TempDir::new().expect("image dir");
    let out = redis.f.dump(images.path(), &["--tcp-established"]);
    assert!(
        out.status.success(),
        "dump --tcp-established of redis-server failed: {}",
        stderr_of(&out)
    );
    redis.f.assert_killed_by_dump();
    // Redis died holding the connection; the client must not have heard of it.
    client.assert_quiet("between the dump and the restore");

    let mut restore = Restore::spawn(images.path(), &[]);
    restore.wait_for_process(&redis.f);
    client.assert_quiet("after the restore");
    client.assert_keys("on the connection opened before the dump");
    assert_eq!(client.call(&["PING"]), Reply::Status("PONG".into()));
    let mut fresh = redis.client();
    fresh.assert_keys("on a connection opened after the restore");
    assert_eq!(fresh.call(&["GET", "k199999"]), Reply::Bulk(Some("v199999".into())));
    assert_eq!(fresh.call(&["SET", "after", "restore"]), Reply::Status("OK".into()));
    assert_eq!(client.call(&["GET", "after"]), Reply::Bulk(Some("restore".into())));

    fresh.shutdown();
    let status = restore.wait(FINISH_TIMEOUT).unwrap_or_else(|| {
        panic!("restored Redis still running after SHUTDOWN; log:\n{}", redis.f.log_text())
    });
    assert!(
        status.success(),
        "restored Redis: {status:?}; stderr:\n{}\nlog:\n{}",
        restore.stderr(),
        redis.f.log_text()
    );
}

#[test]
fn dump_refuses_an_established_connection_without_tcp_established_and_redis_serves_on() {
    let mut redis = Redis::start();
    let mut client = redis.client();
    assert_eq!(client.call(&["PING"]), Reply::Status("PONG".into()));

    let images = TempDir::new().expect("image dir");
    let out = redis.f.dump(images.path(), &[]);
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "dump without --tcp-established: {stderr}");
    for endpoint in [redis.port, client.local_port()].map(|p| format!("127.0.0.1:{p}")) {
        assert!(stderr.contains(&endpoint), "the refusal does not name {endpoint}: {stderr}");
    }
    assert!(stderr.contains("--tcp-established"), "the refusal does not name the flag: {stderr}");

    assert_running_untraced(redis.f.pid);
    client.assert_quiet("after the refused dump");
    assert_eq!(client.call(&["PING"]), Reply::Status("PONG".into()));
    client.assert_keys("after the refused dump");

    client.shutdown();
    let status = redis.f.wait_exit(FINISH_TIMEOUT);
    assert!(status.success(), "Redis after SHUTDOWN: {status:?}; log:\n{}", redis.f.log_text());
}
