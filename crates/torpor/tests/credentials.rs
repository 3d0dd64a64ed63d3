//! Who may restore what: root restores the ids and capabilities an image holds only when
//! no one but root could have written the image, or when told to trust it
//! (`--allow-credentials`). An image a user can write must not become a root process.

mod common;

use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::{assert_pid_gone, assert_restore_refused, proc_status, Fixture, Restore};
use tempfile::TempDir;

/// A uid no account uses, as which the tests run processes and own images.
const UID: u32 = 64_123;

/// Gives the image in DIR and its files to UID.
/// A command that runs what follows as `UID` (group `UID`, no supplementary groups),
/// with none of the test's descriptors.
fn as_user() -> std::process::Command {
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args([format!("--reuid={UID}"), format!("--regid={UID}"), "--clear-groups".into()]);
    common::close_inherited_fds(&mut cmd);
    cmd
}

fn give_to(dir: &Path, uid: u32) {
    chown(dir, Some(uid), Some(uid)).expect("chown image dir");
    for entry in fs::read_dir(dir).expect("read image dir") {
        chown(entry.expect("entry").path(), Some(uid), Some(uid)).expect("chown image file");
    }
}

/// Restores IMAGES with EXTRA arguments, says go, and asserts that F passes.
fn restore_and_pass_with(f: &Fixture, images: &Path, extra: &[&str]) {
    let mut restore = Restore::spawn(images, extra);
    restore.wait_for_process(f);
    f.go();
    let status = restore.wait(Duration::from_secs(60)).expect("restore did not finish");
    assert!(status.success(), "restore: {status:?}; stderr:\n{}", restore.stderr());
    f.assert_log_passed();
}

#[test]
fn a_root_process_from_an_image_a_user_owns_is_refused_unless_allowed() {
    let mut f = Fixture::start("counter", &[]);
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());
    give_to(images.path(), UID);

    let line = assert_restore_refused(
        images.path(),
        &[&format!("pid {}", f.pid), "as uid 0", &format!("uid {UID}"), "--allow-credentials"],
    );
    eprintln!("refused: {line}");
    assert_pid_gone(f.pid);

    restore_and_pass_with(&f, images.path(), &["--allow-credentials"]);
}

#[test]
fn an_image_writable_by_others_is_refused_naming_the_file() {
    let mut f = Fixture::start("counter", &[]);
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());
    let tree = images.path().join("tree.json");
    assert_eq!(fs::metadata(&tree).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(fs::metadata(images.path()).unwrap().permissions().mode() & 0o022, 0);

    fs::set_permissions(&tree, fs::Permissions::from_mode(0o620)).expect("chmod");
    assert_restore_refused(images.path(), &["tree.json", "620", "writable by other users"]);
    assert_pid_gone(f.pid);
    fs::set_permissions(images.path(), fs::Permissions::from_mode(0o707)).expect("chmod");
    fs::set_permissions(&tree, fs::Permissions::from_mode(0o600)).expect("chmod");
    assert_restore_refused(images.path(), &["707", "writable by other users"]);

    fs::set_permissions(images.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
    f.restore_and_pass(images.path());
}

/// Rewrites the credentials of every process in the image in DIR to UID with no
/// capabilities, as a dump of that user's processes records them, and re-signs the tree.
fn make_creds_of(dir: &Path, uid: u32) {
    let tree = dir.join("tree.json");
    let mut t: serde_json::Value = serde_json::from_slice(&fs::read(&tree).unwrap()).unwrap();
    for p in t["processes"].as_array_mut().unwrap() {
        let c = &mut p["creds"];
        c["uids"] = serde_json::json!([uid, uid, uid, uid]);
        c["gids"] = serde_json::json!([uid, uid, uid, uid]);
        c["groups"] = serde_json::json!([]);
        for set in ["cap_inheritable", "cap_permitted", "cap_effective", "cap_ambient"] {
            c[set] = 0.into();
        }
    }
    fs::write(&tree, serde_json::to_vec(&t).unwrap()).unwrap();
    let manifest = dir.join("manifest.json");
    let mut m = torpor_image::decode_manifest(&fs::read(&manifest).unwrap(), &manifest).unwrap();
    let entry = m.files.iter_mut().find(|e| e.name == "tree.json").expect("tree listed");
    entry.xxh3 = torpor_image::hash_file(&tree).unwrap();
    entry.len = fs::metadata(&tree).unwrap().len();
    fs::write(&manifest, torpor_image::encode_manifest(&m)).unwrap();
}

/// An image of a user's process that the user owns restores as root without the flag,
/// and the process runs as that user with no capabilities. (The image is made by
/// rewriting the ids of a root dump: root here may lack CAP_SYS_RESOURCE, which reading
/// another user's limits with prlimit needs.)
#[test]
fn a_users_process_from_that_users_image_restores_as_that_user() {
    let mut f = Fixture::start("counter", &[]);
    // Let it find its go file once it runs as UID.
    fs::set_permissions(f.workdir.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
    let images = TempDir::new().expect("image dir");
    f.dump_ok(images.path());
    make_creds_of(images.path(), UID);
    give_to(images.path(), UID);

    // Its output goes to a log root made, which the user may not write: restore, which
    // opens it as root, refuses.
    let log = f.log.to_str().unwrap().to_string();
    assert_restore_refused(images.path(), &[&log, "open for writing", &format!("uid {UID}")]);
    assert_pid_gone(f.pid);
    chown(&f.log, Some(UID), None).expect("chown log");

    let mut restore = Restore::spawn(images.path(), &[]);
    restore.wait_for_process(&f);
    // The pid exists from the start of the restore; its ids are set before it is let go.
    let uid = UID.to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let ids = || (proc_status(f.pid, "Uid").expect("status"), proc_status(f.pid, "CapEff"));
    let (mut uid_line, mut caps) = ids();
    while !(uid_line.starts_with(&uid) && caps.as_deref() == Some("0000000000000000"))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
        (uid_line, caps) = ids();
    }
    assert_eq!(uid_line.split_whitespace().collect::<Vec<_>>(), [uid.as_str(); 4]);
    assert_eq!(caps.as_deref(), Some("0000000000000000"), "restored with capabilities");
    f.go();
    let status = restore.wait(Duration::from_secs(60)).expect("restore did not finish");
    assert!(status.success(), "restore: {status:?}; stderr:\n{}", restore.stderr());
    f.assert_log_passed();
}

/// An unprivileged user dumping their own process: allowed where the kernel lets them
/// (CAP_CHECKPOINT_RESTORE), else refused saying what is missing, the process running on.
#[test]
fn an_unprivileged_dump_works_or_says_what_is_missing() {
    let tmp = TempDir::new().expect("tempdir");
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let dir = tmp.path().join("img");
    let mut sleeper = as_user().args(["sleep", "60"]).spawn().expect("start sleep");
    let pid = sleeper.id().to_string();
    std::thread::sleep(Duration::from_millis(200));
    let out = as_user()
        .arg(env!("CARGO_BIN_EXE_torpor"))
        .args(["dump", &pid, "-D"])
        .arg(&dir)
        .output()
        .expect("run torpor as the user");
    let stderr = common::stderr_of(&out);
    if out.status.success() {
        assert!(dir.join("manifest.json").exists(), "dump succeeded without an image");
    } else {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&pid), "the pid is not named: {stderr}");
        assert!(
            stderr.contains("CAP_CHECKPOINT_RESTORE"),
            "nothing says what is missing: {stderr}"
        );
        common::assert_running_untraced(sleeper.id() as i32);
    }
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// An unprivileged user hibernates a process of their own inside a user namespace they
/// made (`unshare --user --map-root-user --pid`), where the kernel grants them what
/// torpor needs over that namespace's processes: the process, started with `torpor run`,
/// is dumped and woken by the user and counts on from where it stopped.
#[test]
fn an_unprivileged_user_hibernates_a_process_in_a_user_namespace_of_their_own() {
    let tmp = TempDir::new().expect("tempdir");
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let dir = tmp.path().join("work");
    fs::create_dir(&dir).expect("work dir");
    chown(&dir, Some(UID), Some(UID)).expect("chown work dir");
    // Run by the user as pid 1 of the new namespaces; `kill -9 -1` ends every other
    // process in them at the end. Each step leaves its result in a file of DIR.
    let script = r#"
        cd "$1" || exit 1
        T="$2"
        "$T" run --pidfile pid -- sh -c 'i=0; while :; do i=$((i+1)); echo $i > count.new; mv count.new count; sleep 0.05; done' </dev/null >/dev/null 2>run.err &
        n=0; while [ ! -s count ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n+1)); done
        "$T" dump "$(cat pid)" -D img 2>dump.err || { kill -9 -1; exit 1; }
        cat count > at_dump
        sleep 0.3
        cat count > after_dump
        "$T" restore -D img --detach </dev/null 2>restore.err || { kill -9 -1; exit 1; }
        n=0; while [ "$(cat count)" = "$(cat at_dump)" ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n+1)); done
        cat count > after_restore
        kill -9 -1
    "#;
    let mut cmd = as_user();
    cmd.args(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"])
        .args(["sh", "-c", script, "sh"])
        .arg(&dir)
        .arg(env!("CARGO_BIN_EXE_torpor"))
        .stdin(std::process::Stdio::null());
    let status = cmd.status().expect("run the user's script");
    let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
    let number = |name: &str| -> u64 {
        read(name).trim().parse().unwrap_or_else(|_| {
            panic!(
                "no {name} ({status:?}); dump: {}\nrestore: {}",
                read("dump.err"),
                read("restore.err")
            )
        })
    };
    let (at_dump, after_dump, after_restore) =
        (number("at_dump"), number("after_dump"), number("after_restore"));
    assert!(at_dump > 0);
    assert_eq!(after_dump, at_dump, "the process counted on after its dump");
    // Woken, it goes on from its count, not from the start.
    assert!(
        after_restore > at_dump && after_restore <= at_dump + 5,
        "counted {at_dump} at the dump, then {after_restore} once woken"
    );
}

/// A copy of torpor given `CAP_CHECKPOINT_RESTORE` and `CAP_SYS_PTRACE` as file
/// capabilities, in a directory of its own that everyone may read.
fn capable_torpor(dir: &Path) -> std::path::PathBuf {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    let bin = dir.join("torpor");
    fs::copy(env!("CARGO_BIN_EXE_torpor"), &bin).expect("copy torpor");
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod torpor");
    let out = std::process::Command::new("setcap")
        .args(["cap_checkpoint_restore,cap_sys_ptrace+ep"])
        .arg(&bin)
        .output()
        .expect("run setcap");
    assert!(out.status.success(), "setcap: {}", common::stderr_of(&out));
    bin
}

/// A user runs a torpor that holds the two capabilities as file capabilities (how an
/// administrator lets users hibernate their programs without root): it dumps and wakes
/// the user's own process, which counts on from where it stopped and keeps none of
/// torpor's capabilities, but refuses a process of root's, which runs on untouched.
#[test]
fn a_user_with_a_capable_torpor_hibernates_their_own_processes_only() {
    let tmp = TempDir::new().expect("tempdir");
    let bin = capable_torpor(tmp.path());
    let dir = tmp.path().join("work");
    fs::create_dir(&dir).expect("work dir");
    chown(&dir, Some(UID), Some(UID)).expect("chown work dir");
    let mut roots = std::process::Command::new("sleep");
    roots.arg("60");
    common::close_inherited_fds(&mut roots);
    let mut roots = roots.spawn().expect("start root's sleep");
    let script = r#"
        cd "$1" || exit 1
        T="$2"
        "$T" dump "$3" -D root-img 2>root.err; echo $? > root.rc
        sh -c 'i=0; while :; do i=$((i+1)); echo $i > count.new; mv count.new count; sleep 0.05; done' </dev/null >/dev/null 2>&1 &
        P=$!
        n=0; while [ ! -s count ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n+1)); done
        "$T" dump $P -D img 2>dump.err || { kill -9 $P; exit 1; }
        cat count > at_dump
        "$T" restore -D img --detach --pidfile woken </dev/null 2>restore.err || exit 1
        n=0; while [ "$(cat count)" = "$(cat at_dump)" ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n+1)); done
        cat count > after_restore
        grep CapPrm /proc/$(cat woken)/status > caps
        kill -9 $(cat woken)
    "#;
    let mut cmd = as_user();
    cmd.args(["sh", "-c", script, "sh"])
        .arg(&dir)
        .arg(&bin)
        .arg(roots.id().to_string())
        .stdin(std::process::Stdio::null());
    let status = cmd.status().expect("run the user's script");
    let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
    // Root's process: refused, named, left as it was.
    let root_err = read("root.err");
    assert_eq!(read("root.rc").trim(), "1", "dump of root's process: {root_err}");
    assert!(
        root_err.contains(&format!("pid {} runs as uid [0, 0, 0, 0]", roots.id())),
        "{root_err}"
    );
    common::assert_running_untraced(roots.id() as i32);
    let _ = roots.kill();
    let _ = roots.wait();
    // The user's own: woken, counting on, without capabilities.
    let number = |name: &str| -> u64 {
        read(name).trim().parse().unwrap_or_else(|_| {
            panic!(
                "no {name} ({status:?}); dump: {}\nrestore: {}",
                read("dump.err"),
                read("restore.err")
            )
        })
    };
    let (at_dump, after_restore) = (number("at_dump"), number("after_restore"));
    assert!(
        after_restore > at_dump && after_restore <= at_dump + 5,
        "counted {at_dump} at the dump, then {after_restore} once woken"
    );
    assert_eq!(
        read("caps").split_whitespace().nth(1),
        Some("0000000000000000"),
        "woken with capabilities"
    );
}

/// The same capable torpor, run by a user on an image of a root process the user was
/// given: refused before anything is made, since the capabilities it holds would pass to
/// the process.
#[test]
fn a_capable_torpor_run_by_a_user_refuses_an_image_of_root() {
    let mut f = Fixture::start("counter", &[]);
    let tmp = TempDir::new().expect("tempdir");
    let bin = capable_torpor(tmp.path());
    let images = tmp.path().join("img");
    let out = f.dump(&images, &[]);
    assert!(out.status.success(), "dump: {}", common::stderr_of(&out));
    f.assert_killed_by_dump();
    give_to(&images, UID);
    let mut cmd = as_user();
    cmd.arg(&bin).args(["restore", "-D"]).arg(&images).stdin(std::process::Stdio::null());
    let out = cmd.output().expect("run the user's restore");
    let err = common::stderr_of(&out);
    assert!(!out.status.success(), "a user's capable torpor woke root's process: {err}");
    assert!(
        err.contains(&format!("pid {} would run as uid [0, 0, 0, 0]", f.pid)),
        "the refusal does not say why: {err}"
    );
    assert_pid_gone(f.pid);
}

/// The parent of an incremental image supplies page data: a user who can write it could
/// write a root process's memory, so it counts as part of the image.
#[test]
fn a_root_image_over_a_parent_a_user_owns_is_refused() {
    let mut f = Fixture::start("counter", &[]);
    let tmp = TempDir::new().expect("tempdir");
    let (parent, child) = (tmp.path().join("parent"), tmp.path().join("child"));
    let out = f.dump(&parent, &["--leave-running"]);
    assert!(out.status.success(), "dump: {}", common::stderr_of(&out));
    f.dump_ok_with(&child, &["--parent", parent.to_str().unwrap()]);
    give_to(&parent, UID);

    // The parent is named as the child's manifest records it: child/../parent.
    assert_restore_refused(&child, &["as uid 0", "/parent and so", "--allow-credentials"]);
    assert_pid_gone(f.pid);
    give_to(&parent, 0);
    f.restore_and_pass(&child);
}

/// A single-file image is unpacked by root into a directory of root's: the file it came
/// from is what a user could have written, and it counts like the image's own files.
#[test]
fn a_root_process_from_a_single_file_a_user_owns_is_refused() {
    let mut f = Fixture::start("counter", &[]);
    let dir = TempDir::new().expect("image dir");
    let file = dir.path().join("app.torpor");
    let pid = f.pid.to_string();
    let out = common::torpor(["dump".as_ref(), pid.as_ref(), "-o".as_ref(), file.as_os_str()]);
    assert!(out.status.success(), "dump -o: {}", common::stderr_of(&out));
    f.assert_killed_by_dump();
    chown(&file, Some(UID), Some(UID)).expect("chown single file");

    let out = common::torpor(["restore".as_ref(), file.as_os_str()]);
    let err = common::stderr_of(&out);
    assert!(!out.status.success(), "a user's single file restored as root: {err}");
    assert!(err.contains(&format!("uid {UID}")) && err.contains("app.torpor"), "{err}");
    assert_pid_gone(f.pid);
}

/// A process of another user is dumped by root (whose `prlimit` of another user's process
/// needs `CAP_SYS_RESOURCE`, which root may lack: the limits then come from
/// `/proc/PID/limits`) and comes back as that user, carrying on its count.
#[test]
fn another_users_process_is_dumped_and_woken_as_that_user() {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    common::become_subreaper();
    let dir = TempDir::new().expect("work dir");
    chown(dir.path(), Some(UID), Some(UID)).expect("chown work dir");
    let count = dir.path().join("count");
    let script = format!(
        "i=0; while :; do i=$((i+1)); echo $i > {0}.tmp && mv {0}.tmp {0}; sleep 0.02; done",
        count.display()
    );
    let mut cmd = as_user();
    cmd.args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let mut child = cmd.spawn().expect("start the counter as another user");
    let pid = child.id() as i32;
    let read = || fs::read_to_string(&count).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while read().unwrap_or(0) < 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        proc_status(pid, "Uid").as_deref().map(|u| u.split_whitespace().next()),
        Some(Some("64123"))
    );

    let images = TempDir::new().expect("image dir");
    let out = common::torpor([
        "dump".as_ref(),
        pid.to_string().as_ref(),
        "-D".as_ref(),
        images.path().as_os_str(),
    ]);
    assert!(out.status.success(), "dump of another user's process: {}", common::stderr_of(&out));
    let _ = child.wait();
    let at_dump = read().expect("count at the dump");

    let out = common::torpor([
        "restore".as_ref(),
        "-D".as_ref(),
        images.path().as_os_str(),
        "--detach".as_ref(),
    ]);
    assert!(out.status.success(), "restore: {}", common::stderr_of(&out));
    // The first count written after the wake follows the last one before the dump: a
    // counter that lost its memory would start again from 1.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut next = read();
    while next == Some(at_dump) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
        next = read();
    }
    let uid = proc_status(pid, "Uid");
    // SAFETY: kill takes integers; the woken process is ours to end.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let next = next.expect("count after the wake");
    assert!(
        next > at_dump && next <= at_dump + 3,
        "the count did not carry on from {at_dump}: next {next}"
    );
    assert_eq!(uid.as_deref().map(|u| u.split_whitespace().next()), Some(Some("64123")));
}
