//! The plumbing of the guard process that undoes a dump or a restore if torpor dies in
//! the middle of it.
//!
//! A killed torpor runs no code, so it cannot put back what it changed. Before it changes
//! anything, torpor starts itself again as a guard (`torpor __guard KIND PID TORPOR`),
//! a child reading a journal on a pipe: one line of text per change, written just before
//! the change is made. torpor's last line is `done`. A journal that ends without it
//! means torpor is gone, and the guard undoes what the lines list; what that means is up
//! to the dump and restore crates, which own the lines' meaning.
//!
//! Each line goes in one `write`, of at most `PIPE_BUF` bytes (which a pipe never splits)
//! but for a long image path; the guard takes only lines that end with their newline, so
//! a line a dying torpor left half written is never read as a whole one.

use std::fs::File;
use std::io::{self, BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;

/// The guard process and the pipe to it.
pub struct Guard {
    child: Child,
    journal: Journal,
}

/// Where torpor notes what it is about to change; cheap to clone. The default notes
/// nothing (work without a guard).
#[derive(Clone, Default)]
pub struct Journal {
    pipe: Option<Rc<File>>,
}

impl Guard {
    /// Starts `program __guard KIND PID TORPOR` with the journal's pipe on its stdin.
    pub fn start(program: &Path, kind: &str, pid: i32) -> io::Result<Self> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let child = Command::new(program)
            .args(["__guard", kind])
            .arg(pid.to_string())
            .arg(std::process::id().to_string())
            .stdin(Stdio::from(r))
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Self { child, journal: Journal { pipe: Some(Rc::new(File::from(w))) } })
    }

    pub fn journal(&self) -> Journal {
        self.journal.clone()
    }

    /// Tells the guard torpor is done, whatever the outcome (the processes are now as
    /// torpor reports), and waits for it to exit.
    pub fn finish(self) {
        // Done by drop.
    }
}

impl Drop for Guard {
    /// Ends the guard as [`Guard::finish`] does, unless torpor is panicking: then its
    /// work was not brought to an end, and the guard is left to undo it.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.journal.line("done");
        }
        self.journal.pipe = None;
        if let Err(e) = self.child.wait() {
            tracing::warn!("waiting for the guard (pid {}) failed: {e}", self.child.id());
        }
    }
}

impl Journal {
    /// Writes one line (without its newline) to the guard.
    pub fn line(&self, line: &str) {
        let Some(pipe) = &self.pipe else { return };
        let mut bytes = line.as_bytes().to_vec();
        bytes.push(b'\n');
        // Lines are short but for a long image path; the guard takes only whole lines, so
        // one cut short by torpor's death is never read as another.
        if let Err(e) = (&**pipe).write_all(&bytes) {
            tracing::warn!("the guard is gone ({e}): if torpor dies now, nothing undoes its work");
        }
    }
}

/// The guard's side: reads the journal on stdin, handing each line to `each`, until
/// `done` (returns true) or the end (returns false, once torpor, pid `torpor`, has fully
/// exited and the kernel has detached its tracees).
pub fn follow(torpor: i32, mut each: impl FnMut(&str)) -> bool {
    // Signals meant for torpor's terminal or session (^C, a hang-up) must not end the
    // guard with it: the guard is what cleans up after them. Nor may it be stopped for
    // writing its message to a terminal a restored shell job has taken over.
    let sigs = [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGPIPE,
        libc::SIGTSTP,
        libc::SIGTTOU,
        libc::SIGTTIN,
    ];
    for sig in sigs {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let torpor_fd = pidfd(torpor).filter(|_| {
        // Opened after torpor died and its pid was reused: not the right process.
        // SAFETY: getppid takes nothing.
        unsafe { libc::getppid() == torpor }
    });
    let mut input = io::stdin().lock();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // A line without its newline was torn by torpor's death: it is not a note.
        match input.read_until(b'\n', &mut buf) {
            Ok(_) if buf.last() == Some(&b'\n') => {}
            _ => break,
        }
        let line = String::from_utf8_lossy(&buf[..buf.len() - 1]);
        if line == "done" {
            // torpor may still hold the pipe open; nothing more will come.
            return true;
        }
        each(&line);
    }
    // The journal ends when torpor's descriptors close, a moment before the kernel
    // detaches torpor's tracees.
    if let Some(fd) = &torpor_fd {
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd that lives across the call.
        unsafe { libc::poll(&mut p, 1, 10_000) };
    }
    false
}

/// A pidfd for `pid` (see pidfd_open(2)).
pub fn pidfd(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes integers and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a new descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `SIGKILL` to the process `pidfd` refers to, which cannot be another process
/// that reused its pid (see pidfd_send_signal(2)).
pub fn kill_pidfd(pidfd: &OwnedFd) {
    // SAFETY: integers and a null siginfo pointer, which the call accepts.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// An error with its causes, for the guard's messages.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// Prints a message of the guard's, naming it.
pub fn say(msg: &str) {
    eprintln!("torpor (guard {}): {msg}", std::process::id());
}
