//! What sockets carry besides their data: buffer sizes (also past `net.core.rmem_max`),
//! the backlogs of TCP listeners, and the senders of datagrams queued on a bound unix
//! socket (fixture `sock_settings.py`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, Fixture};
use tempfile::TempDir;

#[test]
fn sock_settings_fixture_passes_without_torpor() {
    assert_passes_standalone("sock_settings", &[]);
}

#[test]
fn sock_settings_fixture_catches_damage() {
    assert_catches_damage("sock_settings", &[], &["rcvbuf", "backlog", "sender"]);
}

#[test]
fn buffer_sizes_backlogs_and_datagram_senders_survive() {
    let mut f = Fixture::start("sock_settings", &[]);
    let images = TempDir::new().expect("image dir");
    let out = f.dump(images.path(), &["--tcp-established"]);
    assert!(out.status.success(), "dump: {}", String::from_utf8_lossy(&out.stderr));
    f.assert_killed_by_dump();
    f.restore_and_pass(images.path());
}
