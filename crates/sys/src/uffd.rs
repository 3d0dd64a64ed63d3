//! Write tracking of another process's memory: userfaultfd in asynchronous write-protect
//! mode, and the `PAGEMAP_SCAN` ioctl of `/proc/PID/pagemap`.
//!
//! Neither libc nor nix wraps these yet (userfaultfd's `UFFD_FEATURE_WP_ASYNC` and
//! `PAGEMAP_SCAN` came with Linux 6.7), so the structures and request numbers are spelled
//! out here from the kernel's UAPI headers `linux/userfaultfd.h` and `linux/fs.h`.
//!
//! How they fit together: a userfaultfd whose API was set with `UFFD_FEATURE_WP_ASYNC`
//! and that has a range registered in write-protect mode makes the kernel resolve
//! write-protect faults there by itself: the writer never blocks, the page just loses its
//! protection. `PAGEMAP_SCAN` then lists the pages that lost it ("written") and, with
//! `PM_SCAN_WP_MATCHING`, protects them again in the same page-table walk.
//!
//! # References
//! - userfaultfd(2), ioctl_userfaultfd(2), PAGEMAP_SCAN(2const)
//! - Documentation/admin-guide/mm/userfaultfd.rst and pagemap.rst in the kernel tree

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::{Error, Result};

/// `userfaultfd(2)` flag: handle faults from user mode only, which needs no privilege.
pub const USER_MODE_ONLY: u64 = 1;

const UFFD_API: u64 = 0xaa;
/// Treat pages never populated as write-protected too (page-table markers).
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Resolve write-protect faults in the kernel, without a reader of the descriptor.
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;
const REGISTER_MODE_WP: u64 = 1 << 1;

/// `PAGEMAP_SCAN` flags and page categories (`linux/fs.h`).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// Also page-table markers, which hold no page (see `pagemap` in the dump).
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;

/// `_IOWR(type, nr, size)` on x86_64.
const fn iowr(ty: u64, nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (ty << 8) | nr
}

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

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

const UFFDIO_API: u64 = iowr(UFFD_API, 0x3f, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(UFFD_API, 0x00, std::mem::size_of::<UffdioRegister>());
const PAGEMAP_SCAN: u64 = iowr(b'f' as u64, 16, std::mem::size_of::<PmScanArg>());

/// `ioctl(uffd, UFFDIO_API)`: enables `features` on a new userfaultfd. Works on a copy of
/// another process's descriptor too: the context belongs to the address space that
/// created it, not to whoever calls. See ioctl_userfaultfd(2).
pub fn api(uffd: &OwnedFd, features: u64) -> Result<()> {
    let mut a = UffdioApi { api: UFFD_API, features, ioctls: 0 };
    // SAFETY: UFFDIO_API reads and writes one uffdio_api, which `a` is, for the call.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, &mut a as *mut UffdioApi) };
    if r < 0 {
        return Err(crate::last("UFFDIO_API"));
    }
    if a.features & features != features {
        return Err(Error::Syscall {
            call: "UFFDIO_API",
            source: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        });
    }
    Ok(())
}

/// `ioctl(uffd, UFFDIO_REGISTER)` in write-protect mode over `[start, start + len)` of
/// the descriptor's address space. Fails (`EINVAL`, `EPERM`, `EBUSY`) when the range is
/// not wholly mapped, a mapping cannot be written at all, or another userfaultfd owns it.
pub fn register_wp(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    let mut reg = UffdioRegister { start, len, mode: REGISTER_MODE_WP, ioctls: 0 };
    // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register, which `reg` is; the
    // range is checked by the kernel against the descriptor's address space.
    let r = unsafe {
        libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg as *mut UffdioRegister)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
    /// Categories reported (runs are split where they differ).
    pub report: u64,
}

/// `ioctl(pagemap, PAGEMAP_SCAN)`: appends to `out` up to `room` runs of pages of the
/// requested range that have every `required` category, and with
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
