//! A server listening on a unix socket path and an abstract name, with a client (its
//! child) connected to both and unread data both ways: after a restore both connections
//! carry on and new clients can connect to both names (fixture `unix_server.c`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::time::Duration;

use common::{assert_catches_damage, wait_pid_gone, FixtureTree, Restore, FINISH_TIMEOUT};
use tempfile::TempDir;

const GREETING: &str = "hello from the test\n";

fn start() -> FixtureTree {
    FixtureTree::start("unix_server", &[], &["client"])
}

/// The server's two names: its socket file and its abstract name.
fn names(t: &FixtureTree) -> [(String, SocketAddr); 2] {
    let path = t.f.path("srv.sock");
    let abstract_name = t.f.ready_value("abstract");
    [
        (path.display().to_string(), SocketAddr::from_pathname(&path).expect("path address")),
        (
            format!("@{abstract_name}"),
            SocketAddr::from_abstract_name(abstract_name.as_bytes()).expect("abstract address"),
        ),
    ]
}

/// Connects to each of the server's names as a new client and expects to be greeted.
fn greeted_on_both_names(t: &FixtureTree) {
    for (name, addr) in names(t) {
        let s = UnixStream::connect_addr(&addr)
            .unwrap_or_else(|e| panic!("connect to {name}: {e}; log:\n{}", t.f.log_text()));
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
        (&s).write_all(GREETING.as_bytes()).unwrap_or_else(|e| panic!("write to {name}: {e}"));
        let mut reply = String::new();
        BufReader::new(&s)
            .read_line(&mut reply)
            .unwrap_or_else(|e| panic!("read from {name}: {e}; log:\n{}", t.f.log_text()));
        assert_eq!(reply, format!("welcome {GREETING}"), "the server's answer on {name}");
    }
}

#[test]
fn unix_server_fixture_passes_without_torpor() {
    let mut t = start();
    greeted_on_both_names(&t);
    t.f.go();
    let status = t.f.wait_exit(FINISH_TIMEOUT);
    assert!(status.success(), "unix_server exited with {status:?}; log:\n{}", t.f.log_text());
    t.f.assert_log_passed();
}

#[test]
fn unix_server_fixture_catches_damage() {
    assert_catches_damage("unix_server", &[], &["lost", "listen", "abstract"]);
}

#[test]
fn unix_listeners_and_accepted_connections_carry_on_after_restore() {
    let mut t = start();
    greeted_on_both_names(&t);
    let images = TempDir::new().expect("image dir");
    t.f.dump_ok(images.path());
    for (key, pid) in &t.others {
        assert!(wait_pid_gone(*pid, Duration::from_secs(10)), "{key} {pid} outlived the dump");
    }

    let mut restore = Restore::spawn(images.path(), &[]);
    restore.wait_for_process(&t.f);
    greeted_on_both_names(&t);
    t.f.go();
    let status = restore
        .wait(FINISH_TIMEOUT)
        .unwrap_or_else(|| panic!("restored server did not finish; log:\n{}", t.f.log_text()));
    assert!(
        status.success(),
        "restored server: {status:?}; stderr:\n{}\nlog:\n{}",
        restore.stderr(),
        t.f.log_text()
    );
    t.f.assert_log_passed();
}
