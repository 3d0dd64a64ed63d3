//! Pre-copy: copy a process's memory while it runs, so that it is frozen only while the
//! pages it wrote during the last round are copied.
//!
//! This kernel line has no soft-dirty bits to track writes with, so torpor uses what
//! replaced them: a userfaultfd in asynchronous write-protect mode (`UFFD_FEATURE_WP_ASYNC`)
//! and the `PAGEMAP_SCAN` ioctl (see `torpor_sys::uffd`).
//!
//! 1. The tree is stopped for a moment. Each process creates a userfaultfd through a
//!    system call torpor runs inside it; torpor takes a copy (`pidfd_getfd`) and closes the
//!    process's own, so its descriptor table ends as it was. The tree runs on.
//! 2. torpor registers each private mapping whose pages the image keeps in write-protect
//!    mode. Round 1 protects every page (`PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING`) and
//!    then copies them all; the process runs on meanwhile and each write just unprotects
//!    the page it touches, in the kernel, without waiting for anyone.
//! 3. Each further round lists the pages written since the round before and protects them
//!    again in the same walk, then copies them, appending to the page file. Protection
//!    always comes before the copy, so a write racing with the copy is seen next round.
//! 4. Once a round finds few pages written (or after a number of rounds or a time), the
//!    dump freezes the tree as usual. A last scan marks the pages written since the last
//!    copy; every page the final page map says the process has is then taken from its
//!    latest copy if it has one and was not written since, or else copied now.
//!
//! What is not tracked is copied once frozen, as without pre-copy: mappings created or
//! moved while the process ran (they carry no registration: `uw` is missing from their
//! `VmFlags`), shared memory (others may write it), mappings the kernel refuses to
//! register, and processes that have a userfaultfd of their own or forked meanwhile.
//!
//! Nothing of torpor stays in a process: the userfaultfd lives in torpor only, and when
//! torpor closes it (or dies) the kernel removes the registration and every protection.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use torpor_image::model::PageRun;
use torpor_image::{ImageFile, ImageWriter};
use torpor_sys::uffd::{self, PageRegion, ScanRequest};
use torpor_sys::{args, mem, proc, sock, PAGE};

use crate::memory::{self, Policy, PM_EXCLUSIVE, PM_PRESENT};
use crate::{DumpError, Frozen, FrozenTree, Result, Stats};

/// Rounds while the process runs, at most (the first copies everything).
const MAX_ROUNDS: usize = 10;
/// Time spent in rounds after which the dump freezes the process whatever is left.
const MAX_TIME: Duration = Duration::from_secs(30);
/// A round that finds at most this many pages written is the last: the pages written
/// during it, copied frozen, will be fewer still.
const SMALL_ENOUGH: u64 = 512;
/// Regions one `PAGEMAP_SCAN` call may report.
const REGIONS: usize = 4096;
/// Pages per table chunk of copy locations.
const CHUNK: usize = 512;

/// Copy locations: no current copy, or an all-zero page; any other value is an offset in
/// the page file.
const NO_COPY: u64 = u64::MAX;
const ZERO: u64 = u64::MAX - 1;

/// The name of a process's page file in the image.
pub(crate) fn pages_file(pid: i32) -> String {
    format!("pages-{pid}.img")
}

/// What the dump does with a mapping's pages after pre-copy: pages whose current copy
/// is used, and runs of pages whose page map entries it must read.
pub(crate) type Plan = (Vec<(u64, Copy)>, Vec<(u64, u64)>);

/// The latest copy of a page, still current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Copy {
    Zero,
    Data(u64),
}

/// What one round did, for the summary.
#[derive(Debug, Clone, Default)]
pub struct Round {
    /// Pages found written since the round before (all of them in round 1).
    pub pages_written: u64,
    /// Bytes appended to the page files.
    pub bytes: u64,
    pub took: Duration,
}

/// What pre-copy did, for the summary.
#[derive(Debug, Clone, Default)]
pub struct PreCopyReport {
    /// Processes whose memory was tracked.
    pub processes: usize,
    /// How long the tree was stopped to set tracking up.
    pub setup_frozen: Duration,
    pub rounds: Vec<Round>,
}

/// A registered mapping, and where the latest copy of each of its pages is.
struct Range {
    start: u64,
    end: u64,
    policy: Policy,
    /// Per 2 MiB of the range, allocated on the first copy of a page in it.
    chunks: Vec<Option<Box<[u64; CHUNK]>>>,
}

impl Range {
    fn new(start: u64, end: u64, policy: Policy) -> Self {
        let pages = ((end - start) / PAGE) as usize;
        Self { start, end, policy, chunks: vec![None; pages.div_ceil(CHUNK)] }
    }

    fn get(&self, addr: u64) -> u64 {
        let i = ((addr - self.start) / PAGE) as usize;
        self.chunks[i / CHUNK].as_ref().map_or(NO_COPY, |c| c[i % CHUNK])
    }

    fn set(&mut self, addr: u64, v: u64) {
        let i = ((addr - self.start) / PAGE) as usize;
        match &mut self.chunks[i / CHUNK] {
            Some(c) => c[i % CHUNK] = v,
            slot @ None if v != NO_COPY => {
                let mut c = Box::new([NO_COPY; CHUNK]);
                c[i % CHUNK] = v;
                *slot = Some(c);
            }
            None => {}
        }
    }
}

/// Index of the range holding `addr` among `ranges` (sorted, disjoint).
fn find(ranges: &[Range], addr: u64) -> Option<usize> {
    let i = ranges.partition_point(|r| r.end <= addr);
    (i < ranges.len() && ranges[i].start <= addr).then_some(i)
}

/// One process whose writes are tracked.
pub(crate) struct Tracked {
    pid: i32,
    /// torpor's only copy of the process's userfaultfd: closing it ends the tracking.
    _uffd: OwnedFd,
    pagemap: File,
    /// The page file, appended to round after round until the frozen dump takes it.
    out: Option<ImageFile>,
    /// Where the page file is, to flush it to disk between rounds.
    path: PathBuf,
    /// Whether the image must reach the disk (not `--no-sync`).
    durable: bool,
    ranges: Vec<Range>,
    /// After the last scan: the runs of pages present or swapped out (or page-table
    /// markers, which look swapped), with their `PAGE_IS_*` categories, in address order.
    resident: Vec<PageRegion>,
}

/// The copies of one final mapping's pages.
pub(crate) struct VmaCopies<'a> {
    ranges: &'a [Range],
    resident: &'a [PageRegion],
}

impl VmaCopies<'_> {
    /// The latest copy of the page at `addr`, if it has one not written since.
    pub fn current(&self, addr: u64) -> Option<Copy> {
        let r = &self.ranges[find(self.ranges, addr)?];
        match r.get(addr) {
            NO_COPY => None,
            ZERO => Some(Copy::Zero),
            off => Some(Copy::Data(off)),
        }
    }

    /// Sorts the pages of `[start, end)` saved under `policy` into those whose current
    /// copy is used as it is, and runs of pages whose page map entries must be read
    /// (copied now, or only possibly saved: swapped ones may be page-table markers).
    /// Pages neither present nor swapped out are not saved, and need neither. Parts of
    /// the mapping that were never registered (it grew) are read whole.
    pub fn plan(&self, start: u64, end: u64, policy: Policy) -> Plan {
        let mut reused = Vec::new();
        let mut spans: Vec<(u64, u64)> = Vec::new();
        let mut at = start;
        for r in self.ranges {
            if r.start > at {
                spans.push((at, r.start.min(end)));
            }
            at = at.max(r.end);
        }
        if at < end {
            spans.push((at, end));
        }
        let mut read = |a: u64, b: u64| spans.push((a, b));
        let first = self.resident.partition_point(|g| g.end <= start);
        for g in self.resident[first..].iter().take_while(|g| g.start < end) {
            let (a, b) = (g.start.max(start), g.end.min(end));
            let present = g.categories & uffd::PAGE_IS_PRESENT != 0;
            // A page-cache page of a private file mapping is the file's own.
            let file = g.categories & uffd::PAGE_IS_FILE != 0 && policy == Policy::PrivateFile;
            if !present {
                read(a, b);
                continue;
            }
            if file {
                continue;
            }
            for p in (a..b).step_by(PAGE as usize) {
                match self.current(p) {
                    Some(c) => reused.push((p, c)),
                    None => read(p, p + PAGE),
                }
            }
        }
        spans.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
        for (a, b) in spans {
            match merged.last_mut() {
                Some(last) if last.1 >= a => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        (reused, merged)
    }
}

impl Tracked {
    /// The page file, for the frozen dump to finish.
    pub fn take_file(&mut self) -> Option<ImageFile> {
        self.out.take()
    }

    /// The copies of final mapping `m`, if it is still the registered one (a mapping
    /// created, or moved, while the process ran has no `uw` flag).
    pub fn copies_for(&self, m: &proc::MapEntry) -> Option<VmaCopies<'_>> {
        if !m.vm_flags.iter().any(|f| f == "uw") {
            return None;
        }
        let first = self.ranges.partition_point(|r| r.end <= m.start);
        let last = self.ranges.partition_point(|r| r.start < m.end);
        let resident = &self.resident;
        (first < last).then(|| VmaCopies { ranges: &self.ranges[first..last], resident })
    }

    /// Sets tracking up in a running process whose userfaultfd torpor holds. `None` when
    /// nothing of it can be tracked (its pages are then copied once frozen).
    fn start(pid: i32, uffd: OwnedFd, writer: &mut ImageWriter) -> Result<Option<Self>> {
        let maps = match proc::smaps(pid) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("pid {pid}: no pre-copy, cannot read its memory map: {e}");
                return Ok(None);
            }
        };
        let pagemap = match File::open(format!("/proc/{pid}/pagemap")) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("pid {pid}: no pre-copy, cannot open its page map: {e}");
                return Ok(None);
            }
        };
        let mut ranges = Vec::new();
        for m in &maps {
            let Some(policy) = track_policy(m) else { continue };
            match uffd::register_wp(uffd.as_fd(), m.start, m.end - m.start) {
                Ok(()) => ranges.push(Range::new(m.start, m.end, policy)),
                Err(e) => tracing::debug!(
                    "pid {pid}: mapping {:#x}-{:#x} ({}) not tracked, copied once frozen: {e}",
                    m.start,
                    m.end,
                    m.name
                ),
            }
        }
        if ranges.is_empty() {
            return Ok(None);
        }
        let out = writer.create_file(&pages_file(pid))?;
        let path = writer.dir().join(out.name());
        Ok(Some(Self {
            pid,
            _uffd: uffd,
            pagemap,
            out: Some(out),
            path,
            durable: writer.is_durable(),
            ranges,
            resident: Vec::new(),
        }))
    }

    /// Runs `PAGEMAP_SCAN` over every tracked range with `flags`, for pages that have
    /// every category of `required`, reporting those of `report`. Mappings that lost
    /// their registration (unmapped and mapped again meanwhile) are left out by requiring
    /// `PAGE_IS_WPALLOWED`, rather than aborting the scan as `PM_SCAN_CHECK_WPASYNC`
    /// would: they are copied once frozen.
    /// `report` may depend on the range's policy.
    fn scan(
        &self,
        flags: u64,
        required: u64,
        report: impl Fn(Policy) -> u64,
    ) -> std::io::Result<Vec<PageRegion>> {
        let mut regions = Vec::new();
        for r in &self.ranges {
            let report = report(r.policy);
            let mut at = r.start;
            while at < r.end {
                let req = ScanRequest {
                    start: at,
                    end: r.end,
                    flags,
                    required: required | uffd::PAGE_IS_WPALLOWED,
                    any_of: 0,
                    report,
                };
                let from = regions.len();
                let walk_end = uffd::pagemap_scan(&self.pagemap, &req, &mut regions, REGIONS)?;
                // A call that ran out of room may report again, in the next call, part of
                // the run it ended with: keep each page once.
                let mut kept_end = regions[..from].last().map_or(0, |g| g.end);
                let mut i = from;
                while i < regions.len() {
                    regions[i].start = regions[i].start.max(kept_end);
                    if regions[i].start >= regions[i].end {
                        regions.remove(i);
                        continue;
                    }
                    kept_end = regions[i].end;
                    i += 1;
                }
                if walk_end <= at {
                    break;
                }
                at = walk_end;
            }
        }
        Ok(regions)
    }

    /// One round while the process runs: protects again and copies the pages written
    /// since the round before. Returns false when the process cannot be tracked any more
    /// (it exited or its page map went away); its pages are then copied once frozen.
    fn round(&mut self, buf: &mut [u8], round: &mut Round) -> Result<bool> {
        // The pages written since the round before, protected again in the same walk.
        let scan =
            self.scan(uffd::PM_SCAN_WP_MATCHING, uffd::PAGE_IS_WRITTEN, |_| uffd::PAGE_IS_WRITTEN);
        let written: Vec<(u64, u64)> = match scan {
            Ok(w) => w.iter().map(|g| (g.start, g.end)).collect(),
            Err(e) => {
                tracing::debug!("pid {}: pre-copy stops, scanning its pages failed: {e}", self.pid);
                return Ok(false);
            }
        };
        let before = self.out.as_ref().map_or(0, |o| o.len());
        let mut batch = Batch::default();
        for &(start, end) in &written {
            round.pages_written += (end - start) / PAGE;
            let mut entries = vec![0u8; ((end - start) / PAGE) as usize * 8];
            let read = mem::pread_full(&self.pagemap, &mut entries, start / PAGE * 8);
            let n = match read {
                Ok(n) => n / 8,
                Err(e) => {
                    tracing::debug!("pid {}: pre-copy stops, page map: {e}", self.pid);
                    return Ok(false);
                }
            };
            for i in 0..n {
                let a = start + i as u64 * PAGE;
                let e = u64::from_ne_bytes(entries[i * 8..i * 8 + 8].try_into().unwrap());
                let Some(ri) = find(&self.ranges, a) else { continue };
                if !memory::wanted(self.ranges[ri].policy, e) {
                    self.ranges[ri].set(a, NO_COPY);
                    continue;
                }
                batch.push(a, e & PM_PRESENT != 0 && e & PM_EXCLUSIVE == 0);
                if batch.pages.len() * PAGE as usize == buf.len() {
                    self.copy(&mut batch, buf)?;
                }
            }
            // Pages past what the page map returned are gone: no copy.
            for a in (start + n as u64 * PAGE..end).step_by(PAGE as usize) {
                if let Some(ri) = find(&self.ranges, a) {
                    self.ranges[ri].set(a, NO_COPY);
                }
            }
        }
        self.copy(&mut batch, buf)?;
        round.bytes += self.out.as_ref().map_or(0, |o| o.len()) - before;

        // Written to disk now, while the process runs, so that the dump's final fsync
        // has only the last pages to write.
        if let Some(out) = self.out.as_mut().filter(|_| self.durable) {
            out.sync_data().map_err(|source| DumpError::SaveFile {
                pid: self.pid,
                what: format!("{}", self.path.display()),
                source,
            })?;
        }
        Ok(true)
    }

    /// Reads the pages of `batch` and appends those not all zero to the page file,
    /// recording where each page's latest copy is.
    fn copy(&mut self, batch: &mut Batch, buf: &mut [u8]) -> Result<()> {
        if batch.pages.is_empty() {
            return Ok(());
        }
        if torpor_sys::termination_pending() {
            return Err(DumpError::Interrupted { pid: self.pid });
        }
        // Pages not mapped by this process alone are read without pinning, which would
        // break their copy-on-write sharing (as the frozen dump does).
        let mut at = 0usize;
        let mut failed = None;
        for (ranges, shared) in batch.groups() {
            let len: usize = ranges.iter().map(|r| r.1).sum();
            let dst = &mut buf[at..at + len];
            let r = if shared {
                mem::read_ranges_unpinned(self.pid, &ranges, dst)
            } else {
                mem::read_ranges(self.pid, &ranges, dst)
            };
            if let Err(e) = r {
                failed = Some(e);
                break;
            }
            at += len;
        }
        if let Some(e) = failed {
            // Unmapped while the process ran: whatever is there once frozen is copied then.
            tracing::debug!("pid {}: pre-copy could not read some pages: {e}", self.pid);
            for &(a, _) in &batch.pages {
                if let Some(ri) = find(&self.ranges, a) {
                    self.ranges[ri].set(a, NO_COPY);
                }
            }
            batch.pages.clear();
            return Ok(());
        }

        let out = self.out.as_mut().expect("page file open while tracking");
        let base = out.len();
        let mut kept = 0usize;
        for (n, &(a, _)) in batch.pages.iter().enumerate() {
            let page = n * PAGE as usize..(n + 1) * PAGE as usize;
            let v = if mem::is_zero(&buf[page.clone()]) {
                ZERO
            } else {
                if kept != page.start {
                    buf.copy_within(page, kept);
                }
                kept += PAGE as usize;
                base + kept as u64 - PAGE
            };
            if let Some(ri) = find(&self.ranges, a) {
                self.ranges[ri].set(a, v);
            }
        }
        batch.pages.clear();
        out.write_all(&buf[..kept])?;
        Ok(())
    }

    /// The last scan, frozen: pages written since their copy lose it, and the pages
    /// the process has are noted, so that the dump reads page map entries only for
    /// pages it must copy now.
    fn finish(&mut self) {
        // Whether a page is the file's is only asked where it matters: finding out means
        // looking at each page's descriptor.
        let report = |policy| {
            let file = if policy == Policy::PrivateFile { uffd::PAGE_IS_FILE } else { 0 };
            uffd::PAGE_IS_WRITTEN | uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_SWAPPED | file
        };
        match self.scan(0, 0, report) {
            Ok(regions) => {
                for g in regions {
                    if g.categories & uffd::PAGE_IS_WRITTEN != 0 {
                        for a in (g.start..g.end).step_by(PAGE as usize) {
                            if let Some(ri) = find(&self.ranges, a) {
                                self.ranges[ri].set(a, NO_COPY);
                            }
                        }
                    }
                    if g.categories & (uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_SWAPPED) != 0 {
                        self.resident.push(g);
                    }
                }
            }
            Err(e) => {
                tracing::debug!(
                    "pid {}: last scan failed, all its pages copied now: {e}",
                    self.pid
                );
                self.ranges.clear();
            }
        }
    }
}

/// Pages waiting to be read, in address order, and whether each is shared.
#[derive(Default)]
struct Batch {
    pages: Vec<(u64, bool)>,
}

impl Batch {
    fn push(&mut self, addr: u64, shared: bool) {
        self.pages.push((addr, shared));
    }

    /// Consecutive pages alike in sharing, as (address, length) ranges.
    fn groups(&self) -> Vec<(Vec<(u64, usize)>, bool)> {
        let mut out: Vec<(Vec<(u64, usize)>, bool)> = Vec::new();
        for &(a, shared) in &self.pages {
            match out.last_mut() {
                Some((ranges, sh)) if *sh == shared => match ranges.last_mut() {
                    Some((s, l)) if *s + *l as u64 == a => *l += PAGE as usize,
                    _ => ranges.push((a, PAGE as usize)),
                },
                _ => out.push((vec![(a, PAGE as usize)], shared)),
            }
        }
        out
    }
}

/// Whether mapping `m` is tracked, and how its pages are saved. Private mappings whose
/// pages the image keeps; shared memory is copied once frozen, since others may write it.
fn track_policy(m: &proc::MapEntry) -> Option<Policy> {
    // Hugetlb, raw page frames, I/O memory: left to the frozen dump and its checks.
    let special = ["ht", "pf", "io"];
    if m.shared || m.vm_flags.iter().any(|f| special.contains(&f.as_str())) {
        return None;
    }
    let n = m.name.as_str();
    if n.is_empty()
        || n == "[heap]"
        || n == "[stack]"
        || n.starts_with("[anon:")
        || n.starts_with("/dev/zero")
        || m.vm_flags.iter().any(|f| f == "gd")
    {
        return Some(Policy::Anon);
    }
    if n.starts_with('/') && !n.starts_with("/dev/") && !n.starts_with("/SYSV") {
        return Some(Policy::PrivateFile);
    }
    None
}

/// Makes a userfaultfd for process `f` (stopped) and takes it: created inside the
/// process, copied into torpor, closed in the process. `None` (logged) when the process
/// cannot be tracked; it is then dumped as without pre-copy.
fn open_uffd(f: &Frozen, journal: &torpor_sys::guard::Journal) -> Result<Option<OwnedFd>> {
    let pid = f.pid;
    if has_userfaultfd(pid) {
        tracing::debug!("pid {pid}: no pre-copy, it uses a userfaultfd of its own");
        return Ok(None);
    }
    let r = &f.leader().remote;
    // Should torpor die before the close below, the guard closes it.
    crate::guard::note(journal, crate::guard::Note::Uffd { pid });
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | uffd::USER_MODE_ONLY;
    let fd = match r.call("userfaultfd", libc::SYS_userfaultfd, args!(flags)) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::debug!("pid {pid}: no pre-copy: {e}");
            return Ok(None);
        }
    };
    let taken = sock::take_fd(pid, fd as i32);
    torpor_sys::test_point("dump:uffd-open", pid);
    // The process's descriptor table must end as it was, whatever happened.
    r.call("close", libc::SYS_close, args!(fd)).map_err(|source| DumpError::Collect {
        pid,
        what: format!("back its descriptor {fd} (a userfaultfd torpor made)"),
        source,
    })?;
    let uffd = match taken {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!("pid {pid}: no pre-copy, cannot take its userfaultfd: {e}");
            return Ok(None);
        }
    };
    // Not UFFD_FEATURE_WP_UNPOPULATED: it would fill every page table of a tracked
    // mapping with markers (allocating page tables for sparse ones), and a page never
    // populated is listed as written once a fault brings it in anyway.
    if let Err(e) = uffd::api(uffd.as_fd(), uffd::FEATURE_WP_ASYNC) {
        tracing::debug!("pid {pid}: no pre-copy, asynchronous write protection: {e}");
        return Ok(None);
    }
    Ok(Some(uffd))
}

/// Whether one of the process's descriptors is a userfaultfd.
fn has_userfaultfd(pid: i32) -> bool {
    proc::fds(pid).unwrap_or_default().iter().any(|fd| {
        proc::readlink(format!("/proc/{pid}/fd/{fd}")).is_ok_and(|l| l.contains("[userfaultfd]"))
    })
}

/// The tracked processes of a tree.
pub(crate) struct PreCopy {
    tracked: Vec<Tracked>,
    pub report: PreCopyReport,
}

impl PreCopy {
    /// Sets tracking up in every process of the tree under `root` and copies their
    /// memory in rounds while they run. On error, or on a termination signal, everything
    /// of torpor is gone from the processes when this returns (the userfaultfds are
    /// closed as the value drops).
    pub fn run(
        root: i32,
        writer: &mut ImageWriter,
        journal: &torpor_sys::guard::Journal,
    ) -> Result<Self> {
        let frozen = FrozenTree::freeze(root, journal)?;
        let t = Instant::now();
        let mut uffds = Vec::new();
        for f in &frozen.processes {
            match open_uffd(f, journal) {
                Ok(Some(u)) => uffds.push((f.pid, u)),
                Ok(None) => {}
                Err(e) => {
                    frozen.release();
                    crate::guard::note(journal, crate::guard::Note::Released);
                    return Err(e);
                }
            }
        }
        let setup_frozen = t.elapsed();
        frozen.release();
        crate::guard::note(journal, crate::guard::Note::Released);

        let mut pre = Self {
            tracked: Vec::new(),
            report: PreCopyReport { setup_frozen, ..Default::default() },
        };
        for (pid, u) in uffds {
            if let Some(t) = Tracked::start(pid, u, writer)? {
                pre.tracked.push(t);
            }
        }
        pre.report.processes = pre.tracked.len();
        pre.rounds(root)?;
        Ok(pre)
    }

    fn rounds(&mut self, root: i32) -> Result<()> {
        if self.tracked.is_empty() {
            return Ok(());
        }
        let mut buf = vec![0u8; memory::BATCH];
        let began = Instant::now();
        for n in 1..=MAX_ROUNDS {
            if torpor_sys::termination_pending() {
                return Err(DumpError::Interrupted { pid: root });
            }
            let t = Instant::now();
            let mut round = Round::default();
            let mut kept = Vec::with_capacity(self.tracked.len());
            for mut tr in std::mem::take(&mut self.tracked) {
                if tr.round(&mut buf, &mut round)? {
                    kept.push(tr);
                }
            }
            self.tracked = kept;
            round.took = t.elapsed();
            tracing::info!(
                "pre-copy round {n}: {} pages written since the round before, {} bytes stored, \
                 {:.1} ms",
                round.pages_written,
                round.bytes,
                round.took.as_secs_f64() * 1e3
            );
            let small = round.pages_written <= SMALL_ENOUGH;
            self.report.rounds.push(round);
            if small || began.elapsed() >= MAX_TIME || self.tracked.is_empty() {
                break;
            }
        }
        Ok(())
    }

    /// Once the tree is frozen: marks what was written since the last round, and drops
    /// (with their page files) processes that are no longer part of the tree.
    pub fn finish(&mut self, frozen: &FrozenTree, writer: &mut ImageWriter) {
        let (keep, gone): (Vec<Tracked>, Vec<Tracked>) = std::mem::take(&mut self.tracked)
            .into_iter()
            .partition(|t| frozen.processes.iter().any(|f| f.pid == t.pid));
        for mut t in gone {
            tracing::debug!("pid {} left the tree during pre-copy", t.pid);
            if let Some(out) = t.out.take() {
                writer.remove_file(out);
            }
        }
        self.tracked = keep;
        for t in &mut self.tracked {
            // A userfaultfd made meanwhile could own registrations that look like ours.
            if has_userfaultfd(t.pid) {
                tracing::debug!("pid {}: has a userfaultfd now, all pages copied now", t.pid);
                t.ranges.clear();
            }
            t.finish();
        }
    }

    /// The tracking of process `pid`, if any.
    pub fn get_mut(&mut self, pid: i32) -> Option<&mut Tracked> {
        self.tracked.iter_mut().find(|t| t.pid == pid)
    }
}

/// Adds to `runs` (a mapping's runs of pages copied frozen) the pages taken from their
/// pre-copies, keeping address order.
pub(crate) fn add_reused(
    runs: &mut Vec<PageRun>,
    reused: &[(u64, Copy)],
    policy: Policy,
    stats: &mut Stats,
) {
    if reused.is_empty() {
        return;
    }
    let mut more = Vec::new();
    for &(addr, c) in reused {
        match c {
            Copy::Data(off) => {
                memory::push_run(&mut more, addr, Some(off), None);
                stats.pages_stored += 1;
            }
            Copy::Zero => {
                stats.zero_pages += 1;
                // As when copied frozen: a zero page of a private file mapping is kept
                // so that the file does not show through; an anonymous one is absent.
                if policy == Policy::PrivateFile {
                    memory::push_run(&mut more, addr, None, None);
                }
            }
        }
    }
    let mut all: Vec<PageRun> = runs.drain(..).chain(more).collect();
    all.sort_by_key(|r| r.addr);
    for r in all {
        match runs.last_mut() {
            Some(last) if continues(last, &r) => last.pages += r.pages,
            _ => runs.push(r),
        }
    }
}

/// Whether run `r` carries on where `last` ends, in memory and in the page file.
fn continues(last: &PageRun, r: &PageRun) -> bool {
    last.addr + last.pages * PAGE == r.addr
        && last.from_pid == r.from_pid
        && match (last.offset, r.offset) {
            (Some(lo), Some(o)) => lo + last.pages * PAGE == o,
            (None, None) => true,
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(addr: u64, pages: u64, offset: Option<u64>) -> PageRun {
        PageRun { addr, pages, offset, from_pid: None, image: 0 }
    }

    #[test]
    fn reused_pages_merge_in_address_order() {
        let mut stats = Stats::default();
        let mut runs = vec![run(0x1000, 1, Some(0x9000))];
        let reused = [(0x2000, Copy::Data(0xa000)), (0x3000, Copy::Data(0)), (0x4000, Copy::Zero)];
        add_reused(&mut runs, &reused, Policy::Anon, &mut stats);
        assert_eq!(runs, vec![run(0x1000, 2, Some(0x9000)), run(0x3000, 1, Some(0))]);
        assert_eq!((stats.pages_stored, stats.zero_pages), (2, 1));
    }

    #[test]
    fn zero_pages_of_private_files_stay_as_runs() {
        let mut stats = Stats::default();
        let mut runs = vec![run(0x3000, 1, None)];
        add_reused(&mut runs, &[(0x2000, Copy::Zero)], Policy::PrivateFile, &mut stats);
        assert_eq!(runs, vec![run(0x2000, 2, None)]);
    }

    #[test]
    fn plan_reads_only_pages_without_a_current_copy() {
        let mut r = Range::new(0x10000, 0x20000, Policy::Anon);
        r.set(0x10000, 0x3000);
        r.set(0x16000, ZERO);
        let ranges = [r];
        let region = |start, end, categories| PageRegion { start, end, categories };
        let resident = [
            region(0x10000, 0x12000, uffd::PAGE_IS_PRESENT),
            region(0x14000, 0x15000, uffd::PAGE_IS_SWAPPED),
            region(0x16000, 0x17000, uffd::PAGE_IS_PRESENT),
        ];
        let copies = VmaCopies { ranges: &ranges, resident: &resident };
        // The mapping grew on both sides since it was registered.
        let (reused, spans) = copies.plan(0x8000, 0x28000, Policy::Anon);
        assert_eq!(reused, vec![(0x10000, Copy::Data(0x3000)), (0x16000, Copy::Zero)]);
        assert_eq!(
            spans,
            vec![(0x8000, 0x10000), (0x11000, 0x12000), (0x14000, 0x15000), (0x20000, 0x28000)]
        );
        // Page-cache pages of a private file mapping are the file's: neither.
        let resident = [region(0x10000, 0x12000, uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_FILE)];
        let copies = VmaCopies { ranges: &ranges, resident: &resident };
        assert_eq!(copies.plan(0x10000, 0x20000, Policy::PrivateFile), (vec![], vec![]));
    }

    #[test]
    fn copy_table_keeps_the_latest_copy() {
        let mut r = Range::new(0x10_0000, 0x10_0000 + 2000 * PAGE, Policy::Anon);
        let a = 0x10_0000 + 1500 * PAGE;
        assert_eq!(r.get(a), NO_COPY);
        r.set(a, 0x2000);
        r.set(a, 0x5000);
        assert_eq!(r.get(a), 0x5000);
        r.set(a, NO_COPY);
        assert_eq!(r.get(a), NO_COPY);
        let ranges = [r];
        assert_eq!(find(&ranges, 0x10_0000 - PAGE), None);
        assert_eq!(find(&ranges, a), Some(0));
        assert_eq!(find(&ranges, 0x10_0000 + 2000 * PAGE), None);
    }
}
