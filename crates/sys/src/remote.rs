//! System calls run inside a stopped tracee.
//!
//! torpor never injects code. To make a stopped task call `syscall(nr, a..f)`, it loads the
//! number and arguments into the task's registers, points the instruction pointer at a
//! `syscall` instruction that already exists in the task (inside its vDSO), and
//! single-steps: the kernel runs the call as the task, with the task's credentials and
//! address space, and reports the step once the call has returned. The task's own
//! registers are put back afterwards, so nothing of torpor remains in it.
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
    /// The task's registers when torpor took it over; the base of every call.
    base: Regs,
    /// Address of a `syscall` instruction inside the task.
    syscall_ip: u64,
}

impl Remote {
    /// Prepares to run calls in stopped tracee `tid`, at the `syscall` instruction at
    /// `syscall_ip` in its address space.
    pub fn new(tid: i32, syscall_ip: u64) -> Result<Self> {
        let base = ptrace::get_regs(tid)?;
        Ok(Self { tid, base, syscall_ip, new_task: std::cell::Cell::new(None) })
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
