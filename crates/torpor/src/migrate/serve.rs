//! The destination side: `torpor serve` receives images and wakes them.
//!
//! With `--lazy` the process is woken before its memory is loaded (`torpor restore
//! --lazy`): the source's process is then frozen only until its state is rebuilt here,
//! and the image is removed once the page server has loaded every page. A page that
//! turns out damaged then can only end the woken process; without `--lazy`, every page
//! is checked before the source lets its copy go.
//!
//! Each connection is one migration. The files arrive into a private (0700) directory of
//! their own; on the commit the manifest is written, the `--before-restore` command runs
//! (moving a service address here, say), and `torpor restore --detach` wakes the tree.
//! The source learns the outcome from the answer to its commit and ends its copy of the
//! process only on success. The received image is removed once the restore has returned:
//! a restored process holds its memory and needs nothing of it any more. A connection
//! that ends without a commit leaves nothing behind.
//!
//! Migrations are taken one at a time, in the order they connect.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write};
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use torpor_image::model;

use super::link::{Acceptor, Link, Security};
use super::wire::{self, Frame};

pub struct ServeOptions {
    pub listen: String,
    pub once: bool,
    pub security: Security,
    pub before_restore: Option<String>,
    pub after_failed_restore: Option<String>,
    pub work_dir: Option<PathBuf>,
    pub timeout: Duration,
    pub quiet: bool,
    /// Wake processes before their memory is loaded (`torpor restore --lazy`).
    pub lazy: bool,
}

/// What one successful migration brought.
struct Arrived {
    pid: i32,
    bytes: u64,
    /// From the commit to the woken process.
    woken_in: Duration,
    /// With --lazy: ends once the page server has loaded every page and the image is
    /// removed.
    loading: Option<std::thread::JoinHandle<()>>,
}

pub fn serve(opts: &ServeOptions) -> Result<u8> {
    let listener = TcpListener::bind(&opts.listen)
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let acceptor = Acceptor::new(&opts.security)?;
    if !opts.quiet {
        let addr = listener.local_addr().map_or(opts.listen.clone(), |a| a.to_string());
        eprintln!("torpor: waiting for migrations on {addr}");
    }
    loop {
        let (tcp, peer) = listener.accept().context("cannot accept a connection")?;
        tracing::info!("migration from {peer} begins");
        let outcome = acceptor.accept(tcp, opts.timeout).and_then(|link| session(link, opts));
        let ok = outcome.is_ok();
        let mut loading = None;
        match outcome {
            Ok(a) => {
                if !opts.quiet {
                    eprintln!(
                        "torpor: pid {} arrived from {peer}: {} received, woken {:.1} ms after \
                         the commit{}",
                        a.pid,
                        crate::human(a.bytes),
                        a.woken_in.as_secs_f64() * 1e3,
                        if a.loading.is_some() { "; loading its memory" } else { "" }
                    );
                }
                loading = a.loading;
            }
            Err(e) => eprintln!("torpor: migration from {peer} failed: {e:#}"),
        }
        if opts.once {
            // The image stays until the page server is done with it.
            if let Some(l) = loading {
                let _ = l.join();
            }
            return Ok(if ok { 0 } else { 1 });
        }
    }
}

/// A directory of its own for one migration, removed when dropped.
fn session_dir(work_dir: Option<&Path>) -> Result<tempfile::TempDir> {
    let mut b = tempfile::Builder::new();
    b.prefix("torpor-migration-").permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700));
    let dir = match work_dir {
        Some(w) => b.tempdir_in(w),
        None => b.tempdir(),
    };
    dir.context("cannot create a directory for the incoming image")
}

fn session(link: Link, opts: &ServeOptions) -> Result<Arrived> {
    let peer = link.peer;
    let mut r = BufReader::with_capacity(wire::CHUNK + 64, link.stream);
    let dir = session_dir(opts.work_dir.as_deref())?;
    let image = dir.path().join("image");
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&image)
        .with_context(|| format!("cannot create {}", image.display()))?;
    let mut files: HashMap<u32, (String, BufWriter<File>)> = HashMap::new();
    let mut bytes = 0u64;
    let mut begun = false;
    // A failure of this side is told to the source before the connection closes.
    let fail = |r: &mut BufReader<Box<dyn super::link::Stream>>, e: anyhow::Error| {
        let why = format!("{e:#}");
        let _ = Frame::Failed { why }.write_to(r.get_mut()).and_then(|()| r.get_mut().flush());
        e
    };
    loop {
        let frame = Frame::read_from(&mut r)
            .with_context(|| format!("the connection from {peer} failed; nothing was restored"))?;
        let Some(frame) = frame else {
            bail!("{peer} closed the connection before the commit; nothing was restored");
        };
        // Nothing is taken from a stream that did not say first what it is.
        if !begun && !matches!(frame, Frame::Begin { .. }) {
            return Err(fail(&mut r, anyhow!("the stream does not begin as a migration")));
        }
        let step = match frame {
            Frame::Begin { .. } if begun => Err(anyhow!("a second start in one migration")),
            Frame::Begin { version } => {
                wire::check_version(version).map_err(|e| anyhow!(e)).and_then(|()| {
                    begun = true;
                    Frame::Ready.write_to(r.get_mut())?;
                    r.get_mut().flush().context("cannot answer the source")
                })
            }
            Frame::Create { id, name } => {
                let path = image.join(&name);
                fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)
                    .with_context(|| format!("cannot create {}", path.display()))
                    .map(|f| drop(files.insert(id, (name, BufWriter::with_capacity(1 << 20, f)))))
            }
            Frame::Append { id, data } => match files.get_mut(&id) {
                Some((name, f)) => {
                    bytes += data.len() as u64;
                    f.write_all(&data).with_context(|| format!("cannot write {name} of the image"))
                }
                None => Err(anyhow!("data for file {id}, which was never created")),
            },
            Frame::Finish { id } => match files.remove(&id) {
                Some((name, mut f)) => {
                    f.flush().with_context(|| format!("cannot write {name} of the image"))
                }
                None => Err(anyhow!("file {id} finished, which was never created")),
            },
            Frame::Remove { name } => match fs::remove_file(image.join(&name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(anyhow::Error::new(e).context(format!("cannot remove {name}")))
                }
                _ => Ok(()),
            },
            Frame::Commit { manifest } => {
                let t = Instant::now();
                bytes += manifest.len() as u64;
                let woken = fs::write(image.join(torpor_image::MANIFEST), &manifest)
                    .context("cannot write the manifest")
                    .and_then(|()| wake(&image, dir.path(), opts, &peer.to_string()));
                let answer = match &woken {
                    Ok((pid, _)) => Frame::Restored { pid: *pid },
                    Err(e) => Frame::Failed { why: format!("{e:#}") },
                };
                // The source ends its copy only on hearing this; if it cannot hear it, it
                // lets its copy run on: this one must not run as well.
                let told = answer.write_to(r.get_mut()).and_then(|()| r.get_mut().flush());
                let (pid, restore_output) = woken?;
                if let Err(e) = told {
                    // SAFETY: kill takes only integers.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return Err(anyhow::Error::new(e).context(format!(
                        "woke pid {pid} but could not tell {peer}, whose copy runs on; killed pid {pid}"
                    )));
                }
                let woken_in = t.elapsed();
                // The restore's output ends when the last process holding it does: with
                // --lazy, the page server, once every page is loaded. Only then is the
                // image no longer needed.
                let finish = move || {
                    let out = restore_output.join().unwrap_or_default();
                    let out = out.trim();
                    if !out.is_empty() {
                        eprintln!("{out}");
                    }
                    drop(dir);
                };
                let loading = match opts.lazy {
                    true => Some(std::thread::spawn(finish)),
                    false => {
                        finish();
                        None
                    }
                };
                return Ok(Arrived { pid, bytes, woken_in, loading });
            }
            Frame::Abandon => {
                bail!("{peer} gave the migration up (its dump failed); nothing was restored")
            }
            other => Err(anyhow!("unexpected {other:?} from the source")),
        };
        if let Err(e) = step {
            return Err(fail(&mut r, e));
        }
    }
}

/// Restores the received image: locks its connections' peers out until their sockets
/// exist here, runs the operator's hook, then `torpor restore --detach`. Returns the
/// woken pid and what the restore (and its page server) will yet write to stderr.
fn wake(
    image: &Path,
    session: &Path,
    opts: &ServeOptions,
    peer: &str,
) -> Result<(i32, std::thread::JoinHandle<String>)> {
    let tree: model::Tree = fs::read(image.join(torpor_image::TREE))
        .map_err(anyhow::Error::new)
        .and_then(|b| serde_json::from_slice(&b).map_err(anyhow::Error::new))
        .context("cannot read the image's process tree")?;
    let lock = tree.net_lock.as_ref().filter(|_| torpor_sys::netlock::available());
    if tree.net_lock.is_some() && lock.is_none() {
        tracing::warn!(
            "nft is not installed here: a peer that sends to a moved connection before it is \
             rebuilt will get a reset"
        );
    }
    if let Some(tag) = lock {
        torpor_sys::netlock::lock(&connections(&tree), tag)
            .context("cannot hold back the peers of the process's TCP connections")?;
    }
    let unlock = || {
        if let Some(tag) = lock {
            if let Err(e) = torpor_sys::netlock::unlock(tag) {
                tracing::warn!("cannot remove the firewall rules {tag}: {e}");
            }
        }
    };
    let env =
        [("TORPOR_MIGRATION_SOURCE", peer), ("TORPOR_MIGRATION_PID", &tree.root_pid.to_string())];
    if let Some(cmd) = &opts.before_restore {
        if let Err(e) = hook(cmd, &env) {
            unlock();
            return Err(e.context("the --before-restore command failed; nothing was restored"));
        }
    }
    let pidfile = session.join("pid");
    let mut cmd = Command::new("/proc/self/exe");
    cmd.args(["restore", "--detach", "--quiet", "--pidfile"]).arg(&pidfile).arg("-D").arg(image);
    if opts.lazy {
        cmd.arg("--lazy");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run torpor restore")?;
    let mut stderr = child.stderr.take().context("torpor restore has no stderr")?;
    let output = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let status = child.wait().context("cannot wait for torpor restore")?;
    let restored = match status.success() {
        true => fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .map(|pid| (pid, output))
            .ok_or_else(|| anyhow!("torpor restore wrote no pid into {}", pidfile.display())),
        false => {
            // Nothing it started runs on: its output ends with it.
            let err = output.join().unwrap_or_default();
            let err = err.trim().trim_start_matches("torpor: ");
            Err(anyhow!("{err}"))
        }
    };
    if restored.is_err() {
        unlock();
        if let Some(cmd) = &opts.after_failed_restore {
            if let Err(e) = hook(cmd, &env) {
                eprintln!("torpor: the --after-failed-restore command failed: {e:#}");
            }
        }
    }
    restored
}

/// Runs an operator's command through the shell; its output goes to serve's own.
fn hook(cmd: &str, env: &[(&str, &str)]) -> Result<()> {
    let status = Command::new("/bin/sh")
        .args(["-c", cmd])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} exited with {status}");
    }
    Ok(())
}

/// Every established TCP connection the image holds, as its two ends.
fn connections(tree: &model::Tree) -> Vec<torpor_sys::netlock::Conn> {
    let addr = |h: &str| hex::decode(h).ok().and_then(|b| torpor_sys::sock::to_socket_addr(&b));
    let files = tree.processes.iter().flat_map(|p| &p.open_files);
    files
        .filter_map(|f| match &f.kind {
            model::OpenFileKind::Inet { local, peer: Some(peer), tcp: Some(_), .. } => {
                Some(torpor_sys::netlock::Conn { local: addr(local)?, peer: addr(peer)? })
            }
            _ => None,
        })
        .collect()
}
