//! System V shared memory: a private segment marked for removal and shared with a child,
//! and a keyed one attached read-only (fixture `sysv.c`).

mod common;

use common::{assert_catches_damage, assert_passes_standalone, FixtureTree};

#[test]
fn sysv_fixture_passes_without_torpor() {
    assert_passes_standalone("sysv", &[]);
}

#[test]
fn sysv_fixture_catches_damage() {
    assert_catches_damage("sysv", &[], &["pattern", "shared"]);
}

/// Removes the keyed segment on drop, for when the fixture does not get to.
struct RemoveSegment(libc::key_t);

impl Drop for RemoveSegment {
    fn drop(&mut self) {
        // SAFETY: shmget and shmctl(IPC_RMID) take plain integers and a null buffer, which
        // IPC_RMID does not read.
        unsafe {
            let id = libc::shmget(self.0, 0, 0);
            if id >= 0 {
                libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
            }
        }
    }
}

/// Whether a segment with KEY exists.
fn key_exists(key: libc::key_t) -> bool {
    // SAFETY: shmget with size 0 and no flags only looks the key up.
    unsafe { libc::shmget(key, 0, 0) >= 0 }
}

#[test]
fn sysv_segments_come_back_with_their_ids_mode_attachments_and_content() {
    let mut t = FixtureTree::start("sysv", &[], &["child"]);
    let key = t.f.ready_value("key");
    let key = i32::from_str_radix(key.trim_start_matches("0x"), 16).expect("key on READY");
    let _remove = RemoveSegment(key);
    assert_eq!(key, 0x7e00_0000 | t.f.pid, "key is not derived from the pid");
    assert!(key_exists(key), "no segment with key {key:#x}");

    t.roundtrip();
    assert!(!key_exists(key), "segment {key:#x} is still there after the fixture removed it");
}
