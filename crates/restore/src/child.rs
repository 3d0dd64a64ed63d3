//! Creating the process with its original pid, and what it does on its own before torpor
//! takes it over: its session, descriptors, working directory and umask.
//!
//! The child is a copy of torpor made by `clone3`. Until torpor stops it, it runs only the
//! code in [`child_main`], which makes raw system calls on data prepared beforehand and
//! never allocates: the copy must not depend on locks other threads of torpor may hold.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::{RestoreError, Result};

/// What the child does before it stops: keep torpor's auxiliary files (page data, mapped
/// files, the descriptor transfer socket) at known numbers, and nothing else.
pub struct Plan {
    pub pid: i32,
    /// Make the process the first of a new pid namespace (with its own mount namespace
    /// and `/proc`), where `pid` is 1.
    pub new_pid_ns: bool,
    /// Files opened by torpor that the new process (and, by inheritance, every process
    /// created from it) needs during the restore.
    pub sources: Vec<OwnedFd>,
    /// First descriptor number above everything in use; sources are moved there.
    pub base: i32,
    /// The pipe the child reports its setup on: (read end, write end). Made before
    /// `base` is chosen so that it lies below it.
    pub report: Option<(OwnedFd, OwnedFd)>,
}

impl Plan {
    /// Where source `i` ends up in the child.
    pub fn aux_fd(&self, i: usize) -> i32 {
        self.base + i as i32
    }

    /// First descriptor number of the auxiliary range in the child.
    pub fn aux_base(&self) -> i32 {
        self.base
    }

    /// First number above the auxiliary range.
    pub fn aux_end(&self) -> i32 {
        self.base + self.sources.len() as i32
    }
}

/// Steps the child reports when one fails.
const STEPS: &[&str] =
    &["set the parent-death signal", "move descriptors", "close torpor's descriptors"];

/// Creates the process with `plan.pid` as its pid and runs the plan in it. Returns once
/// the child has carried the plan out and is waiting to be taken over.
pub fn spawn(plan: &mut Plan) -> Result<i32> {
    let pid = plan.pid;
    let (rd, wr) = plan.report.take().expect("a plan is spawned once");
    // SAFETY: the child runs only `child_main`, which makes raw system calls on `plan`
    // (prepared beforehand) and never allocates or takes locks, so the locks it copies
    // from torpor's other threads (the image check may run) are never touched.
    let child = unsafe { torpor_sys::clone3_with_pid(pid, plan.new_pid_ns) }.map_err(|source| {
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
/// Reports a failed step and errno on `report`, and exits.
fn fail_on(report: RawFd, step: u32) -> ! {
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
}

fn child_main(plan: &Plan, report: RawFd) -> ! {
    let fail = |step| fail_on(report, step);
    // SAFETY: every call below is a plain system call on integers or on memory in `plan`,
    // which this copy of the address space owns; nothing allocates.
    unsafe {
        // Die with torpor until torpor has handed the process over.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
            fail(0);
        }
        // A torpor given its capabilities as file capabilities is not dumpable, nor is
        // this copy of it, whose /proc files would then be root's only: torpor, run by
        // the user, could not open its memory. The process's own flag is set at the end.
        if libc::prctl(libc::PR_SET_DUMPABLE, 1) < 0 {
            fail(0);
        }

        // Move every source above all numbers in use and drop the rest. The report pipe
        // moves along, after the sources. The numbers are taken with dup3, not the lowest
        // free one at or above them: another thread of torpor (the image check) may have
        // opened a file there since `base` was chosen, and that copy must go anyway.
        let n = plan.sources.len() as i32;
        for (i, src) in plan.sources.iter().enumerate() {
            let want = plan.base + i as i32;
            if libc::dup3(src.as_raw_fd(), want, 0) != want {
                fail(1);
            }
        }
        let report_fd = libc::dup3(report, plan.base + n, libc::O_CLOEXEC);
        if report_fd < 0 {
            fail(1);
        }
        if libc::syscall(libc::SYS_close_range, 0u32, (plan.base - 1) as u32, 0u32) < 0
            || libc::syscall(libc::SYS_close_range, (report_fd + 1) as u32, u32::MAX, 0u32) < 0
        {
            fail(2);
        }
        let report = report_fd;
        let fail = |step| fail_on(report, step);

        // In its own pid namespace, /proc must show that namespace: mount a new one, in a
        // mount namespace kept private from the rest of the system.
        if plan.new_pid_ns {
            let none = std::ptr::null::<libc::c_char>();
            if libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) < 0
                || libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ) < 0
            {
                fail(3);
            }
        }

        let ok = [0xffu8; 8];
        libc::write(report, ok.as_ptr() as *const libc::c_void, 8);
        libc::close(report);
        loop {
            libc::pause();
        }
    }
}
