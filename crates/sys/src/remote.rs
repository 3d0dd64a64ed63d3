//! System calls run inside a stopped tracee.
//!
//! torpor injects no code into a dumped process. To make a stopped task call `syscall(nr, a..f)`, it loads the
//! number and arguments into the task's registers, points the instruction pointer at a
//! `syscall` instruction that already exists in the task (inside its vDSO), and
//! single-steps: the kernel runs the call as the task, with the task's credentials and
//! address space, and reports the step once the call has returned. The task's own
//! registers are put back afterwards, so nothing of torpor remains in it.
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

    /// Moves the `syscall` instruction used (after the vDSO moved).
    pub fn set_syscall_ip(&mut self, ip: u64) {
        self.syscall_ip = ip;
    }

    /// Runs one system call in the task; returns the raw result (negative errno on error).
    pub fn raw(&self, nr: i64, args: [u64; 6]) -> Result<i64> {
        let mut r = self.base;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
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
