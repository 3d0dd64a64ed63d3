//! Feeds arbitrary bytes to the decoder of `tree.json`, and any tree it accepts to the
//! consistency checks (page runs, the frame index of compressed page files, ...), none of
//! which may panic (on overflow, an index, or anything else).

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use torpor_image::model::Tree;
use torpor_image::{check_tree, CpuState, FileEntry, Manifest, FORMAT_VERSION, MAGIC};

/// A manifest listing the files the seed tree names, plus one large enough that page runs
/// can reach far into it.
fn manifest() -> &'static Manifest {
    static MANIFEST: OnceLock<Manifest> = OnceLock::new();
    MANIFEST.get_or_init(|| {
        let entry = |name: &str, len: u64| FileEntry {
            name: name.to_string(),
            len,
            xxh3: "0".repeat(32),
        };
        Manifest {
            magic: MAGIC.to_string(),
            format_version: FORMAT_VERSION,
            torpor_version: String::new(),
            created_unix: 0,
            kernel_release: String::new(),
            arch: "x86_64".to_string(),
            cpu: CpuState::default(),
            root_pid: 0,
            files: vec![
                entry("tree.json", 1 << 14),
                entry("pages-4242.img", 70 << 12),
                entry("pages-4243.img", u64::MAX),
                entry("vdso-4242.img", 8192),
                entry("file-0.img", 100),
            ],
            parent: None,
            encryption: None,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(tree) = serde_json::from_slice::<Tree>(data) {
        // The same root pid as the tree, so that the checks go past the first one.
        let manifest = Manifest {
            root_pid: tree.root_pid,
            ..manifest().clone()
        };
        let _ = check_tree(&tree, &manifest, Path::new("tree.json"));
    }
});
