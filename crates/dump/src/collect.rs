//! Collects the non-memory state of a frozen process.

use std::fmt;

use torpor_image::model::{self, AltStack, ITimer, ITimers, PosixTimer, SigAction, SigInfo};
use torpor_sys::{args, mem, proc, ptrace, remote};

use crate::files::{FdContext, FileTable};
use crate::{DumpError, Frozen, FrozenThread, Result};
use torpor_image::ImageWriter;

/// Why a process cannot be dumped by this version of torpor.
#[derive(Debug, Clone)]
pub enum UnsupportedReason {
    NotLeader {
        tgid: i32,
    },
    LeaderGone,
    Fd {
        fd: i32,
        kind: String,
    },
    Mapping {
        start: u64,
        end: u64,
        what: String,
    },
    External {
        fd: i32,
        what: String,
        holder: String,
    },
    /// A unix socket whose peer is outside the tree, and what the user can do about it.
    UnixOutside {
        fd: i32,
        what: String,
        advice: String,
    },
    InsidePidNs {
        inner: i32,
    },
    NeedsFlag {
        fd: i32,
        what: String,
        flag: &'static str,
    },
    /// One side of a pseudo-terminal pair, whose other side is outside the tree (or
    /// open nowhere): `master` says which side `fd` is.
    PtyOutside {
        fd: i32,
        pts: u32,
        master: bool,
        holder: Option<String>,
    },
    /// The master of a pair whose slave controls a session led from outside the tree.
    PtySession {
        fd: i32,
        pts: u32,
        sid: i32,
    },
    Torpor,
    /// A thread in seccomp strict mode (`filters` is `None`), or under more seccomp filters
    /// than torpor's own process, whose filters the woken process would lack.
    Seccomp {
        tid: i32,
    },
    /// Threads under different seccomp filters.
    SeccompThreads {
        tid: i32,
        other: i32,
    },
    /// A namespace of its own (`id` as its /proc/PID/ns link reads) that restore would
    /// not give back; `of_root` when it differs from the tree root's, not torpor's.
    Namespace {
        name: &'static str,
        id: String,
        of_root: bool,
        /// What differs, when more than the namespace's id (a mount namespace).
        detail: Option<String>,
    },
}

impl fmt::Display for UnsupportedReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotLeader { tgid } => {
                write!(f, "is a thread of process {tgid}; dump the process instead")
            }
            Self::LeaderGone => write!(
                f,
                "its main thread has exited while other threads run on, which torpor cannot save yet"
            ),
            Self::Fd { fd, kind } => {
                write!(
                    f,
                    "fd {fd} is {kind}, a kind of descriptor torpor cannot save yet"
                )
            }
            Self::External { fd, what, holder } => write!(
                f,
                "fd {fd} is {what}, whose other end is held by {holder} outside the dumped tree"
            ),
            Self::UnixOutside { fd, what, advice } => write!(f, "fd {fd} is {what}; {advice}"),
            Self::Torpor => write!(f, "its tree includes torpor itself"),
            Self::Seccomp { tid } => write!(
                f,
                "thread {tid} is in seccomp strict mode, which torpor cannot save yet"
            ),
            Self::SeccompThreads { tid, other } => write!(
                f,
                "thread {tid} runs under other seccomp filters than thread {other}; torpor \
                 saves filters that all threads of a process share"
            ),
            Self::PtyOutside { fd, pts, master: true, holder } => write!(
                f,
                "fd {fd} is the master of pseudo-terminal /dev/pts/{pts}, whose slave is {}; \
                 torpor saves a pseudo-terminal pair only with both sides in the tree",
                match holder {
                    Some(h) => format!("held by {h} outside the dumped tree"),
                    None => "open nowhere in the dumped tree".into(),
                }
            ),
            Self::PtyOutside { fd, pts, master: false, holder } => write!(
                f,
                "fd {fd} is pseudo-terminal /dev/pts/{pts}, whose master is held by {} outside \
                 the dumped tree; a terminal on descriptors 0-2 can be saved with --shell-job",
                holder.as_deref().unwrap_or("a process")
            ),
            Self::PtySession { fd, pts, sid } => write!(
                f,
                "fd {fd} is the master of pseudo-terminal /dev/pts/{pts}, the controlling \
                 terminal of session {sid}, whose leader is outside the dumped tree"
            ),
            Self::NeedsFlag { fd, what, flag } => {
                write!(f, "fd {fd} is {what}; dump with {flag} to save it")
            }
            Self::InsidePidNs { inner } => write!(
                f,
                "runs as pid {inner} inside a pid namespace it does not lead; dump the \
                 namespace's first process (pid 1 inside) to take the whole namespace"
            ),
            Self::Namespace { name, id, of_root, detail } => write!(
                f,
                "is in a {name} namespace of its own ({id}), {}{}, which torpor cannot save \
                 yet; it would wake in torpor's {name} namespace instead",
                if *of_root { "not the tree root's" } else { "not torpor's" },
                detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default(),
            ),
            Self::Mapping { start, end, what } => {
                write!(
                    f,
                    "mapping {start:#x}-{end:#x} is {what}, which torpor cannot save yet"
                )
            }
        }
    }
}

/// Finds the vDSO of `pid` in `maps` (its memory map) and a `syscall` instruction
/// inside it.
pub(crate) fn find_syscall(pid: i32, maps: &[proc::MapEntry]) -> Result<u64> {
    let err = |what: &str, source| DumpError::Collect { pid, what: what.into(), source };
    let vdso = maps.iter().find(|m| m.name == "[vdso]").ok_or_else(|| {
        err(
            "its vDSO",
            torpor_sys::Error::Parse {
                what: format!("/proc/{pid}/maps"),
                line: "no [vdso]".into(),
            },
        )
    })?;
    let mut bytes = vec![0u8; (vdso.end - vdso.start) as usize];
    mem::read_ranges(pid, &[(vdso.start, bytes.len())], &mut bytes)
        .map_err(|e| err("its vDSO", e))?;
    let off = torpor_vdso::find_syscall_insn(&bytes).map_err(|e| {
        err(
            "a system call instruction in its vDSO",
            torpor_sys::Error::Parse { what: "[vdso]".into(), line: e.to_string() },
        )
    })?;
    Ok(vdso.start + off)
}

/// A few hundred bytes below the stack pointer, past the red zone, used to pass
/// structures to system calls run inside the process, and below them, when the thread
/// has one, its healing frame ([`torpor_sys::remote::HealFrame`]). What was there is
/// saved and put back, so the process's memory ends exactly as it was.
pub(crate) struct Scratch {
    /// The argument area.
    pub addr: u64,
    /// The lowest byte used, the start of `saved`.
    pub low: u64,
    saved: Vec<u8>,
}

pub(crate) const SCRATCH_LEN: usize = 512;

impl Scratch {
    /// The area below `rsp`, with `below` bytes more under the argument area.
    pub fn new(pid: i32, rsp: u64, below: usize) -> torpor_sys::Result<Self> {
        let addr = Self::args_at(rsp);
        let low = addr - below as u64;
        let mut saved = vec![0u8; (addr - low) as usize + SCRATCH_LEN];
        mem::read_ranges(pid, &[(low, saved.len())], &mut saved)?;
        Ok(Self { addr, low, saved })
    }

    /// The argument area for a stack pointer: past 128 bytes of red zone the code may be
    /// using, 64-byte aligned.
    pub fn args_at(rsp: u64) -> u64 {
        (rsp - 128 - SCRATCH_LEN as u64 - 64) & !63
    }

    pub fn restore(&self, pid: i32) -> torpor_sys::Result<()> {
        mem::write_mem(pid, self.low, &self.saved)
    }

    /// What the area held before torpor used it, from `low`.
    pub fn saved(&self) -> &[u8] {
        &self.saved
    }

    pub fn read(&self, pid: i32, len: usize) -> torpor_sys::Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        mem::read_ranges(pid, &[(self.addr, len)], &mut b)?;
        Ok(b)
    }
}

/// Finds code in `pid` for healing frames ([`torpor_sys::remote::Gadgets`]): in its
/// vDSO, its C library, then its other executable files, reading at most 64 MiB.
pub(crate) fn find_gadgets(pid: i32, maps: &[proc::MapEntry]) -> Option<remote::Gadgets> {
    let mut code: Vec<&proc::MapEntry> =
        maps.iter().filter(|m| m.exec && (m.name == "[vdso]" || m.name.starts_with('/'))).collect();
    code.sort_by_key(|m| (m.name != "[vdso]", !m.name.contains("/libc"), m.start));
    let mut search = remote::GadgetSearch::default();
    let mut budget = 64usize << 20;
    // In pieces, overlapping by a gadget's length, since what is needed is mostly found
    // early in the C library.
    const PIECE: u64 = 256 << 10;
    let mut bytes = Vec::new();
    for m in code {
        let mut at = m.start;
        while at < m.end && budget > 0 && !search.done() {
            let len = (m.end - at).min(PIECE + 16) as usize;
            bytes.resize(len, 0);
            if mem::read_ranges(pid, &[(at, len)], &mut bytes).is_err() {
                break;
            }
            search.scan(&bytes, at);
            at += PIECE;
            budget = budget.saturating_sub(len);
        }
    }
    search.found()
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap())
}

/// Collects everything but page contents.
pub(crate) fn collect(
    frozen: &Frozen,
    files: &mut FileTable,
    fd_ctx: &mut FdContext,
    writer: &mut ImageWriter,
) -> Result<model::Process> {
    let pid = frozen.pid;
    let leader = frozen.leader();
    let r = &leader.remote;
    let scratch = leader.scratch.addr;
    let read_scratch = |len| leader.scratch.read(pid, len);
    let err = |what: &str| {
        let what = what.to_string();
        move |source| DumpError::Collect { pid, what, source }
    };

    let status = proc::status(pid).map_err(err("its status"))?;
    let stat = proc::stat(pid).map_err(err("its stat"))?;

    // Process-wide values only the process itself can report, through calls run inside
    // its leader.
    let brk = r.call("brk", libc::SYS_brk, args!(0)).map_err(err("its program break"))?;
    r.call("prctl(PR_GET_PDEATHSIG)", libc::SYS_prctl, args!(libc::PR_GET_PDEATHSIG, scratch))
        .map_err(err("its parent-death signal"))?;
    torpor_sys::test_point("dump:collecting", pid);
    let pdeath_signal =
        i32::from_ne_bytes(read_scratch(4).map_err(err("scratch"))?[..4].try_into().unwrap());
    let dumpable = r
        .call("prctl(PR_GET_DUMPABLE)", libc::SYS_prctl, args!(libc::PR_GET_DUMPABLE))
        .map_err(err("its dumpable flag"))? as i32;

    // Only the actions that are not the default need asking, and SIGCHLD's, whose
    // SA_NOCLDWAIT and SA_NOCLDSTOP act even then: each call run inside the process is a
    // moment in which a torpor that dies would leave it with torpor's registers (see
    // `Remote::tidy`). The flags and mask of another default action, which only a
    // sigaction call reading them back can see, are not kept.
    let set = status.sig_caught | status.sig_ignored | 1 << (libc::SIGCHLD - 1);
    let mut sigactions = Vec::with_capacity(64);
    for sig in 1..=64u64 {
        if set & 1 << (sig - 1) == 0 {
            sigactions.push(SigAction { handler: 0, flags: 0, restorer: 0, mask: 0 });
            continue;
        }
        r.call("rt_sigaction", libc::SYS_rt_sigaction, args!(sig, 0, scratch, 8))
            .map_err(err(&format!("the action of signal {sig}")))?;
        let b = read_scratch(32).map_err(err("scratch"))?;
        sigactions.push(SigAction {
            handler: u64_at(&b, 0),
            flags: u64_at(&b, 1),
            restorer: u64_at(&b, 2),
            mask: u64_at(&b, 3),
        });
    }

    let mut it = [ITimer::default(); 3];
    for (which, slot) in it.iter_mut().enumerate() {
        r.call("getitimer", libc::SYS_getitimer, args!(which, scratch))
            .map_err(err("its interval timers"))?;
        // struct itimerval { it_interval, it_value }, each { tv_sec, tv_usec }.
        let b = read_scratch(32).map_err(err("scratch"))?;
        slot.interval_us = u64_at(&b, 0) * 1_000_000 + u64_at(&b, 1);
        slot.value_us = u64_at(&b, 2) * 1_000_000 + u64_at(&b, 3);
    }
    let itimers = ITimers { real: it[0], virt: it[1], prof: it[2] };

    let mut posix_timers = Vec::new();
    for t in proc::timers(pid).map_err(err("its POSIX timers"))? {
        r.call("timer_gettime", libc::SYS_timer_gettime, args!(t.id, scratch))
            .map_err(err(&format!("POSIX timer {}", t.id)))?;
        // struct itimerspec { it_interval, it_value }, each { tv_sec, tv_nsec }.
        let b = read_scratch(32).map_err(err("scratch"))?;
        let overrun = r
            .call("timer_getoverrun", libc::SYS_timer_getoverrun, args!(t.id))
            .map_err(err(&format!("POSIX timer {}", t.id)))? as i32;
        let notify = match t.notify.as_str() {
            "none" => libc::SIGEV_NONE,
            "thread" => libc::SIGEV_THREAD,
            _ => libc::SIGEV_SIGNAL,
        } | if t.to_thread { libc::SIGEV_THREAD_ID } else { 0 };
        posix_timers.push(PosixTimer {
            id: t.id,
            clock: t.clock,
            notify,
            signo: t.signo,
            sigval: t.sigval,
            notify_tid: if t.to_thread { t.notify_pid } else { 0 },
            interval_ns: u64_at(&b, 0) * 1_000_000_000 + u64_at(&b, 1),
            value_ns: u64_at(&b, 2) * 1_000_000_000 + u64_at(&b, 3),
            overrun,
        });
    }

    let shared_pending: Vec<SigInfo> = ptrace::peek_siginfo(pid, true)
        .map_err(err("its pending signals"))?
        .into_iter()
        .map(to_siginfo)
        .collect();

    let mut rlimits = Vec::new();
    let mut shown: Option<Vec<(u64, u64)>> = None;
    // RLIMIT_CPU (0) to RLIMIT_RTTIME (15): the sixteen limits Linux has.
    for resource in 0..16u32 {
        let (soft, hard) = match torpor_sys::get_rlimit(pid, resource) {
            Ok(l) => l,
            // Another user's limits without CAP_SYS_RESOURCE: /proc shows them all.
            Err(e) if e.os_error() == Some(libc::EPERM) => {
                if shown.is_none() {
                    shown = Some(proc::limits(pid).map_err(err("its limits"))?);
                }
                let all = shown.as_deref().unwrap_or_default();
                *all.get(resource as usize).ok_or_else(|| DumpError::Collect {
                    pid,
                    what: format!("its limits: /proc/{pid}/limits lacks limit {resource}"),
                    source: e,
                })?
            }
            Err(e) => return Err(err("its limits")(e)),
        };
        rlimits.push(model::Rlimit { resource, soft, hard });
    }

    let exe = proc::readlink(format!("/proc/{pid}/exe")).map_err(err("its executable"))?;
    let exe_file = files
        .add_path(pid, &format!("/proc/{pid}/exe"), &exe)
        .map_err(|source| DumpError::SaveFile { pid, what: format!("executable {exe}"), source })?;
    let auxv = proc::auxv(pid).map_err(err("its auxiliary vector"))?;
    let mm = model::MmFields {
        start_code: stat.start_code,
        end_code: stat.end_code,
        start_data: stat.start_data,
        end_data: stat.end_data,
        start_brk: stat.start_brk,
        brk,
        start_stack: stat.start_stack,
        arg_start: stat.arg_start,
        arg_end: stat.arg_end,
        env_start: stat.env_start,
        env_end: stat.env_end,
        auxv,
        exe_file,
    };

    let (open_files, fds, file_locks) = crate::files::collect_fds(pid, files, fd_ctx, writer)?;
    if !file_locks.is_empty() {
        writer.needs_version(4);
    }
    let threads =
        frozen.threads.iter().map(|t| collect_thread(pid, t)).collect::<Result<Vec<_>>>()?;
    let seccomp = seccomp_filters(frozen)?;
    if !seccomp.is_empty() {
        writer.needs_version(4);
    }
    r.call(
        "prctl(PR_GET_CHILD_SUBREAPER)",
        libc::SYS_prctl,
        args!(libc::PR_GET_CHILD_SUBREAPER, scratch),
    )
    .map_err(err("its child subreaper flag"))?;
    let subreaper = read_scratch(4).map_err(err("scratch"))?;
    let attrs = model::ProcessAttrs {
        child_subreaper: subreaper != [0; 4],
        thp_disabled: proc::read(format!("/proc/{pid}/status"))
            .map_err(err("its status"))?
            .lines()
            .any(|l| l.starts_with("THP_enabled:") && l.ends_with('0')),
        oom_score_adj: proc::read(format!("/proc/{pid}/oom_score_adj"))
            .map_err(err("its OOM score adjustment"))?
            .trim()
            .parse()
            .unwrap_or(0),
    };
    let thread_attrs = |t: &model::Thread| {
        t.affinity.is_some() || t.ioprio.is_some() || t.timer_slack_ns.is_some()
    };
    if !attrs.is_default() || threads.iter().any(thread_attrs) {
        writer.needs_version(6);
    }

    Ok(model::Process {
        pid,
        ppid: stat.ppid,
        pgid: stat.pgrp,
        sid: stat.session,
        cmdline: proc::cmdline(pid),
        creds: model::Creds {
            uids: status.uids,
            gids: status.gids,
            groups: status.groups.clone(),
            cap_inheritable: status.cap_inh,
            cap_permitted: status.cap_prm,
            cap_effective: status.cap_eff,
            cap_bounding: status.cap_bnd,
            cap_ambient: status.cap_amb,
            no_new_privs: status.no_new_privs,
        },
        rlimits,
        umask: status.umask,
        cwd: proc::readlink(format!("/proc/{pid}/cwd")).map_err(err("its working directory"))?,
        root: proc::readlink(format!("/proc/{pid}/root")).map_err(err("its root directory"))?,
        personality: proc::personality(pid).map_err(err("its personality"))?,
        pdeath_signal,
        dumpable,
        mm,
        vmas: Vec::new(),
        pages_file: crate::precopy::pages_file(pid),
        page_frames: None,
        page_hashes: None,
        sigactions,
        shared_pending,
        itimers,
        posix_timers,
        open_files,
        fds,
        file_locks,
        seccomp,
        threads,
        termios: fd_ctx.termios.get(&pid).cloned(),
        cgroups: proc::cgroups(pid)
            .map_err(err("its control groups"))?
            .into_iter()
            .map(|(controllers, path)| model::Cgroup { controllers, path })
            .collect(),
        attrs,
    })
}

fn to_siginfo(raw: [u8; 128]) -> SigInfo {
    SigInfo { signo: i32::from_ne_bytes(raw[..4].try_into().unwrap()), raw: hex::encode(raw) }
}

/// Collects one thread's registers and per-thread kernel state, with calls run inside it.
fn collect_thread(pid: i32, t: &FrozenThread) -> Result<model::Thread> {
    let tid = t.tid;
    let r = &t.remote;
    let scratch = t.scratch.addr;
    let err = |what: &str| {
        let what = format!("{what} of thread {tid}");
        move |source| DumpError::Collect { pid, what, source }
    };
    // As they were when torpor stopped the thread, before any remote call.
    let regs = *r.saved_regs();
    let xsave = ptrace::get_xstate(tid).map_err(err("the FPU/AVX registers"))?;

    r.call("prctl(PR_GET_TID_ADDRESS)", libc::SYS_prctl, args!(libc::PR_GET_TID_ADDRESS, scratch))
        .map_err(err("the clear_child_tid address"))?;
    let clear_child_tid = u64_at(&t.scratch.read(pid, 8).map_err(err("scratch"))?, 0);

    r.call("sigaltstack", libc::SYS_sigaltstack, args!(0, scratch))
        .map_err(err("the alternate signal stack"))?;
    let b = t.scratch.read(pid, 24).map_err(err("scratch"))?;
    let altstack = AltStack { sp: u64_at(&b, 0), flags: u64_at(&b, 1) as i32, size: u64_at(&b, 2) };

    let pending: Vec<SigInfo> = ptrace::peek_siginfo(tid, false)
        .map_err(err("the pending signals"))?
        .into_iter()
        .map(to_siginfo)
        .collect();
    let rseq = ptrace::get_rseq(tid)
        .map_err(err("the rseq area"))?
        .map(|(addr, len, signature)| model::Rseq { addr, len, signature });
    let (robust_list, robust_list_len) =
        torpor_sys::robust_list(tid).map_err(err("the robust futex list"))?;
    let (nice, sched_policy, sched_priority) =
        torpor_sys::get_sched(tid).map_err(err("the scheduling policy"))?;
    // Kept only when narrower than the machine: a process free to run anywhere stays so
    // on a machine with more CPUs.
    let affinity = torpor_sys::affinity(tid).map_err(err("the CPU affinity"))?;
    let everywhere = everywhere();
    let covers =
        everywhere.iter().enumerate().all(|(i, w)| affinity.get(i).unwrap_or(&0) & w == *w);
    let affinity = (!covers).then_some(affinity);
    let ioprio = torpor_sys::ioprio(tid).map_err(err("the I/O priority"))?;
    let ioprio = (ioprio >> 13 != 0).then_some(ioprio);
    // A real-time thread's slack is the kernel's to set (0).
    let realtime = matches!(sched_policy & !libc::SCHED_RESET_ON_FORK, 1 | 2);
    // The file needs CAP_SYS_NICE; the thread itself may always ask.
    let timer_slack_ns = match proc::read(format!("/proc/{tid}/timerslack_ns")) {
        Ok(text) => text.trim().parse::<u64>().ok(),
        Err(_) => Some(
            r.call("prctl(PR_GET_TIMERSLACK)", libc::SYS_prctl, args!(libc::PR_GET_TIMERSLACK))
                .map_err(err("the timer slack"))?,
        ),
    }
    .filter(|&ns| ns != DEFAULT_TIMER_SLACK_NS && !realtime);
    let comm = proc::read(format!("/proc/{pid}/task/{tid}/comm"))
        .map_err(err("the name"))?
        .trim_end_matches('\n')
        .to_string();

    Ok(model::Thread {
        tid,
        comm,
        regs: to_model_regs(&regs),
        xsave: hex::encode(&xsave),
        blocked: t.blocked,
        pending,
        altstack,
        rseq,
        robust_list,
        robust_list_len,
        clear_child_tid,
        nice,
        sched_policy,
        sched_priority,
        affinity,
        ioprio,
        timer_slack_ns,
    })
}

/// The CPUs a thread free to run anywhere may use: those online, else torpor's own.
/// Read once per dump, not once per thread.
fn everywhere() -> &'static [u64] {
    static EVERYWHERE: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
    EVERYWHERE.get_or_init(|| {
        torpor_sys::online_cpus()
            .or_else(|| torpor_sys::affinity(std::process::id() as i32).ok())
            .unwrap_or_default()
    })
}

/// The timer slack every thread starts with (50 µs).
const DEFAULT_TIMER_SLACK_NS: u64 = 50_000;

fn to_model_regs(r: &ptrace::Regs) -> model::Regs {
    model::Regs {
        r15: r.r15,
        r14: r.r14,
        r13: r.r13,
        r12: r.r12,
        rbp: r.rbp,
        rbx: r.rbx,
        r11: r.r11,
        r10: r.r10,
        r9: r.r9,
        r8: r.r8,
        rax: r.rax,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        orig_rax: r.orig_rax,
        rip: r.rip,
        cs: r.cs,
        eflags: r.eflags,
        rsp: r.rsp,
        ss: r.ss,
        fs_base: r.fs_base,
        gs_base: r.gs_base,
        ds: r.ds,
        es: r.es,
        fs: r.fs,
        gs: r.gs,
    }
}

/// The seccomp filters the process's threads run under beyond torpor's own, oldest first.
///
/// A woken process inherits the filters of `torpor restore`, which runs where `torpor
/// dump` did (in the same container, under the same filters): only the ones above those
/// are saved, and installed again at restore. Every thread must run under the same
/// filters, since restore installs them for the whole process at once.
fn seccomp_filters(frozen: &Frozen) -> Result<Vec<model::SeccompFilter>> {
    let pid = frozen.pid;
    let err = |what: String| move |source| DumpError::Collect { pid, what, source };
    let own = proc::status(std::process::id() as i32)
        .map_err(err("torpor's own seccomp state".into()))?
        .seccomp_filters;
    let mut first: Option<(i32, Vec<model::SeccompFilter>)> = None;
    for t in &frozen.threads {
        let tid = t.tid;
        let st = proc::task_status(pid, tid).map_err(err(format!("the status of thread {tid}")))?;
        let total = if st.seccomp == 2 { st.seccomp_filters } else { 0 };
        let mut filters = Vec::new();
        // Index 0 is the oldest filter; torpor's own are the oldest ones.
        for index in u64::from(own.min(total))..u64::from(total) {
            let got = ptrace::seccomp_filter(tid, index)
                .map_err(err(format!("seccomp filter {index} of thread {tid}")))?;
            let Some((code, log)) = got else { break };
            filters.push(model::SeccompFilter { code: hex::encode(code), log });
        }
        match &first {
            None => first = Some((tid, filters)),
            Some((other, theirs)) if *theirs != filters => {
                return Err(DumpError::Unsupported {
                    pid,
                    reason: UnsupportedReason::SeccompThreads { tid, other: *other },
                })
            }
            Some(_) => {}
        }
    }
    Ok(first.map(|(_, f)| f).unwrap_or_default())
}
