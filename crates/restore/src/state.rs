//! Kernel state of the new process beyond its memory: mm fields, signals, timers, limits,
//! credentials, and finally its registers.

use torpor_image::model;
use torpor_sys::remote::Expect;
use torpor_sys::{args, ptrace, Remote};

use crate::batch::Batch;
use crate::cwd::StandIn;
use crate::prepare::Prepared;
use crate::space::Space;
use std::os::fd::AsRawFd;

use crate::{RestoreError, Result};

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

/// Process state set in phase 2, after memory and descriptors: working directory and
/// friends, signal actions, timers, limits, the other threads and every thread's own
/// state, and credentials last. Returns the threads other than the leader.
pub(crate) fn restore_state(s: &Space, p: &model::Process) -> Result<Vec<Remote>> {
    let pid = s.pid();
    fs_state(s, p)?;

    // Every action, since the new process inherited torpor's.
    let mut batch = Batch::new(s);
    for (i, a) in p.sigactions.iter().enumerate() {
        let sig = i as u64 + 1;
        if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
            continue;
        }
        let at = batch.data(&le(&[a.handler, a.flags, a.restorer, a.mask]));
        batch.call(
            format!("set the action of signal {sig}"),
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            args!(sig, at, 0, 8),
            Expect::Success,
        );
    }
    s.run(s.remote(), &mut batch)?;
    restore_itimers(s, p)?;
    set_rlimits(pid, p);

    // The other threads, made by the leader with their own tids while it still may
    // choose ids. POSIX timers may notify a thread, so they come after.
    let others = create_threads(s, &p.threads[1..])?;
    restore_posix_timers(s, p)?;

    let remotes: Vec<&Remote> = std::iter::once(s.remote()).chain(others.iter()).collect();
    for (t, r) in p.threads.iter().zip(&remotes) {
        thread_state(s, r, t)?;
    }
    // Credentials belong to each thread; they drop privileges, so they come last.
    for r in &remotes {
        set_creds(s, r, p)?;
    }
    Ok(others)
}

/// Working directory, root, umask and personality.
fn fs_state(s: &Space, p: &model::Process) -> Result<()> {
    let path = |p: &str| {
        let mut b = p.as_bytes().to_vec();
        b.push(0);
        if b.len() > 4096 {
            return Err(RestoreError::Unsupported { what: format!("a path this long: {p:?}") });
        }
        Ok(b)
    };
    // A deleted working directory is entered as a new empty one, removed right after.
    let stand_in = StandIn::for_cwd(s.pid(), &p.cwd)?;
    let cwd = stand_in.as_ref().map_or(p.cwd.as_str(), StandIn::path);
    let at = s.put(&path(cwd)?)?;
    s.call(
        &format!("change to its working directory {}", p.cwd),
        "chdir",
        libc::SYS_chdir,
        args!(at),
    )?;
    drop(stand_in);
    let own_root = std::fs::read_link("/proc/self/root").map(|r| r.to_string_lossy().into_owned());
    if own_root.ok().as_deref() != Some(p.root.as_str()) {
        // After chdir: the saved cwd is a path as torpor sees it, and chroot leaves the
        // working directory where it is.
        let at = s.put(&path(&p.root)?)?;
        s.call(&format!("change its root to {}", p.root), "chroot", libc::SYS_chroot, args!(at))?;
    }
    s.call("set its umask", "umask", libc::SYS_umask, args!(p.umask))?;
    s.call("set its personality", "personality", libc::SYS_personality, args!(p.personality))?;
    Ok(())
}

/// Makes `pid` as a child of the process of `parent`, like `fork` with a chosen pid (in
/// the parent's pid namespace). The child, seized along with its parent, stops before it
/// runs. Returns its pid as torpor sees it.
pub(crate) fn fork_child(parent: &Space, pid: i32) -> Result<i32> {
    // struct clone_args (88 bytes): a plain fork reporting SIGCHLD, with the pid to use
    // after it.
    let at = parent.scratch;
    let mut buf = le(&[0, 0, 0, 0, libc::SIGCHLD as u64, 0, 0, 0, at + 88, 1, 0]);
    buf.extend_from_slice(&(pid as u64).to_ne_bytes());
    parent.put(&buf)?;
    let got =
        parent.call(&format!("create child {pid}"), "clone3", libc::SYS_clone3, args!(at, 88))?;
    if got != pid as u64 {
        return Err(RestoreError::Unsupported { what: format!("child {pid} (got pid {got})") });
    }
    let step = |what: &str| {
        let step = format!("{what} child {pid}");
        move |source| RestoreError::Step { pid: parent.pid(), step, source }
    };
    let outer = new_task(parent.remote(), pid)?;
    match ptrace::wait_stop(outer).map_err(step("wait for new"))? {
        ptrace::Stop::Event(_) => {}
        other => {
            return Err(RestoreError::Unsupported {
                what: format!("child {pid} that stopped with {other:?}"),
            })
        }
    }
    ptrace::set_sigmask(outer, !0).map_err(step("block signals in"))?;
    Ok(outer)
}

/// The pid torpor sees for the task the last call in `r` made (`what` in messages).
fn new_task(r: &Remote, what: i32) -> Result<i32> {
    r.take_new_task().ok_or_else(|| RestoreError::Unsupported {
        what: format!("task {what}, which the kernel made without telling torpor"),
    })
}

/// Session and process group leadership, set right after the process is made so that
/// the children it makes next inherit them. A shell job's root joins the session of the
/// terminal it wakes in, as a group leader, as a shell would start it.
pub(crate) fn session(s: &Space, p: &model::Process, shell_job_root: bool) -> Result<()> {
    if shell_job_root {
        s.call("create its process group", "setpgid", libc::SYS_setpgid, args!(0, 0))?;
    } else if p.sid == p.pid {
        s.call("create its session", "setsid", libc::SYS_setsid, args!())?;
    } else if p.pgid == p.pid {
        s.call("create its process group", "setpgid", libc::SYS_setpgid, args!(0, 0))?;
    }
    Ok(())
}

/// Joins a process group led by another process of the tree, once all exist.
pub(crate) fn join_group(s: &Space, p: &model::Process, tree: &model::Tree) -> Result<()> {
    if p.pgid != p.pid && tree.processes.iter().any(|q| q.pid == p.pgid) {
        s.call(
            &format!("join process group {}", p.pgid),
            "setpgid",
            libc::SYS_setpgid,
            args!(0, p.pgid),
        )?;
    }
    Ok(())
}

/// Makes a child that has exited with the saved status and waits for its parent.
pub(crate) fn make_zombie(parent: &Space, z: &model::Zombie) -> Result<()> {
    let outer = fork_child(parent, z.pid)?;
    let step = |what: &str| {
        let step = format!("{what} zombie {}", z.pid);
        move |source| RestoreError::Step { pid: z.pid, step, source }
    };
    let r = Remote::new(outer, parent.syscall_ip()).map_err(step("take over"))?;
    let mut comm = [0u8; 16];
    let n = z.comm.len().min(15);
    comm[..n].copy_from_slice(&z.comm.as_bytes()[..n]);
    let at = parent.put(&comm)?;
    r.call("prctl", libc::SYS_prctl, args!(libc::PR_SET_NAME, at)).map_err(step("name"))?;
    let status = z.exit_status;
    if libc::WIFSIGNALED(status) {
        // Dies of the signal, as it did: default action, unblocked, sent to itself.
        let sig = libc::WTERMSIG(status);
        let dfl = parent.put(&le(&[0, 0, 0, 0]))?;
        r.call("rt_sigaction", libc::SYS_rt_sigaction, args!(sig, dfl, 0, 8))
            .map_err(step("reset the signal action of"))?;
        ptrace::set_sigmask(outer, 0).map_err(step("unblock signals in"))?;
        match r.raw(libc::SYS_kill, args!(z.pid, sig)) {
            Err(torpor_sys::Error::RemoteStop { .. }) => {
                ptrace::cont(outer, sig).map_err(step("kill"))?
            }
            Err(torpor_sys::Error::Gone { .. }) => return Ok(()),
            other => {
                other.map_err(step("kill"))?;
            }
        }
    } else {
        match r.raw(libc::SYS_exit_group, args!(libc::WEXITSTATUS(status))) {
            Err(torpor_sys::Error::Gone { .. }) => return Ok(()),
            other => {
                other.map_err(step("end"))?;
            }
        }
    }
    // As its tracer torpor sees the exit first; the parent reaps it later.
    ptrace::wait_exit(outer).map_err(|source| RestoreError::Step {
        pid: z.pid,
        step: "wait for the zombie to exit".into(),
        source: torpor_sys::Error::Wait { tid: z.pid, source },
    })?;
    Ok(())
}

/// Most descriptors passed in one message (the kernel allows 253).
const FDS_PER_MESSAGE: usize = 200;

/// Installs the process's descriptors: torpor sends the open file descriptions over the
/// transfer socket every process inherited, the process receives them with `recvmsg`
/// (they land at the lowest free numbers), moves them out of the way, then `dup3`s each
/// to its number.
pub(crate) fn install_fds(s: &Space, p: &model::Process, prep: &Prepared) -> Result<()> {
    let aux_base = prep.plan.aux_base();
    // Received descriptors stay below aux_end + FDS_PER_MESSAGE; parked ones go above.
    let park = prep.plan.aux_end() + FDS_PER_MESSAGE as i32 + 8;
    s.call(
        "close what it inherited",
        "close_range",
        libc::SYS_close_range,
        args!(0, aux_base - 1, 0),
    )?;
    // `/proc` files are opened only now: they may belong to the processes just made.
    let mut late = Vec::new();
    let mut raw_fds = Vec::with_capacity(p.fds.len());
    for f in &p.fds {
        match crate::prepare::late_open(&p.open_files[f.open_file])? {
            Some(fd) => {
                raw_fds.push(fd.as_raw_fd());
                late.push(fd);
            }
            None => raw_fds.push(prep.objects[prep.fd_objects[&(p.pid, f.open_file)]].as_raw_fd()),
        }
    }
    for (batch, chunk) in raw_fds.chunks(FDS_PER_MESSAGE).enumerate() {
        let raw: Vec<i32> = chunk.to_vec();
        send_fds(&prep.transfer, &raw).map_err(|source| RestoreError::Prepare {
            what: format!("descriptors for pid {}", p.pid),
            source,
        })?;
        let got = recv_fds(s, prep.transfer_fd, chunk.len())?;
        for (j, fd) in got.into_iter().enumerate() {
            let want = park + (batch * FDS_PER_MESSAGE + j) as i32;
            let moved = s.call(
                "park a received descriptor",
                "fcntl",
                libc::SYS_fcntl,
                args!(fd, libc::F_DUPFD, want),
            )?;
            if moved != want as u64 {
                return Err(RestoreError::Unsupported {
                    what: format!("descriptor numbers in pid {} (parked at {moved})", p.pid),
                });
            }
            s.call("close a received descriptor", "close", libc::SYS_close, args!(fd))?;
        }
    }
    for (k, f) in p.fds.iter().enumerate() {
        let flags = if f.cloexec { libc::O_CLOEXEC } else { 0 };
        s.call(
            &format!("install fd {}", f.fd),
            "dup3",
            libc::SYS_dup3,
            args!(park + k as i32, f.fd, flags),
        )?;
    }
    if !p.fds.is_empty() {
        s.call(
            "close parked descriptors",
            "close_range",
            libc::SYS_close_range,
            args!(park, park + p.fds.len() as i32 - 1, 0),
        )?;
    }
    Ok(())
}

/// Takes the process's file locks again, through its own descriptors: a POSIX lock
/// belongs to the process that takes it, so only the process can. A lock another process
/// holds now (one outside the tree, since the dump) makes the restore fail, naming the
/// file: the program would otherwise run on believing it holds it.
pub(crate) fn take_locks(s: &Space, p: &model::Process, tree: &model::Tree) -> Result<()> {
    use model::LockKind;
    for l in &p.file_locks {
        let what = format!(
            "take its {} {} lock{} on fd {}{}",
            match l.kind {
                LockKind::Flock => "flock",
                LockKind::Posix => "POSIX",
                LockKind::Ofd => "open file description",
            },
            if l.write { "write" } else { "read" },
            match (l.kind, l.end) {
                (LockKind::Flock, _) => String::new(),
                (_, Some(end)) => format!(" on bytes {}-{end}", l.start),
                (_, None) => format!(" from byte {} to the end", l.start),
            },
            l.fd,
            describe_fd(p, tree, l.fd),
        );
        let r = if l.kind == LockKind::Flock {
            let op = if l.write { libc::LOCK_EX } else { libc::LOCK_SH };
            s.call(&what, "flock", libc::SYS_flock, args!(l.fd, op | libc::LOCK_NB))
        } else {
            // struct flock on x86_64: l_type, l_whence (shorts), then l_start, l_len
            // (64-bit, after 4 bytes of padding), l_pid and padding: 32 bytes.
            let ty = if l.write { libc::F_WRLCK } else { libc::F_RDLCK } as i16;
            let len = l.end.map_or(0, |end| end - l.start + 1);
            let mut raw = [0u8; 32];
            raw[0..2].copy_from_slice(&ty.to_ne_bytes());
            raw[2..4].copy_from_slice(&(libc::SEEK_SET as i16).to_ne_bytes());
            raw[8..16].copy_from_slice(&l.start.to_ne_bytes());
            raw[16..24].copy_from_slice(&len.to_ne_bytes());
            let at = s.put(&raw)?;
            let cmd = if l.kind == LockKind::Posix { libc::F_SETLK } else { libc::F_OFD_SETLK };
            s.call(&what, "fcntl", libc::SYS_fcntl, args!(l.fd, cmd, at))
        };
        r?;
    }
    Ok(())
}

/// Installs the process's seccomp filters, oldest first, for all its threads at once
/// (`SECCOMP_FILTER_FLAG_TSYNC`). The last system call torpor makes in the process but
/// the scratch area's `munmap`: from here its filters judge every call it makes.
/// Installing needs `no_new_privs` or `CAP_SYS_ADMIN`, which a process that installed
/// filters had, and still has after its credentials were put back.
pub(crate) fn install_seccomp(s: &Space, p: &model::Process) -> Result<()> {
    const SECCOMP_SET_MODE_FILTER: u64 = 1;
    const SECCOMP_FILTER_FLAG_TSYNC: u64 = 1;
    const SECCOMP_FILTER_FLAG_LOG: u64 = 2;
    for (i, f) in p.seccomp.iter().enumerate() {
        let what = format!("install seccomp filter {} of {}", i + 1, p.seccomp.len());
        let code = hex::decode(&f.code).map_err(|_| RestoreError::Unsupported {
            what: format!("a seccomp filter of pid {} that is not hex", p.pid),
        })?;
        if code.is_empty() || code.len() % 8 != 0 || code.len() / 8 > u16::MAX as usize {
            return Err(RestoreError::Unsupported {
                what: format!("a seccomp filter of pid {} of {} bytes", p.pid, code.len()),
            });
        }
        // struct sock_fprog: the instruction count (u16, padded to 8), then a pointer to
        // the instructions, which follow it here.
        let mut bytes = Vec::with_capacity(16 + code.len());
        bytes.extend_from_slice(&((code.len() / 8) as u64).to_ne_bytes());
        bytes.extend_from_slice(&(s.scratch + 16).to_ne_bytes());
        bytes.extend_from_slice(&code);
        let at = s.put(&bytes)?;
        let flags = SECCOMP_FILTER_FLAG_TSYNC | if f.log { SECCOMP_FILTER_FLAG_LOG } else { 0 };
        let r =
            s.call(&what, "seccomp", libc::SYS_seccomp, args!(SECCOMP_SET_MODE_FILTER, flags, at))?;
        if r != 0 {
            return Err(RestoreError::Unsupported {
                what: format!(
                    "seccomp filters for pid {}: thread {r} could not take them with the others",
                    p.pid
                ),
            });
        }
    }
    Ok(())
}

/// ` (PATH)` for a descriptor of a regular file, for messages.
fn describe_fd(p: &model::Process, tree: &model::Tree, fd: i32) -> String {
    let Some(f) = p.fds.iter().find(|f| f.fd == fd) else { return String::new() };
    match &p.open_files[f.open_file].kind {
        model::OpenFileKind::Regular { file } => {
            tree.files.get(*file).map_or(String::new(), |f| format!(" ({})", f.path))
        }
        _ => String::new(),
    }
}

/// Makes the slaves of the tree's pseudo-terminals that controlled this process's
/// session its controlling terminals again, with their foreground process groups. Only
/// the session leader may, from inside: it receives torpor's description of the slave
/// for the moment, takes it (`TIOCSCTTY`), sets the foreground (`TIOCSPGRP`, every group
/// exists by now) and closes it again.
pub(crate) fn controlling_ttys(
    s: &Space,
    p: &model::Process,
    tree: &model::Tree,
    prep: &Prepared,
) -> Result<()> {
    for t in tree.ptys.iter().filter(|t| t.session == Some(p.pid)) {
        let index = t.index;
        let slave = prep.ptys.slave(index).ok_or_else(|| RestoreError::Unsupported {
            what: format!("/dev/pts/{index} without its pair"),
        })?;
        send_fds(&prep.transfer, &[slave.as_raw_fd()]).map_err(|source| RestoreError::Prepare {
            what: format!("/dev/pts/{index} for pid {}", p.pid),
            source,
        })?;
        let fd = recv_fds(s, prep.transfer_fd, 1)?[0];
        s.call(
            &format!("make /dev/pts/{index} its controlling terminal"),
            "ioctl",
            libc::SYS_ioctl,
            args!(fd, libc::TIOCSCTTY, 0),
        )?;
        if let Some(fg) = t.foreground {
            let at = s.put(&fg.to_ne_bytes())?;
            s.call(
                &format!("give process group {fg} the foreground of /dev/pts/{index}"),
                "ioctl",
                libc::SYS_ioctl,
                args!(fd, libc::TIOCSPGRP, at),
            )?;
        }
        s.call("close a terminal it was lent", "close", libc::SYS_close, args!(fd))?;
    }
    Ok(())
}

/// Registers the targets of the process's epoll instances, with calls it makes itself so
/// the kernel keys them by its descriptor numbers. An instance shared by several
/// processes is filled once, by the first (`done` holds the objects already filled).
pub(crate) fn register_epolls(
    s: &Space,
    p: &model::Process,
    prep: &Prepared,
    done: &mut std::collections::HashSet<usize>,
) -> Result<()> {
    for f in &p.fds {
        let model::OpenFileKind::Epoll { targets } = &p.open_files[f.open_file].kind else {
            continue;
        };
        if !done.insert(prep.fd_objects[&(p.pid, f.open_file)]) {
            continue;
        }
        for t in targets {
            if !p.fds.iter().any(|g| g.fd == t.fd) {
                return Err(RestoreError::Unsupported {
                    what: format!(
                        "an epoll (fd {}) watching fd {}, which pid {} does not have open",
                        f.fd, t.fd, p.pid
                    ),
                });
            }
            // struct epoll_event is packed on x86_64: 4 bytes of events, 8 of data.
            let mut ev = t.events.to_ne_bytes().to_vec();
            ev.extend_from_slice(&t.data.to_ne_bytes());
            let at = s.put(&ev)?;
            s.call(
                &format!("register fd {} in the epoll on fd {}", t.fd, f.fd),
                "epoll_ctl",
                libc::SYS_epoll_ctl,
                args!(f.fd, libc::EPOLL_CTL_ADD, t.fd, at),
            )?;
        }
    }
    Ok(())
}

fn send_fds(sock: &std::os::fd::OwnedFd, fds: &[i32]) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [std::io::IoSlice::new(&[0u8])];
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map(drop)
        .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
}

/// Runs `recvmsg` in the process for one message of `n` descriptors; returns their
/// numbers there.
fn recv_fds(s: &Space, sock: i32, n: usize) -> Result<Vec<i32>> {
    // In the scratch area: struct msghdr (56 bytes), one iovec at 64, its byte at 80,
    // the control buffer at 128.
    let base = s.scratch;
    let control_len = 16 + 4 * FDS_PER_MESSAGE as u64;
    let mut buf = le(&[0, 0, base + 64, 1, base + 128, control_len, 0]);
    buf.resize(64, 0);
    buf.extend_from_slice(&le(&[base + 80, 1]));
    s.put(&buf)?;
    s.call("receive its descriptors", "recvmsg", libc::SYS_recvmsg, args!(sock, base, 0))?;
    let mut control = vec![0u8; 16 + 4 * n];
    torpor_sys::mem::read_ranges(s.pid(), &[(base + 128, control.len())], &mut control).map_err(
        |source| RestoreError::Step {
            pid: s.pid(),
            step: "read the received descriptors".into(),
            source,
        },
    )?;
    let len = u64::from_ne_bytes(control[..8].try_into().unwrap()) as usize;
    let got = len.saturating_sub(16) / 4;
    if got != n {
        return Err(RestoreError::Unsupported {
            what: format!("a transfer of {n} descriptors that delivered {got}"),
        });
    }
    Ok((0..n)
        .map(|i| i32::from_ne_bytes(control[16 + 4 * i..20 + 4 * i].try_into().unwrap()))
        .collect())
}

/// Phase 3: discards the signals the restore itself caused, queues the saved pending
/// ones, and sets the flags that credentials changes would have reset.
pub(crate) fn signals_and_flags(
    s: &Space,
    others: &[Remote],
    p: &model::Process,
    detached_root: bool,
    prep: &Prepared,
) -> Result<()> {
    let pid = s.pid();
    // SIGCHLD from the children and zombies torpor made; the leader takes them from the
    // process-wide queue without waiting.
    let set = s.put(&le(&[!((1u64 << (libc::SIGKILL - 1)) | (1 << (libc::SIGSTOP - 1))), 0, 0]))?;
    loop {
        let r = s.remote().raw(libc::SYS_rt_sigtimedwait, args!(set, 0, set + 8, 8)).map_err(
            |source| RestoreError::Step {
                pid,
                step: "discard signals made by the restore".into(),
                source,
            },
        )?;
        if r < 0 {
            break;
        }
    }

    for si in &p.shared_pending {
        let at = s.put(&siginfo(si)?)?;
        s.call(
            &format!("queue pending signal {}", si.signo),
            "rt_sigqueueinfo",
            libc::SYS_rt_sigqueueinfo,
            args!(s.inner(), si.signo, at),
        )?;
    }
    // Queued to one thread: each thread sends them to itself, so the kernel keeps every
    // siginfo field as given.
    let remotes: Vec<&Remote> = std::iter::once(s.remote()).chain(others.iter()).collect();
    for (t, r) in p.threads.iter().zip(&remotes) {
        for si in &t.pending {
            let at = s.put(&siginfo(si)?)?;
            s.call_in(
                r,
                &format!("queue pending signal {} of thread {}", si.signo, t.tid),
                "rt_tgsigqueueinfo",
                libc::SYS_rt_tgsigqueueinfo,
                args!(s.inner(), t.tid, si.signo, at),
            )?;
        }
    }

    // Replaces the SIGKILL that tied the new process to torpor during the restore. A
    // detached root outlives torpor, its parent, so it gets none.
    let pdeath = if detached_root { 0 } else { p.pdeath_signal };
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
    if p.attrs.child_subreaper {
        s.call(
            "make it a child subreaper",
            "prctl",
            libc::SYS_prctl,
            args!(libc::PR_SET_CHILD_SUBREAPER, 1),
        )?;
    }
    if p.attrs.thp_disabled {
        s.call(
            "turn transparent huge pages off",
            "prctl",
            libc::SYS_prctl,
            args!(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0),
        )?;
    }
    let oom = format!("/proc/{pid}/oom_score_adj");
    let current = std::fs::read_to_string(&oom).ok();
    if current.as_deref().map(str::trim) != Some(p.attrs.oom_score_adj.to_string().as_str()) {
        // Lowering it needs CAP_SYS_RESOURCE: without, the process keeps torpor's.
        if let Err(e) = std::fs::write(&oom, p.attrs.oom_score_adj.to_string()) {
            tracing::warn!(
                "pid {pid}: OOM score adjustment {} not set again: {e}",
                p.attrs.oom_score_adj
            );
        }
    }
    // torpor's own descriptors inside the process.
    s.call(
        "close torpor's descriptors",
        "close_range",
        libc::SYS_close_range,
        args!(prep.plan.aux_base(), u32::MAX, 0),
    )?;
    Ok(())
}

fn siginfo(si: &model::SigInfo) -> Result<Vec<u8>> {
    hex::decode(&si.raw)
        .ok()
        .filter(|r| r.len() == 128)
        .ok_or_else(|| RestoreError::Unsupported { what: "a malformed pending signal".into() })
}

/// Creates the threads in the new process, as threads of its leader, with their own tids,
/// and returns them stopped and ready for remote calls. The leader makes them in batches.
fn create_threads(s: &Space, threads: &[model::Thread]) -> Result<Vec<Remote>> {
    let pid = s.pid();
    let flags = libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM;
    let mut remotes = Vec::with_capacity(threads.len());
    let mut batch = Batch::new(s);
    let mut made = 0;
    for (i, t) in threads.iter().enumerate() {
        let tid = t.tid;
        // struct clone_args (88 bytes) with no stack: the thread stops before it runs,
        // and gets its own registers from the image. The tid to use follows the struct,
        // at the set_tid address the struct names.
        let (args_len, set_tid_len) = (88u64, 8u64);
        if !batch.has_room((args_len + set_tid_len) as usize, 1) {
            s.run(s.remote(), &mut batch)?;
            take_threads(s, &threads[made..i], &mut remotes)?;
            made = i;
        }
        let at = batch.data(&[0; 96]);
        let mut bytes = le(&[flags as u64, 0, 0, 0, 0, 0, 0, 0, at + args_len, 1, 0]);
        bytes.extend_from_slice(&(tid as u64).to_ne_bytes());
        batch.set_data(at, &bytes);
        batch.call(
            format!("create thread {tid}"),
            "clone3",
            libc::SYS_clone3,
            args!(at, args_len),
            Expect::Value(tid as u64),
        );
    }
    s.run(s.remote(), &mut batch)?;
    take_threads(s, &threads[made..], &mut remotes)?;
    if remotes.len() != threads.len() {
        return Err(RestoreError::Unsupported {
            what: format!("pid {pid}: {} threads made, {} wanted", remotes.len(), threads.len()),
        });
    }
    Ok(remotes)
}

/// Takes over the threads a batch just made (`threads`, in order): each, seized along
/// with its creator, reports a stop before running any code.
fn take_threads(s: &Space, threads: &[model::Thread], remotes: &mut Vec<Remote>) -> Result<()> {
    let pid = s.pid();
    let made = s.remote().take_new_tasks();
    if made.len() != threads.len() {
        return Err(RestoreError::Unsupported {
            what: format!(
                "threads of pid {pid} that the kernel made without telling torpor ({} of {})",
                made.len(),
                threads.len()
            ),
        });
    }
    for (t, outer) in threads.iter().zip(made) {
        let tid = t.tid;
        let step = |what: &str| {
            let step = format!("{what} thread {tid}");
            move |source| RestoreError::Step { pid, step, source }
        };
        match ptrace::wait_stop(outer).map_err(step("wait for new"))? {
            ptrace::Stop::Event(_) => {}
            other => {
                return Err(RestoreError::Unsupported {
                    what: format!("thread {tid} that stopped with {other:?}"),
                })
            }
        }
        ptrace::set_sigmask(outer, !0).map_err(step("block signals in"))?;
        remotes.push(Remote::new(outer, s.syscall_ip()).map_err(step("take over"))?);
    }
    Ok(())
}

/// Per-thread kernel state, set by calls the thread runs itself.
fn thread_state(s: &Space, r: &Remote, t: &model::Thread) -> Result<()> {
    let pid = s.pid();
    let tid = t.tid;
    let mut b = Batch::new(s);
    let call = |b: &mut Batch, what: &str, name, nr, a| {
        b.call(format!("{what} of thread {tid}"), name, nr, a, Expect::Success)
    };

    let alt = &t.altstack;
    let ss = if alt.flags & libc::SS_DISABLE != 0 {
        le(&[0, libc::SS_DISABLE as u64, 0])
    } else {
        // SS_ONSTACK is a state, not a setting: the kernel derives it from the stack
        // pointer.
        le(&[alt.sp, (alt.flags & !libc::SS_ONSTACK) as u64, alt.size])
    };
    let at = b.data(&ss);
    call(
        &mut b,
        "set the alternate signal stack",
        "sigaltstack",
        libc::SYS_sigaltstack,
        args!(at, 0),
    );

    if t.robust_list != 0 {
        call(
            &mut b,
            "set the robust futex list",
            "set_robust_list",
            libc::SYS_set_robust_list,
            args!(t.robust_list, t.robust_list_len),
        );
    }
    call(
        &mut b,
        "set clear_child_tid",
        "set_tid_address",
        libc::SYS_set_tid_address,
        args!(t.clear_child_tid),
    );
    if let Some(rseq) = &t.rseq {
        call(
            &mut b,
            "register the rseq area",
            "rseq",
            libc::SYS_rseq,
            args!(rseq.addr, rseq.len, 0, rseq.signature),
        );
    }
    if let Some(ns) = t.timer_slack_ns {
        // The thread sets its own: writing /proc/TID/timerslack_ns needs CAP_SYS_NICE.
        call(
            &mut b,
            "set the timer slack",
            "prctl",
            libc::SYS_prctl,
            args!(libc::PR_SET_TIMERSLACK, ns),
        );
    }
    let mut comm = [0u8; 16];
    let n = t.comm.len().min(15);
    comm[..n].copy_from_slice(&t.comm.as_bytes()[..n]);
    let at = b.data(&comm);
    call(&mut b, "set the name", "prctl", libc::SYS_prctl, args!(libc::PR_SET_NAME, at));
    s.run(r, &mut b)?;
    torpor_sys::set_sched(r.tid(), t.nice, t.sched_policy, t.sched_priority).map_err(|source| {
        RestoreError::Step {
            pid,
            step: format!("set the scheduling policy and nice value of thread {tid}"),
            source,
        }
    })?;
    thread_attrs(pid, r.tid(), t);
    Ok(())
}

/// Gives thread `tid` (saved as `t.tid`) its CPU affinity and I/O priority.
/// Each is a matter of placement and latency, not of what the program computes: one the
/// kernel refuses here (the CPUs are not online, a control group forbids them) is named
/// in a warning and left at what the thread inherited.
fn thread_attrs(pid: i32, tid: i32, t: &model::Thread) {
    let warn = |what: &str, e: &dyn std::fmt::Display| {
        tracing::warn!("pid {pid} thread {}: {what} not set again: {e}", t.tid)
    };
    if let Some(mask) = &t.affinity {
        let online = torpor_sys::online_cpus().unwrap_or_else(|| mask.clone());
        let here: Vec<u64> =
            mask.iter().enumerate().map(|(i, w)| w & online.get(i).unwrap_or(&0)).collect();
        if here.iter().all(|&w| w == 0) {
            warn("its CPU affinity", &"none of its CPUs is online on this machine");
        } else if let Err(e) = torpor_sys::set_affinity(tid, &here) {
            warn("its CPU affinity", &e);
        }
    }
    if let Some(prio) = t.ioprio {
        if let Err(e) = torpor_sys::set_ioprio(tid, prio) {
            warn("its I/O priority", &e);
        }
    }
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
    buf.extend_from_slice(&(prep.exe_fds[&p.pid] as u32).to_ne_bytes());
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
    let mut b = Batch::new(s);
    let what = |w: &str| format!("{w} of thread {tid}");
    // The bounding set shrinks while the process still has CAP_SETPCAP. Capabilities this
    // kernel does not know fail with EINVAL: there is nothing to drop.
    for cap in 0..=last_cap() {
        if c.cap_bounding & (1 << cap) == 0 {
            b.call(
                what("drop a capability from the bounding set"),
                "prctl",
                libc::SYS_prctl,
                args!(libc::PR_CAPBSET_DROP, cap),
                Expect::Any,
            );
        }
    }
    if c.groups.len() > 8192 {
        return Err(RestoreError::Unsupported {
            what: "more than 8192 supplementary groups".into(),
        });
    }
    // The process has torpor's groups from birth: when those are its own, setgroups is
    // not called, since a user namespace made by a user without privileges forbids it.
    if !torpor_sys::same_groups(&c.groups) {
        let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
        let at = b.data(&groups);
        b.call(
            what("set its groups"),
            "setgroups",
            libc::SYS_setgroups,
            args!(c.groups.len(), at),
            Expect::Success,
        );
    }
    let [gr, ge, gs, gf] = c.gids;
    b.call(
        what("set its group ids"),
        "setresgid",
        libc::SYS_setresgid,
        args!(gr, ge, gs),
        Expect::Success,
    );
    // setfsgid and setfsuid return the previous id, never an error.
    b.call(
        what("set its filesystem group id"),
        "setfsgid",
        libc::SYS_setfsgid,
        args!(gf),
        Expect::Any,
    );
    let [ur, ue, us, uf] = c.uids;
    b.call(
        what("set its user ids"),
        "setresuid",
        libc::SYS_setresuid,
        args!(ur, ue, us),
        Expect::Success,
    );
    b.call(
        what("set its filesystem user id"),
        "setfsuid",
        libc::SYS_setfsuid,
        args!(uf),
        Expect::Any,
    );

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
    let at = b.data(&buf);
    b.call(
        what("set its capabilities"),
        "capset",
        libc::SYS_capset,
        args!(at, at + 8),
        Expect::Success,
    );
    if c.no_new_privs {
        b.call(
            what("set no_new_privs"),
            "prctl",
            libc::SYS_prctl,
            args!(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            Expect::Success,
        );
    }
    s.run(r, &mut b)
}

/// The highest capability number the running kernel knows.
fn last_cap() -> u64 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(63)
        .min(63)
}

/// Loads the saved registers. A thread stopped inside an interrupted system call is set
/// up as the kernel would after a signal without a handler: the call restarts, or, when
/// the kernel kept its restart state internally (`ERESTART_RESTARTBLOCK`, such as a
/// `nanosleep`), returns `EINTR` with the time left already written for the program;
/// `poll`, which keeps such state too, is called again instead.
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
            // poll keeps its restart state in the kernel too, but a program without
            // signal handlers does not expect it to fail with EINTR (PHP's accept gave
            // up on it). Its arguments are still in their registers: it is called again,
            // its timeout, if any, counted afresh.
            ERESTART_RESTARTBLOCK if m.orig_rax == libc::SYS_poll as u64 => {
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
