//! The memory map and the page contents of a frozen process.

use std::fs::File;

use torpor_image::model::{self, PageRun, Vma, VmaKind};
use torpor_image::{ImageFile, ImageWriter};
use torpor_sys::{mem, proc, PAGE};

use crate::collect::UnsupportedReason;
use crate::files::FileTable;
use crate::{DumpError, Frozen, Result, Stats};

/// pagemap entry bits, see Documentation/admin-guide/mm/pagemap.rst.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE_OR_SHARED: u64 = 1 << 61;

/// Bytes of memory read from the process per batch.
const BATCH: usize = 8 << 20;
/// pagemap entries read per call.
const PAGEMAP_CHUNK: usize = 64 << 10;

/// VmFlags codes that restore re-applies (madvise, mlock).
const KEPT_ADVICE: &[&str] = &["dd", "hg", "nh", "dc", "wf", "lo", "mg", "rr", "sr"];

/// How the pages of a mapping are saved.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
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
    stats: &mut Stats,
) -> Result<()> {
    let pid = frozen.pid;
    let err = |what: &str| {
        let what = what.to_string();
        move |source| DumpError::Collect { pid, what, source }
    };
    let maps = proc::smaps(pid).map_err(err("its memory map"))?;
    let pagemap_path = format!("/proc/{pid}/pagemap");
    let pagemap = File::open(&pagemap_path).map_err(|source| DumpError::Collect {
        pid,
        what: "its page map".into(),
        source: torpor_sys::Error::Io { what: pagemap_path.clone(), source },
    })?;
    let mut out = writer.create_file(&process.pages_file)?;
    let mut buf = vec![0u8; BATCH];

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
        };
        if policy != Policy::None {
            dump_vma(pid, &pagemap, &mut vma, policy, &mut out, &mut buf, stats)
                .map_err(|e| e.into_dump_error(pid, m))?;
        }
        process.vmas.push(vma);
    }
    stats.bytes += out.len();
    writer.finish_file(out)?;
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
        n if n.starts_with("/SYSV") => return Err(unsupported("a SysV shared memory segment")),
        n if n.starts_with("/memfd:") => return Err(unsupported(&format!("a memfd ({n})"))),
        n if n.starts_with('[') => return Err(unsupported(&format!("a kernel mapping {n}"))),
        n => {
            let open_path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
            let meta = std::fs::metadata(&open_path).map_err(|source| DumpError::SaveFile {
                pid,
                what: format!("mapped file {n}"),
                source,
            })?;
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

/// Saves the pages of one mapping that the process has (present or swapped out).
fn dump_vma(
    pid: i32,
    pagemap: &File,
    vma: &mut Vma,
    policy: Policy,
    out: &mut ImageFile,
    buf: &mut [u8],
    stats: &mut Stats,
) -> std::result::Result<(), VmaError> {
    let npages = ((vma.end - vma.start) / PAGE) as usize;
    let mut entries = vec![0u8; PAGEMAP_CHUNK.min(npages) * 8];
    // Ranges waiting to be read, and their total size.
    let mut pending: Vec<(u64, usize)> = Vec::new();
    let mut pending_len = 0usize;

    let mut first = 0usize;
    while first < npages {
        let count = PAGEMAP_CHUNK.min(npages - first);
        let addr = vma.start + first as u64 * PAGE;
        let bytes = &mut entries[..count * 8];
        let n = mem::pread_full(pagemap, bytes, addr / PAGE * 8).map_err(|source| {
            VmaError::Read(torpor_sys::Error::Io { what: format!("/proc/{pid}/pagemap"), source })
        })?;
        for i in 0..n / 8 {
            let e = u64::from_ne_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
            let wanted = match policy {
                Policy::Anon => e & (PM_PRESENT | PM_SWAPPED) != 0,
                // A present page-cache page is the file's own; the process's copies are
                // anonymous (or swapped out).
                Policy::PrivateFile => {
                    e & PM_SWAPPED != 0 || (e & PM_PRESENT != 0 && e & PM_FILE_OR_SHARED == 0)
                }
                Policy::None => false,
            };
            if !wanted {
                continue;
            }
            let a = addr + i as u64 * PAGE;
            match pending.last_mut() {
                Some((s, l)) if *s + *l as u64 == a => *l += PAGE as usize,
                _ => pending.push((a, PAGE as usize)),
            }
            pending_len += PAGE as usize;
            if pending_len == buf.len() {
                flush(pid, &mut pending, vma, policy, out, buf, stats)?;
                pending_len = 0;
            }
        }
        first += count;
    }
    flush(pid, &mut pending, vma, policy, out, buf, stats)
}

/// Reads the pending ranges, drops or records zero pages, appends the rest to the page
/// file and records the runs.
fn flush(
    pid: i32,
    pending: &mut Vec<(u64, usize)>,
    vma: &mut Vma,
    policy: Policy,
    out: &mut ImageFile,
    buf: &mut [u8],
    stats: &mut Stats,
) -> std::result::Result<(), VmaError> {
    if pending.is_empty() {
        return Ok(());
    }
    let total: usize = pending.iter().map(|r| r.1).sum();
    mem::read_ranges(pid, pending, &mut buf[..total]).map_err(VmaError::Read)?;

    // Compact the pages to keep at the front of `buf`, recording runs as we go.
    let mut kept = 0usize;
    let mut at = 0usize;
    let base_off = out.len();
    for &(start, len) in pending.iter() {
        for p in 0..len / PAGE as usize {
            let addr = start + (p as u64) * PAGE;
            let page = at..at + PAGE as usize;
            at += PAGE as usize;
            if mem::is_zero(&buf[page.clone()]) {
                stats.zero_pages += 1;
                if policy == Policy::PrivateFile {
                    push_run(&mut vma.pages, addr, None);
                }
                continue;
            }
            if kept != page.start {
                buf.copy_within(page, kept);
            }
            push_run(&mut vma.pages, addr, Some(base_off + kept as u64));
            kept += PAGE as usize;
            stats.pages_stored += 1;
        }
    }
    pending.clear();
    out.write_all(&buf[..kept]).map_err(VmaError::Write)
}

/// Appends a page to the runs, extending the last run when it continues it.
fn push_run(runs: &mut Vec<PageRun>, addr: u64, offset: Option<u64>) {
    if let Some(last) = runs.last_mut() {
        let next_addr = last.addr + last.pages * PAGE;
        let continues = match (last.offset, offset) {
            (Some(lo), Some(o)) => lo + last.pages * PAGE == o,
            (None, None) => true,
            _ => false,
        };
        if next_addr == addr && continues {
            last.pages += 1;
            return;
        }
    }
    runs.push(PageRun { addr, pages: 1, offset });
}
