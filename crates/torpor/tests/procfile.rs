//! A descriptor of one of the process's own `/proc` files, open across the dump (fixture
//! `procfile.py`): it names a path that exists again only once the process is back.

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn procfile_fixture_passes_without_torpor() {
    assert_passes_standalone("procfile.py", &[]);
}

#[test]
fn procfile_fixture_catches_damage() {
    assert_catches_damage("procfile.py", &[], &["other"]);
}

#[test]
fn an_open_proc_file_of_the_process_itself_comes_back() {
    roundtrip("procfile.py", &[]);
}
