//! ptrace requests torpor uses, as safe functions over a stopped tracee.
//!
//! `nix` covers the common requests; the register sets, signal-queue peeking and the rseq
//! query are not in it, so they are wrapped here by hand.

use std::io;

use libc::{c_long, c_void, pid_t};
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::{Error, Result};

/// `NT_X86_XSTATE`: the register set holding the XSAVE area.
const NT_X86_XSTATE: libc::c_int = 0x202;
/// `PTRACE_GET_RSEQ_CONFIGURATION` (Linux 5.13).
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
/// Largest XSAVE area we accept from the kernel (AMX makes it ~11 KiB).
pub const MAX_XSAVE: usize = 16 << 10;

pub type Regs = libc::user_regs_struct;

fn pid(p: i32) -> Pid {
    Pid::from_raw(p)
}

/// Converts the return of a raw `ptrace` call.
fn check(what: &'static str, tid: i32, ret: c_long) -> Result<c_long> {
    if ret < 0 {
        Err(Error::Ptrace { what, tid, source: io::Error::last_os_error() })
    } else {
        Ok(ret)
    }
}

fn nix_err(what: &'static str, tid: i32) -> impl FnOnce(nix::errno::Errno) -> Error {
    move |e| Error::Ptrace { what, tid, source: io::Error::from_raw_os_error(e as i32) }
}

/// Attaches to `tid` without stopping it (`PTRACE_SEIZE`), with `PTRACE_O_EXITKILL` when
/// `exit_kill` is set so the tracee dies if torpor does.
pub fn seize(tid: i32, exit_kill: bool) -> Result<()> {
    let mut opts = ptrace::Options::PTRACE_O_TRACESYSGOOD;
    if exit_kill {
        opts |= ptrace::Options::PTRACE_O_EXITKILL;
    }
    ptrace::seize(pid(tid), opts).map_err(nix_err("PTRACE_SEIZE", tid))
}

/// Seizes a process torpor is building: it dies with torpor (`PTRACE_O_EXITKILL`), and
/// the threads and processes it creates are seized too, stopped before they run.
pub fn seize_builder(tid: i32) -> Result<()> {
    let opts = ptrace::Options::PTRACE_O_TRACESYSGOOD
        | ptrace::Options::PTRACE_O_EXITKILL
        | ptrace::Options::PTRACE_O_TRACECLONE
        | ptrace::Options::PTRACE_O_TRACEFORK;
    ptrace::seize(pid(tid), opts).map_err(nix_err("PTRACE_SEIZE", tid))
}

/// Asks a seized task to stop (`PTRACE_INTERRUPT`).
pub fn interrupt(tid: i32) -> Result<()> {
    ptrace::interrupt(pid(tid)).map_err(nix_err("PTRACE_INTERRUPT", tid))
}

/// Why a traced task stopped, as far as torpor cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A `PTRACE_EVENT_STOP` (after `PTRACE_INTERRUPT`, or a group stop).
    Event(i32),
    /// Another ptrace event (`PTRACE_EVENT_CLONE`, `_FORK`...): the task is stopped
    /// inside a system call and must be resumed to finish it.
    PtraceEvent(i32),
    /// A signal is about to be delivered.
    Signal(i32),
    /// Stopped after a single step or another trap.
    Trap,
}

/// Waits until `tid` stops. A task that exits or is killed meanwhile is an error that
/// says so.
pub fn wait_stop(tid: i32) -> Result<Stop> {
    loop {
        let st = waitpid(pid(tid), Some(WaitPidFlag::__WALL))
            .map_err(|e| Error::Wait { tid, source: io::Error::from_raw_os_error(e as i32) })?;
        return match st {
            WaitStatus::PtraceEvent(_, sig, ev) if ev == libc::PTRACE_EVENT_STOP => {
                Ok(Stop::Event(sig as i32))
            }
            WaitStatus::PtraceEvent(_, _, ev) => Ok(Stop::PtraceEvent(ev)),
            WaitStatus::PtraceSyscall(_) => continue,
            WaitStatus::Stopped(_, Signal::SIGTRAP) => Ok(Stop::Trap),
            WaitStatus::Stopped(_, sig) => Ok(Stop::Signal(sig as i32)),
            WaitStatus::Exited(_, code) => Err(Error::Gone { tid, how: format!("exit {code}") }),
            WaitStatus::Signaled(_, sig, _) => {
                Err(Error::Gone { tid, how: format!("killed by {sig}") })
            }
            WaitStatus::Continued(_) | WaitStatus::StillAlive => continue,
        };
    }
}

/// Stops a seized task and waits for the stop. Signals that arrive first are delivered
/// (the task runs their handlers) so that none is lost; the interrupt stays pending and is
/// reported afterwards.
pub fn interrupt_and_wait(tid: i32) -> Result<()> {
    interrupt(tid)?;
    loop {
        match wait_stop(tid)? {
            Stop::Event(_) => return Ok(()),
            Stop::Signal(sig) => cont(tid, sig)?,
            Stop::Trap | Stop::PtraceEvent(_) => cont(tid, 0)?,
        }
    }
}

/// Moves a tracee out of the `SIGTRAP` signal-delivery stop a single step leaves it in,
/// into a `PTRACE_EVENT_STOP`, without letting it run any instruction.
///
/// Should the tracer die, the kernel lets each tracee go from the stop it is in, and one
/// in a signal-delivery stop gets its signal: `SIGTRAP`, whose default action kills it.
/// From a `PTRACE_EVENT_STOP` it goes on with no signal. `PTRACE_INTERRUPT` queues the
/// event stop, and resuming with no signal discards the `SIGTRAP`; the task takes the
/// event stop on its way back to user mode.
pub fn park_after_step(tid: i32) -> Result<()> {
    interrupt(tid)?;
    cont(tid, 0)?;
    loop {
        match wait_stop(tid)? {
            Stop::Event(_) => return Ok(()),
            Stop::Signal(sig) => cont(tid, sig)?,
            Stop::Trap | Stop::PtraceEvent(_) => cont(tid, 0)?,
        }
    }
}

/// Resumes a stopped tracee, delivering `sig` (0 for none).
pub fn cont(tid: i32, sig: i32) -> Result<()> {
    // SAFETY: PTRACE_CONT only reads the integer arguments.
    let r = unsafe { libc::ptrace(libc::PTRACE_CONT, tid, 0usize, sig as usize) };
    check("PTRACE_CONT", tid, r).map(drop)
}

/// The message of the last ptrace event (`PTRACE_GETEVENTMSG`): for a fork or clone, the
/// new task's pid in the tracer's namespace.
pub fn event_msg(tid: i32) -> Result<i64> {
    ptrace::getevent(pid(tid)).map_err(nix_err("PTRACE_GETEVENTMSG", tid))
}

/// Resumes a stopped tracee until its next system call entry or exit (`PTRACE_SYSCALL`).
pub fn syscall(tid: i32) -> Result<()> {
    ptrace::syscall(pid(tid), None).map_err(nix_err("PTRACE_SYSCALL", tid))
}

/// Waits until `tid` stops at a system call entry or exit (the tracee was seized with
/// `PTRACE_O_TRACESYSGOOD`); any other stop is returned as an error naming it.
pub fn wait_syscall_stop(tid: i32) -> Result<std::result::Result<(), Stop>> {
    loop {
        let st = waitpid(pid(tid), Some(WaitPidFlag::__WALL))
            .map_err(|e| Error::Wait { tid, source: io::Error::from_raw_os_error(e as i32) })?;
        return Ok(Err(match st {
            WaitStatus::PtraceSyscall(_) => return Ok(Ok(())),
            WaitStatus::PtraceEvent(_, sig, ev) if ev == libc::PTRACE_EVENT_STOP => {
                Stop::Event(sig as i32)
            }
            WaitStatus::PtraceEvent(_, _, ev) => Stop::PtraceEvent(ev),
            WaitStatus::Stopped(_, Signal::SIGTRAP) => Stop::Trap,
            WaitStatus::Stopped(_, sig) => Stop::Signal(sig as i32),
            WaitStatus::Exited(_, code) => {
                return Err(Error::Gone { tid, how: format!("exit {code}") })
            }
            WaitStatus::Signaled(_, sig, _) => {
                return Err(Error::Gone { tid, how: format!("killed by {sig}") })
            }
            WaitStatus::Continued(_) | WaitStatus::StillAlive => continue,
        }));
    }
}

/// Executes one instruction of a stopped tracee.
pub fn single_step(tid: i32) -> Result<()> {
    ptrace::step(pid(tid), None).map_err(nix_err("PTRACE_SINGLESTEP", tid))
}

/// Detaches from a stopped tracee, letting it run, delivering `sig` (0 for none).
pub fn detach(tid: i32, sig: i32) -> Result<()> {
    // SAFETY: PTRACE_DETACH only reads the integer arguments.
    let r = unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0usize, sig as usize) };
    check("PTRACE_DETACH", tid, r).map(drop)
}

pub fn get_regs(tid: i32) -> Result<Regs> {
    ptrace::getregs(pid(tid)).map_err(nix_err("PTRACE_GETREGS", tid))
}

pub fn set_regs(tid: i32, regs: &Regs) -> Result<()> {
    ptrace::setregs(pid(tid), *regs).map_err(nix_err("PTRACE_SETREGS", tid))
}

/// Reads the XSAVE area (FPU, SSE, AVX and later state) of a stopped tracee.
pub fn get_xstate(tid: i32) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; MAX_XSAVE];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut c_void, iov_len: buf.len() };
    // SAFETY: the iovec describes `buf`, which stays alive and writable for the call; the
    // kernel writes at most iov_len bytes and shrinks iov_len to what it wrote.
    let r = unsafe {
        libc::ptrace(libc::PTRACE_GETREGSET, tid, NT_X86_XSTATE as usize, &mut iov as *mut _)
    };
    check("PTRACE_GETREGSET(NT_X86_XSTATE)", tid, r)?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// Loads an XSAVE area into a stopped tracee.
pub fn set_xstate(tid: i32, xsave: &[u8]) -> Result<()> {
    let mut copy = xsave.to_vec();
    let mut iov = libc::iovec { iov_base: copy.as_mut_ptr() as *mut c_void, iov_len: copy.len() };
    // SAFETY: the iovec describes `copy`, alive for the call; the kernel only reads it.
    let r = unsafe {
        libc::ptrace(libc::PTRACE_SETREGSET, tid, NT_X86_XSTATE as usize, &mut iov as *mut _)
    };
    check("PTRACE_SETREGSET(NT_X86_XSTATE)", tid, r).map(drop)
}

/// The blocked signal mask of a stopped tracee.
pub fn get_sigmask(tid: i32) -> Result<u64> {
    let mut mask = 0u64;
    // SAFETY: the kernel writes 8 bytes (the size passed) into `mask`.
    let r = unsafe { libc::ptrace(libc::PTRACE_GETSIGMASK, tid, 8usize, &mut mask as *mut u64) };
    check("PTRACE_GETSIGMASK", tid, r)?;
    Ok(mask)
}

pub fn set_sigmask(tid: i32, mask: u64) -> Result<()> {
    // SAFETY: the kernel reads 8 bytes (the size passed) from `mask`.
    let r = unsafe { libc::ptrace(libc::PTRACE_SETSIGMASK, tid, 8usize, &mask as *const u64) };
    check("PTRACE_SETSIGMASK", tid, r).map(drop)
}

/// Copies the queued signals of a stopped tracee without dequeuing them: the thread's own
/// queue, or the process-wide one when `shared`. Each entry is a raw 128-byte siginfo.
pub fn peek_siginfo(tid: i32, shared: bool) -> Result<Vec<[u8; 128]>> {
    #[repr(C)]
    struct PeekArgs {
        off: u64,
        flags: u32,
        nr: i32,
    }
    const BATCH: usize = 32;
    let mut out = Vec::new();
    loop {
        let args = PeekArgs { off: out.len() as u64, flags: shared as u32, nr: BATCH as i32 };
        let mut buf = [[0u8; 128]; BATCH];
        // SAFETY: `args` is the kernel's struct ptrace_peeksiginfo_args; the kernel writes
        // at most `nr` siginfo records of 128 bytes into `buf`, which has room for them.
        let r = unsafe {
            libc::ptrace(libc::PTRACE_PEEKSIGINFO, tid, &args as *const PeekArgs, buf.as_mut_ptr())
        };
        let n = check("PTRACE_PEEKSIGINFO", tid, r)? as usize;
        out.extend_from_slice(&buf[..n.min(BATCH)]);
        if n < BATCH {
            return Ok(out);
        }
    }
}

/// Seccomp filter number `index` of a stopped tracee (0 is the one installed first), as
/// its `struct sock_filter` instructions (8 bytes each), with whether it was installed with
/// `SECCOMP_FILTER_FLAG_LOG`; `None` past the oldest. Needs `CAP_SYS_ADMIN`.
pub fn seccomp_filter(tid: i32, index: u64) -> Result<Option<(Vec<u8>, bool)>> {
    const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
    const PTRACE_SECCOMP_GET_METADATA: libc::c_uint = 0x420d;
    const SECCOMP_FILTER_FLAG_LOG: u64 = 2;
    // SAFETY: with a null buffer the kernel only returns the number of instructions.
    let n =
        unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, std::ptr::null_mut::<u8>()) };
    if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
        return Ok(None);
    }
    let n = check("PTRACE_SECCOMP_GET_FILTER", tid, n)? as usize;
    let mut code = vec![0u8; n * 8];
    // SAFETY: the kernel writes `n` instructions of 8 bytes, the size of `code`.
    let r = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, code.as_mut_ptr()) };
    let got = check("PTRACE_SECCOMP_GET_FILTER", tid, r)? as usize;
    code.truncate(got.min(n) * 8);
    // struct seccomp_metadata { __u64 filter_off; __u64 flags; }
    let mut meta = [index, 0u64];
    // SAFETY: the kernel reads `filter_off` and writes the two fields of `meta`, whose
    // size is passed.
    let r = unsafe {
        libc::ptrace(
            PTRACE_SECCOMP_GET_METADATA,
            tid,
            std::mem::size_of_val(&meta),
            meta.as_mut_ptr(),
        )
    };
    check("PTRACE_SECCOMP_GET_METADATA", tid, r)?;
    Ok(Some((code, meta[1] & SECCOMP_FILTER_FLAG_LOG != 0)))
}

/// The rseq registration of a stopped tracee, if any: (address, length, signature).
pub fn get_rseq(tid: i32) -> Result<Option<(u64, u32, u32)>> {
    #[repr(C)]
    #[derive(Default)]
    struct RseqConfig {
        rseq_abi_pointer: u64,
        rseq_abi_size: u32,
        signature: u32,
        flags: u32,
        pad: u32,
    }
    let mut cfg = RseqConfig::default();
    // SAFETY: the kernel writes at most `size` bytes (the struct's size) into `cfg`.
    let r = unsafe {
        libc::ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION,
            tid,
            std::mem::size_of::<RseqConfig>(),
            &mut cfg as *mut RseqConfig,
        )
    };
    check("PTRACE_GET_RSEQ_CONFIGURATION", tid, r)?;
    Ok((cfg.rseq_abi_pointer != 0).then_some((
        cfg.rseq_abi_pointer,
        cfg.rseq_abi_size,
        cfg.signature,
    )))
}

/// Whether a child or tracee of ours has ended, without waiting: its raw wait status if
/// it has (reaping it), `None` if it runs or stopped.
pub fn try_wait_exit(p: pid_t) -> io::Result<Option<i32>> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into `status`.
        let r = unsafe { libc::waitpid(p, &mut status, libc::__WALL | libc::WNOHANG) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(None);
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Ok(Some(status));
        }
    }
}

/// Waits for a child of ours to end (not a tracee stop); returns the raw wait status.
pub fn wait_exit(p: pid_t) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into `status`.
        let r = unsafe { libc::waitpid(p, &mut status, libc::__WALL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Ok(status);
        }
    }
}
