//! A threaded CPython program: workers counting under a lock, and a queue with items in
//! flight between a producer and a consumer thread (fixture `threads.py`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn python_threads_fixture_passes_without_torpor() {
    assert_passes_standalone("threads.py", &[]);
}

#[test]
fn python_threads_fixture_catches_damage() {
    assert_catches_damage("threads.py", &[], &["counter", "queue"]);
}

#[test]
fn python_threads_and_queue_survive_dump_and_restore() {
    roundtrip("threads.py", &[]);
}
