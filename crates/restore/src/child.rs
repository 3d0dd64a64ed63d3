//! Creating the process with its original pid, and what it does on its own before torpor
//! takes it over: its session, descriptors, working directory and umask.
//!
//! The child is a copy of torpor made by `clone3`. Until torpor stops it, it runs only the
//! code in [`child_main`], which makes raw system calls on data prepared beforehand and
//! never allocates: the copy must not depend on locks other threads of torpor may hold.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::{RestoreError, Result};

/// One descriptor of the restored process: which prepared file it is and its flags.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Index into [`Plan::sources`].
    pub source: usize,
    pub fd: i32,
    pub cloexec: bool,
}

/// Everything the child does before it stops.
pub struct Plan {
    pub pid: i32,
    /// Make the child a session leader (`setsid`), or a process group leader.
    pub setsid: bool,
    pub setpgid: bool,
    /// Files opened by torpor: first those the process keeps as descriptors, then the
    /// auxiliary ones torpor needs inside it (page data, mapped files...).
    pub sources: Vec<OwnedFd>,
    /// How many of `sources` are descriptors of the process; the rest are auxiliary.
    pub n_fd_sources: usize,
    pub targets: Vec<Target>,
    pub cwd: CString,
    /// Root directory to `chroot` into, when it is not torpor's own.
    pub root: Option<CString>,
    pub umask: u32,
    pub personality: u32,
    /// First descriptor number above everything in use; sources are moved there first.
    pub base: i32,
    /// The pipe the child reports its setup on: (read end, write end). Made before
    /// `base` is chosen so that it lies below it.
    pub report: Option<(OwnedFd, OwnedFd)>,
}

impl Plan {
    /// Where auxiliary source `i` (counted from the first auxiliary one) ends up in the
    /// child.
    pub fn aux_fd(&self, i: usize) -> i32 {
        self.base + (self.n_fd_sources + i) as i32
    }

    /// First descriptor number of the auxiliary range in the child.
    pub fn aux_base(&self) -> i32 {
        self.base + self.n_fd_sources as i32
    }
}

/// Steps the child reports when one fails.
const STEPS: &[&str] = &[
    "set the parent-death signal",
    "create its session",
    "create its process group",
    "move descriptors",
    "close torpor's descriptors",
    "install descriptors",
    "change to its working directory",
    "set its personality",
    "change its root directory",
];

/// Creates the process with `plan.pid` as its pid and runs the plan in it. Returns once
/// the child has carried the plan out and is waiting to be taken over.
pub fn spawn(plan: &mut Plan) -> Result<i32> {
    let pid = plan.pid;
    let (rd, wr) = plan.report.take().expect("a plan is spawned once");
    // SAFETY: the restore path is single-threaded here, and the child runs only
    // `child_main`, which makes raw system calls on `plan` (prepared beforehand) and never
    // allocates or takes locks.
    let child = unsafe { torpor_sys::clone3_with_pid(pid) }.map_err(|source| {
        if source.raw_os_error() == Some(libc::EEXIST) {
            RestoreError::PidTaken { pid, holder: crate::describe_pid(pid) }
        } else {
            RestoreError::Clone { pid, source }
        }
    })?;
    if child == 0 {
        child_main(plan, wr.as_raw_fd());
    }
    // Our copy of the write end must go for the read to end when the child dies.
    drop(wr);
    let mut rd = File::from(rd);
    let mut report = [0u8; 8];
    let n = read_full(&mut rd, &mut report);
    if n == 8 && report == [0xff; 8] {
        return Ok(child);
    }
    // The child failed (its report names the step) or died: reap it.
    // SAFETY: kill takes only integers; `child` is our own child.
    unsafe { libc::kill(child, libc::SIGKILL) };
    let _ = torpor_sys::ptrace::wait_exit(child);
    if n == 8 {
        let step = u32::from_ne_bytes(report[..4].try_into().unwrap()) as usize;
        let errno = i32::from_ne_bytes(report[4..].try_into().unwrap());
        return Err(RestoreError::ChildSetup {
            pid,
            step: STEPS.get(step).copied().unwrap_or("set up"),
            source: io::Error::from_raw_os_error(errno),
        });
    }
    Err(RestoreError::ChildSetup {
        pid,
        step: "start",
        source: io::Error::other("the new process ended before reporting"),
    })
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    n
}

pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(RestoreError::Prepare {
            what: "a pipe".into(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The child's side. Never returns.
fn child_main(plan: &Plan, report: RawFd) -> ! {
    let fail = |step: u32| -> ! {
        // SAFETY: errno location is thread-local and valid; write and _exit take plain
        // arguments and a pointer to an 8-byte local.
        unsafe {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 8];
            msg[..4].copy_from_slice(&step.to_ne_bytes());
            msg[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(report, msg.as_ptr() as *const libc::c_void, 8);
            libc::_exit(127)
        }
    };
    // SAFETY: every call below is a plain system call on integers or on memory in `plan`,
    // which this copy of the address space owns; nothing allocates.
    unsafe {
        // Die with torpor until torpor has handed the process over.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
            fail(0);
        }
        if plan.setsid {
            if libc::setsid() < 0 {
                fail(1);
            }
        } else if plan.setpgid && libc::setpgid(0, 0) < 0 {
            fail(2);
        }

        // Move every source above all numbers in use, drop the rest, then install each
        // descriptor at its number. The report pipe moves along as the last source.
        let n = plan.sources.len() as i32;
        for (i, src) in plan.sources.iter().enumerate() {
            if libc::fcntl(src.as_raw_fd(), libc::F_DUPFD, plan.base + i as i32)
                != plan.base + i as i32
            {
                fail(3);
            }
        }
        let report_fd = libc::fcntl(report, libc::F_DUPFD_CLOEXEC, plan.base + n);
        if report_fd < 0 {
            fail(3);
        }
        if libc::syscall(libc::SYS_close_range, 0u32, (plan.base - 1) as u32, 0u32) < 0 {
            fail(4);
        }
        let report = report_fd;
        let fail = |step: u32| -> ! {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 8];
            msg[..4].copy_from_slice(&step.to_ne_bytes());
            msg[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(report, msg.as_ptr() as *const libc::c_void, 8);
            libc::_exit(127)
        };
        for t in &plan.targets {
            let flags = if t.cloexec { libc::O_CLOEXEC } else { 0 };
            if libc::dup3(plan.base + t.source as i32, t.fd, flags) < 0 {
                fail(5);
            }
        }
        if plan.n_fd_sources > 0
            && libc::syscall(
                libc::SYS_close_range,
                plan.base as u32,
                (plan.base + plan.n_fd_sources as i32 - 1) as u32,
                0u32,
            ) < 0
        {
            fail(4);
        }
        if libc::chdir(plan.cwd.as_ptr()) < 0 {
            fail(6);
        }
        // After chdir: the saved cwd is a path as torpor sees it, and chroot leaves the
        // working directory where it is.
        if let Some(root) = &plan.root {
            if libc::chroot(root.as_ptr()) < 0 {
                fail(8);
            }
        }
        libc::umask(plan.umask);
        if libc::personality(plan.personality as libc::c_ulong) < 0 {
            fail(7);
        }

        let ok = [0xffu8; 8];
        libc::write(report, ok.as_ptr() as *const libc::c_void, 8);
        libc::close(report);
        loop {
            libc::pause();
        }
    }
}
