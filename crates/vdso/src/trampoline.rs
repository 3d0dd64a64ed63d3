//! Patches that send calls through an old vDSO copy to the running kernel's vDSO.
//!
//! Each exported function of the old vDSO gets its entry overwritten with one of:
//!
//! ```text
//!   jump     ff 25 00 00 00 00  <target, u64 LE>    jmp qword ptr [rip+0]   (14 bytes)
//!   syscall  b8 <nr, u32 LE>  0f 05  c3             mov eax, nr; syscall; ret (8 bytes)
//! ```
//!
//! The jump reads its target from the 8 bytes that follow it, so it needs no scratch
//! register: every argument register and every callee-saved register reaches the new
//! function untouched, and the new function returns straight to the original caller.

use std::collections::{BTreeMap, HashMap};

use crate::image::{Image, Symbol};
use crate::VdsoError;

/// Length of the jump written over a function entry that exists in the new vDSO.
pub const JUMP_LEN: usize = 14;

/// What a [`Patch`] makes the old entry do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// Jump to the same-named function of the new vDSO, at this absolute address.
    Jump {
        /// Absolute address of the new function.
        target: u64,
    },
    /// The new vDSO lacks the function: make the equivalent system call and return.
    Syscall {
        /// The x86_64 system call number.
        nr: u32,
    },
}

/// A patch to apply to a copy of the old vDSO: write `bytes` at `offset`.
///
/// There is one patch per distinct function entry; names that share the entry (such as
/// `__vdso_time` and its alias `time`) are covered by the same patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    /// Offset of the function entry in the old vDSO mapping.
    pub offset: u64,
    /// Machine code to write there.
    pub bytes: Vec<u8>,
    /// Name of the function, the `__vdso_` one when the entry has several.
    pub symbol: String,
    /// Other exported names at the same entry.
    pub aliases: Vec<String>,
    /// What the code does.
    pub kind: PatchKind,
}

/// Patches that make every function exported by `old` continue in the same-named
/// function of `new`, mapped at `new_base`.
///
/// `old` and `new` are vDSO images as mapped in memory. A function that `new` lacks gets
/// the system call the kernel ABI defines for it, when there is one (`clock_gettime`,
/// `gettimeofday`, `time`, `getcpu`, `clock_getres`); otherwise the result is
/// [`VdsoError::NoFallback`] naming it. A function too small to hold its patch is refused
/// with [`VdsoError::FunctionTooSmall`]. Both images must be x86_64.
pub fn trampolines(old: &[u8], new: &[u8], new_base: u64) -> Result<Vec<Patch>, VdsoError> {
    let old = Image::parse(old)?;
    old.require_x86_64()?;
    let new = Image::parse(new)?;
    new.require_x86_64()?;
    plan(&old.symbols, &new.symbols, new_base)
}

/// System calls with the same arguments and result as a vDSO function of the same name.
///
/// Each of these takes at most three arguments, which the C calling convention and the
/// system call convention both pass in rdi, rsi and rdx; and the vDSO functions return
/// the raw system call result (a negative errno on failure), as `syscall` does.
const SYSCALL_FALLBACKS: &[(&str, u32)] = &[
    ("clock_gettime", 228),
    ("gettimeofday", 96),
    ("time", 201),
    ("getcpu", 309),
    ("clock_getres", 229),
];

/// The system call that can stand in for the vDSO function `name`, if any.
fn fallback_nr(name: &str) -> Option<u32> {
    let base = name.strip_prefix("__vdso_").unwrap_or(name);
    SYSCALL_FALLBACKS.iter().find(|(n, _)| *n == base).map(|&(_, nr)| nr)
}

/// `jmp qword ptr [rip+0]` followed by the absolute target.
fn jump_bytes(target: u64) -> Vec<u8> {
    let mut bytes = vec![0xff, 0x25, 0, 0, 0, 0];
    bytes.extend_from_slice(&target.to_le_bytes());
    bytes
}

/// `mov eax, nr; syscall; ret`.
fn syscall_bytes(nr: u32) -> Vec<u8> {
    let mut bytes = vec![0xb8];
    bytes.extend_from_slice(&nr.to_le_bytes());
    bytes.extend_from_slice(&[0x0f, 0x05, 0xc3]);
    bytes
}

/// Computes the patches from already validated symbol lists.
///
/// Split from [`trampolines`] so that tests can hide symbols of the new vDSO.
fn plan(old: &[Symbol], new: &[Symbol], new_base: u64) -> Result<Vec<Patch>, VdsoError> {
    // A versioned vDSO may list a name twice; the first definition is the one we use.
    let mut new_by_name: HashMap<&str, u64> = HashMap::new();
    for sym in new {
        new_by_name.entry(sym.name.as_str()).or_insert(sym.offset);
    }

    // Aliases share an entry, and one patch at that entry serves every name.
    let mut entries: BTreeMap<u64, Vec<&Symbol>> = BTreeMap::new();
    for sym in old {
        let names = entries.entry(sym.offset).or_default();
        if !names.iter().any(|s| s.name == sym.name) {
            names.push(sym);
        }
    }

    let mut patches: Vec<Patch> = Vec::with_capacity(entries.len());
    for (offset, mut names) in entries {
        // Put the `__vdso_` name first: it is the one the kernel documents.
        names.sort_by_key(|s| !s.name.starts_with("__vdso_"));
        let primary = names[0];

        let mut resolved: Option<(&str, u64)> = None;
        for sym in &names {
            let Some(&new_offset) = new_by_name.get(sym.name.as_str()) else {
                continue;
            };
            let target =
                new_base.checked_add(new_offset).ok_or_else(|| VdsoError::TargetOverflow {
                    name: sym.name.clone(),
                    base: new_base,
                    offset: new_offset,
                })?;
            match resolved {
                None => resolved = Some((&sym.name, target)),
                Some((first, first_target)) if first_target != target => {
                    return Err(VdsoError::ConflictingAliases {
                        offset,
                        first: first.to_owned(),
                        first_target,
                        second: sym.name.clone(),
                        second_target: target,
                    });
                }
                Some(_) => {}
            }
        }

        let kind = match resolved {
            Some((_, target)) => PatchKind::Jump { target },
            None => match names.iter().find_map(|s| fallback_nr(&s.name)) {
                Some(nr) => PatchKind::Syscall { nr },
                None => return Err(VdsoError::NoFallback { name: primary.name.clone() }),
            },
        };
        let bytes = match kind {
            PatchKind::Jump { target } => jump_bytes(target),
            PatchKind::Syscall { nr } => syscall_bytes(nr),
        };

        // Aliases normally agree on the size; if not, the smallest claim is what we trust.
        let size = names.iter().map(|s| s.size).min().unwrap_or(0);
        if size < bytes.len() as u64 {
            return Err(VdsoError::FunctionTooSmall {
                name: primary.name.clone(),
                size,
                needed: bytes.len(),
            });
        }

        // Entries are visited in address order, so only the previous patch can reach here.
        if let Some(prev) = patches.last() {
            if prev.offset + prev.bytes.len() as u64 > offset {
                return Err(VdsoError::OverlappingPatches {
                    first: prev.symbol.clone(),
                    first_offset: prev.offset,
                    len: prev.bytes.len(),
                    second: primary.name.clone(),
                    second_offset: offset,
                });
            }
        }

        patches.push(Patch {
            offset,
            bytes,
            symbol: primary.name.clone(),
            aliases: names[1..].iter().map(|s| s.name.clone()).collect(),
            kind,
        });
    }
    Ok(patches)
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;
    use crate::image::symbols;
    use crate::testutil::{own_vdso, ExecCopy};

    type ClockGettime = unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int;
    type Time = unsafe extern "C" fn(*mut libc::time_t) -> libc::time_t;
    type Getcpu = unsafe extern "C" fn(*mut u32, *mut u32, *mut libc::c_void) -> libc::c_int;

    fn sym(name: &str, offset: u64, size: u64) -> Symbol {
        Symbol { name: name.to_owned(), offset, size }
    }

    fn entry(image: &[u8], name: &str) -> u64 {
        symbols(image).unwrap().into_iter().find(|s| s.name == name).unwrap().offset
    }

    /// Calls a `clock_gettime` entry and returns the raw result and the time.
    fn call_clock_gettime(addr: usize, clock: libc::clockid_t) -> (libc::c_int, libc::timespec) {
        // SAFETY: addr is the entry of a function with the vDSO `clock_gettime` signature,
        // in a mapping that is executable and outlives the call.
        let f: ClockGettime = unsafe { std::mem::transmute(addr) };
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: ts is a valid, writable timespec.
        let rc = unsafe { f(clock, &mut ts) };
        (rc, ts)
    }

    /// The libc reading of `clock`, in nanoseconds.
    fn libc_now(clock: libc::clockid_t) -> i128 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: ts is a valid, writable timespec.
        assert_eq!(unsafe { libc::clock_gettime(clock, &mut ts) }, 0);
        nanos(&ts)
    }

    fn nanos(ts: &libc::timespec) -> i128 {
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    }

    /// Checks that the copy's `name` entry reads `clock` within a second of libc.
    fn assert_clock_matches(copy: &ExecCopy, image: &[u8], name: &str, clock: libc::clockid_t) {
        let before = libc_now(clock);
        let (rc, ts) = call_clock_gettime(copy.addr(entry(image, name)), clock);
        let after = libc_now(clock);
        assert_eq!(rc, 0, "{name}({clock})");
        let got = nanos(&ts);
        // Coarse clocks may lag the fine ones by a tick; a second is a generous bound.
        assert!(before - 1_000_000_000 <= got && got <= after + 1_000_000_000, "{name}");
    }

    #[test]
    fn jumps_reach_the_real_vdso() {
        let (base, image) = own_vdso();
        let patches = trampolines(image, image, base).unwrap();
        assert!(patches.iter().all(|p| matches!(p.kind, PatchKind::Jump { .. })));
        let copy = ExecCopy::new(image, &patches);

        for name in ["__vdso_clock_gettime", "clock_gettime"] {
            if symbols(image).unwrap().iter().any(|s| s.name == name) {
                assert_clock_matches(&copy, image, name, libc::CLOCK_MONOTONIC);
                assert_clock_matches(&copy, image, name, libc::CLOCK_REALTIME);
            }
        }

        // SAFETY: the entry has the vDSO `time` signature.
        let time: Time = unsafe { std::mem::transmute(copy.addr(entry(image, "__vdso_time"))) };
        // SAFETY: `copy` is alive and executable, and `time` accepts a null pointer.
        let t = unsafe { time(std::ptr::null_mut()) };
        // SAFETY: libc::time accepts a null pointer.
        let now = unsafe { libc::time(std::ptr::null_mut()) };
        assert!((t - now).abs() <= 1, "{t} vs {now}");
    }

    #[test]
    fn missing_functions_fall_back_to_syscalls() {
        let (base, image) = own_vdso();
        let old = symbols(image).unwrap();
        let hidden = ["clock_gettime", "time", "getcpu"];
        let new: Vec<Symbol> = old
            .iter()
            .filter(|s| !hidden.contains(&s.name.trim_start_matches("__vdso_")))
            .cloned()
            .collect();
        let patches = plan(&old, &new, base).unwrap();

        let clock = patches.iter().find(|p| p.symbol == "__vdso_clock_gettime").unwrap();
        assert_eq!(clock.kind, PatchKind::Syscall { nr: 228 });
        assert_eq!(clock.bytes, [0xb8, 228, 0, 0, 0, 0x0f, 0x05, 0xc3]);
        let gtod = patches.iter().find(|p| p.symbol == "__vdso_gettimeofday").unwrap();
        assert!(matches!(gtod.kind, PatchKind::Jump { .. }));

        let copy = ExecCopy::new(image, &patches);
        assert_clock_matches(&copy, image, "__vdso_clock_gettime", libc::CLOCK_MONOTONIC);
        assert_clock_matches(&copy, image, "__vdso_clock_gettime", libc::CLOCK_REALTIME);

        // The vDSO returns the raw syscall result on error; so must the fallback.
        let real =
            call_clock_gettime(base as usize + entry(image, "__vdso_clock_gettime") as usize, 9999);
        let fallback = call_clock_gettime(copy.addr(entry(image, "__vdso_clock_gettime")), 9999);
        assert_eq!(fallback.0, -libc::EINVAL);
        assert_eq!(real.0, fallback.0);

        // SAFETY: the entry has the vDSO `time` signature.
        let time: Time = unsafe { std::mem::transmute(copy.addr(entry(image, "__vdso_time"))) };
        let mut stored: libc::time_t = 0;
        // SAFETY: stored is a valid, writable time_t.
        let t = unsafe { time(&mut stored) };
        // SAFETY: libc::time accepts a null pointer.
        let now = unsafe { libc::time(std::ptr::null_mut()) };
        assert!((t - now).abs() <= 1, "{t} vs {now}");
        assert_eq!(stored, t);

        // SAFETY: the entry has the vDSO `getcpu` signature.
        let getcpu: Getcpu =
            unsafe { std::mem::transmute(copy.addr(entry(image, "__vdso_getcpu"))) };
        let (mut cpu, mut node) = (u32::MAX, u32::MAX);
        // SAFETY: cpu and node are valid, writable u32; the cache argument may be null.
        let rc = unsafe { getcpu(&mut cpu, &mut node, std::ptr::null_mut()) };
        assert_eq!(rc, 0);
        // SAFETY: sysconf has no memory-safety preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
        assert!(i64::from(cpu) < cpus as i64, "cpu {cpu} of {cpus}");
    }

    #[test]
    fn aliases_get_one_patch() {
        let (base, image) = own_vdso();
        let patches = trampolines(image, image, base).unwrap();
        let clock = patches.iter().find(|p| p.symbol == "__vdso_clock_gettime").unwrap();
        if symbols(image).unwrap().iter().any(|s| s.name == "clock_gettime") {
            assert_eq!(clock.aliases, ["clock_gettime"]);
        }
        let mut offsets: Vec<u64> = patches.iter().map(|p| p.offset).collect();
        offsets.dedup();
        assert_eq!(offsets.len(), patches.len());
    }

    #[test]
    fn jump_encoding() {
        let target = 0x7fff_1234_5678_9abc;
        let patches = plan(&[sym("f", 0x100, 32)], &[sym("f", 0x40, 8)], target - 0x40).unwrap();
        assert_eq!(patches.len(), 1);
        assert_eq!(patches[0].offset, 0x100);
        assert_eq!(patches[0].kind, PatchKind::Jump { target });
        let mut expected = vec![0xff, 0x25, 0, 0, 0, 0];
        expected.extend_from_slice(&target.to_le_bytes());
        assert_eq!(patches[0].bytes, expected);
        assert_eq!(patches[0].bytes.len(), JUMP_LEN);
    }

    #[test]
    fn missing_without_fallback_is_refused() {
        let old = [sym("__vdso_getrandom", 0x100, 64)];
        let err = plan(&old, &[], 0x1000).unwrap_err();
        assert!(matches!(&err, VdsoError::NoFallback { name } if name == "__vdso_getrandom"));
        assert!(err.to_string().contains("__vdso_getrandom"));
    }

    #[test]
    fn small_functions_are_refused() {
        let err = plan(&[sym("f", 0x100, 13)], &[sym("f", 0, 64)], 0x1000).unwrap_err();
        assert!(matches!(err, VdsoError::FunctionTooSmall { size: 13, needed: 14, .. }));
        assert!(err.to_string().contains("`f` has 13 bytes"), "{err}");

        // The syscall fallback is shorter than the jump and fits where a jump would not.
        let patches = plan(&[sym("time", 0x100, 8)], &[], 0x1000).unwrap();
        assert_eq!(patches[0].kind, PatchKind::Syscall { nr: 201 });
        let err = plan(&[sym("time", 0x100, 7)], &[], 0x1000).unwrap_err();
        assert!(matches!(err, VdsoError::FunctionTooSmall { size: 7, needed: 8, .. }));
    }

    #[test]
    fn overlapping_entries_are_refused() {
        let old = [sym("f", 0x100, 64), sym("g", 0x108, 64)];
        let new = [sym("f", 0, 64), sym("g", 0x40, 64)];
        let err = plan(&old, &new, 0x1000).unwrap_err();
        assert!(matches!(err, VdsoError::OverlappingPatches { first_offset: 0x100, .. }));
    }

    #[test]
    fn aliases_leading_apart_are_refused() {
        let old = [sym("__vdso_f", 0x100, 64), sym("f", 0x100, 64)];
        let new = [sym("__vdso_f", 0, 64), sym("f", 0x40, 64)];
        let err = plan(&old, &new, 0x1000).unwrap_err();
        assert!(matches!(err, VdsoError::ConflictingAliases { offset: 0x100, .. }));
    }

    #[test]
    fn alias_present_only_under_one_name_is_followed() {
        let old = [sym("time", 0x100, 64), sym("__vdso_time", 0x100, 64)];
        let new = [sym("__vdso_time", 0x40, 64)];
        let patches = plan(&old, &new, 0x1000).unwrap();
        assert_eq!(patches[0].symbol, "__vdso_time");
        assert_eq!(patches[0].aliases, ["time"]);
        assert_eq!(patches[0].kind, PatchKind::Jump { target: 0x1040 });
    }

    #[test]
    fn target_overflow_is_refused() {
        let err = plan(&[sym("f", 0, 64)], &[sym("f", 0x40, 64)], u64::MAX).unwrap_err();
        assert!(matches!(err, VdsoError::TargetOverflow { offset: 0x40, .. }));
    }
}
