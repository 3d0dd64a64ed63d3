//! UDP sockets over 127.0.0.1 and ::1, one connected and one only bound in each family,
//! with unread datagrams both ways (fixture `udp.c`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn udp_fixture_passes_without_torpor() {
    assert_passes_standalone("udp", &[]);
}

#[test]
fn udp_fixture_catches_damage() {
    assert_catches_damage("udp", &[], &["lost", "peer"]);
}

#[test]
fn udp_sockets_keep_their_addresses_and_unread_datagrams() {
    roundtrip("udp", &[]);
}
