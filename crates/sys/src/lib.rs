//! The one home of `unsafe` in torpor: ptrace, system calls run inside a stopped task,
//! other processes' memory, `/proc` parsing and the few raw system calls libc does not
//! wrap.
//!
//! Everything here is specific to Linux on x86_64.

pub mod guard;
pub mod mem;
pub mod netlock;
pub mod proc;
pub mod ptrace;
pub mod pty;
pub mod remote;
pub mod sock;
pub mod uffd;

use std::io;

pub use remote::Remote;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} on task {tid} failed")]
    Ptrace { what: &'static str, tid: i32, source: io::Error },
    #[error("waiting for task {tid} failed")]
    Wait { tid: i32, source: io::Error },
    #[error("task {tid} is gone ({how})")]
    Gone { tid: i32, how: String },
    #[error("{call} inside task {tid} failed")]
    Remote { tid: i32, call: &'static str, source: io::Error },
    #[error("task {tid} stopped unexpectedly ({stop}) while running system call {nr}")]
    RemoteStop { tid: i32, nr: i64, stop: String },
    #[error("cannot read {len} bytes at {addr:#x} in process {pid}")]
    ReadMemory { pid: i32, addr: u64, len: usize, source: io::Error },
    #[error("cannot write {len} bytes at {addr:#x} in process {pid}")]
    WriteMemory { pid: i32, addr: u64, len: usize, source: io::Error },
    #[error("cannot read {what}")]
    Io { what: String, source: io::Error },
    #[error("cannot parse {what}: {line:?}")]
    Parse { what: String, line: String },
    #[error("{call} failed")]
    Syscall { call: &'static str, source: io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The errno behind the error, when a system call gave one.
    pub fn os_error(&self) -> Option<i32> {
        match self {
            Error::Ptrace { source, .. }
            | Error::Wait { source, .. }
            | Error::Remote { source, .. }
            | Error::ReadMemory { source, .. }
            | Error::WriteMemory { source, .. }
            | Error::Io { source, .. }
            | Error::Syscall { source, .. } => source.raw_os_error(),
            Error::Gone { .. } | Error::RemoteStop { .. } | Error::Parse { .. } => None,
        }
    }
}

pub(crate) fn last(call: &'static str) -> Error {
    Error::Syscall { call, source: io::Error::last_os_error() }
}

/// Page size; torpor supports 4 KiB pages only (x86_64).
pub const PAGE: u64 = 4096;

/// `XCR0`: the XSAVE features this CPU and kernel have enabled.
pub fn xcr0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV with ECX=0 reads XCR0; it is valid on every x86_64 CPU with OSXSAVE,
    // which Linux enables on every CPU that has XSAVE. The kernel-reported xsave area
    // (PTRACE_GETREGSET NT_X86_XSTATE) exists only under that condition too.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack));
    }
    ((hi as u64) << 32) | lo as u64
}

/// Whether `groups` are this process's supplementary groups, in any order.
pub fn same_groups(groups: &[u32]) -> bool {
    let Ok(mine) = nix::unistd::getgroups() else { return false };
    let mut mine: Vec<u32> = mine.into_iter().map(|g| g.as_raw()).collect();
    let mut theirs = groups.to_vec();
    mine.sort_unstable();
    mine.dedup();
    theirs.sort_unstable();
    theirs.dedup();
    mine == theirs
}

/// `kcmp(pid1, pid2, KCMP_FILE, fd1, fd2)`: whether two descriptors share one open file
/// description. See kcmp(2).
pub fn same_file_description(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> Result<bool> {
    const KCMP_FILE: i32 = 0;
    // SAFETY: kcmp takes only integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2) };
    if r < 0 {
        return Err(last("kcmp"));
    }
    Ok(r == 0)
}

/// `get_robust_list(tid)`: the robust futex list head and its length. See
/// get_robust_list(2).
pub fn robust_list(tid: i32) -> Result<(u64, u64)> {
    let mut head = 0u64;
    let mut len = 0usize;
    // SAFETY: the kernel writes one pointer into `head` and one size_t into `len`.
    let r = unsafe {
        libc::syscall(libc::SYS_get_robust_list, tid, &mut head as *mut u64, &mut len as *mut usize)
    };
    if r < 0 {
        return Err(last("get_robust_list"));
    }
    Ok((head, len as u64))
}

/// `prlimit(pid, resource)`: a process's soft and hard limit. See prlimit(2).
pub fn get_rlimit(pid: i32, resource: u32) -> Result<(u64, u64)> {
    let mut old = libc::rlimit64 { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: the kernel writes one rlimit64 into `old`; no new limit is passed.
    let r = unsafe { libc::prlimit64(pid, resource as _, std::ptr::null(), &mut old) };
    if r < 0 {
        return Err(last("prlimit"));
    }
    Ok((old.rlim_cur, old.rlim_max))
}

/// Sets a process's limits with `prlimit`.
pub fn set_rlimit(pid: i32, resource: u32, soft: u64, hard: u64) -> io::Result<()> {
    let new = libc::rlimit64 { rlim_cur: soft, rlim_max: hard };
    // SAFETY: the kernel reads one rlimit64 from `new`; the old value is not asked for.
    let r = unsafe { libc::prlimit64(pid, resource as _, &new, std::ptr::null_mut()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `clone3` with `set_tid`: creates a child process whose pid is `pid`, like `fork`; or,
/// with `new_ns`, the first process (pid 1) of a new pid namespace, in a new mount
/// namespace (so it can mount its own `/proc`).
///
/// Returns `Ok(0)` in the child and the child's pid (in this namespace) in the parent. The child must only
/// call async-signal-safe functions (no allocation) until it execs or stops: torpor's
/// other threads are not copied.
///
/// # Safety
///
/// As for `fork`: the caller must not rely, in the child, on locks or state owned by
/// other threads of this process.
pub unsafe fn clone3_with_pid(pid: i32, new_ns: bool) -> io::Result<i32> {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    let tids = [pid as libc::pid_t];
    let args = if new_ns {
        CloneArgs {
            flags: (libc::CLONE_NEWPID | libc::CLONE_NEWNS) as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..Default::default()
        }
    } else {
        CloneArgs {
            exit_signal: libc::SIGCHLD as u64,
            set_tid: tids.as_ptr() as u64,
            set_tid_size: 1,
            ..Default::default()
        }
    };
    // SAFETY: `args` is a valid clone_args of the size passed and `tids` outlives the
    // call; without CLONE_VM the child gets a copy of this address space, so both sides
    // return here with their own stack. The fork-safety contract is the caller's.
    let r = unsafe {
        libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>())
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as i32)
}

/// Whether a signal asking torpor to stop (SIGINT, SIGTERM, SIGHUP, SIGQUIT) is pending,
/// held back by the signal mask. See sigpending(2).
pub fn termination_pending() -> bool {
    // SAFETY: sigpending writes one sigset_t into the local; sigismember only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        if libc::sigpending(&mut set) < 0 {
            return false;
        }
        [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT]
            .iter()
            .any(|&s| libc::sigismember(&set, s) == 1)
    }
}

/// Reads this machine's kernel release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A thread's scheduling: (nice, policy, static priority).
/// See getpriority(2), sched_getscheduler(2), sched_getparam(2).
pub fn get_sched(tid: i32) -> Result<(i32, i32, i32)> {
    // getpriority returns -1 for nice -1 as well as for errors: errno decides.
    // SAFETY: errno is this thread's; the calls take integers and a local out-parameter.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        if nice == -1 && *libc::__errno_location() != 0 {
            return Err(last("getpriority"));
        }
        let policy = libc::sched_getscheduler(tid);
        if policy < 0 {
            return Err(last("sched_getscheduler"));
        }
        let mut param = libc::sched_param { sched_priority: 0 };
        if libc::sched_getparam(tid, &mut param) < 0 {
            return Err(last("sched_getparam"));
        }
        Ok((nice, policy, param.sched_priority))
    }
}

/// Sets a thread's scheduling policy, priority and nice value.
pub fn set_sched(tid: i32, nice: i32, policy: i32, priority: i32) -> Result<()> {
    let param = libc::sched_param { sched_priority: priority };
    // SAFETY: the calls take integers and a pointer to a local sched_param.
    unsafe {
        if libc::sched_setscheduler(tid, policy, &param) < 0 {
            return Err(last("sched_setscheduler"));
        }
        if libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) < 0 {
            return Err(last("setpriority"));
        }
    }
    Ok(())
}

/// The CPUs thread `tid` may run on, as 64-bit words of a bit mask (up to 1,024 CPUs).
pub fn affinity(tid: i32) -> Result<Vec<u64>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(tid))
        .map_err(|e| Error::Syscall { call: "sched_getaffinity", source: e.into() })?;
    let mut words = vec![0u64; nix::sched::CpuSet::count().div_ceil(64)];
    for cpu in 0..nix::sched::CpuSet::count() {
        if set.is_set(cpu).unwrap_or(false) {
            words[cpu / 64] |= 1 << (cpu % 64);
        }
    }
    while words.last() == Some(&0) {
        words.pop();
    }
    Ok(words)
}

/// Restricts thread `tid` to the CPUs of `mask` (as [`affinity`] gives it).
pub fn set_affinity(tid: i32, mask: &[u64]) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for cpu in 0..nix::sched::CpuSet::count().min(mask.len() * 64) {
        if mask[cpu / 64] & 1 << (cpu % 64) != 0 {
            set.set(cpu).map_err(|e| Error::Syscall { call: "CPU_SET", source: e.into() })?;
        }
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set)
        .map_err(|e| Error::Syscall { call: "sched_setaffinity", source: e.into() })
}

/// The machine's online CPUs (`/sys/devices/system/cpu/online`, e.g. `0-3,8`) as a mask
/// like [`affinity`]'s.
pub fn online_cpus() -> Option<Vec<u64>> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    let mut words: Vec<u64> = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?),
            None => (part.parse().ok()?, part.parse().ok()?),
        };
        if b >= 1 << 16 || a > b {
            return None;
        }
        for cpu in a..=b {
            if words.len() <= cpu / 64 {
                words.resize(cpu / 64 + 1, 0);
            }
            words[cpu / 64] |= 1 << (cpu % 64);
        }
    }
    Some(words)
}

/// `IOPRIO_WHO_PROCESS`: `ioprio_get` and `ioprio_set` name one thread. Written by hand:
/// neither nix nor rustix wraps these two calls.
const IOPRIO_WHO_PROCESS: libc::c_long = 1;

/// Thread `tid`'s I/O priority (class in bits 13-15, level below; class 0 when none was
/// set and it follows its nice value).
pub fn ioprio(tid: i32) -> Result<u16> {
    // SAFETY: ioprio_get takes two integers.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, tid as libc::c_long) };
    if r < 0 {
        return Err(last("ioprio_get"));
    }
    Ok(r as u16)
}

/// Sets thread `tid`'s I/O priority (as [`ioprio`] gives it).
pub fn set_ioprio(tid: i32, prio: u16) -> Result<()> {
    // SAFETY: ioprio_set takes three integers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid as libc::c_long,
            prio as libc::c_long,
        )
    };
    if r < 0 {
        return Err(last("ioprio_set"));
    }
    Ok(())
}

/// `fork()` for a process that has one thread; returns 0 in the child and the child's
/// pid in the parent. Refuses (without forking) when other threads exist, since their
/// locks would be copied held.
pub fn fork_single_threaded() -> io::Result<i32> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::other(format!("cannot fork: {threads} threads run")));
    }
    // SAFETY: only this thread exists (checked just above, and torpor starts none
    // between), so the child's copy of every lock is in the state this thread left it.
    let r = unsafe { libc::fork() };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Named points in dump and restore where tests make torpor die or the target vanish.
///
/// `TORPOR_TEST_KILL_AT=NAME` makes torpor `SIGKILL` itself when it reaches point `NAME`;
/// `TORPOR_TEST_KILL_TARGET_AT=NAME` makes it `SIGKILL` the process it works on there
/// (`target`, when not 0). Both exist so that tests can hit precise moments of a dump or
/// a restore; the points are listed in `docs/security.md`. Unset, this costs one load of
/// a cached value. A point reached in a task (`tid`) may also be named `NAME@thread`,
/// which is reached only in a thread that is not its process's first.
pub fn test_point_in(name: &str, tid: i32) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("TORPOR_TEST_KILL_AT").ok());
    if let Some(point) = at.as_deref().and_then(|p| p.strip_suffix("@thread")) {
        let leader = std::fs::read_to_string(format!("/proc/{tid}/status"))
            .is_ok_and(|s| s.lines().any(|l| l == format!("Tgid:\t{tid}")));
        if point == name && !leader {
            // SAFETY: kill takes integers; SIGKILL ends this process here.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
    test_point(name, 0);
}

/// See [`test_point_in`].
pub fn test_point(name: &str, target: i32) {
    static POINTS: std::sync::OnceLock<(Option<String>, Option<String>)> =
        std::sync::OnceLock::new();
    let (me, it) = POINTS.get_or_init(|| {
        (
            std::env::var("TORPOR_TEST_KILL_AT").ok(),
            std::env::var("TORPOR_TEST_KILL_TARGET_AT").ok(),
        )
    });
    if target > 0 && it.as_deref() == Some(name) {
        tracing::debug!("test point {name}: killing pid {target}");
        // SAFETY: kill takes integers.
        unsafe { libc::kill(target, libc::SIGKILL) };
    }
    if me.as_deref() == Some(name) {
        // SAFETY: kill takes integers; SIGKILL ends this process here.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
