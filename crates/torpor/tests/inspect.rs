//! `torpor inspect`: images of real fixtures described as text and as JSON, and damaged
//! images described as far as they can be read.

mod common;

use std::fs;
use std::path::Path;
use std::process::Output;

use common::{free_port, stderr_of, torpor, Fixture, FINISH_TIMEOUT};
use serde_json::Value;
use tempfile::TempDir;

fn inspect(dir: &Path, json: bool) -> Output {
    let mut args = vec!["inspect".as_ref(), dir.as_os_str()];
    if json {
        args.insert(1, "--json".as_ref());
    }
    torpor(args)
}

fn inspect_json(dir: &Path) -> Value {
    let out = inspect(dir, true);
    assert_eq!(out.status.code(), Some(0), "inspect --json failed: {}", stderr_of(&out));
    serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON")
}

fn inspect_text(dir: &Path) -> String {
    let out = inspect(dir, false);
    assert_eq!(out.status.code(), Some(0), "inspect failed: {}", stderr_of(&out));
    String::from_utf8(out.stdout).expect("UTF-8 text")
}

/// Dumps F with `--leave-running` into a new image directory.
fn dump(f: &Fixture) -> TempDir {
    let images = TempDir::new().expect("tempdir");
    let out = f.dump(images.path(), &["--leave-running"]);
    assert!(out.status.success(), "dump of {} failed: {}", f.name, stderr_of(&out));
    images
}

fn process(report: &Value, pid: i32) -> &Value {
    report["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("no process {pid} in {report:#}"))
}

fn fds_of_kind<'a>(p: &'a Value, kind: &str) -> Vec<&'a Value> {
    p["descriptors"].as_array().expect("descriptors").iter().filter(|d| d["kind"] == kind).collect()
}

/// Lets a fixture dumped with `--leave-running` finish, so its whole tree ends.
fn finish(mut f: Fixture) {
    f.go();
    f.wait_exit(FINISH_TIMEOUT);
    f.assert_log_passed();
}

#[test]
fn inspect_names_the_tree_its_pipe_socket_pair_and_zombie() {
    let f = Fixture::start("tree", &[]);
    let pid = |key| f.ready_value(key).parse::<i32>().expect("pid on the READY line");
    let (root, child, grandchild, zombie) = (f.pid, pid("child"), pid("grandchild"), pid("zombie"));
    let images = dump(&f);
    let r = inspect_json(images.path());
    let text = inspect_text(images.path());
    finish(f);

    assert_eq!(r["schema_version"], 1);
    assert_eq!(r["complete"], true);
    assert_eq!(r["root_pid"], root);
    let pids: Vec<i64> =
        r["processes"].as_array().unwrap().iter().map(|p| p["pid"].as_i64().unwrap()).collect();
    assert_eq!(pids, [root, child, grandchild].map(i64::from), "parents before children");
    assert_eq!(process(&r, child)["ppid"], root);
    assert_eq!(process(&r, grandchild)["ppid"], child);
    assert_eq!(r["zombies"][0]["pid"], zombie);
    assert_eq!(r["zombies"][0]["exit_code"], 42);
    let image = &r["image"];
    assert_eq!(image["torpor_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(image["kernel_release"].as_str(), Some(torpor_sys_release().as_str()));
    assert!(image["created"].as_str().unwrap().ends_with('Z'), "{image}");

    for pid in [root, child, grandchild] {
        let p = process(&r, pid);
        assert_eq!(p["threads"].as_array().unwrap().len(), 1, "{p:#}");
        assert_eq!(p["threads"][0]["tid"], pid);
        let cmd = p["command"][0].as_str().unwrap();
        assert!(cmd.ends_with("/tree"), "command of {pid}: {cmd}");
    }

    // The parent writes into the pipe, the child reads 3000 bytes not yet taken out.
    let w = fds_of_kind(process(&r, root), "pipe");
    let rd = fds_of_kind(process(&r, child), "pipe");
    let ino = |d: &Value| d["inode"].as_u64().unwrap();
    let (w, rd) = w
        .iter()
        .find_map(|w| rd.iter().find(|r| ino(r) == ino(w) && r["access"] == "read").map(|r| (w, r)))
        .expect("a pipe from the parent to the child");
    assert_eq!(w["access"], "write");
    assert_eq!(rd["queued_bytes"], 3000);

    // The socket pair: each end names the other process.
    let ends = fds_of_kind(process(&r, child), "unix");
    let end = ends.iter().find(|d| d["peer_pid"] == grandchild).expect("pair to grandchild");
    assert_eq!(end["state"], "connected");
    assert_eq!(end["socket_type"], "stream");
    let back = fds_of_kind(process(&r, grandchild), "unix");
    assert!(back.iter().any(|d| d["peer_pid"] == child && d["peer_fd"] == end["fd"]), "{back:?}");

    // Memory: the 32 MiB copy-on-write buffer is stored once, by the parent.
    let mem = &process(&r, root)["memory"];
    assert!(mem["stored_bytes"].as_u64().unwrap() >= 32 << 20, "{mem:#}");
    let kinds: Vec<&str> =
        mem["by_kind"].as_array().unwrap().iter().map(|k| k["kind"].as_str().unwrap()).collect();
    for k in ["anon", "stack", "file", "shared_anon"] {
        assert!(kinds.contains(&k), "no {k} memory in {kinds:?}");
    }
    assert!(process(&r, child)["memory"]["shared_stored_bytes"].as_u64().unwrap() >= 32 << 20);

    for want in [
        format!("Process {root}:"),
        format!("Process {grandchild}:"),
        format!("{zombie}"),
        "zombie: exited with code 42".into(),
        "3000 bytes unread".into(),
        format!("connected to pid {grandchild} fd"),
        "shared_anon".into(),
    ] {
        assert!(text.contains(&want), "text output lacks {want:?}:\n{text}");
    }
}

/// `uname -r`, which the image must record.
fn torpor_sys_release() -> String {
    let out = std::process::Command::new("uname").arg("-r").output().expect("uname");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn inspect_counts_threads_and_names_them() {
    let f = Fixture::start("threads", &[]);
    let tids: Vec<i64> =
        f.ready_value("tids").split(',').map(|t| t.parse().expect("tid")).collect();
    let images = dump(&f);
    let r = inspect_json(images.path());
    let text = inspect_text(images.path());
    finish(f);

    let threads = process(&r, r["root_pid"].as_i64().unwrap() as i32)["threads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tid"].as_i64().unwrap())
        .collect::<Vec<_>>();
    assert_eq!(threads.len(), 11, "{threads:?}");
    for t in &tids {
        assert!(threads.contains(t), "thread {t} missing from {threads:?}");
    }
    assert!(text.contains("11 threads"), "{text}");
    assert!(text.contains("threads (11)"), "{text}");
}

#[test]
fn inspect_shows_a_tcp_listener_with_its_address() {
    let port = free_port();
    let f = Fixture::start("tcp_echo.py", &[&port.to_string()]);
    let images = dump(&f);
    let r = inspect_json(images.path());
    let text = inspect_text(images.path());

    let p = process(&r, f.pid);
    assert!(p["command"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a.as_str().unwrap().ends_with("tcp_echo.py")));
    let tcp = fds_of_kind(p, "tcp");
    assert_eq!(tcp.len(), 1, "{tcp:?}");
    assert_eq!(tcp[0]["state"], "listening");
    assert_eq!(tcp[0]["family"], "ipv4");
    assert_eq!(tcp[0]["local"], format!("127.0.0.1:{port}"));
    assert!(text.contains(&format!("TCP listening on 127.0.0.1:{port}")), "{text}");
}

#[test]
fn inspect_names_event_descriptors() {
    let f = Fixture::start("events", &[]);
    let images = dump(&f);
    let r = inspect_json(images.path());
    let text = inspect_text(images.path());
    finish(f);

    let p = process(&r, r["root_pid"].as_i64().unwrap() as i32);
    let mut counts: Vec<u64> =
        fds_of_kind(p, "eventfd").iter().map(|d| d["count"].as_u64().unwrap()).collect();
    counts.sort();
    assert_eq!(counts, [3, 5]);
    assert!(!fds_of_kind(p, "timerfd").is_empty());
    assert_eq!(fds_of_kind(p, "signalfd").len(), 1);
    let epoll = fds_of_kind(p, "epoll");
    assert_eq!(epoll.len(), 1);
    assert!(epoll[0]["targets"].as_array().unwrap().len() >= 5, "{:?}", epoll[0]);
    for want in ["eventfd, count 5", "eventfd, count 3, semaphore", "timerfd, next in", "epoll"] {
        assert!(text.contains(want), "text output lacks {want:?}:\n{text}");
    }
}

#[test]
fn inspect_of_a_damaged_image_shows_what_it_can_and_names_the_fault() {
    let f = Fixture::start("tree", &[]);
    let child: i32 = f.ready_value("child").parse().unwrap();
    let images = dump(&f);
    let root = f.pid;
    finish(f);

    let pages = format!("pages-{child}.img");
    fs::remove_file(images.path().join(&pages)).expect("remove a page file");
    let out = inspect(images.path(), true);
    assert_eq!(out.status.code(), Some(1), "a damaged image exits 1");
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON even when damaged");
    assert_eq!(r["complete"], false);
    let problems = r["problems"].to_string();
    assert!(problems.contains(&pages), "{problems}");
    assert_eq!(r["processes"].as_array().unwrap().len(), 3, "the records are still read");
    let out = inspect(images.path(), false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DAMAGED") && text.contains(&pages), "{text}");
    assert!(text.contains(&format!("Process {root}:")), "{text}");

    // Records that are not JSON: the manifest is still shown, and nothing panics.
    fs::write(images.path().join("tree.json"), b"{\"root_pid\": [").unwrap();
    let out = inspect(images.path(), false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr_of(&out));
    assert!(text.contains("tree.json") && text.contains("made by torpor"), "{text}");
    assert!(text.contains("No process records could be read"), "{text}");
}

#[test]
fn inspect_of_a_missing_directory_says_so() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("no-such-image");
    let out = inspect(&missing, false);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("no-such-image") && err.contains("No such file"), "{err}");

    let out = inspect(dir.path(), false);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("manifest.json is missing") && err.contains("interrupted"), "{err}");

    // Scripts get the faults as JSON all the same.
    let out = inspect(&missing, true);
    assert_eq!(out.status.code(), Some(1));
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(r["complete"], false);
    assert!(r["problems"][0].as_str().unwrap().contains("no-such-image"), "{r}");
}

#[test]
fn inspect_of_records_pointing_nowhere_names_them_without_panicking() {
    let f = Fixture::start("tree", &[]);
    let images = dump(&f);
    let root = f.pid;
    finish(f);

    // Indices out of range, a parent cycle, a thread-less process: what a damaged or
    // hand-edited tree.json may hold.
    let path = images.path().join("tree.json");
    let mut tree: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    let last = tree["processes"][2]["pid"].clone();
    let p0 = &mut tree["processes"][0];
    p0["fds"][0]["open_file"] = 9999.into();
    p0["ppid"] = last;
    let p1 = &mut tree["processes"][1];
    p1["threads"] = serde_json::json!([]);
    for v in p1["vmas"].as_array_mut().unwrap() {
        if v["kind"]["type"] == "file" {
            v["kind"]["file"] = 9999.into();
        }
    }
    fs::write(&path, serde_json::to_vec(&tree).unwrap()).unwrap();

    let out = inspect(images.path(), true);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(r["problems"].to_string().contains("tree.json"), "{}", r["problems"]);
    let fd = &process(&r, root)["descriptors"][0];
    assert_eq!(fd["kind"], "invalid", "{fd}");
    let child = tree["processes"][1]["pid"].as_i64().unwrap() as i32;
    let maps = process(&r, child)["memory"]["mappings"].to_string();
    assert!(maps.contains("<invalid file index 9999>"), "{maps}");
    let out = inspect(images.path(), false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(text.contains("open file index 9999 out of range"), "{text}");
    // Every process is still drawn in the tree, though none is a root any more.
    let section = text.split("Processes (").nth(1).expect("a process section");
    let tree_lines = section.split("\n\n").next().unwrap();
    for p in tree["processes"].as_array().unwrap() {
        assert!(tree_lines.contains(&p["pid"].to_string()), "{tree_lines}");
    }
}

#[test]
fn a_command_line_with_newlines_stays_on_one_line() {
    let script = "import time\nprint('READY', flush=True)\ntime.sleep(600)";
    let f = Fixture::start_interpreted("newlines", Path::new("python3"), &["-c", script], &[], &[]);
    let images = dump(&f);
    let text = inspect_text(images.path());
    let out = torpor(["list".as_ref(), images.path().as_os_str()]);
    let list = String::from_utf8(out.stdout).unwrap();

    let want = "import time\\nprint('READY', flush=True)\\ntime.sleep(600)";
    assert!(text.contains(&format!("Process {}: ", f.pid)), "{text}");
    let header = text.lines().find(|l| l.starts_with(&format!("Process {}:", f.pid))).unwrap();
    assert!(header.contains(want), "{header}");
    assert_eq!(list.lines().count(), 2, "{list}");
    assert!(list.contains(want), "{list}");
    let r = inspect_json(images.path());
    assert_eq!(process(&r, f.pid)["command"][2], script, "JSON keeps the argument as it is");
}

#[test]
fn inspect_tells_compressed_and_incremental_images() {
    let f = Fixture::start("tree", &[]);
    let tmp = TempDir::new().unwrap();
    let (base, incr) = (tmp.path().join("base"), tmp.path().join("incr"));
    let out = f.dump(&base, &["--leave-running", "--compress"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let parent = base.to_str().unwrap();
    let out = f.dump(&incr, &["--leave-running", "--compress", "--parent", parent]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let root = f.pid;
    let b = inspect_json(&base);
    let i = inspect_json(&incr);
    let text = inspect_text(&incr);
    finish(f);

    // The fixture's 32 MiB buffer is pseudo-random, so compression gains little; the
    // size on disk is reported all the same, and it is the page file's.
    let mem = &process(&b, root)["memory"];
    let (stored, compressed) =
        (mem["stored_bytes"].as_u64().unwrap(), mem["compressed_bytes"].as_u64().unwrap());
    let pages = std::fs::metadata(base.join(format!("pages-{root}.img"))).unwrap().len();
    assert!(stored >= 32 << 20 && compressed == pages, "{mem:#}, page file {pages}");
    assert!(b["image"]["parent"].is_null());

    // Nothing changed in between but what the fixture keeps writing: most pages stay in
    // the parent.
    assert!(i["image"]["parent"].as_str().unwrap().ends_with("base"), "{}", i["image"]);
    let mem = &process(&i, root)["memory"];
    assert!(mem["parent_stored_bytes"].as_u64().unwrap() >= 32 << 20, "{mem:#}");
    assert!(text.contains("incremental: unchanged pages are in"), "{text}");
    assert!(text.contains("in the parent image"), "{text}");
}
