//! A thread blocked in poll(2) wakes still waiting in it. The kernel restarts an
//! interrupted poll from state it keeps for the thread (ERESTART_RESTARTBLOCK), which a
//! woken thread does not have; restore made poll fail with EINTR instead, and a program
//! without signal handlers does not expect that: PHP's stream_socket_accept gave up and
//! the server exited (fixture `poll_wait.c`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn poll_wait_fixture_passes_without_torpor() {
    assert_passes_standalone("poll_wait", &[]);
}

#[test]
fn poll_wait_fixture_catches_damage() {
    assert_catches_damage("poll_wait", &[], &["eintr"]);
}

#[test]
fn threads_waiting_in_poll_wait_on_after_the_restore() {
    roundtrip("poll_wait", &[]);
}
