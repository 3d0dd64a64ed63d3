//! Unix sockets connected to a peer outside the dumped tree, which the test itself plays:
//! dump refuses them unless the peer is named with `--external`, and restore connects
//! them again to the peer's address on the same descriptor (fixture `ext_unix.c`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{
    assert_catches_damage, assert_pid_gone, assert_restore_refused, assert_running_untraced,
    stderr_of, Fixture, Restore, FINISH_TIMEOUT,
};
use tempfile::TempDir;

/// A line server outside the tree: answers every line with `conn=K echo:LINE`, K counting
/// the connections it accepted from 1; after answering "bye" it shuts down its sending
/// side.
struct EchoServer {
    path: PathBuf,
    accepted: Arc<AtomicUsize>,
}

impl EchoServer {
    fn start(dir: &Path) -> EchoServer {
        let path = dir.join("app.sock");
        let listener = UnixListener::bind(&path).expect("bind the test's server");
        EchoServer::serve(listener, path)
    }

    /// The same server on an abstract name, unique to this test run.
    fn start_abstract() -> EchoServer {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let name = format!("torpor-ext-unix-srv-{}-{nanos}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        let listener = UnixListener::bind_addr(&addr).expect("bind the test's server");
        EchoServer::serve(listener, PathBuf::from(format!("@{name}")))
    }

    /// Serves on `listener`; `path` is its address as torpor shows it.
    fn serve(listener: UnixListener, path: PathBuf) -> EchoServer {
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { return };
                let k = count.fetch_add(1, Ordering::SeqCst) + 1;
                std::thread::spawn(move || {
                    for line in BufReader::new(&s).lines() {
                        let Ok(line) = line else { return };
                        if writeln!(&s, "conn={k} echo:{line}").is_err() {
                            return;
                        }
                        if line == "bye" {
                            let _ = s.shutdown(std::net::Shutdown::Write);
                        }
                    }
                });
            }
        });
        EchoServer { path, accepted }
    }

    /// The same server over `SOCK_SEQPACKET`, one line per message (std has no such
    /// socket).
    fn start_seqpacket(dir: &Path) -> EchoServer {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        use std::os::unix::ffi::OsStrExt;

        let path = dir.join("app.sock");
        // SAFETY: an all-zero sockaddr_un is valid; the path fits (a TempDir path).
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        // SAFETY: socket, bind and listen take integers and the address just built.
        let listener = unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            let bound = libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len) == 0;
            assert!(bound && libc::listen(fd, 4) == 0, "{}", std::io::Error::last_os_error());
            OwnedFd::from_raw_fd(fd)
        };
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || loop {
            // SAFETY: accept4 on the listener, no address asked for.
            let c = unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if c < 0 {
                return;
            }
            // SAFETY: just accepted, owned by nobody else.
            let c = unsafe { OwnedFd::from_raw_fd(c) };
            let k = count.fetch_add(1, Ordering::SeqCst) + 1;
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                loop {
                    // SAFETY: recv and send on our own socket, with buffers of the sizes
                    // passed.
                    unsafe {
                        let n = libc::recv(c.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0);
                        if n <= 0 {
                            return;
                        }
                        let line = String::from_utf8_lossy(&buf[..n as usize]);
                        let reply = format!("conn={k} echo:{}\n", line.trim_end());
                        libc::send(c.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0);
                    }
                }
            });
        });
        EchoServer { path, accepted }
    }

    fn addr(&self) -> String {
        self.path.display().to_string()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn start_client(server: &EchoServer) -> Fixture {
    Fixture::start("ext_unix", &["stream", &server.addr()])
}

/// Says go to a fixture that runs on as it was (never dumped, or dumped and refused) and
/// expects it to PASS.
fn go_and_pass(f: &mut Fixture) {
    f.go();
    let status = f.wait_exit(FINISH_TIMEOUT);
    assert!(status.success(), "ext_unix exited with {status:?}; log:\n{}", f.log_text());
    f.assert_log_passed();
}

#[test]
fn ext_unix_fixture_passes_without_torpor() {
    let dir = TempDir::new().expect("server dir");
    let server = EchoServer::start(dir.path());
    let mut f = start_client(&server);
    go_and_pass(&mut f);
    let log = f.log_text();
    assert!(log.contains("BEFORE conn=1") && log.contains("AFTER conn=1"), "log:\n{log}");
}

#[test]
fn ext_unix_fixture_catches_damage() {
    let dir = TempDir::new().expect("server dir");
    let server = EchoServer::start(dir.path());
    assert_catches_damage("ext_unix", &["stream", &server.addr()], &["quiet"]);
    let log = dir.path().join("log.sock");
    let _sink = UnixDatagram::bind(&log).expect("bind the test's datagram socket");
    let own = dir.path().join("client.sock");
    let _ = std::fs::remove_file(&own);
    let (log, own) = (log.display().to_string(), own.display().to_string());
    assert_catches_damage("ext_unix", &["dgram", &log, &own], &["name"]);
}

#[test]
fn stream_client_of_an_outside_server_reconnects_on_its_same_fd() {
    let dir = TempDir::new().expect("server dir");
    let server = EchoServer::start(dir.path());
    let mut f = start_client(&server);
    let images = TempDir::new().expect("image dir");
    f.dump_ok_with(images.path(), &["--external", &format!("unix:{}", server.addr())]);
    assert_eq!(server.accepted(), 1, "the server saw other clients before the restore");
    // inspect names the socket and the peer it will be connected to again.
    let out = common::torpor(["inspect".as_ref(), "--json".as_ref(), images.path().as_os_str()]);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        json.contains("\"external\"") && json.contains(&server.addr()),
        "inspect --json does not show the external socket:\n{json}"
    );

    let mut restore = Restore::spawn(images.path(), &[]);
    restore.wait_for_process(&f);
    // The restored socket is a new client of the same server.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.accepted() < 2 && std::time::Instant::now() < deadline {
        sleep(Duration::from_millis(10));
    }
    assert_eq!(server.accepted(), 2, "the restore did not connect to the server again");
    // Quiet until go: the fixture checks its connection stays open.
    sleep(Duration::from_millis(200));
    f.go();
    let status = restore.wait(FINISH_TIMEOUT).expect("restored ext_unix did not finish");
    let log = f.log_text();
    assert!(status.success(), "restore: {status:?}; stderr:\n{}\nlog:\n{log}", restore.stderr());
    f.assert_log_passed();
    // Before: the first connection. After: the same descriptor, the second connection.
    assert!(log.contains("BEFORE conn=1") && log.contains("AFTER conn=2"), "log:\n{log}");
}

#[test]
fn stream_client_of_an_abstract_name_reconnects_to_it() {
    let server = EchoServer::start_abstract();
    let mut f = start_client(&server);
    let images = TempDir::new().expect("image dir");
    f.dump_ok_with(images.path(), &["--external", &format!("unix:{}", server.addr())]);
    f.restore_and_pass(images.path());
    let log = f.log_text();
    assert!(log.contains("BEFORE conn=1") && log.contains("AFTER conn=2"), "log:\n{log}");
}

/// A python line server like [`EchoServer`] in a network namespace of its own, which
/// torpor's sock_diag cannot see; killed on drop.
struct NetnsServer {
    child: std::process::Child,
    path: PathBuf,
}

impl NetnsServer {
    /// With a second argument, a datagram socket instead that appends what it receives
    /// and from whom to that file.
    const SCRIPT: &'static str = r#"
import socket, sys, threading
if len(sys.argv) > 2:
    d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    d.bind(sys.argv[1])
    with open(sys.argv[2], "a") as out:
        while True:
            data, sender = d.recvfrom(256)
            name = "@" + sender[1:].decode() if isinstance(sender, bytes) else sender
            out.write("%s from %s\n" % (data.decode(), name))
            out.flush()
l = socket.socket(socket.AF_UNIX)
l.bind(sys.argv[1])
l.listen()
k = 0
def serve(c, k):
    for line in c.makefile("rb"):
        c.sendall(b"conn=%d echo:" % k + line)
while True:
    c, _ = l.accept()
    k += 1
    threading.Thread(target=serve, args=(c, k), daemon=True).start()
"#;

    fn start(dir: &Path) -> NetnsServer {
        NetnsServer::spawn(dir, None)
    }

    fn start_dgram(dir: &Path, out: &Path) -> NetnsServer {
        NetnsServer::spawn(dir, Some(out))
    }

    fn spawn(dir: &Path, out: Option<&Path>) -> NetnsServer {
        let path = dir.join("app.sock");
        let mut cmd = std::process::Command::new("unshare");
        cmd.args(["--net", "python3", "-c", Self::SCRIPT]).arg(&path).args(out);
        common::close_inherited_fds(&mut cmd);
        let child = cmd.spawn().expect("spawn unshare --net python3");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !path.exists() {
            assert!(std::time::Instant::now() < deadline, "the netns server never listened");
            sleep(Duration::from_millis(10));
        }
        NetnsServer { child, path }
    }
}

impl Drop for NetnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn stream_client_of_a_server_in_another_network_namespace_reconnects_to_it() {
    let dir = TempDir::new().expect("server dir");
    let server = NetnsServer::start(dir.path());
    let addr = server.path.display().to_string();
    let mut f = Fixture::start("ext_unix", &["stream", &addr]);
    let images = TempDir::new().expect("image dir");
    // Not listed by sock_diag here: the address comes from the socket itself.
    let err = stderr_of(&f.dump(images.path(), &[]));
    assert!(err.contains(&format!("--external unix:{addr}")), "dump: {err}");
    f.dump_ok_with(images.path(), &["--external", &format!("unix:{addr}")]);
    f.restore_and_pass(images.path());
    let log = f.log_text();
    assert!(log.contains("BEFORE conn=1") && log.contains("AFTER conn=2"), "log:\n{log}");
}

#[test]
fn datagram_client_of_a_socket_in_another_network_namespace_keeps_sending() {
    let dir = TempDir::new().expect("server dir");
    let out = dir.path().join("received");
    let server = NetnsServer::start_dgram(dir.path(), &out);
    let addr = server.path.display().to_string();
    let own = format!("@torpor-ext-unix-ns-{}-{}", std::process::id(), line!());
    let mut f = Fixture::start("ext_unix", &["dgram", &addr, &own]);
    let received = |want: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = std::fs::read_to_string(&out).unwrap_or_default();
            if got.contains(want) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "no {want:?}; received:\n{got}");
            sleep(Duration::from_millis(10));
        }
    };
    received(&format!("msg 1 from {own}"));
    // sock_diag here does not list the peer: its address comes from the socket itself.
    let images = TempDir::new().expect("image dir");
    f.dump_ok_with(images.path(), &["--external", &format!("unix:{addr}")]);
    let mut restore = Restore::spawn(images.path(), &[]);
    restore.wait_for_process(&f);
    f.go();
    received(&format!("msg 2 from {own}"));
    let status = restore.wait(FINISH_TIMEOUT).expect("restored ext_unix did not finish");
    assert!(status.success(), "restore: {status:?}; stderr:\n{}", restore.stderr());
    f.assert_log_passed();
}

#[test]
fn seqpacket_client_of_an_outside_server_reconnects_on_its_same_fd() {
    let dir = TempDir::new().expect("server dir");
    let server = EchoServer::start_seqpacket(dir.path());
    let mut f = Fixture::start("ext_unix", &["seqpacket", &server.addr()]);
    let images = TempDir::new().expect("image dir");
    // Named by its own inode, as the refusal shows it.
    let err = stderr_of(&f.dump(images.path(), &[]));
    let own = err
        .split("seqpacket socket (")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no inode in {err}"))
        .to_string();
    assert!(own.starts_with("socket:["), "inode {own:?} in {err}");
    f.dump_ok_with(images.path(), &["--external", &format!("unix:{own}")]);
    f.restore_and_pass(images.path());
    let log = f.log_text();
    assert!(log.contains("BEFORE conn=1") && log.contains("AFTER conn=2"), "log:\n{log}");
    assert_eq!(server.accepted(), 2);
}

#[test]
fn datagram_client_of_an_outside_socket_keeps_sending_from_its_own_name() {
    let dir = TempDir::new().expect("server dir");
    let log_path = dir.path().join("log.sock");
    let sink = UnixDatagram::bind(&log_path).expect("bind the test's datagram socket");
    sink.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let own = format!("torpor-ext-unix-{}-{nanos}", std::process::id());
    let mut f =
        Fixture::start("ext_unix", &["dgram", &log_path.display().to_string(), &format!("@{own}")]);
    let log = f.log.clone();
    let receive = |want: &str| {
        let mut buf = [0u8; 64];
        let (n, from) = sink.recv_from(&mut buf).unwrap_or_else(|e| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("waiting for {want:?}: {e}; log:\n{log}")
        });
        assert_eq!(&buf[..n], want.as_bytes());
        assert_eq!(from.as_abstract_name(), Some(own.as_bytes()), "sender of {want:?}");
    };
    receive("msg 1");

    // `--external unix`: every peer outside the tree that has an address.
    let images = TempDir::new().expect("image dir");
    f.dump_ok_with(images.path(), &["--external", "unix"]);
    let mut restore = Restore::spawn(images.path(), &[]);
    restore.wait_for_process(&f);
    f.go();
    receive("msg 2");
    let status = restore.wait(FINISH_TIMEOUT).expect("restored ext_unix did not finish");
    assert!(status.success(), "restore: {status:?}; stderr:\n{}", restore.stderr());
    f.assert_log_passed();
}

#[test]
fn dump_refuses_an_outside_peer_it_was_not_told_about_and_names_the_option() {
    let dir = TempDir::new().expect("server dir");
    let server = EchoServer::start(dir.path());
    let mut f = start_client(&server);
    let fd = f.ready_value("fd");
    let images = TempDir::new().expect("image dir");
    for extra in [&[][..], &["--external", "unix:/nonexistent/other.sock"][..]] {
        let out = f.dump(images.path(), extra);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "dump {extra:?}: {err}");
        for want in [
            format!("fd {fd} is a unix stream socket"),
            format!("connected to {}", server.addr()),
            format!("--external unix:{}", server.addr()),
        ] {
            assert!(err.contains(&want), "dump {extra:?} does not say {want:?}: {err}");
        }
        assert_running_untraced(f.pid);
    }
    // It runs on as it was, on its first connection.
    go_and_pass(&mut f);
    assert!(f.log_text().contains("AFTER conn=1"), "log:\n{}", f.log_text());
    assert_eq!(server.accepted(), 1);
}

#[test]
fn peer_without_an_address_is_refused_even_when_named() {
    let dir = TempDir::new().expect("socket dir");
    let addr = dir.path().join("srv.sock").display().to_string();
    let mut f = Fixture::start("ext_unix", &["server", &addr]);
    // An unbound client: the fixture's accepted socket has a peer with no address.
    let _client = UnixStream::connect(&addr).expect("connect to the fixture");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f.log_text().contains("ACCEPTED") {
        assert!(std::time::Instant::now() < deadline, "not accepted; log:\n{}", f.log_text());
        sleep(Duration::from_millis(10));
    }
    let images = TempDir::new().expect("image dir");
    let refused = |extra: &[&str]| {
        let out = f.dump(images.path(), extra);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "dump {extra:?}: {err}");
        assert!(err.contains("has no address"), "dump {extra:?}: {err}");
        assert_running_untraced(f.pid);
        err
    };
    let err = refused(&[]);
    assert!(!err.contains("--external unix:"), "suggests an option that cannot help: {err}");
    refused(&["--external", "unix"]);
    // Named by the peer's inode, as the message shows it.
    let peer = err
        .split("other end (")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no peer inode in {err}"))
        .to_string();
    assert!(peer.starts_with("socket:["), "peer {peer:?} in {err}");
    refused(&["--external", &format!("unix:{peer}")]);
    go_and_pass(&mut f);
}

#[test]
fn socket_with_unread_data_from_an_outside_peer_is_refused_even_when_named() {
    let dir = TempDir::new().expect("server dir");
    let server = EchoServer::start(dir.path());
    let mut f = Fixture::start("ext_unix", &["stream", &server.addr(), "unread"]);
    let images = TempDir::new().expect("image dir");
    for external in ["unix", &format!("unix:{}", server.addr())] {
        let out = f.dump(images.path(), &["--external", external]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "dump --external {external}: {err}");
        assert!(err.contains("data queued for reading"), "dump --external {external}: {err}");
        assert_running_untraced(f.pid);
    }
    // The answer is still there for the program to read.
    go_and_pass(&mut f);
    assert!(f.log_text().contains("AFTER conn=1"), "log:\n{}", f.log_text());
}

#[test]
fn half_closed_connection_to_an_outside_peer_is_refused_even_when_named() {
    let dir = TempDir::new().expect("server dir");
    let server = EchoServer::start(dir.path());
    let mut f = Fixture::start("ext_unix", &["stream", &server.addr(), "halfclosed"]);
    let images = TempDir::new().expect("image dir");
    let out = f.dump(images.path(), &["--external", &format!("unix:{}", server.addr())]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "dump: {err}");
    assert!(err.contains("shut down for reading"), "dump: {err}");
    assert_running_untraced(f.pid);
    // Still at end of file, and still sending.
    go_and_pass(&mut f);
}

/// A stream socket bound to `own` and connected to `to` (std cannot bind a client).
fn bound_client(own: &Path, to: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    let addr = |path: &[u8]| {
        // SAFETY: an all-zero sockaddr_un is valid; the paths are short TempDir paths.
        let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        a.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in a.sun_path.iter_mut().zip(path) {
            *d = *s as libc::c_char;
        }
        a
    };
    let (mine, theirs) = (addr(own.as_os_str().as_bytes()), addr(to.as_bytes()));
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: socket, bind and connect take integers and the addresses just built.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        assert_eq!(libc::bind(raw, &mine as *const _ as *const libc::sockaddr, len), 0);
        assert_eq!(libc::connect(raw, &theirs as *const _ as *const libc::sockaddr, len), 0);
        fd
    }
}

#[test]
fn accepted_connection_from_an_outside_client_is_refused_even_when_named() {
    let dir = TempDir::new().expect("socket dir");
    let addr = dir.path().join("srv.sock").display().to_string();
    let mut f = Fixture::start("ext_unix", &["server", &addr]);
    // A client with an address, which is still not one anybody can connect to.
    let own = dir.path().join("client.sock");
    let _client = bound_client(&own, &addr);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f.log_text().contains("ACCEPTED") {
        assert!(std::time::Instant::now() < deadline, "not accepted; log:\n{}", f.log_text());
        sleep(Duration::from_millis(10));
    }
    let images = TempDir::new().expect("image dir");
    let own = own.display().to_string();
    for extra in [&[][..], &["--external", "unix"][..], &["--external", &format!("unix:{own}")]] {
        let out = f.dump(images.path(), extra);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "dump {extra:?}: {err}");
        assert!(
            err.contains(&format!("its peer is a client bound to {own}, not a server")),
            "dump {extra:?}: {err}"
        );
        assert!(!err.contains("--external unix:"), "suggests an option that cannot help: {err}");
        assert_running_untraced(f.pid);
    }
    go_and_pass(&mut f);
}

#[test]
fn restore_refuses_when_the_outside_peer_is_gone_and_leaves_nothing_running() {
    let dir = TempDir::new().expect("server dir");
    let server = EchoServer::start(dir.path());
    let mut f = start_client(&server);
    let fd = f.ready_value("fd");
    let images = TempDir::new().expect("image dir");
    f.dump_ok_with(images.path(), &["--external", &format!("unix:{}", server.addr())]);

    // The server goes away.
    std::fs::remove_file(&server.path).expect("remove the server's socket file");
    let pid = f.pid.to_string();
    assert_restore_refused(
        images.path(),
        &[&format!("pid {pid} fd {fd}"), &server.addr(), "No such file"],
    );
    assert_pid_gone(f.pid);

    // Once a server listens there again, the same image wakes and talks to it.
    let again = EchoServer::start(dir.path());
    f.restore_and_pass(images.path());
    assert!(f.log_text().contains("AFTER conn=1"), "log:\n{}", f.log_text());
    assert_eq!(again.accepted(), 1);
}
