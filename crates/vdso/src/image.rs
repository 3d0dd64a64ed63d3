//! Reading the ELF structures of a vDSO image.
//!
//! The kernel maps a vDSO from offset 0 of its ELF file, and the file has a single
//! `PT_LOAD` segment at offset 0, so the bytes of the mapping are the bytes of the file.
//! [`Image::parse`] checks that this holds for the bytes it is given, which lets the rest
//! of the crate use file offsets and mapping offsets interchangeably.

use object::elf::{
    FileHeader64, ELFCLASS64, ELFDATA2LSB, ELFMAG, PF_X, PT_LOAD, SHN_UNDEF, SHT_DYNSYM,
    STB_GLOBAL, STB_WEAK, STT_FUNC,
};
use object::read::elf::{FileHeader, ProgramHeader, Sym};
use object::LittleEndian;

use crate::VdsoError;

/// One exported function of a vDSO image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// Name in the dynamic symbol table, without version (`__vdso_clock_gettime`).
    pub name: String,
    /// Offset of the function's first byte from the start of the mapping.
    pub offset: u64,
    /// Size of the function in bytes (`st_size`).
    pub size: u64,
}

/// Exported function symbols of a vDSO image given as its bytes as mapped in memory.
///
/// These are the entries of the dynamic symbol table that are functions (`STT_FUNC`),
/// defined, and global or weak, in table order. Aliases such as `clock_gettime` and
/// `__vdso_clock_gettime` appear as separate entries with the same offset.
///
/// The vDSO is mapped from file offset 0, so a symbol's offset is its `st_value` minus the
/// lowest `p_vaddr` of the `PT_LOAD` segments. Every returned function lies inside a loaded
/// segment and inside `image`.
pub fn symbols(image: &[u8]) -> Result<Vec<Symbol>, VdsoError> {
    Ok(Image::parse(image)?.symbols)
}

/// A loaded segment, as a byte range of the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Offset of the first byte.
    pub(crate) start: u64,
    /// Offset one past the last byte present in the image (`p_offset + p_filesz`).
    pub(crate) end: u64,
    /// Whether the segment is mapped executable.
    pub(crate) executable: bool,
}

/// What the crate needs from a validated vDSO image.
#[derive(Debug, Clone)]
pub(crate) struct Image {
    /// The `e_machine` field.
    pub(crate) machine: u16,
    /// The `PT_LOAD` segments, each checked to lie inside the image.
    pub(crate) segments: Vec<Segment>,
    /// The exported functions, each checked to lie inside one segment.
    pub(crate) symbols: Vec<Symbol>,
}

type Header = FileHeader64<LittleEndian>;

/// Wraps an error of the ELF reader with the structure that was being read.
fn malformed(part: &'static str) -> impl FnOnce(object::read::Error) -> VdsoError {
    move |source| VdsoError::Malformed { part, source }
}

impl Image {
    /// Reads and validates the header, segments and dynamic symbols of `image`.
    pub(crate) fn parse(image: &[u8]) -> Result<Self, VdsoError> {
        // The ELF reader refuses headers that are not 8-byte aligned, but the caller may
        // hand us a slice of a larger buffer at any offset: copy it to aligned storage.
        let storage: Vec<u64>;
        let data: &[u8] = if image.as_ptr().cast::<u64>().is_aligned() {
            image
        } else {
            let mut words = vec![0u64; image.len().div_ceil(8)];
            object::pod::bytes_of_slice_mut(&mut words)[..image.len()].copy_from_slice(image);
            storage = words;
            &object::pod::bytes_of_slice(&storage)[..image.len()]
        };

        // Check the identification bytes ourselves to give a precise reason for refusal.
        if data.len() < 16 || data[..4] != ELFMAG {
            return Err(VdsoError::NotElf { len: data.len() });
        }
        if data[4] != ELFCLASS64 {
            return Err(VdsoError::UnsupportedClass { class: data[4] });
        }
        if data[5] != ELFDATA2LSB {
            return Err(VdsoError::UnsupportedEncoding { encoding: data[5] });
        }
        let header = Header::parse(data).map_err(malformed("header"))?;
        let endian = header.endian().map_err(malformed("header"))?;
        let machine = header.e_machine(endian);

        let (base, segments) = load_segments(header, endian, data)?;

        let sections = header.sections(endian, data).map_err(malformed("section headers"))?;
        let dynsym = sections
            .symbols(endian, data, SHT_DYNSYM)
            .map_err(malformed("dynamic symbol table"))?;
        if dynsym.is_empty() {
            return Err(VdsoError::NoDynamicSymbols);
        }

        let mut symbols = Vec::new();
        for (index, sym) in dynsym.symbols().iter().enumerate() {
            let exported = sym.st_type() == STT_FUNC
                && sym.st_shndx(endian) != SHN_UNDEF
                && matches!(sym.st_bind(), STB_GLOBAL | STB_WEAK);
            if !exported {
                continue;
            }
            let name = sym.name(endian, dynsym.strings()).map_err(malformed("symbol name"))?;
            let name = std::str::from_utf8(name)
                .map_err(|_| VdsoError::SymbolNameNotUtf8 { index })?
                .to_owned();
            // A nameless function cannot be looked up by anyone, so it needs no patch.
            if name.is_empty() {
                continue;
            }
            let value = sym.st_value(endian);
            let size = sym.st_size(endian);
            let offset = value.checked_sub(base);
            let inside = offset.is_some_and(|offset| {
                offset.checked_add(size).is_some_and(|end| {
                    segments.iter().any(|s| s.start <= offset && offset < s.end && end <= s.end)
                })
            });
            match offset {
                Some(offset) if inside => symbols.push(Symbol { name, offset, size }),
                _ => return Err(VdsoError::SymbolOutsideImage { name, value, size }),
            }
        }

        Ok(Image { machine, segments, symbols })
    }

    /// Fails unless the image is for x86_64, the only architecture whose code we emit.
    pub(crate) fn require_x86_64(&self) -> Result<(), VdsoError> {
        if self.machine == object::elf::EM_X86_64 {
            Ok(())
        } else {
            Err(VdsoError::UnsupportedMachine { machine: self.machine })
        }
    }
}

/// The `PT_LOAD` segments as ranges of the mapping, checked against the image, and the
/// lowest `p_vaddr`, which is the address of mapping offset 0.
fn load_segments(
    header: &Header,
    endian: LittleEndian,
    data: &[u8],
) -> Result<(u64, Vec<Segment>), VdsoError> {
    let phdrs = header.program_headers(endian, data).map_err(malformed("program headers"))?;
    let loads = || phdrs.iter().filter(|ph| ph.p_type(endian) == PT_LOAD);
    let base = loads().map(|ph| ph.p_vaddr(endian)).min().ok_or(VdsoError::NoLoadSegment)?;

    let mut segments = Vec::new();
    for ph in loads() {
        let vaddr = ph.p_vaddr(endian);
        let offset = ph.p_offset(endian);
        let filesz = ph.p_filesz(endian);

        // Mapping offsets are computed from addresses, while the ELF reader uses file
        // offsets; both must agree for the image to be read as a mapping.
        let expected = vaddr - base;
        if offset != expected {
            return Err(VdsoError::LayoutMismatch { vaddr, offset, expected });
        }
        let end = offset.checked_add(filesz).filter(|&end| end <= data.len() as u64);
        let Some(end) = end else {
            return Err(VdsoError::SegmentOutsideImage { offset, filesz, len: data.len() });
        };
        segments.push(Segment { start: offset, end, executable: ph.p_flags(endian) & PF_X != 0 });
    }
    Ok((base, segments))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::own_vdso;

    #[test]
    fn own_vdso_exports_the_time_functions() {
        let (_, image) = own_vdso();
        let syms = symbols(image).unwrap();
        for name in ["__vdso_clock_gettime", "__vdso_gettimeofday", "__vdso_time", "__vdso_getcpu"]
        {
            let sym = syms.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("{name}"));
            // Past the ELF header, inside the image, and long enough to hold code.
            assert!(sym.offset >= 64, "{sym:?}");
            assert!(sym.offset + sym.size <= image.len() as u64, "{sym:?}");
            assert!(sym.size > 0, "{sym:?}");
        }
    }

    #[test]
    fn aliases_share_an_offset() {
        let (_, image) = own_vdso();
        let syms = symbols(image).unwrap();
        let offset = |name: &str| syms.iter().find(|s| s.name == name).map(|s| s.offset);
        // Older kernels lack the weak aliases; only compare when both names exist.
        if let (Some(a), Some(b)) = (offset("clock_gettime"), offset("__vdso_clock_gettime")) {
            assert_eq!(a, b);
        }
    }

    #[test]
    fn own_vdso_has_one_executable_segment_at_zero() {
        let (_, image) = own_vdso();
        let parsed = Image::parse(image).unwrap();
        parsed.require_x86_64().unwrap();
        assert_eq!(parsed.segments.len(), 1);
        assert_eq!(parsed.segments[0].start, 0);
        assert!(parsed.segments[0].executable);
    }

    #[test]
    fn misaligned_input_is_read() {
        let (_, image) = own_vdso();
        let mut buffer = vec![0u8; image.len() + 1];
        buffer[1..].copy_from_slice(image);
        assert_eq!(symbols(&buffer[1..]).unwrap(), symbols(image).unwrap());
    }

    #[test]
    fn refusals_name_the_problem() {
        assert!(matches!(symbols(&[]), Err(VdsoError::NotElf { len: 0 })));
        assert!(matches!(symbols(b"not an elf file at all"), Err(VdsoError::NotElf { .. })));

        let (_, image) = own_vdso();
        let mut copy = image.to_vec();
        copy[4] = 1;
        assert!(matches!(symbols(&copy), Err(VdsoError::UnsupportedClass { class: 1 })));

        let mut copy = image.to_vec();
        copy[5] = 2;
        assert!(matches!(symbols(&copy), Err(VdsoError::UnsupportedEncoding { encoding: 2 })));

        // Cut just after the ELF header: the program headers are gone.
        assert!(matches!(symbols(&image[..64]), Err(VdsoError::Malformed { .. })));

        // Drop the section headers: e_shoff = 0 means there are none.
        let mut copy = image.to_vec();
        copy[0x28..0x30].fill(0);
        assert!(matches!(symbols(&copy), Err(VdsoError::NoDynamicSymbols)));
    }
}
