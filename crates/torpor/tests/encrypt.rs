//! Encrypted images (`torpor dump --encrypt-key FILE`): a process holding a secret in its
//! memory, on its heap, in its command line and in a deleted file it keeps open (fixture
//! `secret.c`) is dumped with a key; no file of the image holds the secret, and the
//! process wakes only with that key, checking its own memory. A missing or wrong key, and
//! a changed byte in any file, are refused before anything runs. Encryption composes
//! with compression, incremental dumps, lazy restore, pre-copy, single files and
//! executables.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    assert_pid_gone, stderr_of, torpor, Fixture, Restore, FINISH_TIMEOUT, REFUSAL_TIMEOUT,
    TORPOR_TIMEOUT,
};
use tempfile::TempDir;

/// Two keys made by `torpor keygen`, in a directory of their own.
struct Keys {
    _dir: TempDir,
    key: PathBuf,
    other: PathBuf,
}

impl Keys {
    fn new() -> Keys {
        let dir = TempDir::new().expect("key dir");
        let [key, other] = ["app.key", "other.key"].map(|n| dir.path().join(n));
        for k in [&key, &other] {
            let out = torpor(["keygen".as_ref(), k.as_os_str()]);
            assert!(out.status.success(), "keygen: {}", stderr_of(&out));
        }
        Keys { _dir: dir, key, other }
    }

    /// `--encrypt-key KEY`.
    fn arg(&self) -> [&str; 2] {
        ["--encrypt-key", self.key.to_str().expect("UTF-8 path")]
    }
}

/// A secret that appears nowhere else: not in torpor, the fixture or this test.
fn new_secret() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos(),
    );
    format!("secret-{:016x}-{}", h.finish(), std::process::id())
}

/// Starts the secret fixture holding `secret` and lets it settle.
fn start(secret: &str) -> Fixture {
    let f = Fixture::start("secret", &[secret]);
    sleep(Duration::from_millis(100));
    f
}

/// The files under `path` (a directory, searched whole, or one file) holding `needle`.
fn files_holding(path: &Path, needle: &str) -> Vec<PathBuf> {
    if path.is_file() {
        let bytes = fs::read(path).expect("read image file");
        let found = bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
        return if found { vec![path.to_path_buf()] } else { Vec::new() };
    }
    let mut out = Vec::new();
    for e in fs::read_dir(path).expect("read image dir") {
        out.extend(files_holding(&e.expect("entry").path(), needle));
    }
    out
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
}

/// Asserts that no file of the image at `path` holds the secret.
fn assert_hidden(path: &Path, secret: &str) {
    let found = files_holding(path, secret);
    assert!(found.is_empty(), "the secret shows in {:?} of {}", names(&found), path.display());
}

/// `torpor dump PID -D DIR ARGS...`, asserting success.
fn dump(f: &Fixture, dir: &Path, extra: &[&str]) {
    let out = f.dump(dir, extra);
    assert!(out.status.success(), "dump {extra:?}: {}", stderr_of(&out));
}

/// The checksum the fixture last reported for its memory ("sum=HEX" on its READY or STEP
/// line).
fn reported_sum(log: &str) -> &str {
    let line = log
        .lines()
        .rfind(|l| l.starts_with("READY ") || l.starts_with("STEP "))
        .expect("a READY line");
    line.split(' ').find_map(|w| w.strip_prefix("sum=")).expect("sum= on the line")
}

/// Restores `image` with `extra`, says go, and asserts the process PASSes, having found
/// the checksum of its memory to be the one it reported before the dump.
fn restore_and_pass(f: &Fixture, image: &Path, extra: &[&str]) {
    let want = reported_sum(&f.log_text()).to_string();
    let mut restore = Restore::spawn(image, extra);
    restore.wait_for_process(f);
    f.go();
    let status = restore
        .wait(FINISH_TIMEOUT)
        .unwrap_or_else(|| panic!("restore of {} did not finish; log:\n{}", f.name, f.log_text()));
    assert!(
        status.success(),
        "restore {extra:?} exited with {status:?}; stderr:\n{}\nlog:\n{}",
        restore.stderr(),
        f.log_text()
    );
    f.assert_log_passed();
    let checked = format!("checked sum={want}\n");
    assert!(f.log_text().contains(&checked), "no {checked:?}; log:\n{}", f.log_text());
}

/// Restores `image` with `extra` expecting a refusal: exit 1, one line on stderr naming
/// every item of `want`, and nothing left running under `pid`.
fn assert_refused(image: &Path, extra: &[&str], want: &[&str], pid: i32) -> String {
    let mut restore = Restore::spawn(image, extra);
    let status = restore.wait(REFUSAL_TIMEOUT).unwrap_or_else(|| {
        panic!("restore {extra:?} still runs after {REFUSAL_TIMEOUT:?}: {}", restore.stderr())
    });
    let err = restore.stderr();
    assert_eq!(status.code(), Some(1), "restore {extra:?}: {status:?}; stderr:\n{err}");
    assert_eq!(err.trim().lines().count(), 1, "want one line on stderr, got:\n{err}");
    for w in want {
        assert!(err.contains(w), "restore {extra:?}: stderr does not say {w:?}: {err}");
    }
    assert_pid_gone(pid);
    err
}

/// The manifest's JSON body.
fn manifest(dir: &Path) -> serde_json::Value {
    let text = fs::read_to_string(dir.join("manifest.json")).expect("manifest");
    serde_json::from_str(&text[..text.rfind("\nxxh3 ").expect("trailer")]).expect("JSON")
}

/// Flips one byte in the middle of `path`; returns the original content.
fn flip(path: &Path) -> Vec<u8> {
    let original = fs::read(path).expect("read");
    let mut bytes = original.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    fs::write(path, &bytes).expect("write");
    original
}

#[test]
fn secret_fixture_passes_without_torpor_and_catches_damage() {
    common::assert_passes_standalone("secret", &["standalone-secret"]);
    common::assert_catches_damage("secret", &["standalone-secret"], &["page", "file", "heap"]);
}

#[test]
fn an_encrypted_image_hides_the_secret_and_wakes_with_the_key() {
    let keys = Keys::new();
    let secret = new_secret();
    let mut f = start(&secret);
    let images = TempDir::new().expect("image dir");

    // The control: a plain snapshot shows the secret where the search looks, in the
    // pages, the records and the saved content of the deleted file.
    let plain = images.path().join("plain");
    dump(&f, &plain, &["--leave-running"]);
    let shown = names(&files_holding(&plain, &secret));
    let pages = format!("pages-{}.img", f.pid);
    for want in [pages.as_str(), "tree.json", "file-"] {
        assert!(shown.iter().any(|n| n.starts_with(want)), "{want} not in {shown:?}");
    }

    let enc = images.path().join("enc");
    f.dump_ok_with(&enc, &keys.arg());
    assert_hidden(&enc, &secret);
    let m = manifest(&enc);
    assert_eq!(m["format_version"], 5, "an encrypted image needs format 5: {m}");
    assert!(m["encryption"]["mac"].as_str().is_some_and(|s| s.len() == 64), "{m}");
    for e in fs::read_dir(&enc).expect("image dir") {
        let mode = e.expect("entry").metadata().expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let mut args = vec!["verify".as_ref(), enc.as_os_str()];
    args.extend(keys.arg().map(OsStr::new));
    let out = torpor(args);
    assert!(out.status.success(), "verify with the key: {}", stderr_of(&out));
    restore_and_pass(&f, &enc, &keys.arg());
}

#[test]
fn without_the_key_or_with_another_nothing_is_restored() {
    let keys = Keys::new();
    let mut f = start(&new_secret());
    let images = TempDir::new().expect("image dir");
    f.dump_ok_with(images.path(), &keys.arg());

    assert_refused(images.path(), &[], &["is encrypted", "--encrypt-key FILE"], f.pid);
    let other = ["--key", keys.other.to_str().unwrap()];
    assert_refused(images.path(), &other, &["key does not match"], f.pid);

    // inspect and verify say the same, inspect which flag to pass.
    let out = torpor(["inspect".as_ref(), images.path().as_os_str()]);
    assert_eq!(out.status.code(), Some(1), "inspect without the key: {}", stderr_of(&out));
    assert!(stderr_of(&out).contains("is encrypted"), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("--encrypt-key FILE"), "{}", stderr_of(&out));
    let out = torpor(["verify".as_ref(), images.path().as_os_str()]);
    assert_eq!(out.status.code(), Some(1), "verify without the key: {}", stderr_of(&out));
    let out = torpor(["list".as_ref(), "--json".as_ref(), images.path().as_os_str()]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list JSON");
    assert_eq!(rows[0]["encrypted"], true, "{rows}");
    assert_eq!(rows[0]["complete"], true, "an encrypted image is no damaged one: {rows}");
    let mut args = vec!["inspect".as_ref(), "--json".as_ref(), images.path().as_os_str()];
    args.extend(keys.arg().map(OsStr::new));
    let out = torpor(args);
    assert!(out.status.success(), "inspect with the key: {}", stderr_of(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    assert_eq!(report["processes"][0]["pid"], f.pid, "{report}");
    assert_eq!(report["image"]["encrypted"], true, "{report}");

    // The refusals left nothing in the way.
    restore_and_pass(&f, images.path(), &keys.arg());
}

#[test]
fn a_changed_byte_in_any_file_is_refused_naming_it() {
    let keys = Keys::new();
    let mut f = start(&new_secret());
    let images = TempDir::new().expect("image dir");
    let dir = images.path();
    f.dump_ok_with(dir, &keys.arg());

    let pages = format!("pages-{}.img", f.pid);
    for name in [pages.as_str(), "tree.json"] {
        let path = dir.join(name);
        let original = flip(&path);
        // The segment the byte is in is named too.
        assert_refused(dir, &keys.arg(), &[name, "segment"], f.pid);
        fs::write(&path, original).expect("put back");
    }

    // A manifest changed and given a matching checksum trailer: its MAC tells.
    let path = dir.join("manifest.json");
    let original = fs::read(&path).expect("manifest");
    let mut m = torpor_image::decode_manifest(&original, &path).expect("manifest");
    m.root_pid += 1;
    fs::write(&path, torpor_image::encode_manifest(&m)).expect("write manifest");
    assert_refused(dir, &keys.arg(), &["manifest.json", "changed"], f.pid);
    fs::write(&path, original).expect("put back");

    restore_and_pass(&f, dir, &keys.arg());
}

#[test]
fn encryption_composes_with_compression() {
    let keys = Keys::new();
    let secret = new_secret();
    let mut f = start(&secret);
    let images = TempDir::new().expect("image dir");
    let mut args = keys.arg().to_vec();
    args.push("--compress");
    f.dump_ok_with(images.path(), &args);
    assert_hidden(images.path(), &secret);
    restore_and_pass(&f, images.path(), &keys.arg());
}

/// Says `step1` and waits for the fixture to report it done.
fn step1(f: &Fixture) {
    fs::File::create(f.path("step1")).expect("create step file");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f.log_text().contains("STEP 1 ") {
        assert!(Instant::now() < deadline, "no STEP 1; log:\n{}", f.log_text());
        sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_incremental_dump_over_an_encrypted_parent() {
    let keys = Keys::new();
    let secret = new_secret();
    let mut f = start(&secret);
    let images = TempDir::new().expect("image dir");
    let [full, second, plain, refused] =
        ["full", "second", "plain", "refused"].map(|n| images.path().join(n));
    let mut args = keys.arg().to_vec();
    args.push("--leave-running");
    dump(&f, &full, &args);
    dump(&f, &plain, &["--leave-running"]);
    step1(&f);

    // The parent opens only with its key; a plain parent is refused for an encrypted
    // child, whose unchanged pages would stay readable there. The process runs on.
    let other = ["--encrypt-key", keys.other.to_str().unwrap()];
    let full_arg = full.to_str().unwrap();
    let plain_arg = plain.to_str().unwrap();
    let cases: [(Vec<&str>, &str); 3] = [
        (vec![other[0], other[1], "--parent", full_arg], "key does not match"),
        (vec!["--parent", full_arg], "is encrypted"),
        (vec![keys.arg()[0], keys.arg()[1], "--parent", plain_arg], "is not encrypted"),
    ];
    for (extra, want) in cases {
        let out = f.dump(&refused, &extra);
        assert!(!out.status.success(), "dump {extra:?} succeeded");
        assert!(stderr_of(&out).contains(want), "dump {extra:?}: {}", stderr_of(&out));
        assert!(!refused.exists(), "dump {extra:?} left {}", refused.display());
        common::assert_running_untraced(f.pid);
    }

    let mut args = keys.arg().to_vec();
    args.extend(["--parent", full_arg]);
    f.dump_ok_with(&second, &args);
    assert_hidden(&full, &secret);
    assert_hidden(&second, &secret);
    assert_refused(&second, &[], &["is encrypted"], f.pid);
    restore_and_pass(&f, &second, &keys.arg());
}

/// The number of faults a lazy restore reports having answered.
fn faults_answered(stderr: &str) -> u64 {
    stderr
        .split(" faults answered")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no fault count; stderr:\n{stderr}"))
}

/// Pages of an encrypted image, raw or compressed, come in when the process first
/// touches them, each from the segments (and frame) holding it.
#[test]
fn a_lazy_restore_serves_encrypted_pages_on_first_touch() {
    let keys = Keys::new();
    for compress in [false, true] {
        let mut f = start(&new_secret());
        let images = TempDir::new().expect("image dir");
        let mut args = keys.arg().to_vec();
        if compress {
            args.push("--compress");
        }
        f.dump_ok_with(images.path(), &args);

        let mut lazy = keys.arg().to_vec();
        lazy.extend(["--lazy", "--lazy-prefetch-after-ms", "300"]);
        let want = reported_sum(&f.log_text()).to_string();
        let mut restore = Restore::spawn(images.path(), &lazy);
        restore.wait_for_process(&f);
        f.go();
        let status = restore.wait(FINISH_TIMEOUT).expect("the lazy restore ends");
        let stderr = restore.stderr();
        assert!(status.success(), "lazy restore (compress {compress}): {stderr}");
        f.assert_log_passed();
        assert!(f.log_text().contains(&format!("checked sum={want}\n")), "{}", f.log_text());
        assert!(stderr.contains("all pages loaded"), "no load report: {stderr}");
        let faults = faults_answered(&stderr);
        assert!(faults > 0, "no page was served on a fault (compress {compress}): {stderr}");
    }
}

/// A changed page of an encrypted image met by a lazy restore kills the tree and names
/// the file.
#[test]
fn a_lazy_restore_refuses_changed_pages() {
    let keys = Keys::new();
    let mut f = start(&new_secret());
    let images = TempDir::new().expect("image dir");
    f.dump_ok_with(images.path(), &keys.arg());

    let pages = format!("pages-{}.img", f.pid);
    let path = images.path().join(&pages);
    let original = flip(&path);
    let mut lazy = keys.arg().to_vec();
    lazy.push("--lazy");
    let mut restore = Restore::spawn(images.path(), &lazy);
    let status = restore.wait(TORPOR_TIMEOUT).expect("a lazy restore of changed pages ends");
    assert_eq!(status.code(), Some(1), "lazy restore of changed pages: {}", restore.stderr());
    assert!(restore.stderr().contains(&pages), "{}", restore.stderr());
    assert_pid_gone(f.pid);
    assert!(!f.log_text().contains("PASS"), "the fixture ran to the end:\n{}", f.log_text());
    fs::write(&path, original).expect("put back");

    restore_and_pass(&f, images.path(), &lazy);
}

#[test]
fn pre_copy_writes_an_encrypted_image() {
    let keys = Keys::new();
    let secret = new_secret();
    let mut f = start(&secret);
    let images = TempDir::new().expect("image dir");
    let mut args = keys.arg().to_vec();
    args.push("--pre-copy");
    f.dump_ok_with(images.path(), &args);
    assert_hidden(images.path(), &secret);
    restore_and_pass(&f, images.path(), &keys.arg());
}

#[test]
fn a_single_file_and_an_executable_stay_encrypted() {
    let keys = Keys::new();
    let out = TempDir::new().expect("out dir");

    let secret = new_secret();
    let mut f = start(&secret);
    let file = out.path().join("app.torpor");
    let mut args = keys.arg().to_vec();
    args.extend(["-o", file.to_str().unwrap()]);
    let pid = f.pid.to_string();
    let dumped = torpor([&["dump", pid.as_str()], &args[..]].concat());
    assert!(dumped.status.success(), "dump -o: {}", stderr_of(&dumped));
    f.assert_killed_by_dump();
    assert_hidden(&file, &secret);
    assert_refused(&file, &[], &["is encrypted"], f.pid);
    restore_and_pass(&f, &file, &keys.arg());

    let secret = new_secret();
    let mut f = start(&secret);
    let exe = out.path().join("app.run");
    let mut args = keys.arg().to_vec();
    args.extend(["--exe", exe.to_str().unwrap()]);
    let pid = f.pid.to_string();
    let dumped = torpor([&["dump", pid.as_str()], &args[..]].concat());
    assert!(dumped.status.success(), "dump --exe: {}", stderr_of(&dumped));
    f.assert_killed_by_dump();
    assert_hidden(&exe, &secret);

    let run = common::run_with_timeout(Command::new(&exe), TORPOR_TIMEOUT);
    assert_eq!(run.status.code(), Some(1), "./app.run without the key: {}", stderr_of(&run));
    assert!(stderr_of(&run).contains("is encrypted"), "{}", stderr_of(&run));
    assert_pid_gone(f.pid);
    let mut cmd = Command::new(&exe);
    cmd.args(keys.arg()).arg("--detach");
    let run = common::run_with_timeout(cmd, TORPOR_TIMEOUT);
    assert!(run.status.success(), "./app.run --encrypt-key: {}", stderr_of(&run));
    f.go();
    match common::wait_pid(f.pid, FINISH_TIMEOUT) {
        common::PidWait::Exited(st) => {
            assert!(st.success(), "restored process: {st:?}; log:\n{}", f.log_text())
        }
        other => panic!("restored process did not end: {other:?}; log:\n{}", f.log_text()),
    }
    f.assert_log_passed();
}

#[test]
fn keygen_writes_a_private_key_once_and_a_bad_key_is_refused() {
    let dir = TempDir::new().expect("key dir");
    let key = dir.path().join("k");
    let out = torpor(["keygen".as_ref(), key.as_os_str()]);
    assert!(out.status.success(), "keygen: {}", stderr_of(&out));
    let text = fs::read_to_string(&key).expect("key");
    assert!(text.len() == 65 && text[..64].bytes().all(|b| b.is_ascii_hexdigit()), "{text:?}");
    assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let out = torpor(["keygen".as_ref(), key.as_os_str()]);
    assert_eq!(out.status.code(), Some(1), "keygen over a key: {}", stderr_of(&out));
    assert_eq!(fs::read_to_string(&key).unwrap(), text, "keygen replaced a key");

    // A file that holds no key is refused before the process is touched.
    let bad = dir.path().join("bad");
    fs::write(&bad, "not a key\n").unwrap();
    let f = start("unused-secret");
    let images = dir.path().join("img");
    let out = f.dump(&images, &["--encrypt-key", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "dump with a bad key: {}", stderr_of(&out));
    assert!(stderr_of(&out).contains("does not hold a key"), "{}", stderr_of(&out));
    assert!(!images.exists());
    common::assert_running_untraced(f.pid);
    f.go();
}
