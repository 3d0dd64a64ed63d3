//! Finding a `syscall` instruction in a vDSO.
//!
//! To run a system call inside a stopped process, the restorer loads the registers,
//! points the instruction pointer at a `syscall` instruction and single-steps. The vDSO is
//! mapped executable in every process, so its code is a convenient place to find one.

use crate::image::Image;
use crate::VdsoError;

/// The x86_64 `syscall` instruction.
const SYSCALL: [u8; 2] = [0x0f, 0x05];

/// The x86_64 near `ret` instruction.
const RET: u8 = 0xc3;

/// The opcode of `mov eax, imm32`, which sets the system call number.
const MOV_EAX_IMM32: u8 = 0xb8;

/// Finds a `syscall` instruction (bytes `0f 05`) inside an executable segment of a vDSO
/// image given as its bytes as mapped in memory, and returns its offset.
///
/// The CPU decodes from wherever the instruction pointer is, so any `0f 05` pair works.
/// Still, one that the compiler emitted as an instruction is preferred, so that the
/// choice does not hinge on bytes inside some other instruction's immediate. In order of
/// preference: inside an exported function and looking like a real call site (preceded
/// by `mov eax, imm32` or followed by `ret`), inside a function, looking like a call site,
/// anywhere in an executable segment. Within a rank, the lowest offset wins.
pub fn find_syscall_insn(image: &[u8]) -> Result<u64, VdsoError> {
    let parsed = Image::parse(image)?;
    parsed.require_x86_64()?;

    let code: Vec<_> = parsed.segments.iter().filter(|s| s.executable).collect();
    if code.is_empty() {
        return Err(VdsoError::NoExecutableSegment);
    }
    let functions = merged_ranges(parsed.symbols.iter().map(|s| (s.offset, s.offset + s.size)));

    // Lower is better: (outside a function, not like a call site), then the offset.
    let mut candidates = Vec::new();
    for segment in code {
        // Image::parse checked that every segment lies inside `image`.
        let (start, end) = (segment.start as usize, segment.end as usize);
        let bytes = &image[start..end];
        for (i, pair) in bytes.windows(2).enumerate() {
            if pair != SYSCALL {
                continue;
            }
            let offset = (start + i) as u64;
            let before_ret = bytes.get(i + 2) == Some(&RET);
            let after_mov = i >= 5 && bytes[i - 5] == MOV_EAX_IMM32;
            let in_function = contains(&functions, offset, offset + 2);
            candidates.push(((!in_function, !(before_ret || after_mov)), offset));
        }
    }
    candidates.into_iter().min().map(|(_, offset)| offset).ok_or(VdsoError::NoSyscallInsn)
}

/// Sorts half-open ranges and merges the overlapping or touching ones.
fn merged_ranges(ranges: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut ranges: Vec<_> = ranges.filter(|(start, end)| start < end).collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// Whether `[start, end)` lies inside one of the sorted, disjoint `ranges`.
fn contains(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|r| r.0 <= start);
    i > 0 && end <= ranges[i - 1].1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::symbols;
    use crate::testutil::own_vdso;

    #[test]
    fn finds_a_syscall_in_the_real_vdso() {
        let (_, image) = own_vdso();
        let offset = find_syscall_insn(image).unwrap() as usize;
        assert_eq!(image[offset..offset + 2], SYSCALL);

        // Every current x86_64 vDSO has time functions with a syscall fallback in them.
        let syms = symbols(image).unwrap();
        let inside = syms
            .iter()
            .any(|s| s.offset as usize <= offset && offset + 2 <= (s.offset + s.size) as usize);
        assert!(inside, "syscall at {offset:#x} is in no function");
    }

    #[test]
    fn ranges_merge_and_contain() {
        let merged = merged_ranges([(10, 20), (0, 5), (15, 30), (30, 31), (40, 40)].into_iter());
        assert_eq!(merged, [(0, 5), (10, 31)]);
        assert!(contains(&merged, 0, 2));
        assert!(contains(&merged, 29, 31));
        assert!(!contains(&merged, 4, 6));
        assert!(!contains(&merged, 31, 33));
        assert!(!contains(&[], 0, 2));
    }
}
