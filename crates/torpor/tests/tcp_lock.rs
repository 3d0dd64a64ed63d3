//! An established TCP connection hibernated with `--tcp-established`: a peer that sends
//! while the server is gone is held back (not reset) and its bytes arrive once the server
//! is woken (fixture `tcp_echo.py`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::{free_port, lock_rules, Fixture, Restore, FINISH_TIMEOUT};
use tempfile::TempDir;

fn start(port: u16) -> (Fixture, TcpStream, BufReader<TcpStream>) {
    let f = Fixture::start("tcp_echo.py", &[&port.to_string()]);
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the echo server");
    s.set_read_timeout(Some(Duration::from_secs(15))).expect("read timeout");
    let r = BufReader::new(s.try_clone().expect("clone"));
    (f, s, r)
}

fn echo(s: &mut TcpStream, r: &mut BufReader<TcpStream>, msg: &str) -> String {
    s.write_all(msg.as_bytes()).expect("send");
    let mut line = String::new();
    r.read_line(&mut line).expect("read the echo");
    line.trim_end().to_string()
}

#[test]
fn tcp_echo_fixture_catches_damage() {
    let (mut f, mut s, mut r) = {
        let port = free_port();
        let f = Fixture::start_with_env(
            "tcp_echo.py",
            &[&port.to_string()],
            &[("FIXTURE_BREAK", "total")],
        );
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15))).expect("read timeout");
        let r = BufReader::new(s.try_clone().expect("clone"));
        (f, s, r)
    };
    assert_ne!(echo(&mut s, &mut r, "hello"), "echo:hello total=5", "the break must show");
    f.go();
    let _ = f.wait_exit(FINISH_TIMEOUT);
}

#[test]
fn a_peer_sending_while_the_server_hibernates_is_held_not_reset() {
    assert!(
        torpor_nft_available(),
        "this test needs nft (Debian: apt-get install nftables); .ci/run installs it"
    );
    let port = free_port();
    let (mut f, mut s, mut r) = start(port);
    assert_eq!(echo(&mut s, &mut r, "hello"), "echo:hello total=5");

    let images = TempDir::new().expect("image dir");
    let out = f.dump(images.path(), &["--tcp-established"]);
    assert!(out.status.success(), "dump: {}", String::from_utf8_lossy(&out.stderr));
    f.assert_killed_by_dump();
    assert!(!lock_rules(port).is_empty(), "no firewall rule holds the connection while it sleeps");

    // Sent while nothing owns the server's end: without the lock the peer would be reset.
    s.write_all(b"during").expect("send while the server hibernates");
    std::thread::sleep(Duration::from_millis(700));

    let mut restore = Restore::spawn(images.path(), &[]);
    restore.wait_for_process(&f);
    let mut line = String::new();
    r.read_line(&mut line).expect("the echo of what was sent meanwhile");
    assert_eq!(line.trim_end(), "echo:during total=11");
    assert_eq!(echo(&mut s, &mut r, "after"), "echo:after total=16");
    assert!(lock_rules(port).is_empty(), "rules left after the restore:\n{}", lock_rules(port));

    f.go();
    let status = restore.wait(FINISH_TIMEOUT).expect("restored server never finished");
    assert!(status.success(), "restored server: {status:?}; stderr:\n{}", restore.stderr());
    f.assert_log_passed();
}

fn torpor_nft_available() -> bool {
    Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success())
}
