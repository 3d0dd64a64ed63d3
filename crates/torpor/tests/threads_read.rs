//! A thread blocked in read() on an empty pipe of its own process, which the main thread
//! writes to after the restore (fixture `threads_read.c`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn threads_read_fixture_passes_without_torpor() {
    assert_passes_standalone("threads_read", &[]);
}

#[test]
fn threads_read_fixture_catches_damage() {
    assert_catches_damage("threads_read", &[], &["pipe"]);
}

#[test]
fn a_thread_blocked_reading_a_pipe_gets_the_bytes_written_after_restore() {
    roundtrip("threads_read", &[]);
}
