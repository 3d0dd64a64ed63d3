//! System calls run inside a stopped tracee.
//!
//! torpor injects no code into a dumped process. To make a stopped task call `syscall(nr, a..f)`, it loads the
//! number and arguments into the task's registers, points the instruction pointer at a
//! `syscall` instruction that already exists in the task (inside its vDSO), and
//! single-steps: the kernel runs the call as the task, with the task's credentials and
//! address space, and reports the step once the call has returned. The task's own
//! registers are put back afterwards, so nothing of torpor remains in it.
//!
//! In a process being dumped, which must outlive a torpor that dies, a thread with a
//! healing frame ([`HealFrame`], [`Remote::heal`]) runs each call at a `syscall; ret`
//! found in its own code instead, stopping at the call's entry and as it returns, so
//! that at no moment would it be unfit to run if let go.
//!
//! A process being restored, which torpor creates and which does not outlive a failed
//! restore, may also run series of calls in one go with [`BATCH_CODE`].
//!
//! `orig_rax` is set to -1 for each call so that the kernel's syscall-restart logic does
//! not act on registers that are not the task's own.

use crate::ptrace::{self, Regs, Stop};
use crate::{Error, Result};

/// A stopped task that torpor drives through remote system calls.
pub struct Remote {
    tid: i32,
    /// The task made by the last call that forked or cloned, as torpor sees it (its pid
    /// in torpor's pid namespace, which may differ from the one the call returned).
    new_task: std::cell::Cell<Option<i32>>,
    /// The tasks made by batches, in order, until taken.
    new_tasks: std::cell::RefCell<Vec<i32>>,
    /// The task's registers when torpor took it over; the base of every call.
    base: Regs,
    /// Address of a `syscall` instruction inside the task.
    syscall_ip: u64,
    /// Put the task's own registers back after every call (see [`Remote::tidy`]).
    tidy: bool,
    /// Run each call so that the task puts itself back if torpor dies meanwhile (see
    /// [`Remote::heal`]).
    heal: Option<HealCall>,
}

/// Where a self-healing call starts: the `syscall; ret` to run, with the stack pointer
/// at the chain that leads from its `ret` into `rt_sigreturn` of the healing frame.
#[derive(Debug, Clone, Copy)]
struct HealCall {
    syscall_ret: u64,
    rsp: u64,
}

impl Remote {
    /// Prepares to run calls in stopped tracee `tid`, at the `syscall` instruction at
    /// `syscall_ip` in its address space.
    pub fn new(tid: i32, syscall_ip: u64) -> Result<Self> {
        let base = ptrace::get_regs(tid)?;
        Ok(Self {
            tid,
            base,
            syscall_ip,
            tidy: false,
            heal: None,
            new_task: std::cell::Cell::new(None),
            new_tasks: Default::default(),
        })
    }

    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// The task's registers as they were when torpor took it over.
    pub fn saved_regs(&self) -> &Regs {
        &self.base
    }

    /// Address of the `syscall` instruction used.
    pub fn syscall_ip(&self) -> u64 {
        self.syscall_ip
    }

    /// Puts the task's own registers back after each call, not only at the end.
    ///
    /// For a process being dumped: if torpor dies, the kernel lets its tasks go with the
    /// registers they hold at that moment and from the stop they are in, so between
    /// calls these must be their own, and the stop one that delivers no signal (see
    /// [`ptrace::park_after_step`]). Only the single step of a call itself is left
    /// exposed. It costs three more ptrace requests and a wait per call.
    pub fn tidy(&mut self) {
        self.tidy = true;
    }

    /// Runs each call so that no moment of it leaves the task unfit to run, should torpor
    /// die: the task then puts its own registers, signal mask and extended state back
    /// by itself. `frame` must already be in the task's memory, below anything the
    /// calls' arguments use.
    ///
    /// A call starts at a `syscall; ret` that exists in the task, with the stack pointer
    /// at `frame`'s chain, and stops only at the call's entry (`PTRACE_SYSCALL`) and in a
    /// `PTRACE_EVENT_STOP` once it has returned, never at a trap. A task let go at any
    /// point runs the call, then its `ret` leads into `rt_sigreturn` with the frame the
    /// kernel would have built for a signal handler: the task resumes exactly where it
    /// was stopped (a system call it was stopped in starts again).
    pub fn heal(&mut self, frame: &HealFrame) {
        self.tidy = true;
        self.heal = Some(HealCall { syscall_ret: frame.syscall_ret, rsp: frame.call_rsp });
    }

    /// Moves the `syscall` instruction used (after the vDSO moved).
    pub fn set_syscall_ip(&mut self, ip: u64) {
        self.syscall_ip = ip;
    }

    /// Runs one system call in the task; returns the raw result (negative errno on error).
    pub fn raw(&self, nr: i64, args: [u64; 6]) -> Result<i64> {
        if let Some(h) = self.heal {
            return self.raw_healing(h, nr, args);
        }
        let mut r = self.call_regs(nr, args);
        r.rip = self.syscall_ip;
        ptrace::set_regs(self.tid, &r)?;
        ptrace::single_step(self.tid)?;
        loop {
            match ptrace::wait_stop(self.tid)? {
                Stop::Trap => break,
                // A clone or fork stops the caller inside the call: note the new task and
                // let the call finish.
                Stop::PtraceEvent(_) => {
                    self.new_task.set(ptrace::event_msg(self.tid).ok().map(|m| m as i32));
                    ptrace::single_step(self.tid)?
                }
                other => {
                    return Err(Error::RemoteStop { tid: self.tid, nr, stop: format!("{other:?}") })
                }
            }
        }
        let out = ptrace::get_regs(self.tid)?;
        if self.tidy {
            // Registers first: from here a dying torpor's task only risks the trap.
            self.restore_regs()?;
            ptrace::park_after_step(self.tid)?;
        }
        Ok(out.rax as i64)
    }

    /// The task's registers with call `nr` and its arguments loaded.
    fn call_regs(&self, nr: i64, args: [u64; 6]) -> Regs {
        let mut r = self.base;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9] = args;
        r
    }

    /// [`Remote::raw`] for a task with a healing frame (see [`Remote::heal`]).
    fn raw_healing(&self, h: HealCall, nr: i64, args: [u64; 6]) -> Result<i64> {
        let unexpected = |stop: ptrace::Stop, when: &str| Error::RemoteStop {
            tid: self.tid,
            nr,
            stop: format!("{stop:?} {when}"),
        };
        let mut r = self.call_regs(nr, args);
        r.rip = h.syscall_ret;
        r.rsp = h.rsp;
        // A call the stop request cut short (it slept) is run again.
        for _ in 0..4 {
            ptrace::set_regs(self.tid, &r)?;
            crate::test_point_in("remote:loaded", self.tid);
            ptrace::syscall(self.tid)?;
            if let Err(stop) = ptrace::wait_syscall_stop(self.tid)? {
                return Err(unexpected(stop, "before the call"));
            }
            crate::test_point_in("remote:entered", self.tid);
            // Asked to stop now, the task takes a PTRACE_EVENT_STOP as the call returns,
            // before it runs any instruction of its own: no trap, no second syscall stop.
            ptrace::interrupt(self.tid)?;
            ptrace::cont(self.tid, 0)?;
            match ptrace::wait_stop(self.tid)? {
                ptrace::Stop::Event(_) => {}
                other => return Err(unexpected(other, "during the call")),
            }
            let out = ptrace::get_regs(self.tid)?;
            crate::test_point_in("remote:returned", self.tid);
            self.restore_regs()?;
            if !(-516..=-512).contains(&(out.rax as i64)) {
                return Ok(out.rax as i64);
            }
        }
        Err(Error::RemoteStop {
            tid: self.tid,
            nr,
            stop: "the call was interrupted 4 times".into(),
        })
    }

    /// Runs one system call and turns a negative result into an error naming the call.
    pub fn call(&self, name: &'static str, nr: i64, args: [u64; 6]) -> Result<u64> {
        let r = self.raw(nr, args)?;
        if (-4095..0).contains(&r) {
            Err(Error::Remote {
                tid: self.tid,
                call: name,
                source: std::io::Error::from_raw_os_error(-r as i32),
            })
        } else {
            Ok(r as u64)
        }
    }

    /// The task the last forking or cloning call made, by its pid in torpor's namespace.
    pub fn take_new_task(&self) -> Option<i32> {
        self.new_task.take()
    }

    /// The tasks that calls of batches made by forking or cloning, in the order made, by
    /// their pids in torpor's namespace.
    pub fn take_new_tasks(&self) -> Vec<i32> {
        self.new_tasks.take()
    }

    /// Puts the task's own registers back.
    pub fn restore_regs(&self) -> Result<()> {
        ptrace::set_regs(self.tid, &self.base)
    }
}

/// Builds an argument array from up to six values.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => {{
        let v: &[u64] = &[$($a as u64),*];
        let mut a = [0u64; 6];
        a[..v.len()].copy_from_slice(v);
        a
    }};
}

/// Machine code that runs a table of system calls inside a task, so that a long series of
/// calls costs one stop instead of one per call.
///
/// torpor otherwise runs each remote call by single-stepping a `syscall` instruction,
/// which costs four ptrace requests and two context switches; restoring thousands of
/// mappings or threads that way spends most of its time in ptrace. The code takes the
/// table between `r12` and `r13`, [`BATCH_ENTRY`] bytes per call (number, six arguments,
/// expected result, then the result it writes back), runs the calls in order, and stops
/// at an `int3` after the last one or at the first whose result is not the one expected:
/// `r12` then points at that call. Assembled from (AT&T syntax):
///
/// ```text
/// 1:  cmp  %r13, %r12            ; past the last call?
///     jae  2f
///     mov  (%r12), %rax          ; number, then the six arguments
///     mov  8(%r12), %rdi
///     mov  16(%r12), %rsi
///     mov  24(%r12), %rdx
///     mov  32(%r12), %r10
///     mov  40(%r12), %r8
///     mov  48(%r12), %r9
///     syscall
///     mov  %rax, 64(%r12)        ; the result, for torpor to read
///     mov  56(%r12), %rcx        ; the expectation
///     cmp  %rcx, %rax
///     je   3f                    ; exactly the value expected
///     movabs $EXPECT_ANY, %r11
///     cmp  %r11, %rcx
///     je   3f                    ; any result will do
///     dec  %r11                  ; EXPECT_SUCCESS
///     cmp  %r11, %rcx
///     jne  2f
///     cmp  $-4095, %rax          ; success: not in -4095..-1
///     jae  2f
/// 3:  add  $72, %r12
///     jmp  1b
/// 2:  int3
/// ```
pub const BATCH_CODE: [u8; 94] = [
    0x4d, 0x39, 0xec, 0x73, 0x58, 0x49, 0x8b, 0x04, 0x24, 0x49, 0x8b, 0x7c, 0x24, 0x08, 0x49, 0x8b,
    0x74, 0x24, 0x10, 0x49, 0x8b, 0x54, 0x24, 0x18, 0x4d, 0x8b, 0x54, 0x24, 0x20, 0x4d, 0x8b, 0x44,
    0x24, 0x28, 0x4d, 0x8b, 0x4c, 0x24, 0x30, 0x0f, 0x05, 0x49, 0x89, 0x44, 0x24, 0x40, 0x49, 0x8b,
    0x4c, 0x24, 0x38, 0x48, 0x39, 0xc8, 0x74, 0x1f, 0x49, 0xbb, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x80, 0x4c, 0x39, 0xd9, 0x74, 0x10, 0x49, 0xff, 0xcb, 0x4c, 0x39, 0xd9, 0x75, 0x0e, 0x48,
    0x3d, 0x01, 0xf0, 0xff, 0xff, 0x73, 0x06, 0x49, 0x83, 0xc4, 0x48, 0xeb, 0xa3, 0xcc,
];

/// Bytes per call in a batch table: number, six arguments, expectation, result.
pub const BATCH_ENTRY: usize = 72;
/// Expectation meaning "any result that is not an error".
const EXPECT_SUCCESS: u64 = 0x8000_0000_0000_0000;
/// Expectation meaning "whatever the result".
const EXPECT_ANY: u64 = 0x8000_0000_0000_0001;

/// What a call of a batch must return for the batch to go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Any result but an error.
    Success,
    /// Exactly this value (an address, a length).
    Value(u64),
    /// Anything, errors included (optional settings the kernel may refuse).
    Any,
}

/// Encodes one call as a table entry.
pub fn batch_entry(nr: i64, args: [u64; 6], expect: Expect) -> [u8; BATCH_ENTRY] {
    let expect = match expect {
        Expect::Success => EXPECT_SUCCESS,
        Expect::Any => EXPECT_ANY,
        Expect::Value(v) => v,
    };
    let mut e = [0u8; BATCH_ENTRY];
    let words = [nr as u64, args[0], args[1], args[2], args[3], args[4], args[5], expect, 0];
    for (i, w) in words.iter().enumerate() {
        e[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
    }
    e
}

/// Where a batch stopped short: the index of the call and what it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStop {
    pub index: usize,
    pub result: i64,
}

impl Remote {
    /// Runs the `count` calls of the table at `table` with [`BATCH_CODE`] loaded at `code`,
    /// both already in the task's memory. Returns where it stopped short, if it did.
    pub fn run_batch(&self, code: u64, table: u64, count: usize) -> Result<Option<BatchStop>> {
        let end = table + (count * BATCH_ENTRY) as u64;
        let mut r = self.base;
        r.orig_rax = u64::MAX;
        r.rip = code;
        r.r12 = table;
        r.r13 = end;
        ptrace::set_regs(self.tid, &r)?;
        ptrace::cont(self.tid, 0)?;
        loop {
            match ptrace::wait_stop(self.tid)? {
                Stop::Trap => break,
                // A clone or fork stops the caller inside the call: note the new task and
                // let the batch go on.
                Stop::PtraceEvent(_) => {
                    let new = ptrace::event_msg(self.tid).ok().map(|m| m as i32);
                    self.new_tasks.borrow_mut().extend(new);
                    ptrace::cont(self.tid, 0)?;
                }
                other => {
                    return Err(Error::RemoteStop {
                        tid: self.tid,
                        nr: -1,
                        stop: format!("{other:?} while running a batch of calls"),
                    })
                }
            }
        }
        let out = ptrace::get_regs(self.tid)?;
        if out.r12 == end {
            return Ok(None);
        }
        let index = (out.r12.wrapping_sub(table) / BATCH_ENTRY as u64) as usize;
        if out.r12 < table || index >= count {
            return Err(Error::RemoteStop {
                tid: self.tid,
                nr: -1,
                stop: format!("a batch of calls ending at {:#x}", out.rip),
            });
        }
        Ok(Some(BatchStop { index, result: out.rax as i64 }))
    }
}

/// Code already in a process that a healing frame needs (see [`Remote::heal`]), found
/// by [`GadgetSearch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gadgets {
    /// The bytes `0f 05 c3`: `syscall; ret`.
    pub syscall_ret: u64,
    /// What the `ret` after a call returns into.
    pub sigreturn: Sigreturn,
}

/// How the `ret` of a call reaches `rt_sigreturn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sigreturn {
    /// `mov $15, %eax` or `mov $15, %rax`, then `syscall`: the signal restorer of the C
    /// library (glibc's and musl's `__restore_rt`) or of a runtime (Go's).
    Restorer(u64),
    /// `pop %rax; ret` (`58 c3`): the stack then gives 15 and the `syscall; ret` again.
    PopRax(u64),
}

/// Looks for [`Gadgets`] in the executable memory of a process, mapping by mapping.
///
/// The bytes are searched at every offset, not only at instruction boundaries: the CPU
/// decodes them the same wherever they sit, and the mappings are not modified.
#[derive(Debug, Default)]
pub struct GadgetSearch {
    syscall_ret: Option<u64>,
    restorer: Option<u64>,
    pop_rax: Option<u64>,
}

impl GadgetSearch {
    /// Scans `code`, the bytes at address `base`.
    pub fn scan(&mut self, code: &[u8], base: u64) {
        const SYSCALL_RET: &[u8] = &[0x0f, 0x05, 0xc3];
        const RESTORERS: [&[u8]; 2] = [
            &[0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05],
            &[0xb8, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05],
        ];
        let find = |needle: &[u8]| {
            code.windows(needle.len()).position(|w| w == needle).map(|i| base + i as u64)
        };
        if self.syscall_ret.is_none() {
            self.syscall_ret = find(SYSCALL_RET);
        }
        if self.restorer.is_none() {
            self.restorer = RESTORERS.iter().find_map(|r| find(r));
        }
        if self.pop_rax.is_none() && self.restorer.is_none() {
            self.pop_rax = find(&[0x58, 0xc3]);
        }
    }

    /// What was found, once it is enough.
    pub fn found(&self) -> Option<Gadgets> {
        let sigreturn = match (self.restorer, self.pop_rax) {
            (Some(a), _) => Sigreturn::Restorer(a),
            (None, Some(a)) => Sigreturn::PopRax(a),
            (None, None) => return None,
        };
        Some(Gadgets { syscall_ret: self.syscall_ret?, sigreturn })
    }

    /// Whether the best gadgets are found and scanning can stop.
    pub fn done(&self) -> bool {
        self.syscall_ret.is_some() && self.restorer.is_some()
    }
}

/// A thread's healing frame: what `rt_sigreturn` needs to put the thread back as torpor
/// found it, laid out as the kernel lays out the frame of a signal handler (x86-64
/// `struct rt_sigframe`), with the extended state after it, and the return chain of
/// the calls before it.
#[derive(Debug, Clone)]
pub struct HealFrame {
    /// Where the bytes go: the lowest address, 64-byte aligned.
    pub addr: u64,
    pub bytes: Vec<u8>,
    /// The stack pointer of each call.
    call_rsp: u64,
    syscall_ret: u64,
}

/// `FP_XSTATE_MAGIC1`, in the software-reserved bytes of an XSAVE area made for a
/// signal frame, and `FP_XSTATE_MAGIC2`, right after the area: without them the kernel
/// would take only the legacy part and reset the vector registers' upper halves.
const XSTATE_MAGIC1: u32 = 0x4650_5853;
const XSTATE_MAGIC2: u32 = 0x4650_5845;
/// Offset of those software-reserved bytes (`struct _fpx_sw_bytes`) in the area.
const SW_RESERVED: usize = 464;
/// The return chain (16 bytes), then `struct rt_sigframe` (pretcode, `struct ucontext`
/// of 304 bytes, `struct siginfo` of 128), padded so the XSAVE area after it is 64-byte
/// aligned, as `xrstor` needs.
const FRAME_HEAD: usize = 512;
/// `uc_flags`: the frame has an XSAVE area, and its `ss` is to be restored.
const UC_FP_XSTATE: u64 = 1;
const UC_SIGCONTEXT_SS: u64 = 2;

impl HealFrame {
    /// Bytes a frame for `xsave` (the area `PTRACE_GETREGSET NT_X86_XSTATE` gave) takes,
    /// or `None` when the area is not one (shorter than the legacy area and header).
    pub fn len(xsave: &[u8]) -> Option<usize> {
        (576..=crate::ptrace::MAX_XSAVE)
            .contains(&xsave.len())
            .then(|| (FRAME_HEAD + xsave.len() + 4).next_multiple_of(64))
    }

    /// Builds the frame that puts back `base` (the registers torpor found), `xsave` and
    /// the signal mask `blocked`, to sit right below address `top`.
    ///
    /// A task stopped inside a system call that the kernel would start again when let
    /// go (its result one of the kernel's restart codes) gets it started again by the
    /// frame instead: `rt_sigreturn` turns the kernel's restart logic off.
    pub fn new(base: &Regs, xsave: &[u8], blocked: u64, g: Gadgets, top: u64) -> Option<Self> {
        let len = Self::len(xsave)?;
        // Where ptrace gives the features the area holds (XCR0), a signal frame has
        // `struct _fpx_sw_bytes`: magic, size with the closing magic, features, size.
        let features = u64::from_ne_bytes(xsave[SW_RESERVED..SW_RESERVED + 8].try_into().ok()?);
        let size = xsave.len();
        let addr = top.checked_sub(len as u64)? & !63;
        let mut b = vec![0u8; (top - addr) as usize];
        let mut put = |at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_ne_bytes());

        // The chain, then the frame at A = addr + 16 whose first word (`pretcode`) the
        // last `ret` consumes; rt_sigreturn finds the frame 8 bytes below its stack.
        let a = 16;
        let call_rsp = match g.sigreturn {
            Sigreturn::Restorer(at) => {
                put(a, at);
                addr + a as u64
            }
            Sigreturn::PopRax(at) => {
                put(0, at);
                put(8, libc::SYS_rt_sigreturn as u64);
                put(a, g.syscall_ret);
                addr
            }
        };
        let uc = a + 8;
        put(uc, UC_FP_XSTATE | UC_SIGCONTEXT_SS);
        // uc_stack: flags no sigaltstack accepts (4), so that the kernel leaves the
        // thread's alternate stack as it is.
        put(uc + 24, 4);
        let mut r = *base;
        if (r.orig_rax as i64) >= 0 && [-512, -513, -514, -516].contains(&(r.rax as i64)) {
            r.rax = r.orig_rax;
            r.rip -= 2;
        }
        let sc = uc + 40;
        let gprs = [
            r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx,
            r.rdx, r.rax, r.rcx, r.rsp, r.rip, r.eflags,
        ];
        for (i, v) in gprs.iter().enumerate() {
            put(sc + i * 8, *v);
        }
        // cs, gs, fs, ss: four 16-bit selectors.
        put(sc + 144, (r.cs & 0xffff) | (r.ss & 0xffff) << 48);
        put(sc + 168, blocked);
        let fpstate = FRAME_HEAD;
        put(sc + 184, addr + fpstate as u64);
        put(uc + 296, blocked);
        b[fpstate..fpstate + size].copy_from_slice(xsave);
        let sw = fpstate + SW_RESERVED;
        b[sw..sw + 4].copy_from_slice(&XSTATE_MAGIC1.to_ne_bytes());
        b[sw + 4..sw + 8].copy_from_slice(&(size as u32 + 4).to_ne_bytes());
        b[sw + 8..sw + 16].copy_from_slice(&features.to_ne_bytes());
        b[sw + 16..sw + 20].copy_from_slice(&(size as u32).to_ne_bytes());
        b[fpstate + size..fpstate + size + 4].copy_from_slice(&XSTATE_MAGIC2.to_ne_bytes());
        Some(Self { addr, bytes: b, call_rsp, syscall_ret: g.syscall_ret })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xsave(size: usize) -> Vec<u8> {
        let mut x = vec![0xaau8; size];
        x[SW_RESERVED..SW_RESERVED + 48].fill(0);
        x[SW_RESERVED] = 0xe7;
        x
    }

    fn word(b: &[u8], at: usize) -> u64 {
        u64::from_ne_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn gadgets_are_found_at_any_offset() {
        let mut s = GadgetSearch::default();
        s.scan(&[0x90, 0x0f, 0x05, 0xc3, 0x58, 0xc3], 0x1000);
        assert_eq!(
            s.found(),
            Some(Gadgets { syscall_ret: 0x1001, sigreturn: Sigreturn::PopRax(0x1004) })
        );
        assert!(!s.done());
        s.scan(&[0xcc, 0xb8, 0x0f, 0, 0, 0, 0x0f, 0x05], 0x2000);
        assert_eq!(s.found().unwrap().sigreturn, Sigreturn::Restorer(0x2001));
        assert!(s.done());
    }

    #[test]
    fn a_frame_restarts_an_interrupted_call_and_aligns_its_state() {
        let mut base: Regs = unsafe { std::mem::zeroed() };
        base.rip = 0x40_1002;
        base.rax = -512i64 as u64;
        base.orig_rax = 7;
        base.rsp = 0x7fff_0000;
        base.cs = 0x33;
        base.ss = 0x2b;
        let g = Gadgets { syscall_ret: 0x5000, sigreturn: Sigreturn::Restorer(0x6000) };
        let top = 0x7ffe_f000u64;
        let f = HealFrame::new(&base, &xsave(2696), 0x55, g, top).expect("frame");
        assert_eq!(f.addr % 64, 0);
        assert_eq!(f.addr + f.bytes.len() as u64, top);
        assert_eq!(f.call_rsp, f.addr + 16);
        assert_eq!(word(&f.bytes, 16), 0x6000, "the ret leads into the restorer");
        let sc = 16 + 8 + 40;
        assert_eq!(word(&f.bytes, sc + 13 * 8), 7, "rax is the call to start again");
        assert_eq!(word(&f.bytes, sc + 16 * 8), 0x40_1000, "rip back on its syscall");
        assert_eq!(word(&f.bytes, sc + 15 * 8), 0x7fff_0000);
        let fp = word(&f.bytes, sc + 184);
        assert_eq!(fp % 64, 0);
        let at = (fp - f.addr) as usize;
        assert_eq!(&f.bytes[at + 2696..at + 2700], &XSTATE_MAGIC2.to_ne_bytes());
        let sw = at + SW_RESERVED;
        assert_eq!(&f.bytes[sw..sw + 4], &XSTATE_MAGIC1.to_ne_bytes());
        assert_eq!(word(&f.bytes, sw + 8), 0xe7, "the features ptrace gave");
        assert_eq!(&f.bytes[sw + 16..sw + 20], &2696u32.to_ne_bytes());
        assert_eq!(word(&f.bytes, 16 + 8 + 296), 0x55, "the thread's own mask");
        assert!(HealFrame::new(&base, &[0; 500], 0, g, top).is_none(), "no XSAVE area, no frame");
    }
}
