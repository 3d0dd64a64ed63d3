//! `--shell-job`: a job woken in the terminal `torpor restore` runs in, as a shell would
//! run it: the job's terminal modes, the terminal's foreground, job control.

use std::io;
use std::os::fd::RawFd;

/// The first of descriptors 0 to 2 that is a terminal.
pub fn own_tty() -> Option<RawFd> {
    // SAFETY: isatty only inspects the descriptor number.
    (0..=2).find(|&fd| unsafe { libc::isatty(fd) } == 1)
}

/// Runs `f` with SIGTTOU blocked: changing the foreground of a terminal from a process
/// that is not (or no longer) in it would otherwise stop torpor.
fn without_sigttou<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset operations on locals; sigprocmask on this thread only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTTOU);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        let r = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

/// Gives the terminal the job's saved modes and makes its process group the foreground.
/// Returns the terminal's modes before, to put back when the job is over.
pub fn hand_over(tty: RawFd, termios_hex: Option<&str>, pgid: i32) -> io::Result<Option<Vec<u8>>> {
    let size = std::mem::size_of::<libc::termios>();
    // SAFETY: an all-zero termios is valid; tcgetattr fills it.
    let mut before: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios.
    let had = unsafe { libc::tcgetattr(tty, &mut before) } == 0;
    if let Some(bytes) = termios_hex.and_then(|h| hex::decode(h).ok()).filter(|b| b.len() == size) {
        // SAFETY: `bytes` has exactly the size of a termios, which is plain old data.
        let t: libc::termios = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const _) };
        // SAFETY: tcsetattr reads one termios.
        if without_sigttou(|| unsafe { libc::tcsetattr(tty, libc::TCSANOW, &t) }) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: tcsetpgrp takes integers.
    if without_sigttou(|| unsafe { libc::tcsetpgrp(tty, pgid) }) < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: termios is plain old data; its bytes are read as they are.
    Ok(had.then(|| {
        unsafe { std::slice::from_raw_parts(&before as *const _ as *const u8, size) }.to_vec()
    }))
}

/// Waits for a job like a shell: when the job stops (Ctrl-Z), torpor takes the terminal
/// back and stops too, so the shell that started torpor sees a stopped job; when
/// continued (`fg`), it hands the terminal back and continues the job. Returns the job
/// leader's exit code, or 128 plus the signal that killed it.
pub fn wait_job(pid: i32, pgid: i32, tty: RawFd, saved_modes: Option<Vec<u8>>) -> io::Result<i32> {
    let code = loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if libc::WIFEXITED(status) {
            break libc::WEXITSTATUS(status);
        }
        if libc::WIFSIGNALED(status) {
            break 128 + libc::WTERMSIG(status);
        }
        if libc::WIFSTOPPED(status) {
            // SAFETY: getpgrp, tcsetpgrp, kill take integers.
            unsafe {
                without_sigttou(|| libc::tcsetpgrp(tty, libc::getpgrp()));
                libc::kill(libc::getpid(), libc::SIGSTOP);
                // Continued by the shell: the job gets the terminal back and goes on.
                without_sigttou(|| libc::tcsetpgrp(tty, pgid));
                libc::kill(-pgid, libc::SIGCONT);
            }
        }
    };
    // SAFETY: getpgrp and tcsetpgrp take integers; tcsetattr reads one termios of the
    // size checked.
    unsafe {
        without_sigttou(|| libc::tcsetpgrp(tty, libc::getpgrp()));
        if let Some(b) = saved_modes.filter(|b| b.len() == std::mem::size_of::<libc::termios>()) {
            let t: libc::termios = std::ptr::read_unaligned(b.as_ptr() as *const _);
            without_sigttou(|| libc::tcsetattr(tty, libc::TCSANOW, &t));
        }
    }
    Ok(code)
}
