//! A CPython interpreter holding a dict of two million entries (fixture `dict.py`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn python_fixture_passes_without_torpor() {
    assert_passes_standalone("dict", &[]);
}

#[test]
fn python_fixture_catches_damage() {
    assert_catches_damage("dict", &[], &["entry"]);
}

#[test]
fn python_dict_survives_dump_and_restore() {
    roundtrip("dict", &[]);
}

/// Page data is checked while the processes are rebuilt: a damaged byte in the middle of
/// a large page file still stops the restore, with nothing left running.
#[test]
fn restore_refuses_damaged_page_data_checked_while_rebuilding() {
    let mut f = common::Fixture::start("dict", &[]);
    let images = tempfile::TempDir::new().expect("image dir");
    f.dump_ok(images.path());
    let (pages, len) = std::fs::read_dir(images.path())
        .expect("read image dir")
        .map(|e| e.expect("dir entry"))
        .map(|e| (e.path(), e.metadata().expect("metadata").len()))
        .max_by_key(|(_, len)| *len)
        .expect("an image file");
    assert!(len >= 64 << 20, "{} is only {len} bytes", pages.display());
    let mut bytes = std::fs::read(&pages).expect("read page file");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&pages, &bytes).expect("write page file");

    let name = pages.file_name().unwrap().to_string_lossy().into_owned();
    common::assert_restore_refused(images.path(), &[&name]);
    common::assert_pid_gone(f.pid);
}
