//! Images in object storage (`-D s3://BUCKET/PREFIX`), against a real S3 server: each test
//! starts its own Garage on loopback (single node, its own ports and directories), makes a
//! key and a bucket, and stops it at the end. The memory fixture holds known patterns in
//! every kind of mapping (a 64 MiB buffer among them, uploaded in parts) and checks them
//! itself after the restore.
//!
//! Garage must be installed: `cargo install garage --locked --no-default-features
//! --features lmdb,sqlite,bundled-libs` (`.ci/run` does it when it is missing).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    assert_running_untraced, free_port, run_with_timeout, stderr_of, torpor_with_env, wait_child,
    Fixture, Restore, FINISH_TIMEOUT,
};
use tempfile::TempDir;

const BUCKET: &str = "torpor-test";
const REGION: &str = "garage";

/// A Garage server of one node, with a key allowed to use [`BUCKET`]; killed on drop.
struct Garage {
    child: Option<Child>,
    dir: TempDir,
    config: PathBuf,
    port: u16,
    key_id: String,
    secret: String,
    /// `$TMPDIR` of the torpor commands, to see that they leave no copy behind.
    tmp: TempDir,
}

fn garage_program() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin")))
        .map(|d| d.join("garage"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "these tests need Garage, an S3 server: install it with `cargo install garage \
             --locked --no-default-features --features lmdb,sqlite,bundled-libs` (.ci/run does)"
        )
    })
}

impl Garage {
    fn start() -> Garage {
        let program = garage_program();
        let dir = tempfile::Builder::new().prefix("torpor-garage-").tempdir().expect("tempdir");
        let (port, rpc) = (free_port(), free_port());
        let rpc_secret = random_hex(32);
        let config = dir.path().join("garage.toml");
        fs::write(
            &config,
            format!(
                "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{rpc_secret}\"\n\n\
                 [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{port}\"\n",
                meta = dir.path().join("meta").display(),
                data = dir.path().join("data").display(),
            ),
        )
        .expect("write garage.toml");
        let log = fs::File::create(dir.path().join("log")).expect("garage log");
        let mut cmd = Command::new(&program);
        cmd.arg("-c")
            .arg(&config)
            .arg("server")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone"))
            .stderr(log);
        common::close_inherited_fds(&mut cmd);
        let child = cmd.spawn().expect("start garage");
        let tmp = tempfile::Builder::new().prefix("torpor-s3-tmp-").tempdir().expect("tempdir");
        let mut g = Garage {
            child: Some(child),
            dir,
            config,
            port,
            key_id: String::new(),
            secret: String::new(),
            tmp,
        };
        g.set_up();
        g
    }

    /// Runs `garage -c CONFIG ARGS`, which must succeed; returns its standard output.
    fn admin(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(garage_program());
        cmd.arg("-c").arg(&self.config).args(args);
        let out = run_with_timeout(cmd, Duration::from_secs(60));
        assert!(out.status.success(), "garage {args:?}: {}\nlog:\n{}", stderr_of(&out), self.log());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Gives the node its role, then makes the key and the bucket.
    fn set_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let node = loop {
            let mut cmd = Command::new(garage_program());
            cmd.arg("-c").arg(&self.config).args(["node", "id", "-q"]);
            let out = run_with_timeout(cmd, Duration::from_secs(30));
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && text.contains('@') {
                break text.split('@').next().unwrap_or_default().trim().to_string();
            }
            assert!(Instant::now() < deadline, "garage did not come up; log:\n{}", self.log());
            sleep(Duration::from_millis(200));
        };
        self.admin(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        self.admin(&["layout", "apply", "--version", "1"]);
        let key = self.admin(&["key", "create", "torpor-test-key"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in `garage key create`:\n{key}"))
        };
        self.key_id = field("Key ID:");
        self.secret = field("Secret key:");
        self.admin(&["bucket", "create", BUCKET]);
        self.admin(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            BUCKET,
            "--key",
            "torpor-test-key",
        ]);
    }

    /// The environment a torpor command needs to reach this server, as a user would set
    /// it (and nothing from the AWS files of whoever runs the tests).
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_CONFIG_FILE", "/dev/null".to_string()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".to_string()),
            ("TMPDIR", self.tmp.path().display().to_string()),
        ]
    }

    /// Runs torpor with ARGS against this server, with `change` applied to the environment.
    fn torpor_changed(&self, args: &[&str], change: &[(&'static str, &str)]) -> Output {
        let mut env = self.env();
        for (k, v) in change {
            env.retain(|(key, _)| key != k);
            env.push((k, v.to_string()));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        torpor_with_env(args, &env)
    }

    fn torpor(&self, args: &[&str]) -> Output {
        self.torpor_changed(args, &[])
    }

    fn restore(&self, url: &str, extra: &[&str]) -> Restore {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Restore::spawn_with_env(Path::new(url), extra, &env)
    }

    /// Asserts that no torpor command left a copy of an image in its `$TMPDIR`.
    fn assert_no_copy_left(&self) {
        let left: Vec<_> = fs::read_dir(self.tmp.path()).expect("read TMPDIR").collect();
        assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = wait_child(&mut c, Duration::from_secs(10));
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0; bytes];
    fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).expect("urandom");
    hex::encode(buf)
}

fn url(prefix: &str) -> String {
    format!("s3://{BUCKET}/{prefix}")
}

/// Starts the memory fixture and dumps it into `url` with EXTRA arguments.
fn dump_memory(g: &Garage, url: &str, extra: &[&str]) -> Fixture {
    let mut f = Fixture::start("memory", &[]);
    sleep(Duration::from_millis(100));
    let pid = f.pid.to_string();
    let mut args = vec!["dump", pid.as_str(), "-D", url];
    args.extend_from_slice(extra);
    let out = g.torpor(&args);
    assert!(out.status.success(), "dump into {url} failed: {}", stderr_of(&out));
    let shown = url.trim_end_matches('/');
    assert!(stderr_of(&out).contains(shown), "the summary names {shown}: {}", stderr_of(&out));
    f.assert_killed_by_dump();
    f
}

/// Restores `url`, says go, and asserts the fixture passes its own checks.
fn restore_and_pass(g: &Garage, f: &Fixture, url: &str, extra: &[&str]) {
    let mut restore = g.restore(url, extra);
    restore.wait_for_process(f);
    f.go();
    let status = restore
        .wait(FINISH_TIMEOUT)
        .unwrap_or_else(|| panic!("restore from {url} did not finish; log:\n{}", f.log_text()));
    assert!(
        status.success(),
        "restore from {url}: {status:?}; stderr:\n{}\nlog:\n{}",
        restore.stderr(),
        f.log_text()
    );
    f.assert_log_passed();
}

#[test]
fn memory_hibernated_into_s3_wakes_from_it() {
    let g = Garage::start();
    let u = url("memory/one");
    let f = dump_memory(&g, &u, &[]);
    // Nothing of the image was written locally on the way.
    g.assert_no_copy_left();
    restore_and_pass(&g, &f, &u, &[]);
    g.assert_no_copy_left();
}

#[test]
fn a_compressed_image_in_s3_wakes_and_verifies() {
    let g = Garage::start();
    let u = url("compressed");
    let f = dump_memory(&g, &u, &["--compress"]);
    let out = g.torpor(&["verify", &u]);
    assert!(out.status.success(), "verify {u}: {}", stderr_of(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("complete and intact"));
    restore_and_pass(&g, &f, &u, &[]);
    g.assert_no_copy_left();
}

#[test]
fn a_pre_copy_dump_streams_into_s3_while_the_process_runs() {
    let g = Garage::start();
    let u = url("pre-copied");
    let f = dump_memory(&g, &u, &["--pre-copy"]);
    restore_and_pass(&g, &f, &u, &[]);
    g.assert_no_copy_left();
}

#[test]
fn inspect_reads_an_image_in_s3() {
    let g = Garage::start();
    let u = url("inspected/");
    let f = dump_memory(&g, &u, &[]);
    let out = g.torpor(&["inspect", "--json", &u]);
    assert!(out.status.success(), "inspect {u}: {}", stderr_of(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    assert_eq!(report["root_pid"], f.pid, "{report}");
    assert_eq!(report["complete"], true, "{report}");
    assert_eq!(report["dir"], url("inspected"), "{report}");
    g.assert_no_copy_left();
}

#[test]
fn a_lazy_restore_from_s3_wakes_before_its_pages_are_copied() {
    let g = Garage::start();
    let u = url("lazy");
    let f = dump_memory(&g, &u, &[]);
    // The background copy waits: the pages the fixture checks come by ranged reads as it
    // touches them.
    let mut restore = g.restore(&u, &["-v", "--lazy", "--lazy-prefetch-after-ms=8000"]);
    restore.wait_for_process(&f);
    f.go();
    let status = restore
        .wait(FINISH_TIMEOUT)
        .unwrap_or_else(|| panic!("lazy restore from {u} did not finish; log:\n{}", f.log_text()));
    let err = restore.stderr();
    assert!(status.success(), "lazy restore from {u}: {status:?}; stderr:\n{err}");
    assert!(err.contains("all pages loaded"), "{err}");
    f.assert_log_passed();
    let line = err
        .lines()
        .find(|l| l.contains("bytes fetched when first read"))
        .unwrap_or_else(|| panic!("no report of the fetches in:\n{err}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "bytes").expect("bytes");
    let early: u64 = words[at - 1].parse().unwrap_or_else(|_| panic!("{line}"));
    // Much of the 64 MiB buffer, which the fixture reads whole (all of it unless the
    // machine is too slow to get there before the background copy starts).
    assert!(early >= 16 << 20, "only {early} bytes fetched on first touch: {line}");
    g.assert_no_copy_left();
}

#[test]
fn a_lazy_detached_restore_from_s3_is_refused_with_the_reason() {
    let g = Garage::start();
    let u = url("lazy-detached");
    let f = dump_memory(&g, &u, &[]);
    let mut restore = g.restore(&u, &["--lazy", "--detach"]);
    let status = restore.expect_exit("--lazy --detach from s3");
    let err = restore.stderr();
    assert_eq!(status.code(), Some(1), "stderr:\n{err}");
    assert!(err.contains("--lazy --detach") && err.contains(&u), "{err}");
    assert!(common::proc_exe(f.pid).is_none(), "pid {} was restored", f.pid);
    g.assert_no_copy_left();
}

/// A dump that cannot reach the store must fail naming it, leave the process running as
/// it was, and store nothing that reads as an image.
fn assert_dump_fails(g: &Garage, u: &str, change: &[(&'static str, &str)], cause: &str) {
    let f = Fixture::start("memory", &[]);
    sleep(Duration::from_millis(100));
    let pid = f.pid.to_string();
    let out = g.torpor_changed(&["dump", &pid, "-D", u], change);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "dump into {u} should fail: {err}");
    assert!(err.contains(u), "the error names {u}: {err}");
    assert!(err.contains(cause), "the error says {cause:?}: {err}");
    assert_running_untraced(f.pid);
    g.assert_no_copy_left();
    // The process is as it was: it still passes its own checks.
    f.go();
    let mut f = f;
    let status = f.wait_exit(FINISH_TIMEOUT);
    assert!(status.success(), "{status:?}; log:\n{}", f.log_text());
    f.assert_log_passed();
}

#[test]
fn a_wrong_secret_key_fails_the_dump_and_leaves_the_process_running() {
    let g = Garage::start();
    let u = url("refused");
    let wrong = random_hex(32);
    assert_dump_fails(&g, &u, &[("AWS_SECRET_ACCESS_KEY", &wrong)], "Invalid signature");
    let out = g.torpor(&["inspect", &u]);
    assert_eq!(out.status.code(), Some(1), "inspect: {}", stderr_of(&out));
    assert!(stderr_of(&out).contains("holds no torpor image"), "{}", stderr_of(&out));
}

#[test]
fn a_missing_bucket_fails_the_dump_and_leaves_the_process_running() {
    let g = Garage::start();
    assert_dump_fails(&g, "s3://no-such-bucket/x", &[], "NoSuchBucket");
}

#[test]
fn a_stopped_server_fails_the_dump_and_leaves_the_process_running() {
    let mut g = Garage::start();
    g.stop();
    assert_dump_fails(&g, &url("down"), &[], "Connection refused");
}

#[test]
fn a_dump_failing_half_way_leaves_no_image_in_the_bucket() {
    let g = Garage::start();
    // A bucket too small for the image: the upload of the pages fails part way.
    g.admin(&["bucket", "create", "torpor-small"]);
    g.admin(&["bucket", "allow", "--read", "--write", "torpor-small", "--key", "torpor-test-key"]);
    g.admin(&["bucket", "set-quotas", "--max-size", "4MiB", "torpor-small"]);
    let u = "s3://torpor-small/half";
    assert_dump_fails(&g, u, &[], "quota");
    let out = g.torpor(&["inspect", u]);
    assert_eq!(out.status.code(), Some(1), "inspect: {}", stderr_of(&out));
    assert!(stderr_of(&out).contains("holds no torpor image"), "{}", stderr_of(&out));
    // Not an object left, finished or not.
    let info = g.admin(&["bucket", "info", "torpor-small"]);
    let objects = info.lines().find_map(|l| l.trim().strip_prefix("Objects:")).map(str::trim);
    assert_eq!(objects, Some("0"), "{info}");
    assert!(!info.contains("nfinished"), "{info}");
}

#[test]
fn settings_come_from_an_aws_profile_when_the_environment_has_none() {
    let g = Garage::start();
    let u = url("profiled");
    let _f = dump_memory(&g, &u, &[]);
    let aws = TempDir::new().expect("tempdir");
    let (credentials, config) = (aws.path().join("credentials"), aws.path().join("config"));
    fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = wrong\n\n[torpor]\naws_access_key_id = {}\n\
             aws_secret_access_key = {}\n",
            g.key_id, g.secret
        ),
    )
    .expect("write credentials");
    fs::write(
        &config,
        format!(
            "[profile torpor]\nregion = {REGION}\nendpoint_url = http://127.0.0.1:{}\n",
            g.port
        ),
    )
    .expect("write config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_torpor"));
    cmd.args(["verify", &u])
        .env("AWS_SHARED_CREDENTIALS_FILE", &credentials)
        .env("AWS_CONFIG_FILE", &config)
        .env("AWS_PROFILE", "torpor")
        .env("TMPDIR", g.tmp.path());
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION"] {
        cmd.env_remove(var);
    }
    for var in ["AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT", "AWS_ALLOW_HTTP"] {
        cmd.env_remove(var);
    }
    let out = run_with_timeout(cmd, common::TORPOR_TIMEOUT);
    assert!(out.status.success(), "verify {u} with a profile: {}", stderr_of(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("complete and intact"));
    g.assert_no_copy_left();
}

#[test]
fn an_encrypted_image_in_s3_needs_its_key_and_wakes_lazily_with_it() {
    let g = Garage::start();
    let keys = tempfile::TempDir::new().expect("key dir");
    let key = keys.path().join("key");
    let key = key.to_str().expect("utf-8 path");
    let out = g.torpor(&["keygen", key]);
    assert!(out.status.success(), "keygen: {}", stderr_of(&out));
    let u = url("sealed");
    let f = dump_memory(&g, &u, &["--encrypt-key", key, "--compress"]);

    let out = g.torpor(&["verify", &u]);
    assert!(!out.status.success(), "verify without the key succeeded");
    assert!(stderr_of(&out).contains("encrypted"), "no word of encryption: {}", stderr_of(&out));
    let out = g.torpor(&["verify", &u, "--encrypt-key", key]);
    assert!(out.status.success(), "verify {u} with its key: {}", stderr_of(&out));

    restore_and_pass(&g, &f, &u, &["--lazy", "--encrypt-key", key]);
    g.assert_no_copy_left();
}
