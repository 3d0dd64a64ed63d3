//! Helpers shared by the unit tests: this process's own vDSO and executable copies of it.

#![allow(unsafe_code)]

use std::fs;

use crate::Patch;

/// The base address and bytes of this process's vDSO.
///
/// The base comes from the auxiliary vector and the length from the `[vdso]` line of
/// `/proc/self/maps`, as the dumper finds them in a target process.
pub(crate) fn own_vdso() -> (u64, &'static [u8]) {
    // SAFETY: getauxval only reads the auxiliary vector saved at process start.
    let base = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
    assert_ne!(base, 0, "this process has no vDSO");

    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    let line = maps.lines().find(|l| l.ends_with("[vdso]")).expect("no [vdso] line in maps");
    let range = line.split_whitespace().next().unwrap();
    let (start, end) = range.split_once('-').unwrap();
    let start = u64::from_str_radix(start, 16).unwrap();
    let end = u64::from_str_radix(end, 16).unwrap();
    assert_eq!(start, base, "AT_SYSINFO_EHDR does not match the [vdso] mapping");

    // SAFETY: [start, end) is the readable [vdso] mapping, which the kernel keeps for the
    // life of the process and nothing in the tests unmaps or writes.
    let bytes = unsafe { std::slice::from_raw_parts(start as *const u8, (end - start) as usize) };
    (base, bytes)
}

/// An anonymous mapping holding a patched copy of a vDSO, made executable.
pub(crate) struct ExecCopy {
    addr: *mut libc::c_void,
    len: usize,
}

impl ExecCopy {
    /// Maps `bytes` at a fresh address, applies `patches`, and makes the copy read+exec.
    pub(crate) fn new(bytes: &[u8], patches: &[Patch]) -> Self {
        let len = bytes.len();
        // SAFETY: an anonymous private mapping at an address the kernel chooses cannot
        // overlap any existing object.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());

        // SAFETY: the mapping is `len` bytes, writable, and owned by this value alone.
        let copy = unsafe { std::slice::from_raw_parts_mut(addr.cast::<u8>(), len) };
        copy.copy_from_slice(bytes);
        for patch in patches {
            let start = patch.offset as usize;
            copy[start..start + patch.bytes.len()].copy_from_slice(&patch.bytes);
        }

        // SAFETY: the range is exactly the mapping made above; no reference into it is
        // used after this point except for calls through function pointers.
        let rc = unsafe { libc::mprotect(addr, len, libc::PROT_READ | libc::PROT_EXEC) };
        assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
        ExecCopy { addr, len }
    }

    /// The address of byte `offset` of the copy.
    pub(crate) fn addr(&self, offset: u64) -> usize {
        assert!(offset < self.len as u64);
        self.addr as usize + offset as usize
    }
}

impl Drop for ExecCopy {
    fn drop(&mut self) {
        // SAFETY: the mapping belongs to this value, and no function pointer into it
        // outlives it in the tests.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}
