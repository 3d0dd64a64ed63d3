//! Files made with O_TMPFILE keep that flag, whose bits include O_DIRECTORY; restore
//! reopened them with it and failed with ENOTDIR after the dump had ended the process
//! (MariaDB's temporary files). Fixture `tmpfile.c`.

mod common;

use common::{assert_catches_damage, assert_passes_standalone, roundtrip};

#[test]
fn tmpfile_fixture_passes_without_torpor() {
    assert_passes_standalone("tmpfile", &[]);
}

#[test]
fn tmpfile_fixture_catches_damage() {
    assert_catches_damage("tmpfile", &[], &["truncate"]);
}

#[test]
fn files_made_with_o_tmpfile_come_back_open_with_their_content() {
    roundtrip("tmpfile", &[]);
}
