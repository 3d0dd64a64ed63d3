//! A tree of three processes and a zombie, sharing a pipe, a unix socket pair with unread
//! data both ways, a MAP_SHARED page and 32 MiB of copy-on-write memory (fixture `tree.c`).

mod common;

use std::fs;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    assert_catches_damage, assert_passes_standalone, kill_stray, proc_exe, proc_status,
    wait_pid_gone, Fixture, Restore, FINISH_TIMEOUT, TORPOR_TIMEOUT,
};
use tempfile::TempDir;

const BREAKS: &[&str] = &["pipe", "socket", "shared", "zombie", "ids"];

/// The private buffer the three processes share copy-on-write.
const SHARED_COW_BYTES: u64 = 32 << 20;

#[test]
fn tree_fixture_passes_without_torpor() {
    assert_passes_standalone("tree", &[]);
}

#[test]
fn tree_fixture_catches_damage() {
    assert_catches_damage("tree", &[], BREAKS);
}

/// State, parent, process group and session of PID, from `/proc/PID/stat`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Ids {
    state: char,
    ppid: i32,
    pgrp: i32,
    sid: i32,
}

fn ids(pid: i32) -> Option<Ids> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = f.next()?.chars().next()?;
    let mut num = || f.next()?.parse().ok();
    Some(Ids { state, ppid: num()?, pgrp: num()?, sid: num()? })
}

/// The tree's processes besides the root, killed and reaped on drop; the root is the
/// fixture's own business.
struct Tree {
    f: Fixture,
    child: i32,
    grandchild: i32,
    zombie: i32,
}

impl Tree {
    fn start() -> Tree {
        let f = Fixture::start("tree", &[]);
        let pid = |key| f.ready_value(key).parse().expect("pid on the READY line");
        let (child, grandchild, zombie) = (pid("child"), pid("grandchild"), pid("zombie"));
        Tree { f, child, grandchild, zombie }
    }

    fn all(&self) -> [(&'static str, i32); 4] {
        [
            ("parent", self.f.pid),
            ("child", self.child),
            ("grandchild", self.grandchild),
            ("zombie", self.zombie),
        ]
    }

    fn snapshot(&self) -> Vec<(&'static str, Option<Ids>)> {
        self.all().iter().map(|&(name, pid)| (name, ids(pid))).collect()
    }

    /// Whether every process is back: the three running the fixture and released by
    /// torpor (no longer traced), the zombie a zombie.
    fn all_back(&self) -> bool {
        let runs = |pid| {
            proc_exe(pid).as_deref() == Some(self.f.exe.as_path())
                && proc_status(pid, "TracerPid").as_deref() == Some("0")
        };
        runs(self.f.pid)
            && runs(self.child)
            && runs(self.grandchild)
            && ids(self.zombie).is_some_and(|i| i.state == 'Z')
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        kill_stray(self.grandchild, &self.f.exe);
        kill_stray(self.child, &self.f.exe);
        let _ = self.f.child.kill();
        let _ = common::wait_child(&mut self.f.child, Duration::from_secs(10));
        kill_stray(self.f.pid, &self.f.exe);
        // With its parent gone the zombie is this subreaper's to reap.
        wait_pid_gone(self.zombie, Duration::from_secs(5));
    }
}

/// Bytes in the regular files under DIR.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in fs::read_dir(dir).expect("read image dir") {
        let entry = entry.expect("dir entry");
        let meta = entry.metadata().expect("stat image file");
        total += if meta.is_dir() { dir_bytes(&entry.path()) } else { meta.len() };
    }
    total
}

#[test]
fn a_process_tree_comes_back_with_its_ids_pipes_sockets_shared_memory_and_zombie() {
    let mut t = Tree::start();
    let before = t.snapshot();
    for (name, ids) in &before {
        assert!(ids.is_some(), "{name} is not running before the dump");
    }
    assert_eq!(before[3].1.map(|i| i.state), Some('Z'), "zombie before the dump: {before:?}");
    sleep(Duration::from_millis(100));

    let images = TempDir::new().expect("image dir");
    t.f.dump_ok(images.path());
    for (name, pid) in t.all() {
        assert!(
            wait_pid_gone(pid, Duration::from_secs(10)),
            "{name} (pid {pid}) still exists after the dump"
        );
    }
    let size = dir_bytes(images.path());
    assert!(
        size < 2 * SHARED_COW_BYTES,
        "image is {size} bytes: the 32 MiB the tree shares copy-on-write were stored more than \
         once"
    );

    let mut restore = Restore::spawn(images.path(), &[]);
    restore.wait_for_process(&t.f);
    let deadline = Instant::now() + TORPOR_TIMEOUT;
    while !t.all_back() {
        if let Some(status) = restore.child.try_wait().expect("try_wait") {
            panic!(
                "restore exited with {status:?} before the tree was back: {:?}; stderr:\n{}",
                t.snapshot(),
                restore.stderr()
            );
        }
        assert!(Instant::now() < deadline, "tree not back: {:?}", t.snapshot());
        sleep(Duration::from_millis(10));
    }

    // Everything as before, but the root's parent: that is `torpor restore` now. (Whether
    // a running process is asleep at this instant or not does not matter.)
    let after = t.snapshot();
    for ((name, was), (_, now)) in before.iter().zip(&after) {
        let (mut was, mut now) = (was.expect("seen before"), now.expect("seen after"));
        if *name == "parent" {
            was.ppid = restore.child.id() as i32;
        }
        if was.state != 'Z' && !matches!(now.state, 'T' | 't' | 'Z' | 'X') {
            now.state = was.state;
        }
        assert_eq!(now, was, "{name} after the restore");
    }

    t.f.go();
    let status = restore
        .wait(FINISH_TIMEOUT)
        .unwrap_or_else(|| panic!("restored tree did not finish; log:\n{}", t.f.log_text()));
    assert!(
        status.success(),
        "restored tree: {status:?}; stderr:\n{}\nlog:\n{}",
        restore.stderr(),
        t.f.log_text()
    );
    t.f.assert_log_passed();
}
