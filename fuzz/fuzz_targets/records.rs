//! Feeds arbitrary bytes to the decoder of record files (socket queues), which must refuse
//! or accept them without panicking; what it accepts must encode back to the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use torpor_image::records;

fuzz_target!(|data: &[u8]| {
    if let Some(recs) = records::decode(data) {
        assert!(recs.len() <= records::MAX_RECORDS);
        assert_eq!(records::encode(recs.iter().copied()), data);
    }
});
