//! A Node.js HTTP server that counts requests: it must keep serving on its port, with its
//! count, after a restore (fixture `server.js`).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use common::{fixture_source, free_port, Fixture, Restore, FINISH_TIMEOUT};
use tempfile::TempDir;

fn start(port: u16, env: &[(&str, &str)]) -> Fixture {
    let script = fixture_source("server.js");
    Fixture::start_interpreted("server", Path::new("node"), &[script], &[&port.to_string()], env)
}

/// `GET /hit` on a connection of its own; returns the body.
fn hit(port: u16) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let timeout = Duration::from_secs(10);
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .unwrap_or_else(|e| panic!("connect to port {port}: {e}"));
    s.set_read_timeout(Some(timeout)).expect("read timeout");
    s.write_all(b"GET /hit HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .expect("send request");
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap_or_else(|e| panic!("read reply: {e}; so far: {reply}"));
    assert!(reply.starts_with("HTTP/1.1 200"), "reply: {reply}");
    let (_, body) = reply.split_once("\r\n\r\n").unwrap_or_else(|| panic!("reply: {reply}"));
    body.trim().to_string()
}

fn go_and_pass(f: &mut Fixture) {
    f.go();
    let status = f.wait_exit(FINISH_TIMEOUT);
    assert!(status.success(), "server exited with {status:?}; log:\n{}", f.log_text());
    f.assert_log_passed();
}

#[test]
fn node_fixture_passes_without_torpor() {
    let port = free_port();
    let mut f = start(port, &[]);
    assert_eq!(hit(port), "hits=1");
    assert_eq!(hit(port), "hits=2");
    go_and_pass(&mut f);
}

#[test]
fn node_fixture_catches_damage() {
    let port = free_port();
    let mut f = start(port, &[("FIXTURE_BREAK", "entry")]);
    assert_eq!(hit(port), "hits=1");
    f.go();
    let status = f.wait_exit(FINISH_TIMEOUT);
    let log = f.log_text();
    assert_eq!(status.code(), Some(1), "FIXTURE_BREAK=entry: {status:?}; log:\n{log}");
    assert!(log.contains("\nFAIL: "), "FIXTURE_BREAK=entry; log:\n{log}");
}

#[test]
fn a_node_http_server_keeps_serving_after_restore() {
    let port = free_port();
    let mut f = start(port, &[]);
    assert_eq!(hit(port), "hits=1");
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());

    let mut restore = Restore::spawn(images.path(), &[]);
    restore.wait_for_process(&f);
    assert_eq!(hit(port), "hits=2", "the restored server's count");
    f.go();
    let status = restore
        .wait(FINISH_TIMEOUT)
        .unwrap_or_else(|| panic!("restored server did not finish; log:\n{}", f.log_text()));
    assert!(
        status.success(),
        "restored server: {status:?}; stderr:\n{}\nlog:\n{}",
        restore.stderr(),
        f.log_text()
    );
    f.assert_log_passed();
}
