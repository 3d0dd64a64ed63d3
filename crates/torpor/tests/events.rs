//! A timerfd, two eventfds (one a semaphore), a signalfd with a queued real-time signal,
//! all in one epoll, one of them twice through a dup (fixture `events.c`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn events_fixture_passes_without_torpor() {
    assert_passes_standalone("events", &[]);
}

#[test]
fn events_fixture_catches_damage() {
    assert_catches_damage("events", &[], &["timer", "eventfd", "signalfd", "epolldata"]);
}

#[test]
fn an_epoll_keeps_its_timerfd_eventfds_and_signalfd_with_their_counts_and_data() {
    roundtrip("events", &[]);
}
