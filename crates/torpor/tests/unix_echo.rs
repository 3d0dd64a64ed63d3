//! Two processes joined by a unix stream, seqpacket and datagram socket pair, with
//! messages queued both ways that must arrive in order and with their boundaries, and then
//! carry on echoing (fixture `unix_echo.c`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, FixtureTree};

#[test]
fn unix_echo_fixture_passes_without_torpor() {
    assert_passes_standalone("unix_echo", &[]);
}

#[test]
fn unix_echo_fixture_catches_damage() {
    assert_catches_damage("unix_echo", &[], &["lost", "order", "stream"]);
}

#[test]
fn unix_socket_pairs_keep_queued_messages_in_order_with_their_boundaries() {
    FixtureTree::start("unix_echo", &[], &["child"]).roundtrip();
}
