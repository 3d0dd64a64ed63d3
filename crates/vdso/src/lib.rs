//! vDSO symbol tables and trampolines.
//!
//! A process finds its vDSO (`[vdso]`) through the auxiliary vector once, at start-up, and
//! its libc then keeps pointers into it, for example to `__vdso_clock_gettime`. A restored
//! process must therefore find a vDSO at the address it had when it was dumped.
//!
//! When the image was made under the running kernel, the restorer simply moves the running
//! kernel's vDSO (together with its `[vvar]` data pages, which the code reaches at a fixed
//! distance) to the old address. When the kernel changed, the saved vDSO bytes differ from
//! the running ones and the old entry points mean nothing for the new code. The restorer
//! then places the new vDSO somewhere free, maps a private copy of the *old* bytes at the
//! old address, and overwrites the entry of every exported function in that copy so that
//! it continues in the same-named function of the new vDSO:
//!
//! ```text
//!   old address (copy of the saved vDSO)        new_base (running kernel's vDSO)
//!   +--------------------------------+          +--------------------------------+
//!   | __vdso_clock_gettime:          |   jmp    | __vdso_clock_gettime:          |
//!   |   ff 25 00 00 00 00 <target>  -+--------->|   (real code, reads [vvar])    |
//!   |   (rest of the old body, dead) |          |                                |
//!   | __vdso_time:                   |          | (no __vdso_time here)          |
//!   |   mov eax, 201; syscall; ret   |          |                                |
//!   +--------------------------------+          +--------------------------------+
//! ```
//!
//! This crate reads the ELF structures of a vDSO image ([`symbols`]), computes those
//! patches ([`trampolines`]) and finds a `syscall` instruction that the restorer can use
//! to run system calls inside a stopped process ([`find_syscall_insn`]).
//!
//! Every input may come from a corrupted image file: the functions bound every read and
//! report what is wrong through [`VdsoError`] instead of panicking. Only 64-bit
//! little-endian images are read, and patches are only made for x86_64.

#![deny(missing_docs)]
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod image;
mod insn;
#[cfg(test)]
mod testutil;
mod trampoline;

pub use image::{symbols, Symbol};
pub use insn::find_syscall_insn;
pub use trampoline::{trampolines, Patch, PatchKind, JUMP_LEN};

/// Why a vDSO image could not be read or patched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VdsoError {
    /// The bytes do not start with the ELF magic.
    #[error("image of {len} bytes is not an ELF file (missing ELF magic)")]
    NotElf {
        /// Length of the rejected image.
        len: usize,
    },

    /// The ELF class is not 64-bit.
    #[error("ELF class {class} is not supported, only ELFCLASS64 (2)")]
    UnsupportedClass {
        /// The `EI_CLASS` byte found.
        class: u8,
    },

    /// The ELF data encoding is not little-endian.
    #[error("ELF data encoding {encoding} is not supported, only ELFDATA2LSB (1)")]
    UnsupportedEncoding {
        /// The `EI_DATA` byte found.
        encoding: u8,
    },

    /// The image is for another architecture than the one whose code this crate emits.
    #[error("ELF machine {machine} is not x86_64 (62)")]
    UnsupportedMachine {
        /// The `e_machine` field found.
        machine: u16,
    },

    /// An ELF structure is truncated, misplaced or inconsistent.
    #[error("malformed ELF {part}")]
    Malformed {
        /// Which structure could not be read.
        part: &'static str,
        /// What the ELF reader found wrong.
        #[source]
        source: object::read::Error,
    },

    /// The image has no `PT_LOAD` segment, so nothing of it would be mapped.
    #[error("image has no PT_LOAD segment")]
    NoLoadSegment,

    /// A `PT_LOAD` segment is not at the same distance from the image start in the file
    /// as in memory, so the bytes cannot be both the file and the mapping.
    #[error(
        "PT_LOAD segment at vaddr {vaddr:#x} has file offset {offset:#x}, but lies at \
         {expected:#x} in the mapping"
    )]
    LayoutMismatch {
        /// `p_vaddr` of the segment.
        vaddr: u64,
        /// `p_offset` of the segment.
        offset: u64,
        /// Offset of the segment in the mapping (`p_vaddr` minus the lowest `p_vaddr`).
        expected: u64,
    },

    /// A `PT_LOAD` segment extends beyond the bytes given.
    #[error(
        "PT_LOAD segment at offset {offset:#x} with {filesz:#x} bytes ends outside the \
         {len:#x}-byte image"
    )]
    SegmentOutsideImage {
        /// `p_offset` of the segment.
        offset: u64,
        /// `p_filesz` of the segment.
        filesz: u64,
        /// Length of the image.
        len: usize,
    },

    /// The image has no `.dynsym` section, or it is empty.
    #[error("image has no dynamic symbol table")]
    NoDynamicSymbols,

    /// A function name in the dynamic symbol table is not valid UTF-8.
    #[error("dynamic symbol {index} has a name that is not UTF-8")]
    SymbolNameNotUtf8 {
        /// Index of the symbol in `.dynsym`.
        index: usize,
    },

    /// An exported function does not lie inside one loaded segment of the image.
    #[error(
        "function `{name}` at vaddr {value:#x} with {size} bytes lies outside the loaded image"
    )]
    SymbolOutsideImage {
        /// Name of the function.
        name: String,
        /// `st_value` of the symbol.
        value: u64,
        /// `st_size` of the symbol.
        size: u64,
    },

    /// The image has no executable `PT_LOAD` segment.
    #[error("image has no executable PT_LOAD segment")]
    NoExecutableSegment,

    /// The executable segment holds no `syscall` instruction.
    #[error("no syscall instruction (0f 05) in the executable segment")]
    NoSyscallInsn,

    /// An old function is too small for the code that must overwrite its entry.
    #[error("function `{name}` has {size} bytes, too small for its {needed}-byte patch")]
    FunctionTooSmall {
        /// Name of the function.
        name: String,
        /// Its size in the old vDSO.
        size: u64,
        /// Length of the patch it would need.
        needed: usize,
    },

    /// An old function is absent from the new vDSO and cannot be replaced by a syscall.
    #[error("`{name}` is missing from the new vDSO and has no system-call equivalent")]
    NoFallback {
        /// Name of the function.
        name: String,
    },

    /// Two names sharing one entry in the old vDSO lead to different new functions.
    #[error(
        "`{first}` and `{second}` share the entry at offset {offset:#x} of the old vDSO, \
         but lead to {first_target:#x} and {second_target:#x} in the new one"
    )]
    ConflictingAliases {
        /// Offset of the shared entry in the old vDSO.
        offset: u64,
        /// One of the names.
        first: String,
        /// Where it leads in the new vDSO.
        first_target: u64,
        /// The other name.
        second: String,
        /// Where that one leads.
        second_target: u64,
    },

    /// Two patches would overwrite the same bytes.
    #[error(
        "patch for `{first}` at offset {first_offset:#x} ({len} bytes) overlaps the entry of \
         `{second}` at offset {second_offset:#x}"
    )]
    OverlappingPatches {
        /// The function whose patch is too long for the space before the next one.
        first: String,
        /// Its offset.
        first_offset: u64,
        /// Length of its patch.
        len: usize,
        /// The next function.
        second: String,
        /// Its offset.
        second_offset: u64,
    },

    /// The new base plus a function offset does not fit in 64 bits.
    #[error("jump target of `{name}` overflows: base {base:#x} + offset {offset:#x}")]
    TargetOverflow {
        /// Name of the function.
        name: String,
        /// Base address of the new vDSO.
        base: u64,
        /// Offset of the function in the new vDSO.
        offset: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::own_vdso;

    /// Runs every entry point on `image`; the only requirement is not to panic.
    fn exercise(image: &[u8], real: &[u8], base: u64) {
        let _ = symbols(image);
        let _ = find_syscall_insn(image);
        let _ = trampolines(image, real, base);
        let _ = trampolines(real, image, base);
    }

    #[test]
    fn empty_and_garbage_are_refused() {
        let (base, real) = own_vdso();
        for image in [&[][..], &[0x7f], b"\x7fELF", &[0u8; 4096], &[0xffu8; 4096]] {
            assert!(symbols(image).is_err());
            assert!(find_syscall_insn(image).is_err());
            assert!(trampolines(image, real, base).is_err());
            assert!(trampolines(real, image, base).is_err());
        }

        // Deterministic pseudo-random bytes behind a valid ELF identification.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut garbage = b"\x7fELF\x02\x01\x01\x00".to_vec();
        garbage.resize(8192, 0);
        for byte in &mut garbage[8..] {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        assert!(symbols(&garbage).is_err());
        exercise(&garbage, real, base);
    }

    #[test]
    fn truncations_never_panic() {
        let (base, real) = own_vdso();
        for len in 0..real.len() {
            let cut = &real[..len];
            exercise(cut, real, base);
        }
        // Losing the section headers at the end of the file always loses the symbols.
        assert!(symbols(&real[..real.len() / 2]).is_err());
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let (base, real) = own_vdso();
        let mut image = real.to_vec();
        for i in 0..image.len() {
            let saved = image[i];
            for value in [0x00, 0xff, saved ^ 0x80] {
                image[i] = value;
                exercise(&image, real, base);
            }
            image[i] = saved;
        }
    }

    #[test]
    fn errors_carry_values() {
        let err = symbols(&[1, 2, 3]).unwrap_err();
        assert_eq!(err.to_string(), "image of 3 bytes is not an ELF file (missing ELF magic)");
    }
}
