//! `userfaultfd` and `PAGEMAP_SCAN`: serving another process's page faults (lazy
//! restore) and tracking which of its pages it writes (pre-copy).
//!
//! A descriptor is created inside the target process (by a remote call, so that it
//! belongs to that address space) and taken into torpor with `pidfd_getfd`. Every ioctl
//! acts on the address space the descriptor was made in, whoever calls it, so torpor
//! registers ranges, copies pages in and reads fault messages from outside.
//!
//! Write tracking: a userfaultfd whose API was set with `UFFD_FEATURE_WP_ASYNC` and that
//! has a range registered in write-protect mode makes the kernel resolve write-protect
//! faults there by itself: the writer never blocks, the page just loses its protection.
//! `PAGEMAP_SCAN` on `/proc/PID/pagemap` then lists the pages that lost it ("written")
//! and, with `PM_SCAN_WP_MATCHING`, protects them again in the same page-table walk.
//!
//! No crate wraps these for a descriptor made elsewhere without pulling in bindgen (and
//! `UFFD_FEATURE_WP_ASYNC` and `PAGEMAP_SCAN` came with Linux 6.7), and the interface is
//! a few small ioctls and one 32-byte message, so the ABI is written out here from
//! `<linux/userfaultfd.h>` and `<linux/fs.h>`.
//!
//! See userfaultfd(2), ioctl_userfaultfd(2), PAGEMAP_SCAN(2const) and the kernel's
//! Documentation/admin-guide/mm/userfaultfd.rst and pagemap.rst.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::{Error, Result};

/// `UFFD_API`: the only API version.
const API: u64 = 0xaa;

/// Ioctl numbers: `_IOWR(0xaa, nr, struct)` / `_IOR(...)` with the struct sizes below.
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_WAKE: u64 = 0x8010_aa02;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;

/// `UFFDIO_REGISTER_MODE_MISSING`: report faults on pages that are not there.
const REGISTER_MODE_MISSING: u64 = 1;
/// `UFFDIO_REGISTER_MODE_WP`: track writes (with `FEATURE_WP_ASYNC`, without faults).
const REGISTER_MODE_WP: u64 = 1 << 1;

/// `userfaultfd(2)` flag: handle faults from user mode only, which needs no privilege.
pub const USER_MODE_ONLY: u64 = 1;
/// Treat pages never populated as write-protected too (page-table markers).
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Resolve write-protect faults in the kernel, without a reader of the descriptor.
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `PAGEMAP_SCAN` flags and page categories (`linux/fs.h`).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// Also page-table markers, which hold no page (see `pagemap` in the dump).
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// One run of pages `PAGEMAP_SCAN` reports: `[start, end)` and its categories.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// Features: the process's fork, mremap, madvise(DONTNEED) and munmap are reported as
/// events, so the server can keep up with where each page's data belongs.
pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

/// Size of `struct uffd_msg`.
const MSG_LEN: usize = 32;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// What the kernel reports on a userfaultfd.
#[derive(Debug)]
pub enum Event {
    /// A thread touched `addr`, a page not there; it waits until the page is.
    PageFault { addr: u64 },
    /// The process forked; `uffd` is the child's userfaultfd, now in torpor.
    Fork { uffd: OwnedFd },
    /// `mremap` moved `len` bytes from `from` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// `madvise(MADV_DONTNEED or REMOVE)` dropped `start..end`: it reads as zero now.
    Remove { start: u64, end: u64 },
    /// `munmap` (or a mapping over it) removed `start..end`.
    Unmap { start: u64, end: u64 },
}

/// Runs one userfaultfd ioctl on `fd` with `arg`.
fn ioctl<T>(fd: BorrowedFd, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `req` is one of the userfaultfd ioctls above and `arg` the struct of exactly
    // the size it encodes; the kernel reads and writes only inside it. Addresses inside
    // the struct are checked by the kernel against the target address space (dst) or,
    // for UFFDIO_COPY's src, supplied by `copy` from a live slice.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `UFFDIO_API`: enables the interface on a new userfaultfd with `features`. Fails if
/// the kernel lacks one of them.
pub fn api(fd: BorrowedFd, features: u64) -> Result<()> {
    let mut a = UffdioApi { api: API, features, ioctls: 0 };
    ioctl(fd, UFFDIO_API, &mut a)
        .map_err(|source| Error::Syscall { call: "UFFDIO_API", source })?;
    if a.features & features != features {
        return Err(Error::Syscall {
            call: "UFFDIO_API",
            source: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        });
    }
    Ok(())
}

/// `UFFDIO_REGISTER` in missing mode: faults on absent pages of `start..start+len` are
/// reported on `fd` instead of being filled with zeros by the kernel.
pub fn register_missing(fd: BorrowedFd, start: u64, len: u64) -> Result<()> {
    let mut r = UffdioRegister {
        range: UffdioRange { start, len },
        mode: REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_REGISTER, &mut r)
        .map_err(|source| Error::Syscall { call: "UFFDIO_REGISTER", source })
}

/// `UFFDIO_REGISTER` in write-protect mode over `[start, start + len)` of the
/// descriptor's address space. Fails (`EINVAL`, `EPERM`, `EBUSY`) when the range is not
/// wholly mapped, a mapping cannot be written at all, or another userfaultfd owns it.
pub fn register_wp(fd: BorrowedFd, start: u64, len: u64) -> io::Result<()> {
    let mut r =
        UffdioRegister { range: UffdioRange { start, len }, mode: REGISTER_MODE_WP, ioctls: 0 };
    ioctl(fd, UFFDIO_REGISTER, &mut r)
}

/// What a copy or zero-fill did: the bytes placed, and the error that stopped it early.
#[derive(Debug)]
pub struct Filled {
    pub done: u64,
    pub error: Option<io::Error>,
}

/// `UFFDIO_COPY`: places `data` (whole pages) at `dst` in the target and wakes threads
/// waiting for them. Stops at the first page already there (`EEXIST`), when events are
/// pending (`EAGAIN`), or when the mapping or the process is gone (`ENOENT`, `ESRCH`).
pub fn copy(fd: BorrowedFd, dst: u64, data: &[u8]) -> Filled {
    let mut c =
        UffdioCopy { dst, src: data.as_ptr() as u64, len: data.len() as u64, mode: 0, copy: 0 };
    let error = ioctl(fd, UFFDIO_COPY, &mut c).err();
    Filled { done: c.copy.max(0) as u64, error }
}

/// `UFFDIO_ZEROPAGE`: maps zero pages at `start..start+len` and wakes their waiters.
pub fn zeropage(fd: BorrowedFd, start: u64, len: u64) -> Filled {
    let mut z = UffdioZeropage { range: UffdioRange { start, len }, mode: 0, zeropage: 0 };
    let error = ioctl(fd, UFFDIO_ZEROPAGE, &mut z).err();
    Filled { done: z.zeropage.max(0) as u64, error }
}

/// `UFFDIO_WAKE`: wakes threads waiting on `start..start+len` (after another call put the
/// page there).
pub fn wake(fd: BorrowedFd, start: u64, len: u64) -> io::Result<()> {
    ioctl(fd, UFFDIO_WAKE, &mut UffdioRange { start, len })
}

/// Reads the events waiting on a non-blocking userfaultfd into `out`; returns how many.
/// A fork's new descriptor is owned by the returned event.
pub fn read_events(fd: BorrowedFd, out: &mut Vec<Event>) -> io::Result<usize> {
    let mut buf = [0u8; MSG_LEN * 64];
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
    }
    let n = n as usize / MSG_LEN;
    let word = |m: &[u8], at: usize| u64::from_ne_bytes(m[at..at + 8].try_into().unwrap());
    for m in buf.chunks_exact(MSG_LEN).take(n) {
        // struct uffd_msg: u8 event, 7 reserved bytes, then a 24-byte union.
        out.push(match m[0] {
            // pagefault: u64 flags, u64 address, u32 ptid.
            EVENT_PAGEFAULT => Event::PageFault { addr: word(m, 16) },
            EVENT_FORK => {
                let ufd = u32::from_ne_bytes(m[8..12].try_into().unwrap()) as i32;
                // SAFETY: the kernel installed this descriptor in our table for this
                // message; nothing else refers to it.
                Event::Fork { uffd: unsafe { OwnedFd::from_raw_fd(ufd) } }
            }
            EVENT_REMAP => Event::Remap { from: word(m, 8), to: word(m, 16), len: word(m, 24) },
            EVENT_REMOVE => Event::Remove { start: word(m, 8), end: word(m, 16) },
            EVENT_UNMAP => Event::Unmap { start: word(m, 8), end: word(m, 16) },
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown userfaultfd event {other:#x}"),
                ))
            }
        });
    }
    Ok(n)
}

/// What one `PAGEMAP_SCAN` call asks for.
#[derive(Debug, Clone, Copy)]
pub struct ScanRequest {
    /// The address range `[start, end)` to walk.
    pub start: u64,
    pub end: u64,
    /// `PM_SCAN_*` operations, such as `PM_SCAN_WP_MATCHING` to protect what matches.
    pub flags: u64,
    /// Categories a page must all have to be reported.
    pub required: u64,
    /// Categories a page must have at least one of to be reported (none asked: 0).
    pub any_of: u64,
    /// Categories reported (runs are split where they differ).
    pub report: u64,
}

/// `ioctl(pagemap, PAGEMAP_SCAN)`: appends to `out` up to `room` runs of pages of the
/// requested range that have every `required` category and one of `any_of`, and with
/// `PM_SCAN_WP_MATCHING` write-protects them again in the same walk. Returns where the
/// walk stopped, which is before `end` when `out` had no room left (call again from
/// there).
pub fn pagemap_scan(
    pagemap: &File,
    req: &ScanRequest,
    out: &mut Vec<PageRegion>,
    room: usize,
) -> io::Result<u64> {
    out.reserve(room);
    let at = out.len();
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags: req.flags,
        start: req.start,
        end: req.end,
        // `reserve` made room for `room` more elements after the `at` already there.
        vec: out.as_mut_ptr().wrapping_add(at) as u64,
        vec_len: room as u64,
        category_mask: req.required,
        category_anyof_mask: req.any_of,
        return_mask: req.report,
        ..Default::default()
    };
    // SAFETY: PAGEMAP_SCAN reads and writes `arg` and writes at most `vec_len`
    // page_regions at `vec`, which points at `room` reserved, unused elements of `out`.
    let r = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg as *mut _) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = (r as usize).min(room);
    // SAFETY: the kernel initialised the first `n` reserved elements (it returns how
    // many), and PageRegion is plain integers.
    unsafe { out.set_len(at + n) };
    Ok(arg.walk_end)
}
