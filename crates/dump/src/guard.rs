//! A guard that undoes a dump if torpor dies in the middle of it.
//!
//! While torpor holds a process, the process is not as it was: its threads are stopped
//! under ptrace with every signal blocked, a few hundred bytes of its stack hold torpor's
//! call arguments, its TCP connections may be in repair mode with their peers held back by
//! firewall rules, and a partial image lies on disk. torpor puts all of that back on every
//! error path, but a torpor that is killed (`SIGKILL`, the OOM killer) runs no code: the
//! kernel only detaches its tracees, which then run on with signals blocked, connections
//! mute and the rules in place.
//!
//! So a dump starts a guard first (`torpor __guard dump`, see `torpor_sys::guard` for the
//! process and its journal) and notes each change in the journal just before making it.
//! When the journal ends without `done`, torpor is gone, and the guard puts back what the
//! journal lists: it takes the connections out of repair mode, seizes every thread again
//! to restore its signal mask and its stack bytes, removes the rules and the partial
//! image. A dump that died after the image was complete but before the process was ended
//! leaves the image (it is whole) and the process running; one that died while ending
//! the tree is finished by the guard, which ends the rest.
//!
//! The lines of a dump's journal:
//!
//! ```text
//! image MADE HEXPATH                the image directory (MADE 1: created by this dump)
//! thread PID TID MASK ADDR HEXBYTES  a thread to stop: its signal mask, its stack bytes
//! repair PID FD                     a TCP connection about to enter repair mode
//! lock TAG                          firewall rules named TAG about to be added
//! uffd PID                          a userfaultfd about to be opened inside PID, which had
//!                                   none (pre-copy); the guard closes any it finds there
//! committed                         the image is complete
//! killing                           the tree is being ended
//! ```

use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use torpor_sys::guard::{chain, say, Journal};
use torpor_sys::{mem, ptrace, sock};

/// One thing torpor is about to change.
pub(crate) enum Note<'a> {
    Image {
        dir: &'a Path,
        made: bool,
    },
    Thread {
        pid: i32,
        tid: i32,
        blocked: u64,
        scratch: u64,
        saved: &'a [u8],
    },
    Repair {
        pid: i32,
        fd: i32,
    },
    Lock {
        tag: &'a str,
    },
    /// A userfaultfd about to be opened inside `pid` (which had none) for pre-copy.
    Uffd {
        pid: i32,
    },
    Committed,
    Killing,
    /// The tree was let go (after pre-copy's first stop, or with `--leave-running`): what
    /// was noted of its threads and connections is theirs again, nothing to undo.
    Released,
}

/// Notes one change in the journal.
pub(crate) fn note(journal: &Journal, note: Note) {
    journal.line(&line_of(note));
}

fn line_of(note: Note) -> String {
    match note {
        Note::Image { dir, made } => {
            format!("image {} {}", u8::from(made), hex::encode(dir.as_os_str().as_bytes()))
        }
        Note::Thread { pid, tid, blocked, scratch, saved } => {
            format!("thread {pid} {tid} {blocked:x} {scratch:x} {}", hex::encode(saved))
        }
        Note::Repair { pid, fd } => format!("repair {pid} {fd}"),
        Note::Lock { tag } => format!("lock {tag}"),
        Note::Uffd { pid } => format!("uffd {pid}"),
        Note::Committed => "committed".into(),
        Note::Killing => "killing".into(),
        Note::Released => "released".into(),
    }
}

/// What the journal said, as far as it got.
#[derive(Default)]
struct Record {
    image: Option<(PathBuf, bool)>,
    threads: Vec<ThreadNote>,
    /// A pidfd for each process, taken when its leader is noted, so that ending the tree
    /// cannot hit a process that reused a pid.
    processes: Vec<OwnedFd>,
    repairs: Vec<(i32, i32)>,
    locks: Vec<String>,
    /// Processes in which torpor may have left a userfaultfd of its own.
    uffds: Vec<i32>,
    committed: bool,
    killing: bool,
}

struct ThreadNote {
    pid: i32,
    tid: i32,
    blocked: u64,
    scratch: u64,
    saved: Vec<u8>,
}

impl Record {
    fn add(&mut self, line: &str) {
        let w: Vec<&str> = line.split(' ').collect();
        let int = |i: usize| w.get(i).and_then(|s| s.parse::<i32>().ok());
        let hex64 = |i: usize| w.get(i).and_then(|s| u64::from_str_radix(s, 16).ok());
        let bytes = |i: usize| w.get(i).and_then(|s| hex::decode(s).ok());
        match w[0] {
            "image" => {
                if let Some(path) = bytes(2) {
                    let path = PathBuf::from(std::ffi::OsString::from_vec(path));
                    self.image = Some((path, w.get(1) == Some(&"1")));
                }
            }
            "thread" => {
                if let (Some(pid), Some(tid), Some(blocked), Some(scratch), Some(saved)) =
                    (int(1), int(2), hex64(3), hex64(4), bytes(5))
                {
                    if tid == pid {
                        self.processes.extend(torpor_sys::guard::pidfd(pid));
                    }
                    self.threads.push(ThreadNote { pid, tid, blocked, scratch, saved });
                }
            }
            "repair" => {
                if let (Some(pid), Some(fd)) = (int(1), int(2)) {
                    self.repairs.push((pid, fd));
                }
            }
            "lock" => self.locks.extend(w.get(1).map(|s| s.to_string())),
            "uffd" => self.uffds.extend(int(1)),
            "committed" => self.committed = true,
            "killing" => self.killing = true,
            // What was noted so far is the process's own again: nothing of it to undo.
            "released" => {
                self.threads.clear();
                self.repairs.clear();
                self.uffds.clear();
            }
            _ => {}
        }
    }
}

/// The guard of a dump: `torpor __guard dump PID TORPOR`, the journal on stdin. Returns
/// once torpor says it is done, or once it is gone and the dump of `pid` is undone.
pub fn run_guard(pid: i32, torpor: i32) -> i32 {
    let mut rec = Record::default();
    if torpor_sys::guard::follow(torpor, |line| rec.add(line)) {
        return 0;
    }
    undo(pid, &rec)
}

fn undo(pid: i32, rec: &Record) -> i32 {
    let mut failed = false;
    if rec.killing {
        // The image was complete and the tree was being ended: finish the job, children
        // first as torpor does.
        for p in rec.processes.iter().rev() {
            torpor_sys::guard::kill_pidfd(p);
        }
        say(&format!("torpor died while ending the dumped tree of pid {pid}; ended the rest"));
        return 0;
    }

    // First what the running process may trip over: its connections, then its signals.
    for &(p, fd) in &rec.repairs {
        let r = sock::take_fd(p, fd).map_err(|e| chain(&e)).and_then(|s| {
            sock::set_tcp_opt(&s, sock::tcp_repair::TCP_REPAIR, 0).map_err(|e| e.to_string())
        });
        if let Err(e) = r {
            // A process that has closed the descriptor or exited meanwhile has no
            // connection left to wake.
            if Path::new(&format!("/proc/{p}/fd/{fd}")).exists() {
                say(&format!("pid {p}: cannot take fd {fd} out of TCP repair mode: {e}"));
                failed = true;
            }
        }
    }
    for t in &rec.threads {
        let close_uffds = t.tid == t.pid && rec.uffds.contains(&t.pid);
        if let Err(e) = put_back(t, close_uffds) {
            say(&format!("pid {} thread {}: {e}", t.pid, t.tid));
            failed = true;
        }
    }
    for tag in &rec.locks {
        if let Err(e) = torpor_sys::netlock::unlock(tag) {
            say(&format!("cannot remove the firewall rules {tag}: {e}"));
            failed = true;
        }
    }
    let image = match (&rec.image, rec.committed) {
        (Some((dir, made)), false) => {
            remove_partial(dir, *made);
            format!("; partial image {} removed", dir.display())
        }
        (Some((dir, _)), true) => format!("; the image in {} is complete", dir.display()),
        (None, _) => String::new(),
    };
    say(&format!(
        "torpor died during the dump of pid {pid}; {}{image}",
        if failed { "could not put everything back (above)" } else { "it runs on as before" }
    ));
    i32::from(failed)
}

/// Seizes a thread again and puts back its signal mask and the stack bytes torpor used;
/// with `close_uffds`, closes inside its process every userfaultfd (torpor's, the process
/// had none of its own).
fn put_back(t: &ThreadNote, close_uffds: bool) -> Result<(), String> {
    let gone = |e: &torpor_sys::Error| match e {
        torpor_sys::Error::Ptrace { source, .. } => source.raw_os_error() == Some(libc::ESRCH),
        torpor_sys::Error::Gone { .. } => true,
        _ => false,
    };
    // Until the kernel has detached the dead tracer, a seize fails with EPERM.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match ptrace::seize(t.tid, false) {
            Ok(()) => break,
            Err(e) if gone(&e) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("seizing {} again: {e}", t.tid);
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(chain(&e)),
        }
    }
    let result = (|| -> torpor_sys::Result<()> {
        ptrace::interrupt_and_wait(t.tid)?;
        // Bytes below the red zone are the program's only once its stack has grown over
        // them again; if it has not (the usual case, a thread back in the call it was
        // stopped in), the old bytes go back.
        let rsp = ptrace::get_regs(t.tid)?.rsp;
        let end = t.scratch + t.saved.len() as u64;
        if rsp.wrapping_sub(128) >= end && rsp < end + (64 << 10) {
            mem::write_mem(t.pid, t.scratch, &t.saved)?;
        }
        if close_uffds {
            close_userfaultfds(t)?;
        }
        ptrace::set_sigmask(t.tid, t.blocked)
    })();
    let detached = ptrace::detach(t.tid, 0);
    match (result, detached) {
        (Err(e), _) | (Ok(()), Err(e)) if !gone(&e) => Err(chain(&e)),
        _ => Ok(()),
    }
}

/// Closes every userfaultfd of `t`'s process with a `close` run in thread `t`, stopped.
fn close_userfaultfds(t: &ThreadNote) -> torpor_sys::Result<()> {
    let fds: Vec<i32> = torpor_sys::proc::fds(t.pid)?
        .into_iter()
        .filter(|fd| {
            torpor_sys::proc::readlink(format!("/proc/{}/fd/{fd}", t.pid))
                .is_ok_and(|l| l.contains("[userfaultfd]"))
        })
        .collect();
    if fds.is_empty() {
        return Ok(());
    }
    let maps = torpor_sys::proc::maps(t.pid)?;
    let ip = crate::collect::find_syscall(t.pid, &maps).map_err(|e| torpor_sys::Error::Parse {
        what: format!("/proc/{}/maps", t.pid),
        line: e.to_string(),
    })?;
    // The step's trap must reach the guard, not reset a SIGTRAP handler.
    ptrace::set_sigmask(t.tid, crate::WORKING_MASK)?;
    let remote = torpor_sys::Remote::new(t.tid, ip)?;
    let closed = fds
        .iter()
        .try_for_each(|&fd| remote.call("close", libc::SYS_close, torpor_sys::args!(fd)).map(drop));
    remote.restore_regs()?;
    closed?;
    say(&format!("pid {}: closed the userfaultfd torpor had opened in it", t.pid));
    Ok(())
}

/// Removes an image whose manifest was never written: the whole directory if the dump
/// made it, else the manifest's names (so what is left is plainly incomplete).
fn remove_partial(dir: &Path, made: bool) {
    if made {
        let _ = std::fs::remove_dir_all(dir);
    } else {
        let _ = std::fs::remove_file(dir.join(torpor_image::MANIFEST));
        let _ = std::fs::remove_file(dir.join(".manifest.json.tmp"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_note_reads_back() {
        let dir = Path::new("/tmp/an image\nwith odd bytes \u{e9}");
        let saved: Vec<u8> = (0..=255).collect();
        let mut rec = Record::default();
        for note in [
            Note::Image { dir, made: true },
            Note::Thread {
                pid: 7,
                tid: 9,
                blocked: !0 ^ 5,
                scratch: 0x7ffd_0000_1000,
                saved: &saved,
            },
            Note::Repair { pid: 7, fd: 3 },
            Note::Lock { tag: "torpor-7-123" },
            Note::Committed,
        ] {
            let line = line_of(note);
            assert!(!line.contains('\n'), "{line:?}");
            rec.add(&line);
        }
        assert_eq!(rec.image, Some((dir.to_path_buf(), true)));
        let t = &rec.threads[0];
        assert_eq!((t.pid, t.tid, t.blocked, t.scratch), (7, 9, !0 ^ 5, 0x7ffd_0000_1000));
        assert_eq!(t.saved, saved);
        assert_eq!(rec.repairs, vec![(7, 3)]);
        assert_eq!(rec.locks, vec!["torpor-7-123".to_string()]);
        assert!(rec.committed && !rec.killing);
    }

    #[test]
    fn a_torn_or_unknown_line_is_ignored() {
        let mut rec = Record::default();
        for line in ["thread 7 9 ff", "repair x 3", "image 1 zz", "something new", ""] {
            rec.add(line);
        }
        assert!(rec.threads.is_empty() && rec.repairs.is_empty() && rec.image.is_none());
    }
}
