//! Single-file images (`torpor dump -o FILE`, `-o -`) and self-restoring executables
//! (`torpor dump --exe FILE`): real processes dumped to one file or a pipe and woken from
//! it, and damaged files refused with nothing left running.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use common::{
    assert_pid_gone, close_inherited_fds, stderr_of, torpor, wait_child, Fixture, Restore,
    FINISH_TIMEOUT, TORPOR_TIMEOUT,
};
use tempfile::TempDir;

const TORPOR: &str = env!("CARGO_BIN_EXE_torpor");

/// `torpor dump PID ARGS...` and asserts it succeeded and the process is gone.
fn dump_ok(f: &mut Fixture, args: &[&OsStr]) {
    let pid = f.pid.to_string();
    let mut all: Vec<&OsStr> = vec!["dump".as_ref(), pid.as_ref()];
    all.extend_from_slice(args);
    let out = torpor(all);
    assert!(out.status.success(), "dump of {} failed: {}", f.name, stderr_of(&out));
    f.assert_killed_by_dump();
}

/// Nothing but the file itself next to it: no temporary directory or file left over.
fn assert_alone(dir: &Path, want: &[&str]) {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, want, "{} holds something else too", dir.display());
}

#[test]
fn memory_survives_a_single_file() {
    let mut f = Fixture::start("memory", &[]);
    sleep(Duration::from_millis(100));
    let out = TempDir::new().expect("out dir");
    let file = out.path().join("app.torpor");
    dump_ok(&mut f, &["-o".as_ref(), file.as_os_str()]);
    let mode = fs::metadata(&file).expect("stat image").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the image holds memory: only its owner may read it");
    assert_alone(out.path(), &["app.torpor"]);

    // The page data is in the file, 4 KiB aligned, behind a header naming the format.
    let bytes = fs::read(&file).expect("read image");
    assert!(bytes.starts_with(b"TORPORSF"), "no single-file magic");

    f.restore_and_pass(&file);
    assert_alone(out.path(), &["app.torpor"]);
}

#[test]
fn a_python_process_survives_a_single_file_with_compression() {
    let mut f = Fixture::start("dict", &[]);
    let out = TempDir::new().expect("out dir");
    let file = out.path().join("py.torpor");
    dump_ok(&mut f, &["-o".as_ref(), file.as_os_str(), "--compress".as_ref()]);
    f.restore_and_pass(&file);
}

/// An unmodified shell pipeline (bash, a subshell writing numbers, `sha256sum` reading
/// them through a pipe), dumped to one file while data flows, finishes its work after
/// the restore.
#[test]
fn a_shell_pipeline_survives_a_single_file() {
    const COUNT: u32 = 300;
    let numbers: String = (1..=COUNT).map(|i| format!("{i}\n")).collect();
    let mut sum = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sha256sum");
    use std::io::Write;
    sum.stdin.take().expect("stdin").write_all(numbers.as_bytes()).expect("feed sha256sum");
    let want = String::from_utf8(sum.wait_with_output().expect("sha256sum").stdout).unwrap();

    let script =
        format!("for i in $(seq 1 {COUNT}); do echo $i; sleep 0.01; done | sha256sum > out");
    let mut f = Fixture::start_program(Path::new("/bin/bash"), &["-c", &script]);
    sleep(Duration::from_millis(800).saturating_sub(f.started.elapsed()));
    assert!(f.child.try_wait().expect("try_wait").is_none(), "the pipeline ended already");

    let out = TempDir::new().expect("out dir");
    let file = out.path().join("pipeline.torpor");
    dump_ok(&mut f, &["-o".as_ref(), file.as_os_str()]);
    let partial = torpor_image::single::read_partial(
        torpor_image::single::Input::Stream(&mut fs::File::open(&file).expect("open")),
        &file,
        true,
    );
    assert!(partial.problems.is_empty(), "{:?}", partial.problems);
    let processes = partial.tree.expect("records").processes.len();
    assert!(processes >= 3, "{processes} processes: want bash, the subshell, sha256sum");
    assert!(fs::read(f.path("out")).map_or(true, |b| b.is_empty()), "done before the dump");

    let mut restore = Restore::spawn(&file, &[]);
    let status = restore.wait(FINISH_TIMEOUT).expect("restored pipeline did not finish");
    assert!(status.success(), "restored pipeline: {status:?}; stderr:\n{}", restore.stderr());
    let got = fs::read_to_string(f.path("out")).expect("read out");
    assert_eq!(got, want, "sha256sum of the numbers; log:\n{}", f.log_text());
}

/// `torpor dump PID -o - | torpor restore -` through a real pipe: the restore wakes the
/// process once the dump has ended it and closed the pipe.
#[test]
fn dump_to_stdout_piped_into_restore_from_stdin() {
    let mut f = Fixture::start("memory", &[]);
    sleep(Duration::from_millis(100));
    let pid = f.pid;
    let err = tempfile::tempfile().expect("stderr file");
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(format!("\"$0\" dump {pid} -o - | \"$0\" restore -"))
        .arg(TORPOR)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err.try_clone().expect("clone"));
    close_inherited_fds(&mut sh);
    // The original is the test's child: reap it the moment the dump kills it, so that
    // its pid is free when the restore, at the other end of the pipe, needs it.
    let (mut sh, status) = std::thread::scope(|s| {
        let reaper = s.spawn(|| f.child.wait());
        let sh = sh.spawn().expect("spawn sh");
        (sh, reaper.join().expect("reaper").expect("wait for the original"))
    });
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the original after the dump");
    wait_back(&mut sh, &f);
    f.go();
    let st = wait_child(&mut sh, FINISH_TIMEOUT).expect("pipeline did not finish");
    let stderr = read_all(err);
    assert!(st.success(), "pipeline: {st:?}; stderr:\n{stderr}\nlog:\n{}", f.log_text());
    assert!(stderr.contains("saved to standard output"), "{stderr}");
    assert!(stderr.contains("woken from standard input"), "{stderr}");
    f.assert_log_passed();
}

fn read_all(mut f: fs::File) -> String {
    use std::io::{Read, Seek};
    let mut s = String::new();
    f.rewind().expect("rewind");
    f.read_to_string(&mut s).expect("read");
    s
}

/// Waits for the fixture's pid to run its program again, restored by a pipeline in `sh`.
fn wait_back(sh: &mut std::process::Child, f: &Fixture) {
    let deadline = std::time::Instant::now() + TORPOR_TIMEOUT;
    while common::proc_exe(f.pid).as_deref() != Some(&f.exe) {
        if let Some(st) = sh.try_wait().expect("try_wait") {
            panic!("the pipeline ended with {st:?} before pid {} came back", f.pid);
        }
        assert!(std::time::Instant::now() < deadline, "pid {} never came back", f.pid);
        sleep(Duration::from_millis(10));
    }
}

/// A cut single file is refused with one clear line, before anything runs.
#[test]
fn a_truncated_single_file_is_refused_and_nothing_runs() {
    let mut f = Fixture::start("memory", &[]);
    sleep(Duration::from_millis(100));
    let out = TempDir::new().expect("out dir");
    let file = out.path().join("app.torpor");
    dump_ok(&mut f, &["-o".as_ref(), file.as_os_str()]);
    let bytes = fs::read(&file).expect("read image");

    // Cut in the page data, and cut just before the end record.
    for (i, cut) in [bytes.len() / 2, bytes.len() - 20].into_iter().enumerate() {
        let cut_file = out.path().join(format!("cut{i}.torpor"));
        fs::write(&cut_file, &bytes[..cut]).expect("write cut image");
        let line = common::assert_restore_refused(&cut_file, &["truncated"]);
        assert!(line.contains(&format!("cut{i}.torpor")), "{line}");
        assert_pid_gone(f.pid);

        let verify = torpor(["verify".as_ref(), cut_file.as_os_str()]);
        assert_eq!(verify.status.code(), Some(1), "verify of a cut file");
        assert!(stderr_of(&verify).contains("truncated"), "{}", stderr_of(&verify));
    }

    // A damaged byte in the page data names the member.
    let mut bad = bytes.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x5a;
    let bad_file = out.path().join("bad.torpor");
    fs::write(&bad_file, &bad).expect("write damaged image");
    common::assert_restore_refused(&bad_file, &["bad.torpor", "member"]);
    assert_pid_gone(f.pid);

    // The same cut through standard input.
    let mut cmd = Command::new(TORPOR);
    cmd.args(["restore", "-"])
        .stdin(fs::File::open(out.path().join("cut0.torpor")).expect("open cut image"));
    let out_err = cmd.output().expect("run restore -");
    assert_eq!(out_err.status.code(), Some(1));
    let stderr = stderr_of(&out_err);
    assert!(stderr.contains("standard input") && stderr.contains("truncated"), "{stderr}");
    assert_pid_gone(f.pid);
    // No unpacked copy is left behind.
    let left: Vec<PathBuf> = fs::read_dir(out.path())
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(".torpor"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // The intact file still restores.
    f.restore_and_pass(&file);
}

/// `--exe` writes an executable that wakes the process when run, passing restore's
/// options through.
#[test]
fn exe_wakes_the_process_when_run() {
    let mut f = Fixture::start("memory", &[]);
    sleep(Duration::from_millis(100));
    let out = TempDir::new().expect("out dir");
    let exe = out.path().join("app.run");
    dump_ok(&mut f, &["--exe".as_ref(), exe.as_os_str()]);
    let mode = fs::metadata(&exe).expect("stat exe").permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "executable by its owner only");

    // It is an image like any other for inspect and verify.
    let verify = torpor(["verify".as_ref(), exe.as_os_str()]);
    assert!(verify.status.success(), "verify app.run: {}", stderr_of(&verify));

    let pidfile = out.path().join("app.pid");
    let mut cmd = Command::new(&exe);
    cmd.arg("--detach").arg("--pidfile").arg(&pidfile);
    let run = common::run_with_timeout(cmd, TORPOR_TIMEOUT);
    assert!(run.status.success(), "./app.run --detach: {}", stderr_of(&run));
    assert!(stderr_of(&run).contains(&format!("pid {} woken", f.pid)), "{}", stderr_of(&run));
    let pid: i32 = fs::read_to_string(&pidfile).expect("pid file").trim().parse().expect("pid");
    assert_eq!(pid, f.pid);
    assert_eq!(common::proc_exe(f.pid).as_deref(), Some(f.exe.as_path()));
    f.go();
    // Detached: the restored process was handed to the test, a subreaper.
    match common::wait_pid(f.pid, FINISH_TIMEOUT) {
        common::PidWait::Exited(st) => {
            assert!(st.success(), "restored process: {st:?}; log:\n{}", f.log_text())
        }
        other => panic!("restored process did not end: {other:?}; log:\n{}", f.log_text()),
    }
    f.assert_log_passed();
}

/// A plain torpor binary is not mistaken for a self-restoring one: it has no trailer,
/// and its commands parse as they always did.
#[test]
fn plain_torpor_still_parses_its_own_arguments() {
    let me = fs::File::open(TORPOR).expect("open torpor");
    assert_eq!(torpor_image::single::locate(&me).expect("read torpor"), None);
    let out = torpor(["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("torpor "));
    let out = torpor(["dump", "1"]);
    assert_eq!(out.status.code(), Some(2), "dump without a target: {}", stderr_of(&out));
    assert!(stderr_of(&out).contains("--dir"), "{}", stderr_of(&out));
}

#[test]
fn inspect_verify_and_list_read_a_single_file() {
    let mut f = Fixture::start("memory", &[]);
    sleep(Duration::from_millis(100));
    let out = TempDir::new().expect("out dir");
    let file = out.path().join("app.torpor");
    dump_ok(&mut f, &["-o".as_ref(), file.as_os_str()]);

    let inspect = torpor(["inspect".as_ref(), "--json".as_ref(), file.as_os_str()]);
    assert!(inspect.status.success(), "inspect: {}", stderr_of(&inspect));
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("json");
    assert_eq!(report["complete"], true);
    assert_eq!(report["root_pid"], f.pid);

    let verify = torpor(["verify".as_ref(), file.as_os_str()]);
    assert!(verify.status.success(), "verify: {}", stderr_of(&verify));
    let said = String::from_utf8_lossy(&verify.stdout);
    assert!(said.contains("complete and intact") && said.contains("app.torpor"), "{said}");

    let list = torpor(["list".as_ref(), "--json".as_ref(), out.path().as_os_str()]);
    assert!(list.status.success(), "list: {}", stderr_of(&list));
    let rows: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    assert_eq!(rows[0]["root_pid"], f.pid, "{rows}");
    assert_eq!(rows[0]["complete"], true, "{rows}");

    // Damaged: inspect says where, and still shows what it could read.
    let mut bytes = fs::read(&file).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&file, &bytes).expect("write");
    let inspect = torpor(["inspect".as_ref(), file.as_os_str()]);
    assert_eq!(inspect.status.code(), Some(1));
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.contains("DAMAGED") && text.contains("member"), "{text}");
    let verify = torpor(["verify".as_ref(), file.as_os_str()]);
    assert_eq!(verify.status.code(), Some(1));
    drop(f);
}

/// What a single file cannot hold is refused before the process is touched.
#[test]
fn parent_with_a_single_file_is_refused() {
    let f = Fixture::start("memory", &[]);
    let out = TempDir::new().expect("out dir");
    let pid = f.pid.to_string();
    let file = out.path().join("app.torpor");
    let dump = torpor([
        "dump".as_ref(),
        pid.as_ref(),
        "-o".as_ref(),
        file.as_os_str(),
        "--parent".as_ref(),
        out.path().as_os_str(),
    ]);
    assert_eq!(dump.status.code(), Some(2), "{}", stderr_of(&dump));
    assert!(stderr_of(&dump).contains("--parent"), "{}", stderr_of(&dump));
    common::assert_running_untraced(f.pid);
    assert!(!file.exists());
}

/// A reader that goes away fails the dump and leaves the process running as it was.
#[test]
fn a_broken_pipe_leaves_the_process_running() {
    let f = Fixture::start("memory", &[]);
    sleep(Duration::from_millis(100));
    let err = tempfile::tempfile().expect("stderr file");
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(format!("\"$0\" dump {} -o - | head -c 100 > /dev/null", f.pid))
        .arg(TORPOR)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err.try_clone().expect("clone"));
    close_inherited_fds(&mut sh);
    let mut sh = sh.spawn().expect("spawn sh");
    wait_child(&mut sh, TORPOR_TIMEOUT).expect("pipeline did not end");
    let stderr = read_all(err);
    assert!(stderr.contains("dump of pid") && stderr.contains("failed"), "{stderr}");
    common::assert_running_untraced(f.pid);
    f.go();
    let mut f = f;
    let st = f.wait_exit(FINISH_TIMEOUT);
    assert!(st.success(), "{st:?}; log:\n{}", f.log_text());
    f.assert_log_passed();
}

/// `inspect -` and `verify -` read an image from standard input.
#[test]
fn inspect_and_verify_read_standard_input() {
    let mut f = Fixture::start("memory", &[]);
    sleep(Duration::from_millis(100));
    let out = TempDir::new().expect("out dir");
    let file = out.path().join("app.torpor");
    dump_ok(&mut f, &["-o".as_ref(), file.as_os_str()]);
    for cmd in ["inspect", "verify"] {
        let mut c = Command::new(TORPOR);
        c.args([cmd, "-"]).stdin(fs::File::open(&file).expect("open image"));
        let o = c.output().expect("run torpor");
        assert!(o.status.success(), "{cmd} -: {}", stderr_of(&o));
        let said = String::from_utf8_lossy(&o.stdout);
        assert!(said.contains("standard input"), "{cmd} -: {said}");
        assert!(said.contains(&f.pid.to_string()), "{cmd} -: {said}");
    }
}

/// Ctrl-C while `restore -` waits for the rest of its stream removes what it unpacked,
/// then ends torpor as the signal would.
#[test]
fn an_interrupted_unpack_leaves_nothing_behind() {
    let mut f = Fixture::start("memory", &[]);
    sleep(Duration::from_millis(100));
    let out = TempDir::new().expect("out dir");
    let file = out.path().join("app.torpor");
    dump_ok(&mut f, &["-o".as_ref(), file.as_os_str()]);
    let bytes = fs::read(&file).expect("read image");

    let tmp = TempDir::new().expect("TMPDIR");
    let mut c = Command::new(TORPOR);
    c.args(["restore", "-"])
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    close_inherited_fds(&mut c);
    let mut restore = c.spawn().expect("spawn restore");
    let mut stdin = restore.stdin.take().expect("stdin");
    use std::io::Write;
    stdin.write_all(&bytes[..bytes.len() / 2]).expect("feed half the image");
    let deadline = std::time::Instant::now() + TORPOR_TIMEOUT;
    // Half the image is unpacked once the pages member is being written.
    while fs::read_dir(tmp.path()).expect("read TMPDIR").next().is_none() {
        assert!(std::time::Instant::now() < deadline, "restore - never started unpacking");
        sleep(Duration::from_millis(10));
    }
    sleep(Duration::from_millis(200));
    // SAFETY: kill takes integers; the pid is our child, not yet reaped.
    unsafe { libc::kill(restore.id() as i32, libc::SIGINT) };
    let st = wait_child(&mut restore, TORPOR_TIMEOUT).expect("restore did not stop");
    drop(stdin);
    assert_eq!(st.signal(), Some(libc::SIGINT), "restore after SIGINT: {st:?}");
    let left: Vec<_> = fs::read_dir(tmp.path()).expect("read TMPDIR").collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    assert_pid_gone(f.pid);
}

/// `--pre-copy` (which appends to page files) and `--leave-running` work with a single
/// file: the directory they need is the temporary one.
#[test]
fn pre_copy_and_leave_running_work_with_a_single_file() {
    let mut f = Fixture::start("memory", &[]);
    sleep(Duration::from_millis(100));
    let out = TempDir::new().expect("out dir");
    let file = out.path().join("app.torpor");
    let pid = f.pid.to_string();
    let dump = torpor([
        "dump".as_ref(),
        pid.as_ref(),
        "-o".as_ref(),
        file.as_os_str(),
        "--pre-copy".as_ref(),
        "--leave-running".as_ref(),
    ]);
    assert!(dump.status.success(), "dump: {}", stderr_of(&dump));
    assert!(stderr_of(&dump).contains("pre-copy:"), "{}", stderr_of(&dump));
    common::assert_running_untraced(f.pid);
    assert_alone(out.path(), &["app.torpor"]);

    // The original goes; the image brings it back as it was at the dump.
    f.child.kill().expect("kill the original");
    f.child.wait().expect("reap the original");
    f.restore_and_pass(&file);
}
