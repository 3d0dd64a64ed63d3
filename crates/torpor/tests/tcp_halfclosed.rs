//! TCP connections hibernated with `--tcp-established` while closing: one side or both
//! have shut down their sending side (fixture `tcp_halfclosed.py`). The peer is this
//! test, outside the dumped tree; it checks that it gets every byte and end-of-file once,
//! never a reset, and the server checks its own side once woken.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_running_untraced, free_port, lock_rules, Fixture, Restore, FINISH_TIMEOUT};
use tempfile::TempDir;

/// A firewall rule of the test's own, dropping the segments one end sends the other, so
/// that acknowledgements or FINs stay outstanding; removed on drop.
struct DropRule {
    table: String,
}

impl DropRule {
    fn segments(from_port: u16, to_port: u16) -> DropRule {
        let table = format!("torpor_test_{from_port}_{to_port}");
        let script = format!(
            "table inet {table} {{\n  chain input {{\n    type filter hook input priority -300; \
             policy accept;\n    tcp sport {from_port} tcp dport {to_port} drop\n  }}\n}}\n"
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run nft (apt-get install nftables)");
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "nft refused the test's rule");
        DropRule { table }
    }
}

impl Drop for DropRule {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.table]).status();
    }
}

/// Waits for a line starting with `prefix` in the fixture's log.
fn wait_line(f: &Fixture, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f.log_text().lines().any(|l| l.starts_with(prefix)) {
        assert!(!f.log_text().contains("FAIL"), "{}", f.log_text());
        assert!(Instant::now() < deadline, "no {prefix} line; log:\n{}", f.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs the fixture in `mode`, hibernates it in that state, wakes it, and checks both
/// ends. `server_sends` is what the peer must read before end-of-file.
fn halfclosed(mode: &str, server_sends: &str) {
    halfclosed_on("127.0.0.1", mode, server_sends)
}

/// [`halfclosed`] with the server listening on `host`.
fn halfclosed_on(host: &str, mode: &str, server_sends: &str) {
    let port = free_port();
    // In these modes the peer goes on sending: before the dump, while the server sleeps
    // (held back by the lock) and once it is back.
    let peer_writes = matches!(mode, "fin_wait1" | "fin_wait2");
    let peer_data = if peer_writes { "peer-data|during|after" } else { "peer-data" };
    let mut f = Fixture::start_with_env(
        "tcp_halfclosed.py",
        &[&port.to_string(), mode],
        &[("PEER_DATA", peer_data), ("HOST", host)],
    );
    let mut s = TcpStream::connect((host, port)).expect("connect to the server");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
    let me = s.local_addr().unwrap().port();
    s.write_all(b"peer-data").expect("send");
    if matches!(mode, "close_wait" | "last_ack" | "ended") {
        s.shutdown(Shutdown::Write).expect("shut down the peer's side");
    }
    let rule = match mode {
        // The server's FIN reaches the peer, the acknowledgement does not come back.
        "fin_wait1" | "last_ack" => Some(DropRule::segments(me, port)),
        // The server's FIN does not reach the peer, which shuts down in turn.
        "closing" => Some(DropRule::segments(port, me)),
        _ => None,
    };
    if rule.is_some() || mode == "ended" {
        std::fs::File::create(f.path("shut")).expect("create the shut file");
    }
    if mode == "closing" {
        wait_line(&f, "SHUT");
        s.shutdown(Shutdown::Write).expect("shut down the peer's side");
    }
    wait_line(&f, "SETTLED");

    let images = TempDir::new().expect("image dir");
    let out = f.dump(images.path(), &["--tcp-established"]);
    assert!(out.status.success(), "dump: {}", String::from_utf8_lossy(&out.stderr));
    f.assert_killed_by_dump();
    // An ended connection has nothing left to hold.
    assert_eq!(
        lock_rules(port).is_empty(),
        mode == "ended",
        "firewall rules while it sleeps:\n{}",
        lock_rules(port)
    );
    drop(rule);
    if peer_writes {
        s.write_all(b"|during").expect("send while the server hibernates");
    }
    std::thread::sleep(Duration::from_millis(300));

    let mut restore = Restore::spawn(images.path(), &[]);
    restore.wait_for_process(&f);
    if peer_writes {
        s.write_all(b"|after").expect("send to the woken server");
        s.shutdown(Shutdown::Write).expect("shut down the peer's side");
    }
    f.go();

    let mut got = Vec::new();
    let r = s.read_to_end(&mut got);
    assert!(
        r.is_ok(),
        "the peer's reading failed after {:?}: {r:?}; server log:\n{}",
        String::from_utf8_lossy(&got),
        f.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&got), server_sends, "what the peer read");
    let mut more = [0u8; 16];
    assert_eq!(s.read(&mut more).expect("read after end-of-file"), 0, "data after end-of-file");

    let status = restore.wait(FINISH_TIMEOUT).expect("restored server never finished");
    assert!(status.success(), "restored server: {status:?}; stderr:\n{}", restore.stderr());
    f.assert_log_passed();
    assert!(lock_rules(port).is_empty(), "rules left after the restore:\n{}", lock_rules(port));
}

/// Runs the fixture in `mode`, in which dump must refuse the connection saying
/// `refusal`; the server must run on untouched, and the peer read `server_sends`.
fn refused(mode: &str, refusal: &str, server_sends: &str) {
    let port = free_port();
    let mut f = Fixture::start_with_env(
        "tcp_halfclosed.py",
        &[&port.to_string(), mode],
        &[("PEER_DATA", "peer-data")],
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the server");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
    // Left in the listener's queue.
    let _pending = (mode == "pending").then(|| TcpStream::connect(("127.0.0.1", port)).unwrap());
    s.write_all(b"peer-data").expect("send");
    s.shutdown(Shutdown::Write).expect("shut down the peer's side");
    std::fs::File::create(f.path("shut")).expect("create the shut file");
    wait_line(&f, "SETTLED");

    let images = TempDir::new().expect("image dir");
    let out = f.dump(images.path(), &["--tcp-established"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "dump of a {mode} connection succeeded");
    assert!(err.contains(refusal), "dump's refusal does not say {refusal:?}:\n{err}");
    assert_running_untraced(f.pid);
    assert!(lock_rules(port).is_empty(), "rules left after a failed dump:\n{}", lock_rules(port));

    f.go();
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("the peer's reading");
    assert_eq!(String::from_utf8_lossy(&got), server_sends, "what the peer read");
    let status = f.wait_exit(FINISH_TIMEOUT);
    assert!(status.success(), "server: {status:?}; log:\n{}", f.log_text());
    f.assert_log_passed();
}

#[test]
fn a_connection_that_has_ended_with_data_unread_is_refused_and_runs_on() {
    refused("closed", "with 9 bytes received and not yet read", "server-datalate-data");
}

#[test]
fn a_connection_that_has_ended_wakes_at_end_of_file() {
    halfclosed("ended", "server-datalate-data");
}

#[test]
fn a_listener_with_connections_not_yet_accepted_is_refused() {
    refused("pending", "with 1 connections not yet accepted", "server-datareply");
}

#[test]
fn close_wait_reads_the_peers_data_then_end_of_file_and_may_still_reply() {
    halfclosed("close_wait", "server-datareply");
}

#[test]
fn fin_wait2_cannot_send_and_still_reads_what_the_peer_sends() {
    halfclosed("fin_wait2", "server-data");
}

#[test]
fn fin_wait1_with_unacknowledged_data_and_fin_is_delivered_once() {
    halfclosed("fin_wait1", "server-datalate-data");
}

#[test]
fn last_ack_keeps_both_ends_shut() {
    halfclosed("last_ack", "server-datalate-data");
}

#[test]
fn closing_with_crossed_fins_completes() {
    halfclosed("closing", "server-datalate-data");
}

#[test]
fn shut_down_reading_still_ends_with_end_of_file() {
    halfclosed("shut_rd", "server-datareply");
}

#[test]
fn crossed_fins_over_ipv6() {
    halfclosed_on("::1", "closing", "server-datalate-data");
}
