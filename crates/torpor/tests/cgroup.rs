//! A process in a control group of its own wakes in that group again; it used to wake in
//! the group of `torpor restore`, its limits and accounting silently gone (fixture
//! `cgroup.c`).

mod common;

use std::path::PathBuf;

use common::{assert_passes_standalone, Fixture};
use tempfile::TempDir;

#[test]
fn cgroup_fixture_passes_without_torpor() {
    assert_passes_standalone("cgroup", &[]);
}

/// A group made for the test, in the unified hierarchy if it is mounted at
/// /sys/fs/cgroup, else in version 1's pids hierarchy; removed on drop.
struct Group(PathBuf);

impl Group {
    fn new(name: &str) -> Group {
        let base = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup/pids")
        };
        let dir = base.join(name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Group(dir)
    }

    fn add(&self, pid: i32) {
        let procs = self.0.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", procs.display()));
    }

    fn holds(&self, pid: i32) -> bool {
        std::fs::read_to_string(self.0.join("cgroup.procs"))
            .map(|t| t.lines().any(|l| l == pid.to_string()))
            .unwrap_or(false)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Its processes have ended by now; a group can only be removed empty.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

#[test]
fn a_process_wakes_in_its_control_group() {
    let mut f = Fixture::start("cgroup", &[]);
    let group = Group::new(&format!("torpor-test-{}", f.pid));
    group.add(f.pid);
    std::fs::write(f.path("moved"), b"").expect("write the moved file");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());
    f.restore_and_pass(images.path());
    drop(f);
    drop(group);
}

#[test]
fn a_woken_process_is_in_its_group_while_it_runs() {
    let mut f = Fixture::start("cgroup", &[]);
    let group = Group::new(&format!("torpor-test-{}", f.pid));
    group.add(f.pid);
    std::fs::write(f.path("moved"), b"").expect("write the moved file");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());
    assert!(!group.holds(f.pid), "the group still holds pid {} after the dump", f.pid);
    let mut restore = common::Restore::spawn(images.path(), &[]);
    restore.wait_for_process(&f);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !group.holds(f.pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "pid {} woke outside {}; stderr:\n{}",
            f.pid,
            group.0.display(),
            restore.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    f.go();
    assert!(restore.wait(common::FINISH_TIMEOUT).is_some_and(|s| s.success()), "restore failed");
    f.assert_log_passed();
}
