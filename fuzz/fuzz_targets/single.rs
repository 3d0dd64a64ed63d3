//! Feeds arbitrary bytes to the single-file image reader, which must refuse or accept them
//! without panicking, and without allocating what a damaged length claims.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use torpor_image::single::{read_partial, Input};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let _ = read_partial(Input::Stream(&mut r), Path::new("fuzz.torpor"), true);
});
