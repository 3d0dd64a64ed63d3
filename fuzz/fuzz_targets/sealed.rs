//! Feeds arbitrary bytes to the reader of sealed files (encrypted images): the first 8
//! bytes choose an offset and a length to read, the rest is the file. Whatever the bytes,
//! opening and reading must refuse or succeed without panicking, and a file that is no
//! sealing of this key's must never read back as content.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use torpor_image::crypt::{Key, Sealing};

fn sealing() -> &'static Sealing {
    static S: OnceLock<Sealing> = OnceLock::new();
    S.get_or_init(|| Sealing::create(&Key::parse(&[7; 32]).expect("a key")).expect("keys"))
}

fuzz_target!(|data: &[u8]| {
    let Some((pick, bytes)) = data.split_first_chunk::<8>() else { return };
    let (off, len) = (u32::from_le_bytes(pick[..4].try_into().unwrap()), pick[4] as usize);
    let s = sealing();
    let Ok(f) = s.open_bytes(bytes.to_vec(), "pages-1.img", Path::new("pages-1.img")) else {
        return;
    };
    // The salt is new in every run, so no input can have been sealed with these keys.
    assert!(f.read_all().is_err(), "bytes sealed by nobody opened");
    let mut buf = vec![0u8; len];
    assert!(f.read_at(&mut buf, off as u64).is_err() || len == 0);
});
