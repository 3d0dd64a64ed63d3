//! Compressed images (`torpor dump --compress`): the memory fixture and a process tree
//! sharing copy-on-write memory come back from zstd-framed page files, `verify` accepts
//! them, and a damaged frame is refused naming its file.

mod common;

use std::fs;
use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use common::{assert_restore_refused, stderr_of, torpor, Fixture, FixtureTree};
use tempfile::TempDir;

/// Starts NAME, dumps it with the compression argument ARG, and returns it with the
/// image.
fn dump_compressed(name: &str, arg: &str) -> (Fixture, TempDir) {
    let mut f = Fixture::start(name, &[]);
    let images = TempDir::new().expect("image dir");
    sleep(Duration::from_millis(100));
    f.dump_ok_with(images.path(), &[arg]);
    (f, images)
}

/// The manifest's format version and the frame index of the root's page file.
fn page_frames(dir: &Path, pid: i32) -> (u64, serde_json::Value) {
    let manifest = fs::read_to_string(dir.join("manifest.json")).expect("manifest");
    let body = &manifest[..manifest.rfind("\nxxh3 ").expect("trailer")];
    let m: serde_json::Value = serde_json::from_str(body).expect("manifest JSON");
    let tree: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("tree.json")).expect("tree")).expect("JSON");
    let p = tree["processes"].as_array().unwrap().iter().find(|p| p["pid"] == pid).unwrap();
    (m["format_version"].as_u64().unwrap(), p["page_frames"].clone())
}

#[test]
fn memory_survives_a_compressed_dump_and_verifies() {
    let (f, images) = dump_compressed("memory", "--compress");
    let (version, frames) = page_frames(images.path(), f.pid);
    assert_eq!(version, 2, "a compressed image needs format 2");
    assert!(frames["frames"].as_array().is_some_and(|a| !a.is_empty()), "no frames: {frames}");
    let stored = fs::metadata(images.path().join(format!("pages-{}.img", f.pid))).unwrap().len();
    let data = frames["data_len"].as_u64().unwrap();
    assert!(stored < data, "page file of {stored} bytes holds {data} bytes uncompressed");

    let out = torpor(["verify".as_ref(), "-D".as_ref(), images.path().as_os_str()]);
    assert!(out.status.success(), "verify: {}", stderr_of(&out));
    f.restore_and_pass(images.path());
}

#[test]
fn memory_survives_a_dump_at_a_fast_negative_level() {
    let (f, images) = dump_compressed("memory", "--compress=-5");
    f.restore_and_pass(images.path());
}

#[test]
fn a_tree_sharing_copy_on_write_memory_survives_a_compressed_dump() {
    FixtureTree::start("tree", &[], &["child", "grandchild"]).roundtrip_with(&["--compress"]);
}

#[test]
fn a_damaged_frame_is_refused_naming_its_file() {
    let (f, images) = dump_compressed("memory", "--compress=3");
    let name = format!("pages-{}.img", f.pid);
    let path = images.path().join(&name);
    let mut bytes = fs::read(&path).expect("page file");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    fs::write(&path, &bytes).expect("write page file");

    let out = torpor(["verify".as_ref(), "-D".as_ref(), images.path().as_os_str()]);
    assert_eq!(out.status.code(), Some(1), "verify of a damaged image: {}", stderr_of(&out));
    assert!(stderr_of(&out).contains(&name), "verify does not name {name}: {}", stderr_of(&out));
    assert_restore_refused(images.path(), &[&name]);
    common::assert_pid_gone(f.pid);

    // The same damage with the manifest's checksum made to match: the frame itself is
    // refused when restore reads it, and nothing is left running.
    let manifest = images.path().join("manifest.json");
    let mut m = torpor_image::decode_manifest(&fs::read(&manifest).unwrap(), &manifest).unwrap();
    let entry = m.files.iter_mut().find(|e| e.name == name).expect("page file listed");
    entry.xxh3 = torpor_image::hash_file(&path).unwrap();
    fs::write(&manifest, torpor_image::encode_manifest(&m)).unwrap();
    assert_restore_refused(images.path(), &[&name, "frame"]);
    common::assert_pid_gone(f.pid);
}

#[test]
fn bad_levels_are_usage_errors() {
    for arg in ["--compress=99", "--compress=fast", "--compress="] {
        let out = torpor(["dump", "1", "-D", "/nonexistent/torpor-image", arg]);
        assert_eq!(out.status.code(), Some(2), "{arg}: {}", stderr_of(&out));
    }
}

/// Pre-copy writes raw pages without hashes, so it is refused with compression or a
/// parent, before the process is touched.
#[test]
fn pre_copy_with_compress_or_parent_is_refused_and_the_process_runs_on() {
    let f = Fixture::start("memory", &[]);
    let parent = TempDir::new().expect("parent dir");
    for extra in [["--compress", ""], ["--parent", parent.path().to_str().unwrap()]] {
        let images = TempDir::new().expect("image dir");
        let dir = images.path().join("img");
        let mut args = vec!["--pre-copy", extra[0]];
        if !extra[1].is_empty() {
            args.push(extra[1]);
        }
        let out = f.dump(&dir, &args);
        let err = stderr_of(&out);
        assert!(!out.status.success(), "dump {args:?} succeeded");
        assert!(err.contains("--pre-copy cannot be combined with"), "{args:?}: {err}");
        assert!(!dir.exists(), "dump {args:?} left {}", dir.display());
        common::assert_running_untraced(f.pid);
    }
    f.go();
}
