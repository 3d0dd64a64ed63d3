//! Reading and writing another process's memory.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use libc::{c_void, iovec};

use crate::{Error, Result};

/// Most iovecs one `process_vm_readv` call takes (`IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Reads `ranges` (address, length) of process `pid` into `buf`, back to back.
/// `buf` must be at least the sum of the lengths.
///
/// `process_vm_readv` copies straight from the other address space with no bounce
/// buffer, many ranges per call. It refuses pages the process itself may not read
/// (PROT_NONE), so those ranges fall back to `/proc/PID/mem`, which may.
pub fn read_ranges(pid: i32, ranges: &[(u64, usize)], buf: &mut [u8]) -> Result<()> {
    let total: usize = ranges.iter().map(|r| r.1).sum();
    assert!(buf.len() >= total, "buffer smaller than the ranges");
    let mut done = 0usize;
    let mut at = 0usize;
    for chunk in ranges.chunks(IOV_MAX) {
        let local = iovec { iov_base: buf[at..].as_mut_ptr() as *mut c_void, iov_len: total - at };
        let remote: Vec<iovec> =
            chunk.iter().map(|&(a, l)| iovec { iov_base: a as *mut c_void, iov_len: l }).collect();
        let want: usize = chunk.iter().map(|r| r.1).sum();
        // SAFETY: `local` points into `buf` with the length left in it, so the kernel
        // writes only inside `buf`; the remote iovecs are only read by the kernel and
        // describe the other process's memory, which it checks itself.
        let n = unsafe {
            libc::process_vm_readv(pid, &local, 1, remote.as_ptr(), remote.len() as _, 0)
        };
        let n = if n < 0 { 0 } else { n as usize };
        if n < want {
            // Finish this chunk through /proc/PID/mem, which may read any mapped page.
            read_mem_file(pid, chunk, n, &mut buf[at..at + want])?;
        }
        at += want;
        done += want;
    }
    debug_assert_eq!(done, total);
    Ok(())
}

/// Reads `ranges` of process `pid` into `buf` through `/proc/PID/mem` only.
///
/// Unlike `process_vm_readv`, which pins the pages it copies and so makes the kernel break
/// copy-on-write sharing of anonymous pages (each process sharing them after a fork gets
/// its own copy), this leaves shared pages shared.
pub fn read_ranges_unpinned(pid: i32, ranges: &[(u64, usize)], buf: &mut [u8]) -> Result<()> {
    let total: usize = ranges.iter().map(|r| r.1).sum();
    assert!(buf.len() >= total, "buffer smaller than the ranges");
    read_mem_file(pid, ranges, 0, &mut buf[..total])
}

/// Reads what `process_vm_readv` left out of `chunk` (after its first `skip` bytes).
fn read_mem_file(pid: i32, chunk: &[(u64, usize)], mut skip: usize, out: &mut [u8]) -> Result<()> {
    let path = format!("/proc/{pid}/mem");
    let f = File::open(&path).map_err(|source| Error::Io { what: path.clone(), source })?;
    let mut at = 0usize;
    for &(addr, len) in chunk {
        if skip >= len {
            skip -= len;
            at += len;
            continue;
        }
        let (a, l) = (addr + skip as u64, len - skip);
        f.read_exact_at(&mut out[at + skip..at + len], a).map_err(|source| Error::ReadMemory {
            pid,
            addr: a,
            len: l,
            source,
        })?;
        skip = 0;
        at += len;
    }
    Ok(())
}

/// A process's memory opened once for many writes (`/proc/PID/mem`, which writes through
/// page protections as a debugger does).
pub struct ProcMem {
    pid: i32,
    file: File,
}

impl ProcMem {
    /// Opens the memory of `pid` for writing.
    pub fn open(pid: i32) -> Result<Self> {
        let path = format!("/proc/{pid}/mem");
        let file = File::options()
            .write(true)
            .open(&path)
            .map_err(|source| Error::Io { what: path.clone(), source })?;
        Ok(Self { pid, file })
    }

    /// Writes `data` at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, addr).map_err(|source| Error::WriteMemory {
            pid: self.pid,
            addr,
            len: data.len(),
            source,
        })
    }
}

/// Writes each piece (address, bytes) into process `pid`.
///
/// `process_vm_writev` copies straight into the other address space, many pieces per
/// call; the pages must be writable by the process. What it leaves undone is written
/// through `/proc/PID/mem`, which reports the address that failed.
pub fn write_pieces(pid: i32, pieces: &[(u64, &[u8])]) -> Result<()> {
    for chunk in pieces.chunks(IOV_MAX) {
        let local: Vec<iovec> = chunk
            .iter()
            .map(|(_, b)| iovec { iov_base: b.as_ptr() as *mut c_void, iov_len: b.len() })
            .collect();
        let remote: Vec<iovec> = chunk
            .iter()
            .map(|&(a, b)| iovec { iov_base: a as *mut c_void, iov_len: b.len() })
            .collect();
        // SAFETY: the kernel only reads the local iovecs, each of which is one of the
        // borrowed slices; the remote ones describe the other process's memory, which the
        // kernel checks itself.
        let n = unsafe {
            libc::process_vm_writev(
                pid,
                local.as_ptr(),
                local.len() as _,
                remote.as_ptr(),
                remote.len() as _,
                0,
            )
        };
        let mut done = if n < 0 { 0 } else { n as usize };
        for &(addr, bytes) in chunk {
            if done >= bytes.len() {
                done -= bytes.len();
                continue;
            }
            write_mem(pid, addr + done as u64, &bytes[done..])?;
            done = 0;
        }
    }
    Ok(())
}

/// Writes `data` at `addr` in process `pid` (through `/proc/PID/mem`, which may write
/// pages the process cannot, such as read-only code).
pub fn write_mem(pid: i32, addr: u64, data: &[u8]) -> Result<()> {
    let path = format!("/proc/{pid}/mem");
    let f = File::options()
        .write(true)
        .open(&path)
        .map_err(|source| Error::Io { what: path.clone(), source })?;
    f.write_all_at(data, addr).map_err(|source| Error::WriteMemory {
        pid,
        addr,
        len: data.len(),
        source,
    })
}

/// True when the page is all zero bytes.
pub fn is_zero(page: &[u8]) -> bool {
    // Compare in u64 words: the compiler vectorizes this loop.
    let (head, words, tail) = unsafe_align(page);
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

fn unsafe_align(b: &[u8]) -> (&[u8], &[u64], &[u8]) {
    // SAFETY: every bit pattern is a valid u64, and align_to returns properly aligned,
    // in-bounds middle slices.
    unsafe { b.align_to::<u64>() }
}

/// Reads up to `buf.len()` bytes of a file at an offset, retrying on short reads.
pub fn pread_full(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
