//! `torpor ps` lists the programs `torpor run` started while they run, and forgets them
//! once they are gone; `torpor list DIR` lists the images in a directory.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    become_subreaper, close_inherited_fds, run_with_timeout, stderr_of, torpor, wait_child,
    Fixture, FINISH_TIMEOUT, TORPOR_TIMEOUT,
};
use serde_json::Value;
use tempfile::TempDir;

/// `torpor ARGS` with its registry in REGISTRY.
fn torpor_with_registry(registry: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_torpor"));
    cmd.args(args).env("TORPOR_RUN_DIR", registry);
    let out = run_with_timeout(cmd, TORPOR_TIMEOUT);
    assert!(out.status.success(), "torpor {args:?}: {}", stderr_of(&out));
    out
}

fn ps_json(registry: &Path) -> Vec<Value> {
    let out = torpor_with_registry(registry, &["ps", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v.as_array().expect("an array").clone()
}

/// Starts `torpor run -- sleep 600` with REGISTRY as its registry and waits until it has
/// registered its program; returns torpor run and the program's pid.
fn run_sleep(registry: &Path, pidfile: &Path) -> (std::process::Child, i32) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_torpor"));
    cmd.args(["run", "--pidfile"])
        .arg(pidfile)
        .args(["--", "sleep", "600"])
        .env("TORPOR_RUN_DIR", registry)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    close_inherited_fds(&mut cmd);
    let run = cmd.spawn().expect("spawn torpor run");
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid: i32 = loop {
        if let Some(pid) = fs::read_to_string(pidfile).ok().and_then(|s| s.trim().parse().ok()) {
            if registry.join(format!("{pid}.json")).exists() {
                break pid;
            }
        }
        assert!(Instant::now() < deadline, "torpor run never registered its program");
        sleep(Duration::from_millis(10));
    };
    (run, pid)
}

#[test]
fn ps_lists_a_running_program_until_it_ends() {
    become_subreaper();
    let tmp = TempDir::new().unwrap();
    let registry = tmp.path().join("registry");
    let pidfile = tmp.path().join("pid");
    let (mut run, pid) = run_sleep(&registry, &pidfile);

    let rows = ps_json(&registry);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["pid"], pid);
    assert_eq!(rows[0]["command"], serde_json::json!(["sleep", "600"]));
    assert_eq!(rows[0]["processes"], 1);
    let text = String::from_utf8(torpor_with_registry(&registry, &["ps"]).stdout).unwrap();
    assert!(text.contains(&pid.to_string()) && text.contains("sleep 600"), "{text}");

    // SIGKILL, the one signal pid 1 of a namespace cannot ignore from outside.
    // SAFETY: kill(2) on the pid this test's own `torpor run` started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_child(&mut run, FINISH_TIMEOUT).expect("torpor run ends with its program");
    assert!(ps_json(&registry).is_empty());
    assert!(!registry.join(format!("{pid}.json")).exists(), "torpor run left its entry");
    let text = String::from_utf8(torpor_with_registry(&registry, &["ps"]).stdout).unwrap();
    assert!(text.contains("no program started with `torpor run`"), "{text}");
}

#[test]
fn ps_prunes_entries_of_programs_that_are_gone() {
    let tmp = TempDir::new().unwrap();
    let registry = tmp.path().join("registry");
    fs::create_dir(&registry).unwrap();
    // A pid that certainly ended: a child this test started and reaped.
    let mut gone = Command::new("true").spawn().expect("spawn true");
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let entry = format!(
        r#"{{"pid": {gone_pid}, "start_ticks": 1, "started_unix": 0, "command": ["old"]}}"#
    );
    fs::write(registry.join(format!("{gone_pid}.json")), entry).unwrap();
    // A live pid whose start time does not match: its pid was given to another program.
    let me = std::process::id();
    let entry =
        format!(r#"{{"pid": {me}, "start_ticks": 1, "started_unix": 0, "command": ["x"]}}"#);
    fs::write(registry.join(format!("{me}.json")), entry).unwrap();
    fs::write(registry.join("junk.json"), "not json").unwrap();

    assert!(ps_json(&registry).is_empty());
    let left: Vec<_> = fs::read_dir(&registry).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "stale entries left: {left:?}");
}

#[test]
fn list_shows_each_image_with_its_pid_command_and_damage() {
    let tmp = TempDir::new().unwrap();
    let f = Fixture::start("tree", &[]);
    let g = Fixture::start("threads", &[]);
    for (f, name) in [(&f, "a.img"), (&g, "b.img")] {
        let out = f.dump(&tmp.path().join(name), &["--leave-running"]);
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    fs::create_dir(tmp.path().join("c.img")).unwrap();
    fs::write(tmp.path().join("c.img/tree.json"), "{").unwrap();
    fs::create_dir(tmp.path().join("not-an-image")).unwrap();

    let out = torpor(["list".as_ref(), "--json".as_ref(), tmp.path().as_os_str()]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(rows.len(), 3, "{rows:#?}");
    let row = |name: &str| {
        rows.iter().find(|r| r["path"].as_str().unwrap().ends_with(name)).expect(name).clone()
    };
    let (a, b, c) = (row("a.img"), row("b.img"), row("c.img"));
    assert_eq!(a["root_pid"], f.pid);
    assert_eq!(a["processes"], 3);
    assert!(a["command"][0].as_str().unwrap().ends_with("/tree"), "{a}");
    assert!(a["bytes"].as_u64().unwrap() > 32 << 20, "{a}");
    assert_eq!(b["root_pid"], g.pid);
    assert_eq!(a["complete"], true);
    assert_eq!(c["complete"], false);
    assert!(c["problem"].as_str().unwrap().contains("manifest.json"), "{c}");

    let out = torpor(["list".as_ref(), tmp.path().as_os_str()]);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "a header and one line per image:\n{text}");
    assert!(lines.iter().any(|l| l.contains("a.img") && l.contains(&f.pid.to_string())), "{text}");
    assert!(lines.iter().any(|l| l.contains("c.img") && l.contains("DAMAGED")), "{text}");
    for mut fx in [f, g] {
        fx.go();
        fx.wait_exit(FINISH_TIMEOUT);
    }
}

#[test]
fn list_of_a_missing_directory_says_what_to_give() {
    let tmp = TempDir::new().unwrap();
    let out = torpor(["list".as_ref(), tmp.path().join("nope").as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("nope"), "{}", stderr_of(&out));
    let out = torpor(["list".as_ref(), tmp.path().as_os_str()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no image in"));
}

#[test]
fn ps_lists_a_tree_woken_from_an_image_of_torpor_run() {
    become_subreaper();
    let tmp = TempDir::new().unwrap();
    let registry = tmp.path().join("registry");
    let pidfile = tmp.path().join("pid");
    let images = tmp.path().join("img");
    let (mut run, pid) = run_sleep(&registry, &pidfile);

    let pid_s = pid.to_string();
    torpor_with_registry(&registry, &["dump", &pid_s, "-D", images.to_str().unwrap()]);
    wait_child(&mut run, FINISH_TIMEOUT).expect("torpor run ends when its program is dumped");
    assert!(ps_json(&registry).is_empty(), "a dumped program is not running");

    let woken_file = tmp.path().join("woken");
    torpor_with_registry(
        &registry,
        &[
            "restore",
            "-D",
            images.to_str().unwrap(),
            "--detach",
            "--pidfile",
            woken_file.to_str().unwrap(),
        ],
    );
    let woken: i32 = fs::read_to_string(&woken_file).unwrap().trim().parse().unwrap();
    let rows = ps_json(&registry);
    // SAFETY: kill(2) on the pid this test's restore woke; it is reaped below.
    unsafe { libc::kill(woken, libc::SIGKILL) };
    common::wait_pid_gone(woken, FINISH_TIMEOUT);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["pid"], woken);
    assert_eq!(rows[0]["command"], serde_json::json!(["sleep", "600"]));
    assert!(ps_json(&registry).is_empty(), "the woken program's entry outlived it");
}
