//! An inotify instance whose watch descriptors have a gap (fixture `inotify.c`).

mod common;

use std::thread::sleep;
use std::time::Duration;

use common::{assert_catches_damage, assert_passes_standalone, Fixture};
use tempfile::TempDir;

#[test]
fn inotify_fixture_passes_without_torpor() {
    assert_passes_standalone("inotify", &[]);
}

#[test]
fn inotify_fixture_catches_damage() {
    assert_catches_damage("inotify", &[], &["wd", "lost"]);
}

#[test]
fn inotify_watches_come_back_under_their_own_descriptors_and_report_events() {
    let mut f = Fixture::start("inotify", &[]);
    let wd = |key| f.ready_value(key).parse::<i32>().expect("watch descriptor on READY");
    let (gone, a, b) = (wd("gone"), wd("a"), wd("b"));
    // The case worth testing: the remaining watches are not simply numbered from 1.
    assert!(gone < a && a < b, "watch descriptors gone={gone} a={a} b={b}");

    let images = TempDir::new().expect("image dir");
    sleep(Duration::from_millis(100));
    f.dump_ok(images.path());
    f.restore_and_pass(images.path());
}
