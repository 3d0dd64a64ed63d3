//! Incremental images (`torpor dump --parent DIR`): a process dumped three times, running
//! on after the first two and changing a little in between, comes back from the last
//! image with every page as it left it, although each later image stores only what
//! changed (fixture `incremental.c`). A missing or changed parent is refused by name.

mod common;

use std::fs::{self, File};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    assert_catches_damage, assert_passes_standalone, assert_restore_refused, stderr_of, Fixture,
};
use tempfile::TempDir;

#[test]
fn incremental_fixture_passes_without_torpor() {
    assert_passes_standalone("incremental", &[]);
}

#[test]
fn incremental_fixture_catches_damage() {
    assert_catches_damage("incremental", &[], &["page"]);
}

/// Bytes of the page files of an image.
fn page_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .expect("image dir")
        .map(|e| e.expect("entry"))
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .map(|e| e.metadata().expect("stat").len())
        .sum()
}

/// Says `stepN` and waits for the fixture to report it done.
fn step(f: &Fixture, n: u32) {
    File::create(f.path(&format!("step{n}"))).expect("create step file");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f.log_text().contains(&format!("STEP {n}\n")) {
        assert!(Instant::now() < deadline, "no STEP {n}; log:\n{}", f.log_text());
        sleep(Duration::from_millis(10));
    }
}

fn dump(f: &Fixture, dir: &Path, extra: &[&str]) {
    let out = f.dump(dir, extra);
    assert!(out.status.success(), "dump {extra:?}: {}", stderr_of(&out));
}

#[test]
fn a_chain_of_three_dumps_restores_from_the_last() {
    let mut f = Fixture::start("incremental", &[]);
    let images = TempDir::new().expect("image dir");
    let [d1, d2, d3] = ["full", "second", "third"].map(|n| images.path().join(n));
    sleep(Duration::from_millis(100));

    dump(&f, &d1, &["--leave-running"]);
    step(&f, 1);
    dump(&f, &d2, &["--leave-running", "--parent", d1.to_str().unwrap()]);
    step(&f, 2);
    // Compressed over raw parents: the chain may mix both.
    dump(&f, &d3, &["--compress", "--parent", d2.to_str().unwrap()]);
    f.assert_killed_by_dump();

    // 32 MiB whole; a sixteenth, then a sixty-fourth changed since.
    let (full, second, third) = (page_bytes(&d1), page_bytes(&d2), page_bytes(&d3));
    assert!(full >= 32 << 20, "first image stores {full} bytes of pages");
    assert!(second < full / 8, "second image stores {second} bytes of pages, the first {full}");
    assert!(third < full / 8, "third image stores {third} bytes of pages, the first {full}");

    let verify = |dir: &Path| common::torpor(["verify".as_ref(), "-D".as_ref(), dir.as_os_str()]);
    let out = verify(&d3);
    assert!(out.status.success(), "verify of the chain: {}", stderr_of(&out));

    // A missing ancestor, named.
    let moved = images.path().join("moved");
    fs::rename(&d1, &moved).expect("move the first image");
    assert_restore_refused(&d3, &["full"]);
    let out = verify(&d3);
    assert_eq!(out.status.code(), Some(1), "verify without the first image: {}", stderr_of(&out));
    assert!(stderr_of(&out).contains("full"), "{}", stderr_of(&out));
    fs::rename(&moved, &d1).expect("move it back");

    // A changed parent, named: the same image with another manifest.
    let manifest = d2.join("manifest.json");
    let original = fs::read(&manifest).expect("manifest");
    let mut m = torpor_image::decode_manifest(&original, &manifest).expect("decode");
    m.created_unix += 1;
    fs::write(&manifest, torpor_image::encode_manifest(&m)).expect("rewrite manifest");
    let line = assert_restore_refused(&d3, &["second", "changed"]);
    assert!(!line.contains("full"), "blames the wrong image: {line}");
    fs::write(&manifest, &original).expect("restore manifest");

    f.restore_and_pass(&d3);
    assert!(f.log_text().contains("checked step 2"), "log:\n{}", f.log_text());
}

#[test]
fn a_dump_refuses_to_overwrite_its_own_parent() {
    let mut f = Fixture::start("incremental", &[]);
    let images = TempDir::new().expect("image dir");
    sleep(Duration::from_millis(100));
    dump(&f, images.path(), &["--leave-running"]);
    let before = fs::read(images.path().join("manifest.json")).expect("manifest");
    let dir = images.path().to_str().unwrap();
    let out = f.dump(images.path(), &["--parent", dir]);
    assert_eq!(out.status.code(), Some(1), "dump over itself: {}", stderr_of(&out));
    assert!(stderr_of(&out).contains("parent image itself"), "{}", stderr_of(&out));
    assert_eq!(fs::read(images.path().join("manifest.json")).unwrap(), before);
    common::assert_running_untraced(f.pid);
    f.go();
    let status = f.wait_exit(common::FINISH_TIMEOUT);
    assert!(status.success(), "log:\n{}", f.log_text());
}
