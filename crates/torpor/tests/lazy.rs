//! Lazy restore (`torpor restore --lazy`): the processes run before their memory is
//! loaded; torpor serves their faults and loads the rest in the background (fixtures
//! `memory.c` for every kind of mapping, `lazy.c` for a process that forks, moves and
//! drops memory before its pages arrive).

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    assert_catches_damage, assert_passes_standalone, wait_pid, wait_pid_gone, Fixture, PidWait,
    Restore, FINISH_TIMEOUT,
};
use tempfile::TempDir;

/// Pages of the regions of `lazy.c`: 16 + 8 + 8 + 4 MiB.
const LAZY_FIXTURE_PAGES: u64 = 36 * 256;

/// Starts NAME, lets it settle and dumps it.
fn dumped(name: &str) -> (Fixture, TempDir) {
    let mut f = Fixture::start(name, &[]);
    let images = TempDir::new().expect("image dir");
    sleep(Duration::from_millis(100));
    f.dump_ok(images.path());
    (f, images)
}

/// The fixture's page file in the image.
fn page_file(images: &Path, f: &Fixture) -> PathBuf {
    let p = images.join(format!("pages-{}.img", f.pid));
    assert!(p.exists(), "the image has no {}", p.display());
    p
}

/// Restores with `--lazy` and EXTRA, says go, and asserts the fixture PASSes and torpor
/// reports every page loaded; returns torpor's stderr.
fn lazy_restore_passes(f: &Fixture, images: &Path, extra: &[&str]) -> String {
    let mut args = vec!["--lazy"];
    args.extend_from_slice(extra);
    let mut restore = Restore::spawn(images, &args);
    restore.wait_for_process(f);
    f.go();
    let status = restore.wait(FINISH_TIMEOUT).unwrap_or_else(|| {
        panic!("lazy restore of {} did not finish; log:\n{}", f.name, f.log_text())
    });
    let stderr = restore.stderr();
    assert!(
        status.success(),
        "lazy restore of {} exited with {status:?}; stderr:\n{stderr}\nlog:\n{}",
        f.name,
        f.log_text()
    );
    f.assert_log_passed();
    assert!(stderr.contains("all pages loaded"), "no load report; stderr:\n{stderr}");
    stderr
}

/// Asserts a lazy restore that met a bad page file killed the whole tree and said why.
fn assert_tree_killed(f: &Fixture, mut restore: Restore) {
    let status = restore.wait(FINISH_TIMEOUT).unwrap_or_else(|| {
        panic!("lazy restore still runs on a bad page file; stderr:\n{}", restore.stderr())
    });
    let stderr = restore.stderr();
    eprintln!("torpor said:\n{stderr}");
    assert_eq!(status.code(), Some(1), "lazy restore: {status:?}; stderr:\n{stderr}");
    let file = format!("pages-{}.img", f.pid);
    assert!(
        stderr.contains(&file) && stderr.contains("were killed"),
        "the error does not name {file} and the killing; stderr:\n{stderr}"
    );
    assert!(wait_pid_gone(f.pid, Duration::from_secs(10)), "pid {} still runs", f.pid);
    assert!(!f.log_text().contains("PASS"), "the fixture ran to the end:\n{}", f.log_text());
}

#[test]
fn lazy_fixture_passes_without_torpor() {
    assert_passes_standalone("lazy", &[]);
}

#[test]
fn lazy_fixture_catches_damage() {
    assert_catches_damage("lazy", &[], &["read", "fork", "remap", "dontneed", "unmap"]);
}

/// Every kind of mapping of the memory fixture (heap, brk, anonymous, shared, read-only,
/// guard, sparse, private file, growsdown, stack), its pages served on fault first: the
/// fixture checks its memory all the time it waits.
#[test]
fn memory_survives_lazy_restore() {
    let (f, images) = dumped("memory");
    let stderr = lazy_restore_passes(&f, images.path(), &["--lazy-prefetch-after-ms", "300"]);
    let faults: u64 = stderr
        .split(" faults answered")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no fault count; stderr:\n{stderr}"));
    assert!(faults > 0, "no fault was served lazily; stderr:\n{stderr}");
}

/// The process has the kernel write into a page not loaded yet (read() from a pipe),
/// forks (the child reads pages the parent never loaded), mremaps, drops memory with
/// MADV_DONTNEED and unmaps, all before background loading starts.
#[test]
fn fork_mremap_and_dontneed_before_the_pages_arrive() {
    let (f, images) = dumped("lazy");
    lazy_restore_passes(&f, images.path(), &["--lazy-prefetch-after-ms", "5000"]);
    let log = f.log_text();
    let unloaded: u64 = log
        .lines()
        .find_map(|l| l.strip_prefix("UNLOADED "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no UNLOADED line; log:\n{log}"));
    assert_eq!(unloaded, LAZY_FIXTURE_PAGES, "pages were loaded before go; log:\n{log}");
}

/// With --detach, a page server process of its own loads the pages after torpor
/// returns.
#[test]
fn detached_lazy_restore_loads_everything() {
    let (f, images) = dumped("lazy");
    let mut restore = Restore::spawn(images.path(), &["--lazy", "--detach"]);
    let status = restore.expect_exit("--lazy --detach");
    assert!(status.success(), "{status:?}; stderr:\n{}", restore.stderr());
    let deadline = Instant::now() + FINISH_TIMEOUT;
    while !restore.stderr().contains("all pages loaded") {
        assert!(Instant::now() < deadline, "no load report; stderr:\n{}", restore.stderr());
        sleep(Duration::from_millis(10));
    }
    f.go();
    match wait_pid(f.pid, FINISH_TIMEOUT) {
        PidWait::Exited(s) => assert!(s.success(), "{s:?}; log:\n{}", f.log_text()),
        PidWait::TimedOut => panic!("pid {} still runs; log:\n{}", f.pid, f.log_text()),
        PidWait::NotOurChild => panic!("pid {} was not handed to the test", f.pid),
    }
    f.assert_log_passed();
}

/// A page file whose bytes changed after the dump: the restore starts (only lengths are
/// checked up front), the background check finds it, and the tree dies.
#[test]
fn damaged_page_file_kills_the_tree() {
    let (f, images) = dumped("lazy");
    let file = OpenOptions::new().read(true).write(true).open(page_file(images.path(), &f));
    let file = file.expect("open page file");
    let mut byte = [0u8; 1];
    let at = file.metadata().expect("stat").len() / 2 + 123;
    file.read_exact_at(&mut byte, at).expect("read");
    byte[0] ^= 0x40;
    file.write_all_at(&byte, at).expect("write");

    let restore = Restore::spawn(images.path(), &["--lazy", "--lazy-prefetch-after-ms", "2000"]);
    assert_tree_killed(&f, restore);
}

/// The page file turns unreadable while the process runs: its next fault for a stored
/// page cannot be answered, and the tree dies instead of running on with wrong memory.
#[test]
fn page_file_unreadable_midway_kills_the_tree() {
    let (f, images) = dumped("lazy");
    let pages = page_file(images.path(), &f);
    let mut restore =
        Restore::spawn(images.path(), &["--lazy", "--lazy-prefetch-after-ms", "20000"]);
    restore.wait_for_process(&f);
    // Let the background check pass over the intact file first.
    sleep(Duration::from_millis(500));
    let file = OpenOptions::new().write(true).open(&pages).expect("open page file");
    file.set_len(0).expect("truncate the page file");
    fs::remove_file(&pages).expect("remove the page file");
    f.go();
    assert_tree_killed(&f, restore);
}

/// Eleven threads fault at once, one blocked in FUTEX_WAIT, one in nanosleep.
#[test]
fn threads_survive_lazy_restore() {
    let (f, images) = dumped("threads");
    lazy_restore_passes(&f, images.path(), &[]);
}

/// A tree (a child, a grandchild and a zombie): each process has its own userfaultfd.
#[test]
fn tree_survives_lazy_restore() {
    let (f, images) = dumped("tree");
    lazy_restore_passes(&f, images.path(), &[]);
}
