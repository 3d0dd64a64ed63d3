//! Feeds arbitrary frame indexes of compressed page files to their check: the first 8
//! bytes are the length of the file, the rest the JSON of the index. An index the check
//! accepts must let a reader find every frame in bounds (what `PageSource` computes).

#![no_main]

use libfuzzer_sys::fuzz_target;
use torpor_image::model::PageFrames;
use torpor_image::pages::{check_frames, MAX_FRAME_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((len, json)) = data.split_first_chunk::<8>() else { return };
    let file_len = u64::from_le_bytes(*len);
    let Ok(f) = serde_json::from_slice::<PageFrames>(json) else { return };
    if check_frames(&f, file_len).is_err() {
        return;
    }
    // What a reader derives from an accepted index: frame starts, and the page data
    // range of each frame, all inside the file and the data.
    let mut at = 0u64;
    for (i, &size) in f.frames.iter().enumerate() {
        at = at.checked_add(size as u64).expect("frame starts overflow");
        assert!(at <= file_len);
        let start = (i as u64).checked_mul(f.frame_len).expect("frame offset overflows");
        assert!(start < f.data_len && f.frame_len <= MAX_FRAME_LEN);
    }
    assert_eq!(at, file_len);
});
