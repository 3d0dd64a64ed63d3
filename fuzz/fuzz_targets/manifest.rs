//! Feeds arbitrary bytes to the manifest decoder, which must refuse or accept them without
//! panicking.
//!
//! Random bytes almost never carry a correct checksum trailer, so each input is also
//! decoded with a correct trailer appended: that reaches the JSON, magic, version and
//! file-name checks behind the checksum.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use torpor_image::{decode_manifest, hash_bytes};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("manifest.json");
    let _ = decode_manifest(data, path);

    let mut signed = data.to_vec();
    if signed.last() != Some(&b'\n') {
        signed.push(b'\n');
    }
    let trailer = format!("xxh3 {}\n", hash_bytes(&signed));
    signed.extend_from_slice(trailer.as_bytes());
    let _ = decode_manifest(&signed, path);
});
