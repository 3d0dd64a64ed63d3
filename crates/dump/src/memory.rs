//! The memory map and the page contents of a frozen process.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;

use torpor_image::model::{self, PageRun, Vma, VmaKind};
use torpor_image::pages::{self, PageRef, PageWriter, ParentPages};
use torpor_image::ImageWriter;
use torpor_sys::uffd::{self, ScanRequest};
use torpor_sys::{mem, proc, PAGE};

use crate::collect::UnsupportedReason;
use crate::files::FileTable;
use crate::precopy::{self, Copy, Tracked, VmaCopies};
use crate::{DumpError, Frozen, Result, Stats};

/// pagemap entry bits, see Documentation/admin-guide/mm/pagemap.rst.
pub(crate) const PM_PRESENT: u64 = 1 << 63;
pub(crate) const PM_SWAPPED: u64 = 1 << 62;
pub(crate) const PM_FILE_OR_SHARED: u64 = 1 << 61;

/// Bytes of memory read from the process per batch.
pub(crate) const BATCH: usize = 8 << 20;
/// pagemap entries read per call.
const PAGEMAP_CHUNK: usize = 64 << 10;
/// Runs of populated pages one `PAGEMAP_SCAN` call may report.
const SCAN_REGIONS: usize = 4096;

/// VmFlags codes that restore re-applies (madvise, mlock, and `nr`: mapped with
/// MAP_NORESERVE).
const KEPT_ADVICE: &[&str] = &["dd", "hg", "nh", "dc", "wf", "lo", "mg", "rr", "sr", "nr"];

/// Pages already stored, so that memory shared between processes is stored once.
#[derive(Default)]
pub(crate) struct PageIndex {
    /// Page frames of private pages still shared copy-on-write after a fork: where their
    /// data went (pid whose page file holds it, offset).
    cow: HashMap<u64, (i32, u64)>,
    /// Pages of shared anonymous memory objects already stored: (inode, page index).
    shmem: HashSet<(u64, u64)>,
}

/// pagemap: page frame number bits and "mapped by this process only".
const PM_PFN: u64 = (1 << 55) - 1;
pub(crate) const PM_EXCLUSIVE: u64 = 1 << 56;
/// Swap type bits of a swapped entry, and the type the kernel gives to page-table
/// markers, which hold no page: the last one, 31, since swap types have 5 bits and real
/// swap files take the low numbers. pagemap shows markers as swapped; userfaultfd write
/// protection (pre-copy) leaves them in pages never populated.
const PM_SWAP_TYPE: u64 = 0x1f;
const SWP_PTE_MARKER: u64 = 0x1f;

/// How the pages of a mapping are saved.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Policy {
    /// Nothing: the kernel or a shared file provides the content.
    None,
    /// Anonymous memory: present pages, zero pages skipped (a new mapping is zero).
    Anon,
    /// Private file mapping: only pages the process changed, zero ones included.
    PrivateFile,
}

pub(crate) fn dump_pages(
    frozen: &Frozen,
    process: &mut model::Process,
    writer: &mut ImageWriter,
    files: &mut FileTable,
    index: &mut PageIndex,
    stats: &mut Stats,
    opts: PageOptions,
) -> Result<()> {
    let mut pre = opts.pre;
    let pid = frozen.pid;
    let err = |what: &str| {
        let what = what.to_string();
        move |source| DumpError::Collect { pid, what, source }
    };
    let t = std::time::Instant::now();
    let maps = match opts.maps {
        Some(maps) => maps,
        None => proc::smaps(pid),
    }
    .map_err(err("its memory map"))?;
    tracing::debug!("pid {pid}: smaps taken in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let pagemap_path = format!("/proc/{pid}/pagemap");
    let pagemap = File::open(&pagemap_path).map_err(|source| DumpError::Collect {
        pid,
        what: "its page map".into(),
        source: torpor_sys::Error::Io { what: pagemap_path.clone(), source },
    })?;
    // After pre-copy the page file already holds the copies made while the process ran
    // (pre-copy is refused with compression, so that file is raw).
    let mut out = match pre.as_mut().and_then(|t| t.take_file()) {
        Some(f) => PageWriter::raw(f),
        None => {
            let file = writer.create_file(&process.pages_file)?;
            match opts.compress {
                Some(level) => PageWriter::zstd(file, level),
                None => PageWriter::raw(file),
            }
        }
    };
    let mut buf = vec![0u8; BATCH];
    let mut hashes = Vec::new();
    let scratch: Vec<(u64, &[u8])> =
        frozen.threads.iter().map(|t| (t.scratch.low, t.scratch.saved())).collect();

    for m in &maps {
        let (kind, policy) = classify(pid, m, writer, files)?;
        let mut vma = Vma {
            start: m.start,
            end: m.end,
            prot: (m.read as u32) | (m.write as u32) << 1 | (m.exec as u32) << 2,
            shared: m.shared,
            kind,
            advice: m
                .vm_flags
                .iter()
                .filter(|f| KEPT_ADVICE.contains(&f.as_str()))
                .cloned()
                .collect(),
            pages: Vec::new(),
            shmem: None,
        };
        // Each page of a SysV segment is stored once, like shared anonymous memory; its
        // ids are kept apart from those inodes by the top bit.
        if let VmaKind::SysvShm { shmid, .. } = vma.kind {
            vma.shmem = Some(model::ShmemRef { id: 1 << 63 | shmid as u64, offset: m.offset });
        }
        if m.shared && matches!(vma.kind, VmaKind::Anon { .. }) {
            let open_path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
            let meta = std::fs::metadata(&open_path).map_err(|source| DumpError::SaveFile {
                pid,
                what: format!("shared memory at {:#x}", m.start),
                source,
            })?;
            vma.shmem = Some(model::ShmemRef {
                id: std::os::unix::fs::MetadataExt::ino(&meta),
                offset: m.offset,
            });
        }
        if policy != Policy::None {
            let copies = pre.as_deref().and_then(|t| t.copies_for(m));
            // After pre-copy, only pages without a current copy need their page map entry.
            let (reused, spans) = match &copies {
                Some(c) => c.plan(m.start, m.end, policy),
                None => (Vec::new(), vec![(m.start, m.end)]),
            };
            let mut ctx = VmaCtx {
                pid,
                pagemap: &pagemap,
                policy,
                index,
                parent: opts.parent,
                hashes: &mut hashes,
                copies,
                reused,
                scratch: &scratch,
            };
            for &span in &spans {
                dump_vma(&mut ctx, &mut vma, span, &mut out, &mut buf, stats)
                    .map_err(|e| e.into_dump_error(pid, m))?;
            }
            precopy::add_reused(&mut vma.pages, &ctx.reused, policy, stats);
        }
        process.vmas.push(vma);
    }
    let (file, frames) = out.finish()?;
    if frames.is_some() {
        writer.needs_version(2);
    }
    process.page_frames = frames;
    // Page hashes let a later dump be made over this image (--parent). After pre-copy
    // the pages reused from the rounds have no hash, so such an image cannot be a parent.
    if pre.is_none() {
        let hash_file = format!("hashes-{pid}.img");
        writer.write_file(&hash_file, &pages::encode_hashes(&hashes))?;
        process.page_hashes = Some(hash_file);
    }
    stats.bytes += file.len();
    let t = std::time::Instant::now();
    writer.finish_file(file)?;
    tracing::debug!("pid {pid}: page file synced in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    Ok(())
}

/// Decides what a mapping is and how its pages are saved.
fn classify(
    pid: i32,
    m: &proc::MapEntry,
    writer: &mut ImageWriter,
    files: &mut FileTable,
) -> Result<(VmaKind, Policy)> {
    let unsupported = |what: &str| DumpError::Unsupported {
        pid,
        reason: UnsupportedReason::Mapping { start: m.start, end: m.end, what: what.into() },
    };
    let anon = |heap| (VmaKind::Anon { heap }, Policy::Anon);
    let growsdown = m.vm_flags.iter().any(|f| f == "gd");
    Ok(match m.name.as_str() {
        "[vdso]" => {
            let mut bytes = vec![0u8; (m.end - m.start) as usize];
            mem::read_ranges(pid, &[(m.start, bytes.len())], &mut bytes).map_err(|source| {
                DumpError::Memory { pid, start: m.start, end: m.end, name: m.name.clone(), source }
            })?;
            let content_file = format!("vdso-{pid}.img");
            writer.write_file(&content_file, &bytes)?;
            let content_xxh3 = torpor_image::hash_bytes(&bytes);
            (VmaKind::Vdso { content_xxh3, content_file }, Policy::None)
        }
        "[vvar]" | "[vvar_vclock]" => (VmaKind::Vvar { name: m.name.clone() }, Policy::None),
        "[vsyscall]" => (VmaKind::Vsyscall, Policy::None),
        "[heap]" => anon(true),
        "[stack]" => (VmaKind::Stack, Policy::Anon),
        _ if growsdown => (VmaKind::Stack, Policy::Anon),
        "" => anon(false),
        n if n.starts_with("[anon:") || n.starts_with("[anon_shmem:") => anon(false),
        n if n.starts_with("/dev/zero") => anon(false),
        n if n.starts_with("/SYSV") => {
            let seg = sysv_segment(m.inode as i32).ok_or_else(|| {
                unsupported(&format!("a SysV shared memory segment ({n}) not in /proc/sysvipc/shm"))
            })?;
            (seg, Policy::Anon)
        }
        n if n.starts_with('[') => return Err(unsupported(&format!("a kernel mapping {n}"))),
        n => {
            let mut open_path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
            let meta = match std::fs::metadata(&open_path) {
                Ok(meta) => meta,
                // map_files is root's (CAP_CHECKPOINT_RESTORE in the first user namespace).
                // Without it, the file's path serves when it still leads to the very
                // inode mapped, which /proc/PID/maps names by device and number.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    let meta = std::fs::metadata(n).ok().filter(|s| {
                        let dev = (libc::major(s.dev()), libc::minor(s.dev()));
                        dev == (m.dev_major, m.dev_minor) && s.ino() == m.inode
                    });
                    open_path = n.to_string();
                    meta.ok_or_else(|| DumpError::SaveFile {
                        pid,
                        what: format!(
                            "mapped file {n}: /proc/{pid}/map_files needs CAP_CHECKPOINT_RESTORE \
                             and its path no longer leads to the file mapped"
                        ),
                        source: e,
                    })?
                }
                Err(source) => {
                    return Err(DumpError::SaveFile {
                        pid,
                        what: format!("mapped file {n}"),
                        source,
                    })
                }
            };
            if !meta.is_file() {
                return Err(unsupported(&format!("a mapping of the device or special file {n}")));
            }
            let file = files.add_path(pid, &open_path, n).map_err(|source| {
                DumpError::SaveFile { pid, what: format!("mapped file {n}"), source }
            })?;
            let policy = if m.shared { Policy::None } else { Policy::PrivateFile };
            (VmaKind::File { file, offset: m.offset }, policy)
        }
    })
}

/// A failure while saving one mapping's pages.
enum VmaError {
    Read(torpor_sys::Error),
    Write(torpor_image::ImageError),
}

impl VmaError {
    fn into_dump_error(self, pid: i32, m: &proc::MapEntry) -> DumpError {
        match self {
            Self::Read(source) => {
                DumpError::Memory { pid, start: m.start, end: m.end, name: m.name.clone(), source }
            }
            Self::Write(e) => DumpError::Image(e),
        }
    }
}

/// How page data is written.
pub(crate) struct PageOptions<'a> {
    /// zstd level, when compressing.
    pub compress: Option<i32>,
    /// The image this one is made over: pages unchanged since are not stored again.
    pub parent: Option<&'a ParentPages>,
    /// The pages pre-copy copied while the process ran, with what it wrote since.
    pub pre: Option<&'a mut Tracked>,
    /// The memory map with its flags (`/proc/PID/smaps`), when already read while the
    /// process was frozen.
    pub maps: Option<torpor_sys::Result<Vec<proc::MapEntry>>>,
}

/// What saving one mapping's pages needs besides the mapping.
struct VmaCtx<'a> {
    pid: i32,
    pagemap: &'a File,
    policy: Policy,
    index: &'a mut PageIndex,
    parent: Option<&'a ParentPages>,
    /// Hash of every page with data so far, in address order.
    hashes: &'a mut Vec<u64>,
    /// Copies made before the freeze that are still current, after pre-copy.
    copies: Option<VmaCopies<'a>>,
    /// Pages whose pre-copied data is used as it is.
    reused: Vec<(u64, Copy)>,
    /// Bytes torpor wrote below the threads' stacks for its calls, with what they held
    /// before: the image gets the latter.
    scratch: &'a [(u64, &'a [u8])],
}

/// A SysV shared memory segment by id, from `/proc/sysvipc/shm`.
fn sysv_segment(shmid: i32) -> Option<VmaKind> {
    const SHM_DEST: u32 = 0o1000;
    let text = std::fs::read_to_string("/proc/sysvipc/shm").ok()?;
    for l in text.lines().skip(1) {
        // key shmid perms(octal) size cpid lpid nattch uid gid ...
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 9 || f[1].parse::<i32>().ok()? != shmid {
            continue;
        }
        let perms = u32::from_str_radix(f[2], 8).ok()?;
        return Some(VmaKind::SysvShm {
            shmid,
            key: f[0].parse().ok()?,
            size: f[3].parse().ok()?,
            mode: perms & 0o777,
            uid: f[7].parse().ok()?,
            gid: f[8].parse().ok()?,
            removed: perms & SHM_DEST != 0,
        });
    }
    None
}

/// Saves the pages in `span` of one mapping that the process has (present or swapped
/// out). The span is the whole mapping, unless pre-copy knows better.
fn dump_vma(
    ctx: &mut VmaCtx,
    vma: &mut Vma,
    span: (u64, u64),
    out: &mut PageWriter,
    buf: &mut [u8],
    stats: &mut Stats,
) -> std::result::Result<(), VmaError> {
    let pid = ctx.pid;
    let npages = ((span.1 - span.0) / PAGE) as usize;
    let mut entries = vec![0u8; PAGEMAP_CHUNK.min(npages) * 8];
    // Pages waiting to be read, with their pagemap entries, and ranges to read, split
    // where a page is not mapped by this process alone (read without pinning).
    let mut pending: Vec<(u64, usize)> = Vec::new();
    let mut pending_shared: Vec<bool> = Vec::new();
    let mut pending_entries: Vec<u64> = Vec::new();
    // Pages of a shared memory object that no page table maps now: still its content.
    let object = match vma.shmem.filter(|_| ctx.policy == Policy::Anon) {
        Some(shm) => shmem_data(pid, vma, shm, span).map_err(VmaError::Read)?,
        None => Vec::new(),
    };
    let mut object_at = 0usize;
    let mut in_object = |a: u64| {
        while object.get(object_at).is_some_and(|r| r.1 <= a) {
            object_at += 1;
        }
        object.get(object_at).is_some_and(|r| r.0 <= a)
    };

    for part in populated(ctx.pagemap, span, &object) {
        let npages = ((part.1 - part.0) / PAGE) as usize;
        let mut first = 0usize;
        while first < npages {
            let count = PAGEMAP_CHUNK.min(npages - first);
            let addr = part.0 + first as u64 * PAGE;
            let bytes = &mut entries[..count * 8];
            let n = mem::pread_full(ctx.pagemap, bytes, addr / PAGE * 8).map_err(|source| {
                VmaError::Read(torpor_sys::Error::Io {
                    what: format!("/proc/{pid}/pagemap"),
                    source,
                })
            })?;
            for i in 0..n / 8 {
                let e = u64::from_ne_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
                let a = addr + i as u64 * PAGE;
                if !wanted(ctx.policy, e) && !in_object(a) {
                    continue;
                }
                if let Some(c) = ctx.copies.as_ref().and_then(|c| c.current(a)) {
                    ctx.reused.push((a, c));
                    continue;
                }
                // A page of a shared memory object that another mapping already saved.
                if let Some(shm) = vma.shmem {
                    let page_index = shm.offset / PAGE + (a - vma.start) / PAGE;
                    if !ctx.index.shmem.insert((shm.id, page_index)) {
                        continue;
                    }
                }
                let shared = e & PM_PRESENT != 0 && e & PM_EXCLUSIVE == 0;
                match (pending.last_mut(), pending_shared.last()) {
                    (Some((s, l)), Some(&sh)) if *s + *l as u64 == a && sh == shared => {
                        *l += PAGE as usize
                    }
                    _ => {
                        pending.push((a, PAGE as usize));
                        pending_shared.push(shared);
                    }
                }
                pending_entries.push(e);
                if pending_entries.len() * PAGE as usize == buf.len() {
                    let batch = Batch {
                        ranges: &mut pending,
                        shared: &mut pending_shared,
                        entries: &mut pending_entries,
                    };
                    flush(ctx, batch, vma, out, buf, stats)?;
                }
            }
            first += count;
        }
    }
    let batch =
        Batch { ranges: &mut pending, shared: &mut pending_shared, entries: &mut pending_entries };
    flush(ctx, batch, vma, out, buf, stats)
}

/// The parts of `span` where the process may have pages to save: those the page tables
/// hold (present, swapped out, or a marker), and those of `object`, the pages of a shared
/// memory object that no page table holds. Reading the page map entry of every page of a
/// mapping costs 8 bytes a page, 16 GiB for the 8 TiB of address space a database may
/// reserve without touching it; `PAGEMAP_SCAN` skips empty page tables instead. On a
/// kernel without it (before 6.7) the whole span is read as before.
fn populated(pagemap: &File, span: (u64, u64), object: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut found: Vec<uffd::PageRegion> = Vec::new();
    let mut at = span.0;
    while at < span.1 {
        let req = ScanRequest {
            start: at,
            end: span.1,
            flags: 0,
            required: 0,
            any_of: uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_SWAPPED,
            report: uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_SWAPPED,
        };
        match uffd::pagemap_scan(pagemap, &req, &mut found, SCAN_REGIONS) {
            Ok(end) if end > at => at = end,
            Ok(_) => break,
            Err(e) => {
                tracing::debug!("PAGEMAP_SCAN of {:#x}-{:#x}: {e}; reading it all", span.0, span.1);
                return vec![span];
            }
        }
    }
    let mut parts: Vec<(u64, u64)> = found
        .iter()
        .map(|r| (r.start, r.end))
        .chain(object.iter().map(|&(s, e)| (s.max(span.0), e.min(span.1))))
        .filter(|&(s, e)| s < e)
        .collect();
    parts.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(parts.len());
    for (s, e) in parts {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// The address ranges within `span` of shared memory mapping `vma` (object `shm`) where
/// the object holds pages, in memory or swapped out.
///
/// The page map shows only the pages this process has in its page tables. A page of
/// shared memory that another process wrote and then unmapped or exited with (a
/// database's buffer pool after a worker ended) is in no page table, yet is the
/// object's content; the object itself, reached through `/proc/PID/map_files`, tells
/// where it has data.
fn shmem_data(
    pid: i32,
    vma: &Vma,
    shm: model::ShmemRef,
    span: (u64, u64),
) -> torpor_sys::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/{pid}/map_files/{:x}-{:x}", vma.start, vma.end);
    let file =
        File::open(&path).map_err(|source| torpor_sys::Error::Io { what: path.clone(), source })?;
    // File offsets of the span, and back.
    let to_off = |a: u64| shm.offset + (a - vma.start);
    let to_addr = |o: u64| vma.start + (o - shm.offset);
    let (start, end) = (to_off(span.0), to_off(span.1));
    let seek = |from: u64, whence: i32| -> torpor_sys::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor this function owns.
        let r = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        // ENXIO: no data at or after `from`.
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        Err(torpor_sys::Error::Io { what: format!("{path} (SEEK_DATA/SEEK_HOLE)"), source: e })
    };
    let mut ranges = Vec::new();
    let mut at = start;
    while at < end {
        let Some(data) = seek(at, libc::SEEK_DATA)? else { break };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        let (a, b) = (data / PAGE * PAGE, hole.div_ceil(PAGE) * PAGE);
        ranges.push((to_addr(a.max(start)), to_addr(b.min(end))));
        at = b;
    }
    Ok(ranges)
}

/// Whether a page with pagemap entry `e` is saved under `policy`.
pub(crate) fn wanted(policy: Policy, e: u64) -> bool {
    if e & PM_SWAPPED != 0 && e & PM_SWAP_TYPE == SWP_PTE_MARKER {
        return false;
    }
    match policy {
        Policy::Anon => e & (PM_PRESENT | PM_SWAPPED) != 0,
        // A present page-cache page is the file's own; the process's copies are
        // anonymous (or swapped out).
        Policy::PrivateFile => {
            e & PM_SWAPPED != 0 || (e & PM_PRESENT != 0 && e & PM_FILE_OR_SHARED == 0)
        }
        Policy::None => false,
    }
}

/// Pages waiting to be read: address ranges, whether each range is shared with other
/// processes, and every page's pagemap entry.
struct Batch<'a> {
    ranges: &'a mut Vec<(u64, usize)>,
    shared: &'a mut Vec<bool>,
    entries: &'a mut Vec<u64>,
}

/// Reads the pending pages, drops or records zero pages, refers to copy-on-write pages
/// already stored for another process, appends the rest to the page file and records
/// the runs.
fn flush(
    ctx: &mut VmaCtx,
    batch: Batch,
    vma: &mut Vma,
    out: &mut PageWriter,
    buf: &mut [u8],
    stats: &mut Stats,
) -> std::result::Result<(), VmaError> {
    let Batch { ranges: pending, shared, entries } = batch;
    if pending.is_empty() {
        return Ok(());
    }
    let pid = ctx.pid;
    torpor_sys::test_point("dump:memory", pid);
    // Runs of ranges alike in sharing, each read the way that leaves sharing intact.
    let mut at = 0usize;
    let mut i = 0usize;
    while i < pending.len() {
        let mut j = i;
        while j < pending.len() && shared[j] == shared[i] {
            j += 1;
        }
        let len: usize = pending[i..j].iter().map(|r| r.1).sum();
        let dst = &mut buf[at..at + len];
        if shared[i] {
            mem::read_ranges_unpinned(pid, &pending[i..j], dst)
        } else {
            mem::read_ranges(pid, &pending[i..j], dst)
        }
        .map_err(VmaError::Read)?;
        at += len;
        i = j;
    }
    overlay(pending, buf, ctx.scratch);

    // Compact the pages to keep at the front of `buf`, recording runs as we go.
    let mut kept = 0usize;
    let mut at = 0usize;
    let mut n = 0usize;
    let base_off = out.len();
    for &(start, len) in pending.iter() {
        for p in 0..len / PAGE as usize {
            let addr = start + (p as u64) * PAGE;
            let e = entries[n];
            n += 1;
            let page = at..at + PAGE as usize;
            at += PAGE as usize;
            if mem::is_zero(&buf[page.clone()]) {
                stats.zero_pages += 1;
                if ctx.policy == Policy::PrivateFile {
                    push_run(&mut vma.pages, addr, None, None);
                }
                continue;
            }
            let hash = pages::page_hash(&buf[page.clone()]);
            ctx.hashes.push(hash);
            // Unchanged since the parent image: refer to its copy.
            // (Shared memory is filled apart from the mappings at restore: always stored.)
            let parent = ctx.parent.filter(|_| vma.shmem.is_none());
            if let Some((at, _)) = parent.and_then(|p| p.lookup(pid, addr)).filter(|l| l.1 == hash)
            {
                let from_pid = at.from_pid.filter(|&o| o != pid);
                push_ref(&mut vma.pages, addr, PageRef { from_pid, ..at });
                stats.parent_pages += 1;
                continue;
            }
            // Still shared with a process dumped before: the same frame holds the same
            // bytes, stored once.
            let shared_frame = ctx.policy == Policy::Anon
                && e & PM_PRESENT != 0
                && e & PM_EXCLUSIVE == 0
                && e & PM_PFN != 0;
            if shared_frame {
                if let Some(&(owner, off)) = ctx.index.cow.get(&(e & PM_PFN)) {
                    push_run(&mut vma.pages, addr, Some(off), Some(owner).filter(|&o| o != pid));
                    stats.shared_pages += 1;
                    continue;
                }
            }
            if kept != page.start {
                buf.copy_within(page, kept);
            }
            let off = base_off + kept as u64;
            if shared_frame {
                ctx.index.cow.insert(e & PM_PFN, (pid, off));
            }
            push_run(&mut vma.pages, addr, Some(off), None);
            kept += PAGE as usize;
            stats.pages_stored += 1;
        }
    }
    pending.clear();
    shared.clear();
    entries.clear();
    out.write_all(&buf[..kept]).map_err(VmaError::Write)
}

/// Puts into `buf`, which holds the bytes of `ranges` one after the other, the bytes
/// each region of `patches` (address, bytes) held before torpor used it.
fn overlay(ranges: &[(u64, usize)], buf: &mut [u8], patches: &[(u64, &[u8])]) {
    let mut at = 0usize;
    for &(start, len) in ranges {
        let end = start + len as u64;
        for &(addr, bytes) in patches {
            let (lo, hi) = (addr.max(start), (addr + bytes.len() as u64).min(end));
            if lo < hi {
                let (n, from) = ((hi - lo) as usize, (lo - addr) as usize);
                let to = at + (lo - start) as usize;
                buf[to..to + n].copy_from_slice(&bytes[from..from + n]);
            }
        }
        at += len;
    }
}

/// Appends a page of this image to the runs, extending the last run when it continues it.
pub(crate) fn push_run(
    runs: &mut Vec<PageRun>,
    addr: u64,
    offset: Option<u64>,
    from_pid: Option<i32>,
) {
    push_page(runs, addr, offset, from_pid, 0)
}

/// Appends a page whose data another image of the chain holds.
fn push_ref(runs: &mut Vec<PageRun>, addr: u64, at: PageRef) {
    push_page(runs, addr, Some(at.offset), at.from_pid, at.image)
}

fn push_page(
    runs: &mut Vec<PageRun>,
    addr: u64,
    offset: Option<u64>,
    from_pid: Option<i32>,
    image: u32,
) {
    if let Some(last) = runs.last_mut() {
        let next_addr = last.addr + last.pages * PAGE;
        let continues = last.from_pid == from_pid
            && last.image == image
            && match (last.offset, offset) {
                (Some(lo), Some(o)) => lo + last.pages * PAGE == o,
                (None, None) => true,
                _ => false,
            };
        if next_addr == addr && continues {
            last.pages += 1;
            return;
        }
    }
    runs.push(PageRun { addr, pages: 1, offset, from_pid, image });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_bytes_replace_what_torpor_wrote_below_a_stack() {
        let mut buf = vec![1u8; 3 * 4096];
        let saved = [7u8; 100];
        // Straddles the end of the first range and the start of the second.
        overlay(&[(0x1000, 4096), (0x2000, 8192)], &mut buf, &[(0x1fd0, &saved[..])]);
        assert!(buf[..4096 - 0x30].iter().all(|&b| b == 1));
        assert!(buf[4096 - 0x30..4096 + 52].iter().all(|&b| b == 7));
        assert!(buf[4096 + 52..].iter().all(|&b| b == 1));
    }
}
