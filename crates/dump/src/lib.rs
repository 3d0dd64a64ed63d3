//! Freeze a process, collect its state and write a torpor image.
//!
//! The steps, in order:
//!
//! 1. check the target (exists, not torpor, not a kernel thread, within what this version
//!    supports) before touching it;
//! 2. seize and interrupt it with ptrace, block every signal so none is consumed while
//!    torpor works;
//! 3. collect what `/proc` shows and what only the process can tell (through system calls
//!    run inside it, see `torpor_sys::remote`);
//! 4. copy its memory into the image, write the records, fsync, write the manifest last;
//! 5. only then kill it, or detach and let it run on (`leave_running`).
//!
//! Any failure after step 2 puts the registers, the signal mask and the scratch bytes
//! back and detaches, so the process runs on exactly as before; the partial image is
//! removed.
//!
//! # Example
//!
//! Hibernate a process tree into a directory, as `torpor dump 4242 -D /var/tmp/app`
//! does (the command line is a thin layer over this call):
//!
//! ```no_run
//! use std::path::PathBuf;
//! use torpor_dump::{dump, DumpOptions};
//!
//! let summary = dump(&DumpOptions {
//!     pid: 4242,
//!     dir: PathBuf::from("/var/tmp/app"),
//!     // Keep connections (TCP_REPAIR) instead of refusing them.
//!     tcp_established: true,
//!     // Undo the dump from a guard process should this one die halfway; the guard is
//!     // this program run as `PROGRAM __guard ...`, so only torpor's own binary can be
//!     // one. Leave it `None` in an embedding program.
//!     guard: None,
//!     ..Default::default()
//! })?;
//! println!(
//!     "pid {} saved: {} pages, frozen {:?}",
//!     summary.pid, summary.pages_stored, summary.frozen
//! );
//! # Ok::<(), torpor_dump::DumpError>(())
//! ```
//!
//! Every error names the pid, descriptor, file or mapping involved, and the process is
//! then running as it was.

mod collect;
mod external;
mod files;
mod guard;
mod memory;
mod namespaces;
mod precopy;
mod ptys;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use torpor_image::{model, CpuState, ImageWriter, Manifest, ParentImage, FORMAT_VERSION, MAGIC};
use torpor_sys::remote::{Gadgets, HealFrame};
use torpor_sys::{mem, proc, ptrace, Remote};

pub use collect::UnsupportedReason;
pub use external::ExternalUnix;
pub use guard::run_guard;
pub use precopy::{PreCopyReport, Round};

/// What to dump and how.
#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    pub pid: i32,
    pub dir: PathBuf,
    /// Let the process run on after the dump instead of killing it.
    pub leave_running: bool,
    /// Pipes and sockets on descriptors 0 to 2 whose other end is outside the tree are
    /// saved as "inherited": restore connects them to its own standard descriptors.
    pub inherit_stdio: bool,
    /// Save established TCP connections (with `TCP_REPAIR`) instead of refusing them.
    pub tcp_established: bool,
    /// Unix socket peers outside the tree to connect to again at restore (`--external`).
    pub external: Vec<ExternalUnix>,
    /// A job of an interactive shell: terminals on descriptors 0 to 2 are saved as
    /// inherited, with their modes, so the job wakes in the terminal restore runs in.
    pub shell_job: bool,
    /// Leave the image to the kernel's writeback instead of syncing it before the
    /// process is ended: faster, but a crash soon after the dump can lose both.
    pub no_sync: bool,
    /// Compress page files with zstd at this level.
    pub compress: Option<i32>,
    /// Make an incremental image over the image in this directory: pages unchanged
    /// since it are referred to, not stored.
    pub parent: Option<PathBuf>,
    /// Copy memory in rounds while the process runs, so that it is frozen only while
    /// the pages written since the last round are copied.
    pub pre_copy: bool,
    /// The program to start as the dump's guard (`PROGRAM __guard PID TORPOR`), which
    /// undoes the dump if torpor dies before it ends; `None` for no guard.
    pub guard: Option<PathBuf>,
    /// Called with the image directory once the image is complete and before the
    /// process is ended: a failure here fails the dump and lets the process run on, as
    /// any other failure would (packing the image into one file or a stream).
    pub after_commit: Option<AfterCommit>,
    /// Where the image's files go instead of the local directory `dir`, which then only
    /// names the image in messages (an object store, another host).
    pub store: Option<ImageStore>,
    /// Encrypt the image with this key. A parent image (`parent`) must be encrypted with
    /// the same key.
    pub key: Option<torpor_image::crypt::Key>,
}

/// What [`DumpOptions::store`] holds.
#[derive(Clone)]
pub struct ImageStore(pub Arc<dyn torpor_image::Store>);

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImageStore(..)")
    }
}

/// The function [`AfterCommit`] holds: given the image directory, it finishes the image.
pub type AfterCommitFn = dyn Fn(&Path) -> torpor_image::Result<()> + Send + Sync;

/// What [`DumpOptions::after_commit`] runs.
#[derive(Clone)]
pub struct AfterCommit(pub Arc<AfterCommitFn>);

impl std::fmt::Debug for AfterCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AfterCommit(..)")
    }
}

/// What a dump did, for the summary line.
#[derive(Debug, Clone, Default)]
pub struct DumpSummary {
    pub pid: i32,
    pub pages_stored: u64,
    pub zero_pages_skipped: u64,
    /// Pages left in the parent image, unchanged since.
    pub pages_from_parent: u64,
    pub image_bytes: u64,
    /// How long the tree was frozen for the dump itself (after pre-copy, if any).
    pub frozen: Duration,
    pub total: Duration,
    pub pre_copy: Option<PreCopyReport>,
    /// The name of the firewall rules holding back the peers of the saved TCP
    /// connections (see `torpor_sys::netlock`), left for the restore to remove.
    pub net_lock: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("pid {pid} does not exist")]
    NoSuchProcess { pid: i32 },
    #[error("pid {pid} is torpor itself")]
    IsSelf { pid: i32 },
    #[error("pid {pid} is a kernel thread; only user processes can be dumped")]
    KernelThread { pid: i32 },
    #[error("pid {pid} is a zombie (it has exited and waits for its parent to reap it)")]
    Zombie { pid: i32 },
    #[error("pid {pid} is already traced by pid {tracer} (a debugger?)")]
    Traced { pid: i32, tracer: i32 },
    #[error(
        "pid {pid} {why}; run by uid {uid}, torpor dumps only the processes that user could \
         trace without privileges (its own uid and gid, dumpable, no capabilities)"
    )]
    NotYours { pid: i32, uid: u32, why: String },
    #[error("pid {pid}: {reason}")]
    Unsupported { pid: i32, reason: UnsupportedReason },
    #[error("cannot freeze pid {pid}")]
    Freeze { pid: i32, source: torpor_sys::Error },
    #[error("pid {pid}: cannot collect {what}")]
    Collect { pid: i32, what: String, source: torpor_sys::Error },
    #[error("pid {pid}: cannot read memory of mapping {start:#x}-{end:#x} ({name})")]
    Memory { pid: i32, start: u64, end: u64, name: String, source: torpor_sys::Error },
    #[error("pid {pid}: cannot save {what}")]
    SaveFile { pid: i32, what: String, source: std::io::Error },
    #[error(transparent)]
    Image(#[from] torpor_image::ImageError),
    #[error("{dir} is the parent image itself; an incremental image needs a directory of its own")]
    ParentIsTarget { dir: PathBuf },
    #[error(
        "{parent} is not encrypted: an encrypted image made over it would leave its \
         unchanged pages readable there; dump in full, or over an image encrypted with the \
         same key"
    )]
    PlainParent { parent: PathBuf },
    #[error("interrupted during pre-copy; pid {pid} runs on as before")]
    Interrupted { pid: i32 },
    #[error("--pre-copy cannot be combined with {what} yet; dump without one of them")]
    PreCopyWith { what: &'static str },
    #[error("pid {pid}: cannot kill it after the dump")]
    Kill { pid: i32, source: std::io::Error },
    #[error("cannot start the dump's guard {}", program.display())]
    Guard { program: PathBuf, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, DumpError>;

/// Dumps one process into `opts.dir`.
pub fn dump(opts: &DumpOptions) -> Result<DumpSummary> {
    let t0 = Instant::now();
    precheck(opts.pid)?;
    // The rounds write raw pages without hashes: neither a compressed page file nor one
    // a later incremental image could be made over.
    if opts.pre_copy {
        if opts.compress.is_some() {
            return Err(DumpError::PreCopyWith { what: "--compress" });
        }
        if opts.parent.is_some() {
            return Err(DumpError::PreCopyWith { what: "--parent" });
        }
    }
    let guard = match &opts.guard {
        Some(program) => Some(
            torpor_sys::guard::Guard::start(program, "dump", opts.pid)
                .map_err(|source| DumpError::Guard { program: program.clone(), source })?,
        ),
        None => None,
    };
    let journal = guard.as_ref().map(torpor_sys::guard::Guard::journal).unwrap_or_default();
    let result = dump_noted(opts, &journal, t0);
    drop(journal);
    // Whatever the outcome, the process is now as it says: nothing for the guard to undo.
    if let Some(g) = guard {
        g.finish();
    }
    result
}

/// The dump, noting each change it makes to the process in `journal` before making it.
fn dump_noted(
    opts: &DumpOptions,
    journal: &torpor_sys::guard::Journal,
    t0: Instant,
) -> Result<DumpSummary> {
    let pid = opts.pid;
    // Read before anything is written: the new image may not replace its own parent.
    let parent = match &opts.parent {
        Some(p) => {
            let same = std::fs::canonicalize(p).ok().zip(std::fs::canonicalize(&opts.dir).ok());
            if same.is_some_and(|(a, b)| a == b) {
                return Err(DumpError::ParentIsTarget { dir: opts.dir.clone() });
            }
            let pages = torpor_image::pages::ParentPages::load(p, opts.key.as_ref())?;
            // An encrypted parent cannot be opened without the key, so only this is left.
            if opts.key.is_some() && !pages.encrypted {
                return Err(DumpError::PlainParent { parent: p.clone() });
            }
            Some(pages)
        }
        None => None,
    };
    let mut writer = match &opts.store {
        // A guard cannot reach a store to remove what a dump left there; without its
        // manifest, which is stored last, what is left is no image.
        Some(store) => ImageWriter::with_store(Arc::clone(&store.0), &opts.dir)?,
        None => {
            let made = !opts.dir.exists();
            guard::note(journal, guard::Note::Image { dir: &opts.dir, made });
            ImageWriter::create(&opts.dir)?
        }
    };
    writer.set_durable(!opts.no_sync);
    if let Some(key) = &opts.key {
        if let Err(e) = writer.set_key(key) {
            writer.abandon();
            return Err(e.into());
        }
    }
    let parent_ref = match (&opts.parent, &parent) {
        (Some(dir), Some(pages)) => match torpor_image::pages::parent_path(&opts.dir, dir) {
            Ok(path) => {
                writer.needs_version(2);
                Some(ParentImage { path, manifest_xxh3: pages.manifest_xxh3.clone() })
            }
            Err(source) => {
                writer.abandon();
                return Err(torpor_image::ImageError::Read { path: dir.clone(), source }.into());
            }
        },
        _ => None,
    };
    let mut pre = None;
    if opts.pre_copy {
        match precopy::PreCopy::run(pid, &mut writer, journal) {
            Ok(p) => pre = Some(p),
            Err(e) => {
                writer.abandon();
                return Err(e);
            }
        }
    }
    let frozen = match FrozenTree::freeze(pid, journal) {
        Ok(f) => f,
        Err(e) => {
            drop(pre);
            writer.abandon();
            return Err(e);
        }
    };
    let t_frozen = Instant::now();
    // The kernel walks every page of a process to write its smaps (30 ms for 1 GiB), so
    // they are read on another core while pre-copy's last scan runs.
    let pids: Vec<i32> = frozen.processes.iter().map(|p| p.pid).collect();
    let smaps = std::thread::spawn(move || {
        pids.into_iter().map(|pid| (pid, proc::smaps(pid))).collect::<Vec<_>>()
    });
    if let Some(p) = &mut pre {
        let t = Instant::now();
        p.finish(&frozen, &mut writer);
        tracing::debug!("pre-copy's last scan took {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    }
    let maps: std::collections::HashMap<i32, _> =
        smaps.join().map(|v| v.into_iter().collect()).unwrap_or_default();

    let mut fd_ctx = files::FdContext::default();
    fd_ctx.journal = journal.clone();
    fd_ctx.tcp_established = opts.tcp_established;
    fd_ctx.external_unix = opts.external.clone();
    fd_ctx.lock_tag = format!(
        "torpor-{pid}-{}",
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
    );
    fd_ctx.shell_job = opts.shell_job;
    let parent = parent.as_ref();
    let result = write_image(&frozen, &mut writer, &mut fd_ctx, opts, parent, pre.as_mut(), maps);
    let pre_copy = pre.as_ref().map(|p| p.report.clone());
    torpor_sys::test_point("dump:written", pid);
    let (tree, stats) = match result {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!("dump of pid {pid} failed, releasing it: {e}");
            fd_ctx.end_repair();
            frozen.release();
            writer.abandon();
            return Err(e);
        }
    };

    let manifest = Manifest {
        magic: MAGIC.into(),
        format_version: FORMAT_VERSION,
        torpor_version: env!("CARGO_PKG_VERSION").into(),
        created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        kernel_release: torpor_sys::kernel_release(),
        arch: std::env::consts::ARCH.into(),
        cpu: cpu_state(&tree),
        root_pid: tree.root_pid,
        files: Vec::new(),
        parent: parent_ref,
        encryption: None,
    };
    let t_commit = Instant::now();
    let frozen_for;
    if opts.leave_running {
        // A process that runs on loses nothing if its image is not on disk yet: it is let
        // go before the commit's syncs.
        fd_ctx.end_repair();
        frozen.release();
        // From here the process is its own again: a guard must not touch it, only the
        // image if it is not committed.
        guard::note(journal, guard::Note::Released);
        frozen_for = t_frozen.elapsed();
        // A failed commit removes the image; the process runs on as before.
        writer.commit(manifest)?;
        if let Some(after) = &opts.after_commit {
            (after.0)(&opts.dir)?;
        }
        guard::note(journal, guard::Note::Committed);
        torpor_sys::test_point("dump:committed", pid);
    } else {
        let committed = writer.commit(manifest);
        let after = |()| opts.after_commit.as_ref().map_or(Ok(()), |a| (a.0)(&opts.dir));
        if let Err(e) = committed.and_then(after) {
            fd_ctx.end_repair();
            frozen.release();
            return Err(e.into());
        }
        guard::note(journal, guard::Note::Committed);
        torpor_sys::test_point("dump:committed", pid);
        frozen_for = t_frozen.elapsed();
        guard::note(journal, guard::Note::Killing);
        frozen.kill()?;
        // The connections were in repair mode when their process died: closing torpor's
        // copies now ends them without a FIN or RST reaching the peer.
        drop(fd_ctx);
    }
    tracing::debug!(
        "pid {pid} frozen {:.1} ms: {:.1} ms to save its state and memory, {:.1} ms to commit",
        frozen_for.as_secs_f64() * 1e3,
        (t_commit - t_frozen).as_secs_f64() * 1e3,
        t_commit.elapsed().as_secs_f64() * 1e3
    );
    // Closing the userfaultfds ends the write tracking. Only now: removing the
    // protection from every page of a large process takes a while, and a dead one has
    // nothing left to unprotect.
    drop(pre);
    Ok(DumpSummary {
        pid,
        pages_stored: stats.pages_stored,
        zero_pages_skipped: stats.zero_pages,
        pages_from_parent: stats.parent_pages,
        image_bytes: stats.bytes,
        frozen: frozen_for,
        total: t0.elapsed(),
        pre_copy,
        net_lock: tree.net_lock,
    })
}

/// Refuses targets torpor must not or cannot touch, before attaching.
fn precheck(pid: i32) -> Result<()> {
    if pid <= 0 {
        return Err(DumpError::NoSuchProcess { pid });
    }
    if pid == std::process::id() as i32 {
        return Err(DumpError::IsSelf { pid });
    }
    let status = proc::status(pid).map_err(|_| DumpError::NoSuchProcess { pid })?;
    if status.tgid != pid {
        // A thread id that is not a thread group leader.
        return Err(DumpError::Unsupported {
            pid,
            reason: UnsupportedReason::NotLeader { tgid: status.tgid },
        });
    }
    if status.state == 'Z' || status.state == 'X' {
        return Err(DumpError::Zombie { pid });
    }
    if std::fs::read_link(format!("/proc/{pid}/exe")).is_err()
        && proc::maps(pid).map(|m| m.is_empty()).unwrap_or(true)
    {
        return Err(DumpError::KernelThread { pid });
    }
    if status.tracer_pid != 0 {
        return Err(DumpError::Traced { pid, tracer: status.tracer_pid });
    }
    check_owner(pid, &status)?;
    namespaces::check(pid, std::process::id() as i32, true)?;
    check_seccomp(pid)
}

/// Run by a user other than root, torpor dumps only what that user could trace with no
/// privilege: a process of its uid and gid, dumpable, without capabilities. torpor may
/// hold `CAP_SYS_PTRACE` and `CAP_CHECKPOINT_RESTORE` as file capabilities
/// (docs/security.md), with which the kernel would let it copy any process's memory into
/// the user's image.
fn check_owner(pid: i32, st: &proc::Status) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (uid, gid) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
    if uid == 0 {
        return Ok(());
    }
    let why = if st.uids.iter().any(|&u| u != uid) {
        format!("runs as uid {:?} (real, effective, saved, filesystem)", st.uids)
    } else if st.gids.iter().any(|&g| g != gid) {
        format!("runs as gid {:?} (real, effective, saved, filesystem)", st.gids)
    } else if st.cap_prm != 0 {
        format!("holds capabilities ({:#x})", st.cap_prm)
    } else if std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() != uid) {
        // The kernel gives a process's /proc directory to root when it is not dumpable.
        "is not dumpable (it turned that off to keep its memory private)".to_string()
    } else {
        return Ok(());
    };
    Err(DumpError::NotYours { pid, uid, why })
}

/// Refuses a process with a thread in seccomp strict mode, which allows no system call
/// torpor could restore it with. Filters are saved (`collect::seccomp_filters`).
fn check_seccomp(pid: i32) -> Result<()> {
    // A thread that exits meanwhile has nothing left to check.
    for tid in proc::tids(pid).unwrap_or_default() {
        let Ok(st) = proc::task_status(pid, tid) else {
            continue;
        };
        if st.seccomp == 1 {
            return Err(DumpError::Unsupported { pid, reason: UnsupportedReason::Seccomp { tid } });
        }
    }
    Ok(())
}

/// Checks a descendant before torpor stops it.
fn precheck_member(pid: i32, root: i32) -> Result<()> {
    if pid == std::process::id() as i32 {
        return Err(DumpError::Unsupported { pid, reason: UnsupportedReason::Torpor });
    }
    let status = proc::status(pid).map_err(|_| DumpError::NoSuchProcess { pid })?;
    if status.tracer_pid != 0 {
        return Err(DumpError::Traced { pid, tracer: status.tracer_pid });
    }
    check_owner(pid, &status)?;
    namespaces::check(pid, root, false)?;
    check_seccomp(pid)
}

/// Union of the XSAVE features the image's threads use.
fn cpu_state(tree: &model::Tree) -> CpuState {
    let mut st = CpuState { xcr0: torpor_sys::xcr0(), ..Default::default() };
    for t in tree.processes.iter().flat_map(|p| &p.threads) {
        if let Ok(x) = hex::decode(&t.xsave) {
            st.xsave_size = st.xsave_size.max(x.len() as u32);
            st.xfeatures_used |= xstate_bv(&x);
        }
    }
    st
}

/// XSTATE_BV: the features present in an XSAVE area (first 8 bytes of its header).
pub fn xstate_bv(xsave: &[u8]) -> u64 {
    xsave.get(512..520).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()))
}

#[derive(Default)]
struct Stats {
    pages_stored: u64,
    /// Pages shared copy-on-write with a process dumped before, stored once.
    shared_pages: u64,
    /// Pages unchanged since the parent image, not stored again.
    parent_pages: u64,
    zero_pages: u64,
    bytes: u64,
}

fn write_image(
    frozen: &FrozenTree,
    writer: &mut ImageWriter,
    fd_ctx: &mut files::FdContext,
    opts: &DumpOptions,
    parent: Option<&torpor_image::pages::ParentPages>,
    mut pre: Option<&mut precopy::PreCopy>,
    mut maps: std::collections::HashMap<i32, torpor_sys::Result<Vec<proc::MapEntry>>>,
) -> Result<(model::Tree, Stats)> {
    let inherit_stdio = opts.inherit_stdio;
    let root = frozen.processes[0].pid;
    let mut files = files::FileTable::default();
    let mut stats = Stats::default();
    let mut pages = memory::PageIndex::default();
    let mut processes = Vec::new();
    for f in &frozen.processes {
        let t = Instant::now();
        let mut process = collect::collect(f, &mut files, fd_ctx, writer)?;
        let collected = t.elapsed();
        let (index, stats) = (&mut pages, &mut stats);
        let tracked = pre.as_deref_mut().and_then(|p| p.get_mut(f.pid));
        let page_opts = memory::PageOptions {
            compress: opts.compress,
            parent,
            pre: tracked,
            maps: maps.remove(&f.pid),
        };
        memory::dump_pages(f, &mut process, writer, &mut files, index, stats, page_opts)?;
        tracing::debug!(
            "pid {}: state collected in {:.1} ms, memory saved in {:.1} ms",
            f.pid,
            collected.as_secs_f64() * 1e3,
            (t.elapsed() - collected).as_secs_f64() * 1e3
        );
        processes.push(process);
    }
    let pids: Vec<i32> = frozen.processes.iter().map(|p| p.pid).collect();
    fd_ctx.check_closed(&pids, &mut processes, inherit_stdio, writer)?;
    let ptys = fd_ctx.finish_ptys(&pids, &mut processes, writer)?;
    files.save_deleted(root, writer)?;
    let mut tree = model::Tree {
        root_pid: root,
        processes,
        files: files.into_infos(),
        zombies: frozen.zombies.clone(),
        pid_ns: false,
        net_lock: fd_ctx.locked.then(|| fd_ctx.lock_tag.clone()),
        ptys,
    };
    if let Some(map) = pid_namespace(&frozen.processes, &frozen.zombies)? {
        to_inner_pids(&mut tree, &map);
    }
    writer.write_json(torpor_image::TREE, &tree)?;
    Ok((tree, stats))
}

/// When the tree's root is the first process of a pid namespace other than torpor's (as
/// `torpor run` makes), the map from the pids torpor sees to those inside. `None` for a
/// tree in torpor's own namespace.
fn pid_namespace(
    processes: &[Frozen],
    zombies: &[model::Zombie],
) -> Result<Option<std::collections::HashMap<i32, i32>>> {
    let root = processes[0].pid;
    let ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    if ns(root) == ns(std::process::id() as i32) {
        return Ok(None);
    }
    let inner = |pid: i32, tid: i32| -> Result<i32> {
        let st = proc::task_status(pid, tid).map_err(|source| DumpError::Collect {
            pid,
            what: format!("the pid namespace ids of {tid}"),
            source,
        })?;
        Ok(*st.ns_pids.last().unwrap_or(&tid))
    };
    if inner(root, root)? != 1 {
        return Err(DumpError::Unsupported {
            pid: root,
            reason: UnsupportedReason::InsidePidNs { inner: inner(root, root)? },
        });
    }
    let mut map = std::collections::HashMap::new();
    for f in processes {
        for t in &f.threads {
            map.insert(t.tid, inner(f.pid, t.tid)?);
        }
    }
    for z in zombies {
        map.insert(z.pid, inner(z.pid, z.pid)?);
    }
    Ok(Some(map))
}

/// Rewrites every pid of the records to the one the processes see in their namespace;
/// pids outside it become 0, as the processes see them.
fn to_inner_pids(tree: &mut model::Tree, map: &std::collections::HashMap<i32, i32>) {
    let inner = |p: i32| map.get(&p).copied().unwrap_or(0);
    tree.pid_ns = true;
    tree.root_pid = inner(tree.root_pid);
    for p in &mut tree.processes {
        p.pid = inner(p.pid);
        p.ppid = inner(p.ppid);
        p.pgid = inner(p.pgid);
        p.sid = inner(p.sid);
        for t in &mut p.threads {
            t.tid = inner(t.tid);
        }
        for t in &mut p.posix_timers {
            if t.notify_tid != 0 {
                t.notify_tid = inner(t.notify_tid);
            }
        }
        for r in p.vmas.iter_mut().flat_map(|v| v.pages.iter_mut()) {
            r.from_pid = r.from_pid.map(inner);
        }
    }
    for t in &mut tree.ptys {
        t.session = t.session.map(inner);
        t.foreground = t.foreground.map(inner);
    }
    for z in &mut tree.zombies {
        z.pid = inner(z.pid);
        z.ppid = inner(z.ppid);
        z.pgid = inner(z.pgid);
        z.sid = inner(z.sid);
    }
}

/// Every process of a tree held stopped, parents before children, and its zombies.
pub(crate) struct FrozenTree {
    pub processes: Vec<Frozen>,
    pub zombies: Vec<model::Zombie>,
}

impl FrozenTree {
    /// Stops the tree under `root`: each process with all its threads, then its children.
    /// A stopped process forks no more, so the walk sees every process there is.
    fn freeze(root: i32, journal: &torpor_sys::guard::Journal) -> Result<Self> {
        let mut tree = Self { processes: Vec::new(), zombies: Vec::new() };
        let mut queue = std::collections::VecDeque::from([root]);
        while let Some(pid) = queue.pop_front() {
            if let Err(e) = tree.freeze_one(pid, root, &mut queue, journal) {
                tree.release();
                return Err(e);
            }
        }
        Ok(tree)
    }

    fn freeze_one(
        &mut self,
        pid: i32,
        root: i32,
        queue: &mut std::collections::VecDeque<i32>,
        journal: &torpor_sys::guard::Journal,
    ) -> Result<()> {
        if pid != root {
            precheck_member(pid, root)?;
        }
        let zombie = |pid| -> Option<model::Zombie> {
            let st = proc::stat(pid).ok()?;
            (st.state == 'Z').then_some(model::Zombie {
                pid,
                ppid: st.ppid,
                pgid: st.pgrp,
                sid: st.session,
                exit_status: st.exit_code,
                comm: st.comm.clone(),
            })
        };
        if let Some(z) = zombie(pid).filter(|_| pid != root) {
            self.zombies.push(z);
            return Ok(());
        }
        match Frozen::attach(pid, journal) {
            Ok(f) => self.processes.push(f),
            // It exited while the tree was being stopped: now a zombie of its parent.
            Err(_) if pid != root && zombie(pid).is_some() => {
                self.zombies.push(zombie(pid).unwrap());
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        let children = proc::children(pid).map_err(|source| DumpError::Collect {
            pid,
            what: "its children".into(),
            source,
        })?;
        queue.extend(children);
        Ok(())
    }

    fn release(self) {
        for f in self.processes.into_iter().rev() {
            f.release();
        }
    }

    /// Ends every process of the tree, children first. Each parent, still stopped under
    /// torpor, then reaps its dead children itself, so their pids are free at once
    /// instead of waiting for init to reap orphans; only the root is left for its own
    /// parent to reap.
    fn kill(self) -> Result<()> {
        for f in self.processes.into_iter().rev() {
            let reap = libc::WNOHANG | libc::__WALL;
            for _ in 0..65536 {
                match f.leader().remote.raw(libc::SYS_wait4, torpor_sys::args!(-1i64, 0, reap, 0)) {
                    Ok(r) if r > 0 => continue,
                    _ => break,
                }
            }
            f.kill()?;
            torpor_sys::test_point("dump:killing", 0);
        }
        Ok(())
    }
}

/// The signal mask of a thread while torpor works: everything blocked but `SIGTRAP`.
///
/// A remote call of a thread without a healing frame (and the guard's) ends in a
/// single-step trap, which the kernel raises as a forced `SIGTRAP`; a forced signal that
/// is blocked is unblocked and its action reset to the default, so a program's `SIGTRAP`
/// handler would be lost (in the image, and in the process if it runs on). Unblocked,
/// the trap is only reported to torpor, which discards it. (An ignored `SIGTRAP` is
/// reset all the same: not kept yet.) Calls through a healing frame raise no trap.
pub(crate) const WORKING_MASK: u64 = !(1 << (libc::SIGTRAP - 1));

/// Lets a thread stopped between a fault and its signal take the signal first.
///
/// A thread that faults (a program probing a guard page, say) is sent `SIGSEGV`, and one
/// stopped by torpor in that moment holds it pending: the stop request is served before
/// the signal. Saved so, the signal would wake with the image, to be delivered at once by
/// the kernel while torpor still rebuilds the process. So the thread is let go until its
/// handler has the signal (at most a few tries; a signal still pending then is saved),
/// as it would have had it without torpor.
fn take_fault(tid: i32) -> torpor_sys::Result<()> {
    const FAULTS: [i32; 5] =
        [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGSYS];
    for _ in 0..8 {
        let blocked = ptrace::get_sigmask(tid)?;
        let fault = ptrace::peek_siginfo(tid, false)?.iter().any(|si| {
            let signo = i32::from_ne_bytes(si[..4].try_into().unwrap());
            let code = i32::from_ne_bytes(si[8..12].try_into().unwrap());
            FAULTS.contains(&signo) && code > 0 && blocked & 1 << (signo - 1) == 0
        });
        if !fault {
            return Ok(());
        }
        tracing::debug!("thread {tid}: stopped with a fault signal pending; letting it take it");
        // Resumed, it takes the signal before anything else (a signal-delivery stop that
        // the wait below answers by delivering it), then stops again.
        ptrace::cont(tid, 0)?;
        ptrace::interrupt_and_wait(tid)?;
    }
    Ok(())
}

/// What a healing frame for thread `tid` needs ([`Remote::heal`]): the code found in
/// the process and the thread's extended state. `None` (and the thread's calls then
/// exposed for their few microseconds, see docs/architecture.md) when the thread has a
/// shadow stack, which `rt_sigreturn` would check against a frame it never saw, or when
/// the frame would not fit in the mapping of its stack.
fn heal_plan(
    pid: i32,
    tid: i32,
    rsp: u64,
    maps: &[proc::MapEntry],
    gadgets: Gadgets,
) -> Option<(Gadgets, Vec<u8>)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    let features = status.lines().find(|l| l.starts_with("x86_Thread_features:"));
    if features.is_some_and(|l| l.contains("shstk")) {
        return None;
    }
    let xsave = ptrace::get_xstate(tid).ok()?;
    let len = HealFrame::len(&xsave)? as u64;
    let low = collect::Scratch::args_at(rsp).checked_sub(len + 64)?;
    let stack = maps.iter().find(|m| m.start <= rsp.saturating_sub(1) && rsp <= m.end)?;
    (stack.write && low >= stack.start).then_some((gadgets, xsave))
}

/// One thread held stopped, with what is needed to let it go unchanged.
pub(crate) struct FrozenThread {
    pub tid: i32,
    pub remote: Remote,
    /// Its blocked mask before torpor blocked everything.
    pub blocked: u64,
    pub scratch: collect::Scratch,
}

impl FrozenThread {
    /// Puts back what torpor changed in this thread and detaches from it.
    fn release(&self, pid: i32) {
        let tid = self.tid;
        let steps = [
            ("restoring scratch memory", self.scratch.restore(pid)),
            ("restoring registers", self.remote.restore_regs()),
            ("restoring the signal mask", ptrace::set_sigmask(tid, self.blocked)),
            ("detaching", ptrace::detach(tid, 0)),
        ];
        for (what, r) in steps {
            if let Err(e) = r {
                tracing::warn!("pid {pid} thread {tid}: {what} failed: {e}");
            }
        }
    }
}

/// A process with every thread held stopped under ptrace.
pub(crate) struct Frozen {
    pub pid: i32,
    /// The thread group leader first.
    pub threads: Vec<FrozenThread>,
}

impl Frozen {
    pub fn leader(&self) -> &FrozenThread {
        &self.threads[0]
    }

    /// Stops every thread of `pid`. Threads are seized until a pass over
    /// `/proc/PID/task` finds none new, so one created meanwhile is caught too (a
    /// stopped thread creates no more); one that exits meanwhile is left out.
    fn attach(pid: i32, journal: &torpor_sys::guard::Journal) -> Result<Self> {
        let err = |source| DumpError::Freeze { pid, source };
        let mut stopped: Vec<i32> = Vec::new();
        let seize_all = |stopped: &mut Vec<i32>| -> Result<()> {
            loop {
                let tids = proc::tids(pid).map_err(err)?;
                let new: Vec<i32> = tids.into_iter().filter(|t| !stopped.contains(t)).collect();
                if new.is_empty() {
                    return Ok(());
                }
                for tid in new {
                    match ptrace::seize(tid, false) {
                        Ok(()) => {}
                        // Exited between the listing and the seize.
                        Err(torpor_sys::Error::Ptrace { ref source, .. })
                            if source.raw_os_error() == Some(libc::ESRCH) =>
                        {
                            continue
                        }
                        Err(e) => return Err(err(e)),
                    }
                    match ptrace::interrupt_and_wait(tid).and_then(|()| take_fault(tid)) {
                        Ok(()) => stopped.push(tid),
                        Err(torpor_sys::Error::Gone { .. }) if tid != pid => {}
                        Err(e) => {
                            let _ = ptrace::detach(tid, 0);
                            return Err(err(e));
                        }
                    }
                }
            }
        };
        let detach_all = |stopped: &[i32]| {
            for &t in stopped {
                let _ = ptrace::detach(t, 0);
            }
        };
        if let Err(e) = seize_all(&mut stopped) {
            detach_all(&stopped);
            return Err(e);
        }
        // The leader first, the others in tid order.
        stopped.sort_by_key(|&t| (t != pid, t));
        if stopped.first() != Some(&pid) {
            detach_all(&stopped);
            return Err(DumpError::Unsupported { pid, reason: UnsupportedReason::LeaderGone });
        }

        let found = proc::maps(pid)
            .map_err(|source| DumpError::Collect { pid, what: "its memory map".into(), source })
            .and_then(|maps| Ok((collect::find_syscall(pid, &maps)?, maps)));
        let (syscall_ip, maps) = match found {
            Ok(found) => found,
            Err(e) => {
                detach_all(&stopped);
                return Err(e);
            }
        };
        let gadgets = collect::find_gadgets(pid, &maps);
        let mut threads: Vec<FrozenThread> = Vec::new();
        for &tid in &stopped {
            let prepare = || -> Result<FrozenThread> {
                let err = |source| DumpError::Freeze { pid, source };
                let mut remote = Remote::new(tid, syscall_ip).map_err(err)?;
                // Should torpor die, the thread runs on with the registers it holds then.
                remote.tidy();
                let rsp = remote.saved_regs().rsp;
                let heal = gadgets.and_then(|g| heal_plan(pid, tid, rsp, &maps, g));
                let below = heal.as_ref().map_or(0, |(_, x)| HealFrame::len(x).unwrap_or(0));
                let scratch = collect::Scratch::new(pid, rsp, below).map_err(err)?;
                // Block everything while torpor works, so no signal is consumed meanwhile.
                let blocked = ptrace::get_sigmask(tid).map_err(err)?;
                guard::note(
                    journal,
                    guard::Note::Thread {
                        pid,
                        tid,
                        blocked,
                        scratch: scratch.low,
                        saved: scratch.saved(),
                    },
                );
                let base = remote.saved_regs();
                match heal.and_then(|(g, x)| HealFrame::new(base, &x, blocked, g, scratch.addr)) {
                    Some(frame) => {
                        mem::write_mem(pid, frame.addr, &frame.bytes).map_err(err)?;
                        tracing::debug!(
                            "pid {pid} thread {tid}: healing frame at {:#x}",
                            frame.addr
                        );
                        remote.heal(&frame);
                    }
                    None => tracing::debug!(
                        "pid {pid} thread {tid}: no healing frame (code for it found: {})",
                        gadgets.is_some()
                    ),
                }
                ptrace::set_sigmask(tid, WORKING_MASK).map_err(err)?;
                Ok(FrozenThread { tid, remote, blocked, scratch })
            };
            match prepare() {
                Ok(t) => {
                    threads.push(t);
                    torpor_sys::test_point("dump:freezing", pid);
                }
                Err(e) => {
                    for t in &threads {
                        t.release(pid);
                    }
                    detach_all(&stopped[threads.len()..]);
                    return Err(e);
                }
            }
        }
        Ok(Self { pid, threads })
    }

    /// Puts back what torpor changed and lets the process run on.
    fn release(self) {
        for t in &self.threads {
            t.release(self.pid);
        }
    }

    /// Ends the dumped process and waits until it has really exited.
    fn kill(self) -> Result<()> {
        let pid = self.pid;
        // SAFETY: kill takes only integers.
        if unsafe { libc::kill(pid, libc::SIGKILL) } < 0 {
            return Err(DumpError::Kill { pid, source: std::io::Error::last_os_error() });
        }
        // As their tracer torpor sees each thread exit, the leader last; afterwards the
        // parent reaps the zombie. They are reaped in whatever order they end: when the
        // process is the first of a pid namespace, its last thread to exit waits for the
        // namespace to empty, and so for torpor to reap the others first.
        let mut left: Vec<i32> = self.threads.iter().map(|t| t.tid).collect();
        while !left.is_empty() {
            left.retain(|&tid| matches!(ptrace::try_wait_exit(tid), Ok(None)));
            if !left.is_empty() {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        Ok(())
    }
}
