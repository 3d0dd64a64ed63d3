//! Lazy restore: the processes run before their memory is loaded.
//!
//! Each private anonymous mapping with stored pages is created empty and registered with
//! a userfaultfd made inside its process (missing mode), instead of being filled. A page
//! server in torpor then answers each fault: with the page's bytes from the image
//! (`UFFDIO_COPY`), or with a zero page for a page the image does not hold
//! (`UFFDIO_ZEROPAGE`). Once the tree runs it also copies the pages nobody asked for yet,
//! in address order, a chunk at a time, looking at faults between chunks so that they
//! always come first. When every page is in, it closes the userfaultfds (which
//! unregisters the mappings) and reports.
//!
//! ```text
//!   restore (main thread)                 page server (thread; with --detach a process)
//!   ─────────────────────                 ──────────────────────────────────────────────
//!   map a lazy mapping ── Pages(runs) ──▶ remembers where each page's data is
//!   UFFDIO_REGISTER it                    serves faults (the kernel's own writes into
//!   rest of the restore                     the process during restore fault too)
//!   release the tree ──── Release ──────▶ faults first; otherwise copy the next chunk
//!                                         all copied and page files checked: close, report
//! ```
//!
//! The process may change its address space before its pages arrive; the kernel reports
//! it (`UFFD_FEATURE_EVENT_*`) and the server follows: a fork gives the child its own
//! userfaultfd, whose pages are those the parent still lacked; `mremap` moves the data's
//! place; `madvise(MADV_DONTNEED)` and `munmap` drop it (the range reads as zero, or is
//! gone). The kernel holds back `UFFDIO_COPY` (`EAGAIN`) while such an event is unread, so
//! no page lands at a stale address.
//!
//! Page data is read through [`PageFiles::read`] only. The page files are not hashed
//! before the restore (that would read all of them, the cost lazy restore avoids); they
//! are hashed in the background and the tree is killed if one does not match. A page file
//! that cannot be read when a page is needed kills the tree at once: a process must never
//! run on with memory that is not its own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use torpor_image::model::{self, VmaKind};
use torpor_image::pages::PageSource;
use torpor_image::{Fetch, ImageError, ImageReader};
use torpor_sys::{args, uffd, PAGE};

use crate::space::Space;
use crate::{RestoreError, Result};

/// Pages copied after a fault, from the faulting page on: a program that touches one
/// page usually touches the next ones.
const FAULT_PAGES: u64 = 16;
/// Pages copied per background step; faults wait at most one step.
const PREFETCH_PAGES: u64 = 256;
/// Mappings up to this size are not lazy: small ones (the data of libraries, TLS, a small
/// heap) are what a program touches first, a fault costs a round trip through torpor, and
/// registering each with the server costs more than reading it with the rest of the
/// eager restore (a process with 10,000 small mappings woke 8 times slower when they went
/// through the server).
const HOT_MAPPING: u64 = 256 << 10;
/// Around each thread's stack pointer, loaded before the processes run too: the pages
/// below it (red zone, the next calls) and above it (the frames it returns to).
const HOT_BELOW_SP: u64 = 4 * PAGE;
const HOT_ABOVE_SP: u64 = 16 * PAGE;

/// Why a lazy restore could not finish. Every variant means the restored processes were
/// killed: none of them runs with memory that is not its own.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error(
        "cannot read {file} at offset {offset} for {label}; the restored \
         processes were killed, since their memory cannot be completed"
    )]
    Unreadable { file: String, offset: u64, label: String, source: io::Error },
    #[error(
        "a page file of the image is damaged; the restored processes were killed, since \
         they may already use pages from it"
    )]
    Damaged { source: ImageError },
    #[error("{label}: {call} at {addr:#x} failed; the restored processes were killed")]
    Fill { label: String, call: &'static str, addr: u64, source: io::Error },
    #[error("{label}: cannot read its userfaultfd; the restored processes were killed")]
    Events { label: String, source: io::Error },
    #[error(
        "interrupted by {signal} before every page was loaded; the restored processes \
         were killed, since they cannot run without their memory"
    )]
    Interrupted { signal: String },
    #[error("the page server cannot {what}")]
    Server { what: &'static str, source: io::Error },
}

/// What a finished lazy load did.
#[derive(Debug, Clone, Default)]
pub struct LoadStats {
    /// From the release of the tree to the last page.
    pub took: Duration,
    /// Bytes copied into the processes.
    pub bytes: u64,
    /// Faults answered (data or zero pages).
    pub faults: u64,
    /// Processes served, including ones forked after the restore.
    pub processes: usize,
}

/// Whether mapping `v` is restored lazily: private anonymous memory (heap, stacks,
/// `mmap`) bigger than [`HOT_MAPPING`] with data in the image. The kernel allows missing-mode registration only on
/// anonymous, shmem and hugetlbfs mappings; in a private file mapping an absent page
/// means "the file's page", which a fault server cannot tell from "not yet copied".
/// Shared memory stays eager because its object is filled once for every sharer, and
/// locked memory because `mlock` would fault every page in during the restore anyway.
pub(crate) fn is_lazy(v: &model::Vma) -> bool {
    !v.shared
        && v.shmem.is_none()
        && matches!(v.kind, VmaKind::Anon { .. } | VmaKind::Stack)
        && !v.advice.iter().any(|a| a == "lo")
        && v.len() > HOT_MAPPING
        && v.pages.iter().any(|r| r.offset.is_some())
}

/// What a lazy restore reads of the page files before the processes run.
#[derive(Debug, Default)]
pub(crate) struct Eager {
    /// Compressed page files: torpor unpacks their mappings whole, none lazily.
    pub whole: Vec<String>,
    /// Ranges `(offset, len)` of raw page files: the runs of the mappings that are not
    /// lazy, which the processes read themselves.
    pub ranges: HashMap<String, Vec<(u64, u64)>>,
}

pub(crate) fn eager(tree: &model::Tree) -> Eager {
    let file_of: HashMap<i32, &str> =
        tree.processes.iter().map(|p| (p.pid, p.pages_file.as_str())).collect();
    let mut out = Eager::default();
    for p in &tree.processes {
        if p.page_frames.is_some() {
            out.whole.push(p.pages_file.clone());
            continue;
        }
        for r in p.vmas.iter().filter(|v| !is_lazy(v)).flat_map(|v| &v.pages) {
            let (Some(offset), Some(file)) = (r.offset, file_of.get(&r.from_pid.unwrap_or(p.pid)))
            else {
                continue;
            };
            out.ranges.entry(file.to_string()).or_default().push((offset, r.pages * PAGE));
        }
    }
    out
}

/// Where the data of consecutive pages is: `pages` pages at `offset` in the page file of
/// process `owner` (as the image names it).
#[derive(Debug, Clone, Copy)]
struct Run {
    pages: u64,
    owner: i32,
    offset: u64,
}

/// Pages not copied yet, by address of their first page.
type Pending = BTreeMap<u64, Run>;

/// Removes `start..end` from `p` (splitting runs at the edges); returns what was there.
fn cut(p: &mut Pending, start: u64, end: u64) -> Vec<(u64, Run)> {
    let mut keys: Vec<u64> = Vec::new();
    if let Some((&k, r)) = p.range(..start).next_back() {
        if k + r.pages * PAGE > start {
            keys.push(k);
        }
    }
    keys.extend(p.range(start..end).map(|(&k, _)| k));
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let r = p.remove(&k).expect("key just listed");
        let r_end = k + r.pages * PAGE;
        if k < start {
            p.insert(k, Run { pages: (start - k) / PAGE, ..r });
        }
        if r_end > end {
            p.insert(end, Run { pages: (r_end - end) / PAGE, offset: r.offset + (end - k), ..r });
        }
        let (s, e) = (k.max(start), r_end.min(end));
        out.push((s, Run { pages: (e - s) / PAGE, offset: r.offset + (s - k), ..r }));
    }
    out
}

/// The run holding page `page`, if its data is still to be copied.
fn find(p: &Pending, page: u64) -> Option<(u64, Run)> {
    let (&k, r) = p.range(..=page).next_back()?;
    (page < k + r.pages * PAGE).then_some((k, *r))
}

/// The image's page files, open in torpor. The one place a lazy restore reads page data,
/// whatever way it is stored (raw, compressed, encrypted): [`PageSource`] reads any range.
struct PageFiles {
    files: HashMap<i32, (String, PageSource)>,
    /// Fetches what is read first, when the files are still being copied in.
    fetch: Option<Arc<dyn Fetch>>,
}

impl PageFiles {
    fn open(
        reader: &ImageReader,
        tree: &model::Tree,
        fetch: Option<Arc<dyn Fetch>>,
    ) -> Result<Self> {
        let mut files = HashMap::new();
        for p in &tree.processes {
            if let Some(fetch) = &fetch {
                // Compressed or encrypted page data is not at the pages' own offsets:
                // such a file is read only once it is all in.
                if p.page_frames.is_some() || reader.is_encrypted() {
                    fetch.whole(&p.pages_file).map_err(|source| RestoreError::Prepare {
                        what: format!("page file {}", p.pages_file),
                        source,
                    })?;
                }
            }
            files.insert(p.pid, (p.pages_file.clone(), PageSource::open(reader, p)?));
        }
        Ok(Self { files, fetch })
    }

    /// Name of the page file of process `owner`, for messages.
    fn name(&self, owner: i32) -> String {
        self.files.get(&owner).map(|f| f.0.clone()).unwrap_or_else(|| format!("pages of {owner}"))
    }

    /// Fills `buf` with the bytes at `offset` of the page data of process `owner`.
    fn read(&self, owner: i32, offset: u64, buf: &mut [u8]) -> std::result::Result<(), ImageError> {
        let (name, f) = self.files.get(&owner).ok_or_else(|| ImageError::Read {
            path: format!("pages of pid {owner}").into(),
            source: io::Error::new(io::ErrorKind::NotFound, "no page file for this pid"),
        })?;
        if let Some(fetch) = &self.fetch {
            // Only a raw file holds page data at the page's own offset; a compressed or
            // encrypted one was fetched whole when opened.
            if f.is_raw() {
                fetch
                    .fetch(name, &[(offset, buf.len() as u64)])
                    .map_err(|source| ImageError::Read { path: name.into(), source })?;
            }
        }
        f.read_at(buf, offset)
    }
}

/// A process whose faults the server answers.
struct Target {
    /// Names it in messages: "pid N", or "a child of pid N" for one forked later.
    label: String,
    uffd: OwnedFd,
    pending: Pending,
    /// Ranges a child does not inherit as they are (`MADV_DONTFORK`, `MADV_WIPEONFORK`).
    not_inherited: Vec<(u64, u64)>,
}

enum Cmd {
    /// A process's userfaultfd, before any of its mappings is registered.
    Target { pid: i32, uffd: OwnedFd },
    /// A mapping of process `pid` about to be registered, with its stored runs.
    Pages { pid: i32, runs: Vec<(u64, Run)>, not_inherited: Option<(u64, u64)> },
    /// Ranges of process `pid`, registered, to load now, before the process runs.
    Load { pid: i32, ranges: Vec<(u64, u64)> },
    /// Stop serving and hand the state back.
    Stop,
}

/// How serving ended.
enum End {
    Stopped,
    Done(LoadStats),
}

/// The page server's state; it moves between threads (and, detached, into a child).
struct Server {
    pages: PageFiles,
    reader: ImageReader,
    page_names: Vec<String>,
    /// The restored processes as torpor sees them, killed (with their descendants) on
    /// failure.
    tree: Vec<i32>,
    /// Targets by pid for commands; forked children are only in `targets`.
    by_pid: HashMap<i32, usize>,
    targets: Vec<Target>,
    /// Faults to answer again once pending events are read.
    retry: Vec<(usize, u64)>,
    released: Option<Instant>,
    /// How long after the release background loading starts (faults are served at
    /// once); zero but for tests that must act before the pages arrive.
    prefetch_after: Duration,
    check: Option<JoinHandle<std::result::Result<(), LazyError>>>,
    rx: mpsc::Receiver<Cmd>,
    commands_open: bool,
    wake: OwnedFd,
    signals: SignalFd,
    buf: Vec<u8>,
    stats: LoadStats,
}

/// Whether a fill went through, must wait for events to be read, or found nothing to do.
enum Placed {
    Done,
    Again,
}

impl Server {
    /// Serves until stopped or done; on failure the tree is already killed.
    fn serve(&mut self) -> std::result::Result<End, LazyError> {
        let r = self.serve_inner();
        if r.is_err() {
            self.kill_tree();
        }
        r
    }

    fn serve_inner(&mut self) -> std::result::Result<End, LazyError> {
        loop {
            if self.commands()? {
                return Ok(End::Stopped);
            }
            let loading = self.released.is_some_and(|r| r.elapsed() >= self.prefetch_after);
            let work = loading && self.targets.iter().any(|t| !t.pending.is_empty());
            let timeout = if work {
                PollTimeout::ZERO
            } else if self.released.is_some() {
                PollTimeout::from(20u16)
            } else {
                PollTimeout::NONE
            };
            let readable = self.poll(timeout)?;

            for t in readable {
                self.events(t)?;
            }
            for (t, addr) in std::mem::take(&mut self.retry) {
                self.fault(t, addr)?;
            }
            if self.released.is_none() {
                continue;
            }
            // Damage found by the check ends the restore at once, loaded or not.
            let checked = self.checked()?;
            if work {
                self.prefetch()?;
            } else if loading && checked {
                return Ok(End::Done(self.finish()));
            }
        }
    }

    /// Takes the main thread's commands; true on `Stop`.
    fn commands(&mut self) -> std::result::Result<bool, LazyError> {
        while self.commands_open {
            let cmd = match self.rx.try_recv() {
                Ok(c) => c,
                Err(mpsc::TryRecvError::Empty) => break,
                // Before the release, the restore was abandoned; after it (a detached
                // server), nobody has more to say.
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.commands_open = false;
                    return Ok(self.released.is_none());
                }
            };
            match cmd {
                Cmd::Target { pid, uffd } => {
                    self.by_pid.insert(pid, self.targets.len());
                    self.targets.push(Target {
                        label: format!("pid {pid}"),
                        uffd,
                        pending: Pending::new(),
                        not_inherited: Vec::new(),
                    });
                }
                Cmd::Pages { pid, runs, not_inherited } => {
                    let t = &mut self.targets[self.by_pid[&pid]];
                    t.pending.extend(runs);
                    t.not_inherited.extend(not_inherited);
                }
                Cmd::Load { pid, ranges } => {
                    let t = self.by_pid[&pid];
                    for (start, end) in ranges {
                        self.load(t, start, end)?;
                    }
                }
                Cmd::Stop => return Ok(true),
            }
        }
        Ok(false)
    }

    fn release(&mut self) {
        self.released = Some(Instant::now());
        let (reader, names) = (self.reader.clone(), self.page_names.clone());
        let fetch = self.pages.fetch.clone();
        self.check = Some(std::thread::spawn(move || {
            // Files still being copied in are checked once whole.
            if let Some(fetch) = &fetch {
                for name in &names {
                    fetch.whole(name).map_err(|source| LazyError::Unreadable {
                        file: name.clone(),
                        offset: 0,
                        label: "its check".into(),
                        source,
                    })?;
                }
            }
            reader
                .verify_files(|f| names.contains(&f.name), |_| {})
                .map_err(|source| LazyError::Damaged { source })
        }));
    }

    /// Waits for events; returns the targets with something to read. A signal ends the
    /// restore.
    fn poll(&mut self, timeout: PollTimeout) -> std::result::Result<Vec<usize>, LazyError> {
        let mut fds = vec![
            PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
        ];
        fds.extend(self.targets.iter().map(|t| PollFd::new(t.uffd.as_fd(), PollFlags::POLLIN)));
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(Vec::new()),
            Err(e) => return Err(LazyError::Server { what: "poll", source: e.into() }),
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        let woken = ready(&fds[0]);
        let signalled = ready(&fds[1]);
        let readable: Vec<usize> =
            fds[2..].iter().enumerate().filter(|(_, f)| ready(f)).map(|(i, _)| i).collect();
        drop(fds);
        if woken {
            let mut b = [0u8; 64];
            let _ = nix::unistd::read(self.wake.as_raw_fd(), &mut b);
        }
        if signalled {
            if let Ok(Some(s)) = self.signals.read_signal() {
                let signal = Signal::try_from(s.ssi_signo as i32)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| format!("signal {}", s.ssi_signo));
                return Err(LazyError::Interrupted { signal });
            }
        }
        Ok(readable)
    }

    /// Reads and handles what target `t`'s userfaultfd reports.
    fn events(&mut self, t: usize) -> std::result::Result<(), LazyError> {
        let mut evs = Vec::new();
        loop {
            evs.clear();
            match uffd::read_events(self.targets[t].uffd.as_fd(), &mut evs) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(source) => {
                    return Err(LazyError::Events { label: self.targets[t].label.clone(), source })
                }
            }
            for ev in evs.drain(..) {
                match ev {
                    uffd::Event::PageFault { addr } => {
                        self.stats.faults += 1;
                        self.fault(t, addr)?;
                    }
                    uffd::Event::Fork { uffd } => self.forked(t, uffd),
                    uffd::Event::Remap { from, to, len } => {
                        let target = &mut self.targets[t];
                        for (a, run) in cut(&mut target.pending, from, from + len) {
                            target.pending.insert(a - from + to, run);
                        }
                        for r in &mut target.not_inherited {
                            if r.0 >= from && r.1 <= from + len {
                                *r = (r.0 - from + to, r.1 - from + to);
                            }
                        }
                    }
                    // The range now reads as zero, or is gone: its stored data must never
                    // land there.
                    uffd::Event::Remove { start, end } | uffd::Event::Unmap { start, end } => {
                        cut(&mut self.targets[t].pending, start, end);
                    }
                }
            }
        }
    }

    /// A child forked by target `t`: its pages are those `t` still lacked, except in
    /// mappings a child gets empty or not at all.
    fn forked(&mut self, t: usize, uffd: OwnedFd) {
        let parent = &self.targets[t];
        let mut pending = parent.pending.clone();
        for &(s, e) in &parent.not_inherited {
            cut(&mut pending, s, e);
        }
        let label = format!("a child of {}", parent.label.trim_start_matches("a child of "));
        tracing::debug!("{}: forked; the child has {} runs to load", parent.label, pending.len());
        let not_inherited = parent.not_inherited.clone();
        self.targets.push(Target { label, uffd, pending, not_inherited });
        self.stats.processes += 1;
    }

    /// Answers a fault at `addr` in target `t`: its data and that of the next few pages,
    /// or a zero page.
    fn fault(&mut self, t: usize, addr: u64) -> std::result::Result<(), LazyError> {
        let page = addr & !(PAGE - 1);
        match find(&self.targets[t].pending, page) {
            Some((start, run)) => {
                let skip = (page - start) / PAGE;
                let n = (run.pages - skip).min(FAULT_PAGES);
                if let Placed::Again =
                    self.place(t, page, run.owner, run.offset + skip * PAGE, n)?
                {
                    self.retry.push((t, addr));
                }
            }
            None => {
                let target = &self.targets[t];
                let z = uffd::zeropage(target.uffd.as_fd(), page, PAGE);
                match z.error.as_ref().and_then(|e| e.raw_os_error()) {
                    None => {}
                    Some(libc::EAGAIN) => self.retry.push((t, addr)),
                    // Already there (a copy raced the fault): make sure its waiter runs.
                    Some(libc::EEXIST) => {
                        let _ = uffd::wake(target.uffd.as_fd(), page, PAGE);
                    }
                    // Unmapped meanwhile, or the process is gone.
                    Some(libc::ENOENT | libc::EFAULT | libc::ESRCH) => {}
                    Some(_) => {
                        return Err(LazyError::Fill {
                            label: target.label.clone(),
                            call: "UFFDIO_ZEROPAGE",
                            addr: page,
                            source: z.error.unwrap(),
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// Copies `n` pages of stored data to `addr` in target `t` and forgets them.
    fn place(
        &mut self,
        t: usize,
        addr: u64,
        owner: i32,
        offset: u64,
        n: u64,
    ) -> std::result::Result<Placed, LazyError> {
        let len = (n * PAGE) as usize;
        self.buf.resize(len, 0);
        match self.pages.read(owner, offset, &mut self.buf[..len]) {
            Ok(()) => {}
            Err(ImageError::Read { source, .. }) => {
                return Err(LazyError::Unreadable {
                    file: self.pages.name(owner),
                    offset,
                    label: self.targets[t].label.clone(),
                    source,
                })
            }
            // Damaged or tampered page data: the error names the file and the place.
            Err(source) => return Err(LazyError::Damaged { source }),
        }
        let target = &mut self.targets[t];
        let c = uffd::copy(target.uffd.as_fd(), addr, &self.buf[..len]);
        self.stats.bytes += c.done;
        let at = addr + c.done;
        cut(&mut target.pending, addr, at);
        let Some(e) = c.error else { return Ok(Placed::Done) };
        match e.raw_os_error() {
            // An event is unread: the address may be stale.
            Some(libc::EAGAIN) => Ok(Placed::Again),
            // The page is there already (inherited over fork, or a copy raced): keep it,
            // wake whoever waits for it.
            Some(libc::EEXIST) => {
                cut(&mut target.pending, at, at + PAGE);
                let _ = uffd::wake(target.uffd.as_fd(), at, PAGE);
                Ok(Placed::Done)
            }
            // No longer registered there (the unmap event comes next), or the process
            // ended: nothing of this range is wanted any more.
            Some(libc::ENOENT | libc::EFAULT) => {
                cut(&mut target.pending, at, addr + n * PAGE);
                Ok(Placed::Done)
            }
            Some(libc::ESRCH) => {
                tracing::debug!("{} ended before all its pages were loaded", target.label);
                target.pending.clear();
                Ok(Placed::Done)
            }
            _ => Err(LazyError::Fill {
                label: target.label.clone(),
                call: "UFFDIO_COPY",
                addr: at,
                source: e,
            }),
        }
    }

    /// Copies what is still to load in `start..end` of target `t`.
    fn load(&mut self, t: usize, start: u64, end: u64) -> std::result::Result<(), LazyError> {
        let runs = cut(&mut self.targets[t].pending.clone(), start, end);
        for (addr, run) in runs {
            // No event can be pending: the process has not run since it was registered.
            self.place(t, addr, run.owner, run.offset, run.pages)?;
        }
        Ok(())
    }

    /// Copies the next chunk nobody asked for, lowest address first.
    fn prefetch(&mut self) -> std::result::Result<(), LazyError> {
        let Some(t) = self.targets.iter().position(|t| !t.pending.is_empty()) else {
            return Ok(());
        };
        let (&start, run) = self.targets[t].pending.first_key_value().expect("not empty");
        let (owner, offset, n) = (run.owner, run.offset, run.pages.min(PREFETCH_PAGES));
        // Again: the event that caused it is read before the next step.
        self.place(t, start, owner, offset, n).map(drop)
    }

    /// Whether the page files are known to match the manifest; an error if one does not.
    fn checked(&mut self) -> std::result::Result<bool, LazyError> {
        if self.check.as_ref().is_some_and(|h| h.is_finished()) {
            match self.check.take().expect("checked above").join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(LazyError::Server {
                        what: "check the page files",
                        source: io::Error::other("the checking thread panicked"),
                    })
                }
            }
        }
        Ok(self.check.is_none())
    }

    /// Every page is in and the page files are good: let the processes go.
    fn finish(&mut self) -> LoadStats {
        // Closing the userfaultfds unregisters every range; what is still absent is
        // zero in the image too, and the kernel fills it as for any anonymous memory.
        self.targets.clear();
        self.by_pid.clear();
        let mut stats = self.stats.clone();
        stats.took = self.released.map(|r| r.elapsed()).unwrap_or_default();
        stats
    }

    /// Kills the restored processes and every descendant, parents first so that none
    /// forks meanwhile, and stops serving them.
    fn kill_tree(&mut self) {
        let mut killed: HashSet<i32> = HashSet::new();
        let mut next: Vec<i32> = self.tree.clone();
        while !next.is_empty() {
            for &pid in &next {
                let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                killed.insert(pid);
            }
            next = descendants(&killed);
        }
        self.targets.clear();
        self.by_pid.clear();
    }
}

/// Processes whose parent is in `of` and which are not in it themselves.
fn descendants(of: &HashSet<i32>) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| !of.contains(pid))
        .filter(|&pid| torpor_sys::proc::status(pid).is_ok_and(|s| of.contains(&s.ppid)))
        .collect()
}

/// The restore's side of a lazy restore: makes each process's userfaultfd, registers its
/// lazy mappings and hands their page runs to the server.
pub(crate) struct Lazy {
    tx: mpsc::Sender<Cmd>,
    wake: OwnedFd,
    /// torpor's copy of each process's userfaultfd, for registering; by pid as torpor
    /// sees it.
    uffds: HashMap<i32, OwnedFd>,
    /// Each process's threads' stack pointers, by pid as the image names it.
    stack_pointers: HashMap<i32, Vec<u64>>,
    thread: Option<JoinHandle<(Server, std::result::Result<End, LazyError>)>>,
}

impl Lazy {
    /// Opens the page files and starts the server, which answers faults from now on.
    pub fn start(
        reader: &ImageReader,
        tree: &model::Tree,
        prefetch_after: Duration,
        fetch: Option<Arc<dyn Fetch>>,
    ) -> Result<Self> {
        let prepare = |what: &str| {
            let what = what.to_string();
            move |source| RestoreError::Prepare { what, source }
        };
        let pages = PageFiles::open(reader, tree, fetch)?;
        let (wake_rd, wake_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| prepare("the page server's pipe")(e.into()))?;
        nix::fcntl::fcntl(
            wake_rd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| prepare("the page server's pipe")(e.into()))?;
        // The signals that would end torpor end the restored tree instead, cleanly: the
        // caller holds them blocked while pages are served (see `PageServer`).
        let mut set = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT] {
            set.add(s);
        }
        let signals = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| prepare("a signalfd for the page server")(e.into()))?;
        let (tx, rx) = mpsc::channel();
        let mut server = Server {
            pages,
            reader: reader.clone(),
            page_names: tree.processes.iter().map(|p| p.pages_file.clone()).collect(),
            tree: Vec::new(),
            by_pid: HashMap::new(),
            targets: Vec::new(),
            retry: Vec::new(),
            released: None,
            prefetch_after,
            check: None,
            rx,
            commands_open: true,
            wake: wake_rd,
            signals,
            buf: Vec::new(),
            stats: LoadStats { processes: tree.processes.len(), ..Default::default() },
        };
        let thread = std::thread::Builder::new()
            .name("page-server".into())
            .spawn(move || {
                let r = server.serve();
                (server, r)
            })
            .map_err(prepare("the page server thread"))?;
        let stack_pointers = tree
            .processes
            .iter()
            .map(|p| (p.pid, p.threads.iter().map(|t| t.regs.rsp).collect()))
            .collect();
        Ok(Self { tx, wake: wake_wr, uffds: HashMap::new(), stack_pointers, thread: Some(thread) })
    }

    fn send(&self, cmd: Cmd) {
        // A server that has ended reports why when it is joined.
        let _ = self.tx.send(cmd);
        let _ = nix::unistd::write(&self.wake, &[1]);
    }

    /// Registers mapping `v`, just created empty in `space`, if it is restored lazily;
    /// returns whether it is (then its pages must not be filled now).
    pub fn register(&mut self, space: &Space, v: &model::Vma) -> Result<bool> {
        if !is_lazy(v) {
            return Ok(false);
        }
        let pid = space.pid();
        let step = |what: &str| {
            let step = what.to_string();
            move |source| RestoreError::Step { pid, step, source }
        };
        if !self.uffds.contains_key(&pid) {
            let uffd = make_uffd(space)?;
            let mine = uffd.try_clone().map_err(|source| {
                step("keep its userfaultfd")(torpor_sys::Error::Syscall { call: "dup", source })
            })?;
            self.send(Cmd::Target { pid, uffd });
            self.uffds.insert(pid, mine);
        }
        let runs: Vec<(u64, Run)> = v
            .pages
            .iter()
            .filter_map(|r| {
                let offset = r.offset?;
                let owner = r.from_pid.unwrap_or(space.inner());
                Some((r.addr, Run { pages: r.pages, owner, offset }))
            })
            .collect();
        let not_inherited =
            v.advice.iter().any(|a| a == "dc" || a == "wf").then_some((v.start, v.end));
        // The server knows the data before the first fault can ask for it.
        self.send(Cmd::Pages { pid, runs, not_inherited });
        uffd::register_missing(self.uffds[&pid].as_fd(), v.start, v.len())
            .map_err(step(&format!("register {:#x}-{:#x} for lazy loading", v.start, v.end)))?;

        // What the processes will touch first comes in now, without faults.
        let sps = self.stack_pointers.get(&space.inner()).map(Vec::as_slice).unwrap_or(&[]);
        let ranges: Vec<(u64, u64)> = sps
            .iter()
            .filter(|&&sp| v.start <= sp && sp < v.end)
            .map(|&sp| {
                let page = sp & !(PAGE - 1);
                let start = page.saturating_sub(HOT_BELOW_SP).max(v.start);
                (start, (page + HOT_ABOVE_SP).min(v.end))
            })
            .collect();
        if !ranges.is_empty() {
            self.send(Cmd::Load { pid, ranges });
        }
        Ok(true)
    }

    /// The tree is released: serve on, loading everything. `tree` lists its processes
    /// as torpor sees them, to kill should loading fail.
    pub fn into_server(mut self, tree: Vec<i32>) -> Result<PageServer> {
        self.uffds.clear();
        let (mut server, ended) = self.stop();
        if let Err(e) = ended {
            return Err(RestoreError::Lazy(e));
        }
        server.tree = tree;
        Ok(PageServer { server: Some(server), thread: None })
    }

    /// Stops the server thread and takes its state back.
    fn stop(&mut self) -> (Server, std::result::Result<End, LazyError>) {
        self.send(Cmd::Stop);
        let thread = self.thread.take().expect("stopped once");
        thread.join().expect("the page server thread panicked")
    }

    /// The restore failed: stop serving (closing the userfaultfds), and say whether the
    /// server failed first (then its error is the cause).
    pub fn abandon(mut self) -> Option<LazyError> {
        self.uffds.clear();
        self.stop().1.err()
    }
}

impl Drop for Lazy {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop();
        }
    }
}

/// Creates a userfaultfd inside the process, takes it into torpor and closes it there.
fn make_uffd(space: &Space) -> Result<OwnedFd> {
    let pid = space.pid();
    let step = |what: &str| {
        let step = what.to_string();
        move |source| RestoreError::Step { pid, step, source }
    };
    // Inside the process, so it serves that address space. Not user-mode-only: the
    // kernel's own accesses (a read() into a buffer not loaded yet) must wait for the
    // page too, not fail.
    let fd = space.call(
        "create a userfaultfd",
        "userfaultfd",
        libc::SYS_userfaultfd,
        args!(libc::O_CLOEXEC | libc::O_NONBLOCK),
    )?;
    let taken = torpor_sys::sock::take_fd(pid, fd as i32).map_err(step("take its userfaultfd"));
    space.call("close its userfaultfd", "close", libc::SYS_close, args!(fd))?;
    let uffd = taken?;
    let features = uffd::FEATURE_EVENT_FORK
        | uffd::FEATURE_EVENT_REMAP
        | uffd::FEATURE_EVENT_REMOVE
        | uffd::FEATURE_EVENT_UNMAP;
    uffd::api(uffd.as_fd(), features).map_err(step("enable its userfaultfd"))?;
    Ok(uffd)
}

/// The page server of a released tree. Dropping it before [`PageServer::finish`] or
/// [`PageServer::detach`] kills the tree, whose memory would otherwise stay incomplete.
///
/// SIGINT, SIGTERM, SIGHUP and SIGQUIT must stay blocked in every thread of torpor while
/// it serves: the server takes them from a signalfd and kills the tree before it ends.
pub struct PageServer {
    server: Option<Server>,
    thread: Option<JoinHandle<(Server, std::result::Result<End, LazyError>)>>,
}

impl std::fmt::Debug for PageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageServer")
    }
}

impl PageServer {
    /// Loads every page in a thread of this process; [`PageServer::finish`] waits for it.
    pub fn start(&mut self) -> io::Result<()> {
        let mut server = self.server.take().expect("started once");
        server.release();
        self.thread =
            Some(std::thread::Builder::new().name("page-server".into()).spawn(move || {
                let r = server.serve();
                (server, r)
            })?);
        Ok(())
    }

    /// Waits until every page is loaded and checked (or loading failed and the tree was
    /// killed).
    pub fn finish(mut self) -> std::result::Result<LoadStats, LazyError> {
        let (_server, ended) =
            self.thread.take().expect("started").join().map_err(|_| LazyError::Server {
                what: "serve pages",
                source: io::Error::other("the page server thread panicked"),
            })?;
        match ended? {
            End::Done(stats) => Ok(stats),
            End::Stopped => unreachable!("nothing stops a released server"),
        }
    }

    /// Goes on in a child process of its own (in a new session), which loads every page,
    /// calls `report` with the outcome and exits with the code it returns. Returns the
    /// child's pid. Call it before [`PageServer::start`], with no other thread running.
    pub fn detach(
        mut self,
        report: impl FnOnce(std::result::Result<LoadStats, LazyError>) -> i32,
    ) -> io::Result<i32> {
        let child = torpor_sys::fork_single_threaded()?;
        if child > 0 {
            // The child serves; this copy of the state must not kill the tree on drop.
            drop(self.server.take());
            return Ok(child);
        }
        let _ = nix::unistd::setsid();
        let mut server = self.server.take().expect("not started");
        server.release();
        let code = report(match server.serve() {
            Ok(End::Done(stats)) => Ok(stats),
            Ok(End::Stopped) => unreachable!("nothing stops a released server"),
            Err(e) => Err(e),
        });
        std::process::exit(code);
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.kill_tree();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pages: u64, offset: u64) -> Run {
        Run { pages, owner: 1, offset }
    }

    #[test]
    fn cut_splits_runs_at_the_edges() {
        let mut p = Pending::new();
        p.insert(0x10000, run(4, 0));
        p.insert(0x20000, run(2, 0x4000));
        let out = cut(&mut p, 0x11000, 0x21000);
        let got: Vec<(u64, u64, u64)> = out.iter().map(|(a, r)| (*a, r.pages, r.offset)).collect();
        assert_eq!(got, vec![(0x11000, 3, 0x1000), (0x20000, 1, 0x4000)]);
        let left: Vec<(u64, u64, u64)> = p.iter().map(|(a, r)| (*a, r.pages, r.offset)).collect();
        assert_eq!(left, vec![(0x10000, 1, 0), (0x21000, 1, 0x5000)]);
    }

    #[test]
    fn find_only_inside_a_run() {
        let mut p = Pending::new();
        p.insert(0x10000, run(2, 0));
        assert!(find(&p, 0x11000).is_some());
        assert!(find(&p, 0x12000).is_none());
        assert!(find(&p, 0xf000).is_none());
    }
}
