//! Validate a torpor image and bring its process back.
//!
//! 1. Read the whole image and check every checksum, the format version, the CPU's XSAVE
//!    features, that the pid is free and that every file the process uses is unchanged,
//!    before anything is created.
//! 2. Open the process's files in torpor, then create the process with its pid
//!    (`clone3` + `set_tid`); it installs its descriptors and stops (see `child`).
//! 3. Drive it under ptrace with system calls run inside it (see `torpor_sys::remote`):
//!    replace torpor's address space with the saved one, page data read straight from
//!    the image by the process itself, move the vDSO, then signals, timers, limits and
//!    credentials (see `space` and `state`).
//! 4. Load its registers and signal mask and let it go.
//!
//! The new process dies with torpor (`PTRACE_O_EXITKILL` and a parent-death signal) until
//! it is handed over, so a failed or interrupted restore leaves nothing running.
//!
//! # Example
//!
//! Wake the tree saved in an image and wait for its root, as `torpor restore -D
//! /var/tmp/app` does:
//!
//! ```no_run
//! use std::path::PathBuf;
//! use torpor_restore::{restore, wait, RestoreOptions};
//!
//! let restored = restore(&RestoreOptions {
//!     dir: PathBuf::from("/var/tmp/app"),
//!     ..Default::default()
//! })?;
//! // The root is a child of this process, with the pid it had when it was dumped.
//! println!("woken as pid {} in {:?}", restored.pid, restored.total);
//! let status = wait(restored.pid).expect("wait for the woken process");
//! println!("it exited with {status}");
//! # Ok::<(), torpor_restore::RestoreError>(())
//! ```
//!
//! With `lazy: true`, [`Restored::pages`] holds the page server, which must be run
//! (`start`, then `finish`) until every page is loaded; see `torpor restore --lazy`.

mod batch;
mod cgroup;
mod child;
mod cwd;
mod fill;
pub mod lazy;
mod prepare;
mod ptys;
mod space;
mod state;
pub mod terminal;
mod trust;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use torpor_image::{model, ImageReader};
use torpor_sys::{ptrace, Remote};

/// What to restore and how.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub dir: PathBuf,
    /// The caller will not wait for the process (it is reparented when torpor exits), so
    /// a parent-death signal is not set on it.
    pub detach: bool,
    /// Always reach the running kernel's vDSO through jumps from the saved one, as after
    /// a reboot into another kernel (for testing that path).
    pub force_vdso_jumps: bool,
    /// Wake a shell job in the terminal this torpor runs in: its inherited terminal
    /// descriptors get this terminal, with the job's modes, and its group the foreground.
    pub shell_job: bool,
    /// Let the processes run before their memory is loaded: private anonymous memory
    /// comes in on first touch and in the background (see `lazy`); the caller then
    /// serves it with [`Restored::pages`].
    pub lazy: bool,
    /// With `lazy`: wait this long after the release before loading pages nobody asked
    /// for (for tests that must act while pages are still missing).
    pub lazy_prefetch_after: Duration,
    /// The program to start as the restore's guard (`PROGRAM __guard restore DIR
    /// TORPOR`), which kills what was made if torpor dies before releasing it; `None` for
    /// no guard.
    pub guard: Option<PathBuf>,
    /// Restore as root whatever user ids, group ids and capabilities the image holds,
    /// even when a user other than root could have written it (see `trust`).
    pub allow_credentials: bool,
    /// With `lazy`: the page files are still being copied into `dir` (from object
    /// storage); what the restore reads of them is fetched first.
    pub fetch: Option<Fetcher>,
    /// The file `dir` was unpacked from (a single-file image or a self-restoring
    /// executable): whoever could write it could write the image, so it counts for the
    /// credential rule like the image's own files.
    pub packed_from: Option<PathBuf>,
    /// The key of an encrypted image. Without it an encrypted image is refused, as is a
    /// key that is not the image's, before anything is made.
    pub key: Option<torpor_image::crypt::Key>,
}

/// What [`RestoreOptions::fetch`] holds.
#[derive(Clone)]
pub struct Fetcher(pub Arc<dyn torpor_image::Fetch>);

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fetcher(..)")
    }
}

/// The files of an image that a lazy restore reads only through
/// [`RestoreOptions::fetch`], so that they may still be on their way when it starts: the
/// page files that are not checked before the processes are made.
pub fn lazy_files(manifest: &torpor_image::Manifest, tree: &model::Tree) -> Vec<String> {
    let pages: Vec<&str> = tree.processes.iter().map(|p| p.pages_file.as_str()).collect();
    let late = manifest.files.iter().filter(|f| f.len >= VERIFY_LATER);
    late.filter(|f| pages.contains(&f.name.as_str())).map(|f| f.name.clone()).collect()
}

/// Fetches what a lazy restore reads of the page files before the processes run.
fn fetch_eager(fetch: &dyn torpor_image::Fetch, tree: &model::Tree) -> Result<()> {
    let eager = lazy::eager(tree);
    let failed = |name: &str| {
        let what = format!("fetch the pages of {name} needed before the processes run");
        move |source| RestoreError::Prepare { what: what.clone(), source }
    };
    for name in &eager.whole {
        fetch.whole(name).map_err(failed(name))?;
    }
    for (name, ranges) in &eager.ranges {
        fetch.fetch(name, ranges).map_err(failed(name))?;
    }
    Ok(())
}

/// A restored, running process.
#[derive(Debug)]
pub struct Restored {
    pub pid: i32,
    /// With `shell_job`: the job's process group, the terminal, and the terminal's modes
    /// before, for [`terminal::wait_job`].
    pub job: Option<(i32, i32, Option<Vec<u8>>)>,
    pub verify_time: Duration,
    pub total: Duration,
    pub image_bytes: u64,
    /// With `lazy`: the page server, which must run until every page is loaded.
    pub pages: Option<lazy::PageServer>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Image(#[from] torpor_image::ImageError),
    #[error("the image holds {what}, which this version of torpor cannot restore")]
    Unsupported { what: String },
    #[error(
        "the image needs CPU state this machine lacks: XSAVE features {missing:#x} are not \
         enabled here (image uses {used:#x}, this CPU has {have:#x})"
    )]
    Cpu { used: u64, have: u64, missing: u64 },
    #[error("the image is for {arch}, this machine is {here}")]
    Arch { arch: String, here: &'static str },
    #[error(
        "pid {pid} would run {what}, which {owner} (uid {uid}) does not have, yet \
         {owner} owns {path} and so could have written the image; restore it as that \
         user, or pass --allow-credentials if you trust the image"
    )]
    Credentials { pid: i32, what: String, owner: String, uid: u32, path: std::path::PathBuf },
    #[error(
        "{path} (mode {mode:o}) is writable by other users, who could have changed the \
         image; make it writable by its owner only, or pass --allow-credentials if you \
         trust the image"
    )]
    ImageWritable { path: std::path::PathBuf, mode: u32 },
    #[error(
        "pid {pid} would run {what}; this torpor holds capabilities of its own (file \
         capabilities), so run by uid {uid} it restores only processes of that uid and gid \
         with no capabilities"
    )]
    NotYours { pid: i32, what: String, uid: u32 },
    #[error(
        "pid {pid} is taken by {holder}; free the pid, or start the program under \
         `torpor run` so it can be woken in its own pid namespace"
    )]
    PidTaken { pid: i32, holder: String },
    #[error(
        "pseudo-terminal /dev/pts/{index} is in use (by {holder}); the restored programs \
         know their terminal by that name, so it must be free"
    )]
    PtyTaken { index: u32, holder: String },
    #[error("pseudo-terminal /dev/pts/{index}: cannot {step}")]
    Pty { index: u32, step: String, source: torpor_sys::Error },
    #[error("file {path} has changed since the dump ({why}); restoring could corrupt the process")]
    FileChanged { path: String, why: String },
    #[error("cannot open {what}")]
    Prepare { what: String, source: io::Error },
    #[error(
        "pid {pid} fd {fd}: cannot connect its unix socket again to {addr}, the peer outside \
         the image it was connected to (is what served {addr} running?)"
    )]
    ExternalPeer { pid: i32, fd: i32, addr: String, source: io::Error },
    #[error(
        "pid {pid}: cannot make an empty directory at {path} to stand for its working \
         directory, deleted before the dump"
    )]
    DeletedCwd { pid: i32, path: String, source: io::Error },
    #[error("cannot create pid {pid}")]
    Clone { pid: i32, source: io::Error },
    #[error("pid {pid}: the new process could not {step}")]
    ChildSetup { pid: i32, step: &'static str, source: io::Error },
    #[error("pid {pid}: {step}")]
    Step { pid: i32, step: String, source: torpor_sys::Error },
    #[error("pid {pid}: cannot map {start:#x}-{end:#x} ({what})")]
    Map { pid: i32, start: u64, end: u64, what: String, source: torpor_sys::Error },
    #[error("pid {pid}: {what}")]
    Vdso { pid: i32, what: String },
    #[error("lazy loading of the memory failed")]
    Lazy(#[source] lazy::LazyError),
}

pub type Result<T> = std::result::Result<T, RestoreError>;

/// Names whoever holds a pid, for messages.
pub(crate) fn describe_pid(pid: i32) -> String {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "another process".into());
    let state = torpor_sys::proc::status(pid).map(|s| s.state).unwrap_or('?');
    if state == 'Z' {
        format!("{comm} (pid {pid}, a zombie its parent has not reaped)")
    } else {
        format!("{comm} (pid {pid})")
    }
}

/// Checks an image completely, creating nothing; `key` opens an encrypted one.
pub fn check_image(
    dir: &std::path::Path,
    key: Option<&torpor_image::crypt::Key>,
) -> Result<(ImageReader, model::Tree)> {
    let reader = ImageReader::open_keyed(dir, key)?;
    reader.verify_all(|_| {})?;
    let tree = reader.read_tree()?;
    // An incremental image needs every image it was made over, unchanged.
    torpor_image::pages::open_parents(&reader, true)?;
    prepare::validate(&reader, &tree)?;
    Ok((reader, tree))
}

/// Files at least this big are checked while the restore goes on, not before it.
const VERIFY_LATER: u64 = 4 << 20;

/// Asks the kernel to start reading the image's big files into the page cache now, so
/// that the disk works while torpor checks the records and makes the processes. A dump
/// writes page data around the cache (`O_DIRECT`), and after a reboot nothing is cached:
/// without this, the processes' own reads of their pages would wait for the disk one
/// batch at a time. Only advice: an error changes nothing.
fn prefetch(reader: &ImageReader) {
    use std::os::fd::AsRawFd;
    for f in reader.manifest().files.iter().filter(|f| f.len >= VERIFY_LATER) {
        let Ok(file) = std::fs::File::open(reader.dir().join(&f.name)) else { continue };
        let advice = nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED;
        if let Err(e) = nix::fcntl::posix_fadvise(file.as_raw_fd(), 0, 0, advice) {
            tracing::debug!("cannot prefetch {}: {e}", f.name);
        }
    }
}

/// Restores the image in `opts.dir` and lets its processes run.
pub fn restore(opts: &RestoreOptions) -> Result<Restored> {
    let t0 = Instant::now();
    // The records and small files are checked before anything is made from them. Page
    // data, most of the image, is checked on another core while the processes are rebuilt
    // (reading it from the page cache as they do), and they run only if it is intact. A
    // lazy restore leaves the page files to the page server, which checks each as it
    // loads it; the parents of an incremental image are checked whole.
    let reader = ImageReader::open_keyed(&opts.dir, opts.key.as_ref())?;
    prefetch(&reader);
    reader.verify_files(|f| f.len < VERIFY_LATER, |_| {})?;
    let tree = reader.read_tree()?;
    prepare::validate(&reader, &tree)?;
    trust::check_credentials(&reader, &tree, opts.allow_credentials, opts.packed_from.as_deref())?;
    let lazy_pages: Vec<String> = match opts.lazy {
        true => tree.processes.iter().map(|p| p.pages_file.clone()).collect(),
        false => Vec::new(),
    };
    let later = reader.clone();
    let big = std::thread::spawn(move || {
        let t = Instant::now();
        later.verify_files(|f| f.len >= VERIFY_LATER && !lazy_pages.contains(&f.name), |_| {})?;
        torpor_image::pages::open_parents(&later, true)?;
        Ok::<_, torpor_image::ImageError>(t.elapsed())
    });
    let mut big = Some(big);
    let mut verify_time = t0.elapsed();
    let mut verified = || -> Result<()> {
        let Some(h) = big.take() else { return Ok(()) };
        let took = h.join().unwrap_or_else(|_| panic!("the image check panicked"))?;
        verify_time += took;
        Ok(())
    };
    let ids = tree
        .processes
        .iter()
        .flat_map(|p| p.threads.iter().map(|t| t.tid))
        .chain(tree.zombies.iter().map(|z| z.pid));
    // In a new pid namespace every pid is free; otherwise each must be.
    if !tree.pid_ns {
        for id in ids {
            prepare::check_pid_free(id)?;
        }
    }
    prepare::check_files(&tree)?;
    ptys::check_free(&tree)?;

    // Should torpor be killed, ptrace's exit-kill ends what is still traced; the guard
    // ends what was already let go while others were not yet.
    let guard = match &opts.guard {
        Some(program) => {
            Some(torpor_sys::guard::Guard::start(program, "restore", tree.root_pid).map_err(
                |source| RestoreError::Prepare { what: "the restore's guard".into(), source },
            )?)
        }
        None => None,
    };
    if let (true, Some(f)) = (opts.lazy, &opts.fetch) {
        fetch_eager(f.0.as_ref(), &tree)?;
    }
    // Before the descriptors are counted: the new process closes every one of torpor's.
    let mut prepared = prepare::prepare(&reader, &tree)?;
    let mut built = Built {
        journal: guard.as_ref().map(torpor_sys::guard::Guard::journal).unwrap_or_default(),
        ..Default::default()
    };
    // The root's pid as torpor sees it (in a new pid namespace it is 1 only inside).
    let child = child::spawn(&mut prepared.plan)?;
    // The page server, for a lazy restore, exists before anything it must serve. It is
    // started after the spawn, whose child must not inherit its descriptors.
    let fetch = opts.fetch.as_ref().map(|f| Arc::clone(&f.0));
    let lazy = match opts.lazy {
        true => match lazy::Lazy::start(&reader, &tree, opts.lazy_prefetch_after, fetch) {
            Ok(l) => Some(l),
            Err(e) => {
                // SAFETY: kill takes only integers.
                unsafe { libc::kill(child, libc::SIGKILL) };
                let _ = ptrace::wait_exit(child);
                return Err(e);
            }
        },
        false => None,
    };
    // From here on, any failure kills the half-made tree: the root, and with it (by the
    // parent-death signal and ptrace's exit-kill) every process it made.
    built.lazy = lazy;
    let mut result = build(opts, &reader, &tree, &prepared, child, &mut built, &mut verified);
    built.journal = Default::default();
    if let Some(g) = guard {
        g.finish();
    }
    let mut pages = None;
    if let Some(l) = built.lazy.take() {
        match &result {
            // The server failed first (and killed the tree): that is the cause.
            Err(_) => result = l.abandon().map_or(result, |e| Err(RestoreError::Lazy(e))),
            Ok(()) => match l.into_server(built.pids.clone()) {
                Ok(server) => pages = Some(server),
                Err(e) => result = Err(e),
            },
        }
    }
    // The objects were handed to the processes; torpor's copies go. SysV segments stay
    // only if the restore succeeded.
    let sysv = std::mem::take(&mut prepared.sysv);
    drop(prepared);
    if let Err(e) = result {
        for &pid in built.pids.iter().rev() {
            // SAFETY: kill takes only integers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // The others first: torpor traces them, so each dead one waits for torpor to
        // take its exit before its parent can reap it, and the first process of a pid
        // namespace does not finish exiting until every other in it is reaped.
        for &pid in built.pids.iter().rev().filter(|&&p| p != child) {
            let _ = ptrace::wait_exit(pid);
        }
        let _ = ptrace::wait_exit(child);
        // Damaged page data explains any other failure better than that failure does.
        verified()?;
        return Err(e);
    }
    sysv.finish();
    let image_bytes = reader.manifest().files.iter().map(|f| f.len).sum();
    let job = built.job.take();
    Ok(Restored { pid: child, job, verify_time, total: t0.elapsed(), image_bytes, pages })
}

/// The processes made so far, to kill on failure.
#[derive(Default)]
struct Built {
    pids: Vec<i32>,
    /// A lazy restore's page server being set up: mappings register with it.
    lazy: Option<lazy::Lazy>,
    /// Where each process made is noted for the guard.
    journal: torpor_sys::guard::Journal,
    job: Option<(i32, i32, Option<Vec<u8>>)>,
}

impl Built {
    fn made(&mut self, pid: i32) {
        self.pids.push(pid);
        self.journal.line(&format!("process {pid}"));
    }
}

/// The guard of a restore: `torpor __guard restore PID TORPOR`, the journal on stdin.
/// Should torpor die before it says it is done, every process it made is killed: those
/// it still traced die with it, but those it had already let go would run on without
/// the rest of their tree.
pub fn run_guard(root: i32, torpor: i32) -> i32 {
    use torpor_sys::guard;
    // Each process is held by a pidfd from the moment it is noted, so a pid reused after
    // the process died is never hit.
    let mut made = Vec::new();
    let pid = |line: &str| line.strip_prefix("process ")?.parse::<i32>().ok();
    if guard::follow(torpor, |line| made.extend(pid(line).and_then(guard::pidfd))) {
        return 0;
    }
    for p in made.iter().rev() {
        guard::kill_pidfd(p);
    }
    if made.is_empty() {
        return 0;
    }
    guard::say(&format!(
        "torpor died during the restore of pid {root}; ended the {} processes it had made",
        made.len()
    ));
    0
}

/// One process being rebuilt: its address space and its threads other than the leader.
struct Proc<'a> {
    p: &'a model::Process,
    space: space::Space,
    threads: Vec<Remote>,
}

impl Proc<'_> {
    fn remotes(&self) -> impl Iterator<Item = &Remote> {
        std::iter::once(self.space.remote()).chain(self.threads.iter())
    }
}

fn build(
    opts: &RestoreOptions,
    reader: &ImageReader,
    tree: &model::Tree,
    prep: &prepare::Prepared,
    root_outer: i32,
    built: &mut Built,
    verified: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let root = tree.root_pid;
    let step = |pid: i32, what: &str| {
        let step = what.to_string();
        move |source| RestoreError::Step { pid, step, source }
    };
    built.made(root_outer);
    ptrace::seize_builder(root_outer).map_err(step(root, "attach to the new process"))?;
    ptrace::interrupt_and_wait(root_outer).map_err(step(root, "stop the new process"))?;
    ptrace::set_sigmask(root_outer, !0).map_err(step(root, "block signals"))?;
    torpor_sys::test_point("restore:created", 0);

    // 1. Every process, parents before children, each forked by its own parent while
    //    that one is still only a parked vDSO, so the copies are cheap.
    let mut procs: Vec<Proc> = Vec::with_capacity(tree.processes.len());
    for p in &tree.processes {
        let space = if p.pid == root {
            space::Space::take(root_outer, root, p)?
        } else {
            let parent = procs.iter().find(|q| q.p.pid == p.ppid).expect("validated");
            let outer = state::fork_child(&parent.space, p.pid)?;
            built.made(outer);
            space::Space::take(outer, p.pid, p)?
        };
        state::session(&space, p, opts.shell_job && p.pid == root)?;
        procs.push(Proc { p, space, threads: Vec::new() });
    }
    for pr in &procs {
        state::join_group(&pr.space, pr.p, tree)?;
    }
    for z in &tree.zombies {
        let parent = procs.iter().find(|q| q.p.pid == z.ppid).expect("validated");
        state::make_zombie(&parent.space, z)?;
    }

    // 2. Each process's memory, descriptors, threads and state.
    let mut epolls = std::collections::HashSet::new();
    for pr in &mut procs {
        let p = pr.p;
        // Before the saved mappings exist: the kernel refuses to change the executable
        // while the old one (torpor, which the image may also be) is still mapped.
        state::set_mm(&pr.space, p, prep)?;
        pr.space.rebuild(opts, reader, tree, p, prep, built.lazy.as_mut())?;
        torpor_sys::test_point("restore:memory", 0);
        state::install_fds(&pr.space, p, prep)?;
        state::controlling_ttys(&pr.space, p, tree, prep)?;
        state::register_epolls(&pr.space, p, prep, &mut epolls)?;
        pr.threads = state::restore_state(&pr.space, p)?;
    }

    // 3. Signals last: the forks above sent SIGCHLDs that were never the processes' own.
    for pr in &procs {
        let detached_root = opts.detach && pr.p.pid == root;
        state::signals_and_flags(&pr.space, &pr.threads, pr.p, detached_root, prep)?;
        // After torpor's own descriptors in the process are closed: closing any descriptor
        // of a file lets go of the process's POSIX locks on it, and torpor's include the
        // files the process maps shared (a database's shared index, locked byte by byte).
        state::take_locks(&pr.space, pr.p, tree)?;
        state::install_seccomp(&pr.space, pr.p)?;
        pr.space.finish()?;
        // Every thread exists by now, and moving the process moves them all.
        cgroup::join(pr.space.pid(), pr.p);
    }

    // 4. Every thread of every process is ready before any runs.
    for pr in &procs {
        for (t, r) in pr.p.threads.iter().zip(pr.remotes()) {
            state::load_registers(r, t)?;
            ptrace::set_sigmask(r.tid(), t.blocked)
                .map_err(step(pr.p.pid, "set the signal mask"))?;
        }
    }
    // Nothing runs on page data that does not match the manifest.
    verified()?;
    torpor_sys::test_point("restore:ready", 0);

    // A shell job gets the terminal before it can read from it.
    if opts.shell_job {
        if let Some(tty) = terminal::own_tty() {
            // SAFETY: getpgid takes an integer.
            let pgid = unsafe { libc::getpgid(root_outer) };
            let modes = terminal::hand_over(tty, tree.processes[0].termios.as_deref(), pgid)
                .map_err(|source| RestoreError::Prepare {
                    what: "the terminal for the shell job".into(),
                    source,
                })?;
            built.job = Some((pgid, tty, modes));
        }
    }
    // Connections wake last of all, once nothing can fail any more: until they leave
    // repair mode, a failed restore (or a killed torpor) closes them without a word to
    // their peers, and the image can wake them later.
    prepare::end_repair(tree, prep)?;
    // The connections answer again: their peers' packets may come through.
    if let Some(tag) = &tree.net_lock {
        if let Err(e) = torpor_sys::netlock::unlock(tag) {
            tracing::warn!("cannot remove the firewall rules {tag}: {e}");
        }
    }
    prep.sysv.mark_removed();
    for pr in procs.iter().rev() {
        for r in pr.remotes() {
            ptrace::detach(r.tid(), 0).map_err(step(pr.p.pid, "let the process run"))?;
        }
        torpor_sys::test_point("restore:releasing", 0);
    }
    // The terminal may have another size than the one the job last saw.
    if let Some((pgid, _, _)) = built.job {
        // SAFETY: kill takes integers.
        unsafe { libc::kill(-pgid, libc::SIGWINCH) };
    }
    Ok(())
}

/// Waits for a restored process (a child of this one) to end; returns its exit code, or
/// 128 plus the signal that killed it, as shells do.
pub fn wait(pid: i32) -> io::Result<i32> {
    let status = ptrace::wait_exit(pid)?;
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}
