//! Kernel state of the new process beyond its memory: mm fields, signals, timers, limits,
//! credentials, and finally its registers.

use torpor_image::model;
use torpor_sys::{args, ptrace, Remote};

use crate::prepare::Prepared;
use crate::space::Space;
use crate::{RestoreError, RestoreOptions, Result};

/// `prctl(PR_TIMER_CREATE_RESTORE_IDS)`: makes `timer_create` take the id to use from
/// its third argument (Linux 6.17).
const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
/// `ERESTART*` codes the kernel leaves in `rax` of a task stopped inside a system call.
const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;

fn le(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

pub(crate) fn restore_state(
    s: &Space,
    opts: &RestoreOptions,
    p: &model::Process,
    prep: &Prepared,
) -> Result<Vec<Remote>> {
    let pid = s.pid();

    // Every action, since the new process inherited torpor's.
    for (i, a) in p.sigactions.iter().enumerate() {
        let sig = i as u64 + 1;
        if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
            continue;
        }
        let at = s.put(&le(&[a.handler, a.flags, a.restorer, a.mask]))?;
        s.call(
            &format!("set the action of signal {sig}"),
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            args!(sig, at, 0, 8),
        )?;
    }
    restore_itimers(s, p)?;
    set_rlimits(pid, p);

    // The other threads, made by the leader with their own tids while it still may
    // choose ids. POSIX timers may notify a thread, so they come after.
    let others =
        p.threads[1..].iter().map(|t| create_thread(s, t.tid)).collect::<Result<Vec<_>>>()?;
    restore_posix_timers(s, p)?;

    let remotes: Vec<&Remote> = std::iter::once(s.remote()).chain(others.iter()).collect();
    for (t, r) in p.threads.iter().zip(&remotes) {
        thread_state(s, r, t)?;
    }

    // Signals queued to the whole process, sent by the leader to itself so the kernel
    // keeps every siginfo field as given.
    for si in &p.shared_pending {
        let at = s.put(&siginfo(si)?)?;
        s.call(
            &format!("queue pending signal {}", si.signo),
            "rt_sigqueueinfo",
            libc::SYS_rt_sigqueueinfo,
            args!(pid, si.signo, at),
        )?;
    }

    // Credentials belong to each thread; they drop privileges, so they come last.
    for r in &remotes {
        set_creds(s, r, p)?;
    }
    // Replaces the SIGKILL that tied the new process to torpor during the restore. A
    // detached process outlives torpor, its parent, so it gets none.
    let pdeath = if opts.detach { 0 } else { p.pdeath_signal };
    s.call(
        "set the parent-death signal",
        "prctl",
        libc::SYS_prctl,
        args!(libc::PR_SET_PDEATHSIG, pdeath),
    )?;
    s.call(
        "set the dumpable flag",
        "prctl",
        libc::SYS_prctl,
        args!(libc::PR_SET_DUMPABLE, p.dumpable),
    )?;

    // torpor's own descriptors inside the process.
    s.call(
        "close torpor's descriptors",
        "close_range",
        libc::SYS_close_range,
        args!(prep.plan.aux_base(), u32::MAX, 0),
    )?;
    Ok(others)
}

fn siginfo(si: &model::SigInfo) -> Result<Vec<u8>> {
    hex::decode(&si.raw)
        .ok()
        .filter(|r| r.len() == 128)
        .ok_or_else(|| RestoreError::Unsupported { what: "a malformed pending signal".into() })
}

/// Creates thread `tid` in the new process, as a thread of its leader, and returns it
/// stopped and ready for remote calls.
fn create_thread(s: &Space, tid: i32) -> Result<Remote> {
    let pid = s.pid();
    let flags = libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM;
    // struct clone_args (88 bytes) with no stack: the thread stops before it runs, and
    // gets its own registers from the image. The tid to use follows the struct.
    let args_at = s.scratch;
    let mut buf = le(&[flags as u64, 0, 0, 0, 0, 0, 0, 0, args_at + 88, 1, 0]);
    buf.extend_from_slice(&(tid as u64).to_ne_bytes());
    s.put(&buf)?;
    let got =
        s.call(&format!("create thread {tid}"), "clone3", libc::SYS_clone3, args!(args_at, 88))?;
    if got != tid as u64 {
        return Err(RestoreError::Unsupported { what: format!("thread {tid} (got tid {got})") });
    }
    let step = |what: &str| {
        let step = format!("{what} thread {tid}");
        move |source| RestoreError::Step { pid, step, source }
    };
    // Seized along with its creator, it reports a stop before running any code.
    match ptrace::wait_stop(tid).map_err(step("wait for new"))? {
        ptrace::Stop::Event(_) => {}
        other => {
            return Err(RestoreError::Unsupported {
                what: format!("thread {tid} that stopped with {other:?}"),
            })
        }
    }
    ptrace::set_sigmask(tid, !0).map_err(step("block signals in"))?;
    Remote::new(tid, s.syscall_ip()).map_err(step("take over"))
}

/// Per-thread kernel state, set by calls the thread runs itself.
fn thread_state(s: &Space, r: &Remote, t: &model::Thread) -> Result<()> {
    let pid = s.pid();
    let tid = t.tid;
    let call =
        |what: &str, name, nr, a| s.call_in(r, &format!("{what} of thread {tid}"), name, nr, a);

    let alt = &t.altstack;
    let ss = if alt.flags & libc::SS_DISABLE != 0 {
        le(&[0, libc::SS_DISABLE as u64, 0])
    } else {
        // SS_ONSTACK is a state, not a setting: the kernel derives it from the stack
        // pointer.
        le(&[alt.sp, (alt.flags & !libc::SS_ONSTACK) as u64, alt.size])
    };
    let at = s.put(&ss)?;
    call("set the alternate signal stack", "sigaltstack", libc::SYS_sigaltstack, args!(at, 0))?;

    // Queued to this thread only: the thread sends them to itself, so the kernel keeps
    // every siginfo field as given.
    for si in &t.pending {
        let at = s.put(&siginfo(si)?)?;
        call(
            &format!("queue pending signal {}", si.signo),
            "rt_tgsigqueueinfo",
            libc::SYS_rt_tgsigqueueinfo,
            args!(pid, tid, si.signo, at),
        )?;
    }
    if t.robust_list != 0 {
        call(
            "set the robust futex list",
            "set_robust_list",
            libc::SYS_set_robust_list,
            args!(t.robust_list, t.robust_list_len),
        )?;
    }
    call(
        "set clear_child_tid",
        "set_tid_address",
        libc::SYS_set_tid_address,
        args!(t.clear_child_tid),
    )?;
    if let Some(rseq) = &t.rseq {
        call(
            "register the rseq area",
            "rseq",
            libc::SYS_rseq,
            args!(rseq.addr, rseq.len, 0, rseq.signature),
        )?;
    }
    let mut comm = [0u8; 16];
    let n = t.comm.len().min(15);
    comm[..n].copy_from_slice(&t.comm.as_bytes()[..n]);
    let at = s.put(&comm)?;
    call("set the name", "prctl", libc::SYS_prctl, args!(libc::PR_SET_NAME, at))?;
    torpor_sys::set_sched(tid, t.nice, t.sched_policy, t.sched_priority).map_err(|source| {
        RestoreError::Step {
            pid,
            step: format!("set the scheduling policy and nice value of thread {tid}"),
            source,
        }
    })
}

/// Sets the mm fields, auxiliary vector and executable in one `PR_SET_MM_MAP`.
pub(crate) fn set_mm(s: &Space, p: &model::Process, prep: &Prepared) -> Result<()> {
    let mm = &p.mm;
    if mm.auxv.len() > 128 {
        return Err(RestoreError::Unsupported { what: "an auxiliary vector that long".into() });
    }
    // struct prctl_mm_map: eleven addresses, the auxv pointer, its size and the exe fd.
    let auxv_bytes = le(&mm.auxv);
    let header = 13 * 8 + 8;
    let auxv_at = s.scratch + header as u64;
    let mut buf = le(&[
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv_at,
    ]);
    buf.extend_from_slice(&(auxv_bytes.len() as u32).to_ne_bytes());
    buf.extend_from_slice(&(prep.exe_fd as u32).to_ne_bytes());
    let size = buf.len();
    buf.resize(header, 0);
    buf.extend_from_slice(&auxv_bytes);
    let at = s.put(&buf)?;
    s.call(
        "set its memory layout and executable (PR_SET_MM_MAP)",
        "prctl",
        libc::SYS_prctl,
        args!(libc::PR_SET_MM, libc::PR_SET_MM_MAP, at, size),
    )
    .map(drop)
}

fn restore_itimers(s: &Space, p: &model::Process) -> Result<()> {
    let it = &p.itimers;
    for (which, t) in [(0u64, it.real), (1, it.virt), (2, it.prof)] {
        if t.value_us == 0 && t.interval_us == 0 {
            continue;
        }
        let value = t.value_us.max(1);
        let at = s.put(&le(&[
            t.interval_us / 1_000_000,
            t.interval_us % 1_000_000,
            value / 1_000_000,
            value % 1_000_000,
        ]))?;
        s.call("set an interval timer", "setitimer", libc::SYS_setitimer, args!(which, at, 0))?;
    }
    Ok(())
}

fn restore_posix_timers(s: &Space, p: &model::Process) -> Result<()> {
    if p.posix_timers.is_empty() {
        return Ok(());
    }
    let ids_by_prctl =
        s.remote().call("prctl", libc::SYS_prctl, args!(PR_TIMER_CREATE_RESTORE_IDS, 1)).is_ok();
    let mut timers = p.posix_timers.clone();
    timers.sort_by_key(|t| t.id);
    let mut fillers = Vec::new();
    for t in &timers {
        // struct sigevent: value, signo, notify, then the thread id for SIGEV_THREAD_ID;
        // the kernel reads 64 bytes. The id to create follows it.
        let mut ev = le(&[t.sigval]);
        ev.extend_from_slice(&t.signo.to_ne_bytes());
        ev.extend_from_slice(&t.notify.to_ne_bytes());
        ev.extend_from_slice(&t.notify_tid.to_ne_bytes());
        ev.resize(64, 0);
        ev.extend_from_slice(&t.id.to_ne_bytes());
        let at = s.put(&ev)?;
        let what = format!("create POSIX timer {}", t.id);
        loop {
            s.call(&what, "timer_create", libc::SYS_timer_create, args!(t.clock, at, at + 64))?;
            let got = i32::from_ne_bytes(read_scratch(s, 64, 4)?.try_into().unwrap());
            if got == t.id || ids_by_prctl {
                if got != t.id {
                    return Err(RestoreError::Unsupported {
                        what: format!("POSIX timer {} (the kernel gave id {got})", t.id),
                    });
                }
                break;
            }
            // Without the prctl, ids come in order: make and later delete fillers.
            if got > t.id {
                return Err(RestoreError::Unsupported {
                    what: format!("POSIX timer {} (ids are already past it)", t.id),
                });
            }
            fillers.push(got);
        }
        if t.value_ns > 0 {
            let at = s.put(&le(&[
                t.interval_ns / 1_000_000_000,
                t.interval_ns % 1_000_000_000,
                t.value_ns / 1_000_000_000,
                t.value_ns % 1_000_000_000,
            ]))?;
            s.call(
                &format!("arm POSIX timer {}", t.id),
                "timer_settime",
                libc::SYS_timer_settime,
                args!(t.id, 0, at, 0),
            )?;
        }
    }
    for id in fillers {
        s.call("delete a filler timer", "timer_delete", libc::SYS_timer_delete, args!(id))?;
    }
    if ids_by_prctl {
        s.call(
            "end timer id restore",
            "prctl",
            libc::SYS_prctl,
            args!(PR_TIMER_CREATE_RESTORE_IDS, 0),
        )?;
    }
    Ok(())
}

fn read_scratch(s: &Space, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    torpor_sys::mem::read_ranges(s.pid(), &[(s.scratch + off, len)], &mut b).map_err(|source| {
        RestoreError::Step { pid: s.pid(), step: "read the scratch area".into(), source }
    })?;
    Ok(b)
}

/// Resource limits. A hard limit above torpor's own cannot be raised without
/// CAP_SYS_RESOURCE; it is kept at torpor's, with a warning.
fn set_rlimits(pid: i32, p: &model::Process) {
    for l in &p.rlimits {
        if let Err(e) = torpor_sys::set_rlimit(pid, l.resource, l.soft, l.hard) {
            let (_, cur_hard) = torpor_sys::get_rlimit(pid, l.resource).unwrap_or((0, 0));
            let hard = l.hard.min(cur_hard);
            let soft = l.soft.min(hard);
            tracing::warn!(
                "pid {pid}: limit {} cannot be set to {}/{} ({e}); using {soft}/{hard}",
                l.resource,
                l.soft,
                l.hard
            );
            let _ = torpor_sys::set_rlimit(pid, l.resource, soft, hard);
        }
    }
}

fn set_creds(s: &Space, r: &Remote, p: &model::Process) -> Result<()> {
    let c = &p.creds;
    let tid = r.tid();
    // The bounding set shrinks while the process still has CAP_SETPCAP.
    for cap in 0..64u64 {
        if c.cap_bounding & (1 << cap) == 0 {
            // Capabilities this kernel does not know fail with EINVAL: nothing to drop.
            let _ = r.call("prctl", libc::SYS_prctl, args!(libc::PR_CAPBSET_DROP, cap));
        }
    }
    if c.groups.len() > 65536 {
        return Err(RestoreError::Unsupported { what: "that many groups".into() });
    }
    let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
    let at = s.put(&groups)?;
    s.call_in(
        r,
        &format!("{} of thread {tid}", "set its groups"),
        "setgroups",
        libc::SYS_setgroups,
        args!(c.groups.len(), at),
    )?;
    let [gr, ge, gs, gf] = c.gids;
    s.call_in(
        r,
        &format!("{} of thread {tid}", "set its group ids"),
        "setresgid",
        libc::SYS_setresgid,
        args!(gr, ge, gs),
    )?;
    s.call_in(
        r,
        &format!("{} of thread {tid}", "set its filesystem group id"),
        "setfsgid",
        libc::SYS_setfsgid,
        args!(gf),
    )?;
    let [ur, ue, us, uf] = c.uids;
    s.call_in(
        r,
        &format!("{} of thread {tid}", "set its user ids"),
        "setresuid",
        libc::SYS_setresuid,
        args!(ur, ue, us),
    )?;
    s.call_in(
        r,
        &format!("{} of thread {tid}", "set its filesystem user id"),
        "setfsuid",
        libc::SYS_setfsuid,
        args!(uf),
    )?;

    // struct __user_cap_header_struct { version 3, pid 0 } and two data words.
    let lo = |v: u64| v & 0xffff_ffff;
    let hi = |v: u64| v >> 32;
    let mut buf = Vec::new();
    buf.extend_from_slice(&0x2008_0522u32.to_ne_bytes());
    buf.extend_from_slice(&0i32.to_ne_bytes());
    for w in [
        lo(c.cap_effective),
        lo(c.cap_permitted),
        lo(c.cap_inheritable),
        hi(c.cap_effective),
        hi(c.cap_permitted),
        hi(c.cap_inheritable),
    ] {
        buf.extend_from_slice(&(w as u32).to_ne_bytes());
    }
    let at = s.put(&buf)?;
    s.call_in(
        r,
        &format!("{} of thread {tid}", "set its capabilities"),
        "capset",
        libc::SYS_capset,
        args!(at, at + 8),
    )?;
    if c.no_new_privs {
        s.call_in(
            r,
            &format!("{} of thread {tid}", "set no_new_privs"),
            "prctl",
            libc::SYS_prctl,
            args!(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
        )?;
    }
    Ok(())
}

/// Loads the saved registers. A thread stopped inside an interrupted system call is set
/// up as the kernel would after a signal without a handler: the call restarts, or, when
/// the kernel kept its restart state internally (`ERESTART_RESTARTBLOCK`, such as a
/// `nanosleep`), returns `EINTR` with the time left already written for the program.
pub(crate) fn load_registers(r: &Remote, t: &model::Thread) -> Result<()> {
    let pid = r.tid();
    let step = |what: &str| {
        let step = what.to_string();
        move |source| RestoreError::Step { pid, step, source }
    };
    let m = &t.regs;
    let mut regs = *r.saved_regs();
    regs.r15 = m.r15;
    regs.r14 = m.r14;
    regs.r13 = m.r13;
    regs.r12 = m.r12;
    regs.rbp = m.rbp;
    regs.rbx = m.rbx;
    regs.r11 = m.r11;
    regs.r10 = m.r10;
    regs.r9 = m.r9;
    regs.r8 = m.r8;
    regs.rax = m.rax;
    regs.rcx = m.rcx;
    regs.rdx = m.rdx;
    regs.rsi = m.rsi;
    regs.rdi = m.rdi;
    regs.rip = m.rip;
    regs.eflags = m.eflags;
    regs.rsp = m.rsp;
    regs.fs_base = m.fs_base;
    regs.gs_base = m.gs_base;
    regs.orig_rax = u64::MAX;
    if (m.orig_rax as i64) >= 0 {
        match m.rax as i64 {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                regs.rax = m.orig_rax;
                regs.rip = m.rip - 2;
            }
            ERESTART_RESTARTBLOCK => regs.rax = (-libc::EINTR) as u64,
            _ => {}
        }
    }

    let mut xsave = hex::decode(&t.xsave)
        .map_err(|_| RestoreError::Unsupported { what: "a malformed XSAVE area".into() })?;
    // The kernel takes an area of exactly its own size; the layout of the standard
    // components is architectural, so a shorter or longer one is cut or padded.
    let here = ptrace::get_xstate(pid).map_err(step("read the FPU state"))?;
    xsave.resize(here.len(), 0);
    ptrace::set_xstate(pid, &xsave).map_err(step("load the FPU/AVX registers"))?;
    ptrace::set_regs(pid, &regs).map_err(step("load the registers"))?;
    Ok(())
}
