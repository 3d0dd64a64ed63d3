//! Pseudo-terminal pairs held inside the tree (a terminal multiplexer and its panes).
//!
//! A pair is saved only whole: its master (an open `/dev/ptmx`) and its slave
//! (`/dev/pts/N`) both open in the tree. Everything the kernel keeps for the pair is read
//! through copies of the tree's own descriptors (`pidfd_getfd`), never by opening the
//! pair again: opening `/dev/ptmx` would make a new pair, and opening the slave anew
//! would change when the master sees it hang up.

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;

use torpor_image::model::{self, OpenFileKind};
use torpor_image::ImageWriter;
use torpor_sys::{pty, sock};

use crate::collect::UnsupportedReason;
use crate::files::{inherit, outside_holder, termios, FdContext};
use crate::{DumpError, Result};

/// A slave `/dev/pts/N` on descriptor `fd` of `pid`.
pub(crate) fn pty_slave(
    pid: i32,
    fd: i32,
    link: &str,
    link_path: &str,
    meta: &fs::Metadata,
    ctx: &mut FdContext,
) -> Result<OpenFileKind> {
    // Another devpts instance (a container's) numbers its terminals on its own.
    let ours = fs::metadata("/dev/pts").map(|m| m.dev() == meta.dev()).unwrap_or(false);
    if !ours {
        return Err(DumpError::Unsupported {
            pid,
            reason: UnsupportedReason::Fd {
                fd,
                kind: format!("a pseudo-terminal of a devpts other than /dev/pts ({link})"),
            },
        });
    }
    let index = libc::minor(meta.rdev());
    ctx.ptys.entry(index).or_default().slave.get_or_insert((pid, fd));
    if ctx.shell_job && (0..=2).contains(&fd) {
        if let Some(t) = termios(link_path) {
            ctx.pty_termios.insert(pid, t);
        }
    }
    Ok(OpenFileKind::PtySlave { index })
}

/// A master (an open `/dev/ptmx`) on descriptor `fd` of `pid`.
pub(crate) fn pty_master(
    pid: i32,
    fd: i32,
    link: &str,
    ctx: &mut FdContext,
) -> Result<OpenFileKind> {
    if link != "/dev/ptmx" && link != "/dev/pts/ptmx" {
        return Err(DumpError::Unsupported {
            pid,
            reason: UnsupportedReason::Fd {
                fd,
                kind: format!("a pseudo-terminal master of a devpts other than /dev/pts ({link})"),
            },
        });
    }
    let err = |what: &str| {
        let what = format!("{what} of the pseudo-terminal master on fd {fd}");
        move |source| DumpError::Collect { pid, what, source }
    };
    let master = sock::take_fd(pid, fd).map_err(err("a copy"))?;
    let index = pty::index(&master).map_err(err("the slave number"))?;
    ctx.ptys.entry(index).or_default().master.get_or_insert((pid, fd));
    Ok(OpenFileKind::PtyMaster { index })
}

impl FdContext {
    /// Once every process is collected: saves each pair seen whole, refuses a master
    /// whose slave is not in the tree, and refuses a slave whose master is not in the
    /// tree (or, with `--shell-job`, on descriptors 0 to 2, turns it into the terminal
    /// restore runs in).
    pub(crate) fn finish_ptys(
        &mut self,
        tree: &[i32],
        processes: &mut [model::Process],
        writer: &mut ImageWriter,
    ) -> Result<Vec<model::Pty>> {
        let mut saved = Vec::new();
        let seen = std::mem::take(&mut self.ptys);
        // A slave also held outside keeps its number taken after the dump: the pair
        // could not come back.
        let whole: Vec<u32> = seen
            .iter()
            .filter(|(_, s)| s.master.is_some() && s.slave.is_some())
            .map(|(&i, _)| i)
            .collect();
        let outside = if whole.is_empty() { Default::default() } else { slaves_outside(tree) };
        for (index, s) in seen {
            match (s.master, s.slave) {
                (Some((pid, fd)), Some(_)) if outside.contains_key(&index) => {
                    return Err(DumpError::Unsupported {
                        pid,
                        reason: UnsupportedReason::PtyOutside {
                            fd,
                            pts: index,
                            master: true,
                            holder: outside.get(&index).cloned(),
                        },
                    })
                }
                (Some(master), Some(slave)) => {
                    saved.push(save_pair(index, master, slave, tree, processes, writer)?)
                }
                (Some((pid, fd)), None) => {
                    return Err(DumpError::Unsupported {
                        pid,
                        reason: UnsupportedReason::PtyOutside {
                            fd,
                            pts: index,
                            master: true,
                            holder: outside_holder(&format!("/dev/pts/{index}"), tree),
                        },
                    })
                }
                (None, Some((pid, fd))) => {
                    let is_it = |k: &OpenFileKind| *k == OpenFileKind::PtySlave { index };
                    let users: Vec<i32> = processes
                        .iter()
                        .filter(|p| p.open_files.iter().any(|o| is_it(&o.kind)))
                        .map(|p| p.pid)
                        .collect();
                    if self.shell_job && inherit(processes, is_it) {
                        for p in processes.iter_mut().filter(|p| users.contains(&p.pid)) {
                            p.termios = self.pty_termios.get(&p.pid).cloned();
                        }
                        continue;
                    }
                    return Err(DumpError::Unsupported {
                        pid,
                        reason: UnsupportedReason::PtyOutside {
                            fd,
                            pts: index,
                            master: false,
                            holder: master_holder(index, tree),
                        },
                    });
                }
                (None, None) => {}
            }
        }
        Ok(saved)
    }
}

/// The slaves `/dev/pts/N` that processes outside `tree` hold, by number, with one such
/// process each.
fn slaves_outside(tree: &[i32]) -> std::collections::HashMap<u32, String> {
    let mut held = std::collections::HashMap::new();
    let Ok(procs) = fs::read_dir("/proc") else { return held };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if tree.contains(&pid) {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for f in fds.flatten() {
            let link = fs::read_link(f.path()).unwrap_or_default();
            let Some(n) = link.to_str().and_then(|l| l.strip_prefix("/dev/pts/")) else {
                continue;
            };
            if let Ok(n) = n.parse::<u32>() {
                held.entry(n).or_insert_with(|| {
                    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    format!("{} (pid {pid})", comm.trim())
                });
            }
        }
    }
    held
}

/// A process outside `tree` holding the master of `/dev/pts/index`, for messages; the
/// kernel shows a master's slave number in its fdinfo (`tty-index`).
fn master_holder(index: u32, tree: &[i32]) -> Option<String> {
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if tree.contains(&pid) {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for f in fds.flatten() {
            let link = fs::read_link(f.path()).unwrap_or_default();
            if link.to_str() != Some("/dev/ptmx") && link.to_str() != Some("/dev/pts/ptmx") {
                continue;
            }
            let info = fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                f.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            let n = info.lines().find_map(|l| l.strip_prefix("tty-index:")).map(str::trim);
            if n == Some(index.to_string().as_str()) {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                return Some(format!("{} (pid {pid})", comm.trim()));
            }
        }
    }
    None
}

/// Reads what the kernel keeps for pair `index` through copies of the master on
/// `master` and the slave on `slave` (each a (pid, fd) of the tree).
fn save_pair(
    index: u32,
    (mpid, mfd): (i32, i32),
    (spid, sfd): (i32, i32),
    tree: &[i32],
    processes: &[model::Process],
    writer: &mut ImageWriter,
) -> Result<model::Pty> {
    let err = |what: &str| {
        let what = format!("{what} of /dev/pts/{index} (fd {mfd})");
        move |source| DumpError::Collect { pid: mpid, what, source }
    };
    let master = sock::take_fd(mpid, mfd).map_err(err("the master"))?;
    let slave = sock::take_fd(spid, sfd).map_err(|source| DumpError::Collect {
        pid: spid,
        what: format!("the slave /dev/pts/{index} on fd {sfd}"),
        source,
    })?;
    let t = pty::termios(&master).map_err(err("the modes"))?;
    let w = pty::winsize(&master).map_err(err("the window size"))?;
    let locked = pty::locked(&master).map_err(err("the lock"))?;
    let packet = pty::packet(&master).map_err(err("the packet mode"))?;
    let exclusive = pty::exclusive(&slave).map_err(err("the exclusive mode"))?;

    // The session it controls must come back with it: its leader makes it its
    // controlling terminal again.
    let sid = pty::session(&master).map_err(err("the session"))?;
    let session = match sid {
        0 => None,
        sid if tree.contains(&sid) => Some(sid),
        sid => {
            return Err(DumpError::Unsupported {
                pid: mpid,
                reason: UnsupportedReason::PtySession { fd: mfd, pts: index, sid },
            })
        }
    };
    let fg = pty::foreground(&master).map_err(err("the foreground process group"))?;
    // A foreground group whose processes are all gone (or outside the tree) cannot be
    // made again; the session leader's group takes the foreground then.
    let foreground =
        (session.is_some() && fg > 0 && processes.iter().any(|p| p.pgid == fg)).then_some(fg);
    if session.is_some() && foreground.is_none() {
        tracing::debug!("/dev/pts/{index}: foreground group {fg} has no process in the tree");
    }

    let (output, input) = if packet {
        // Reading a master in packet mode also takes its pending control status, which
        // cannot be put back.
        let out = pty::queued(&master).unwrap_or(0);
        let inp = pty::queued(&slave).unwrap_or(0);
        if out + inp > 0 {
            tracing::warn!(
                "/dev/pts/{index}: {out} bytes written to it and not yet read by its master, \
                 and {inp} bytes of input not yet read by its programs, are not saved (packet \
                 mode)"
            );
        }
        (None, None)
    } else {
        let output = save_output(index, &master, &slave, &t, writer).map_err(|e| match e {
            Ok(source) => err("the queued output")(source),
            Err(e) => e,
        })?;
        let input = save_input(index, &master, &slave, &t, writer).map_err(|e| match e {
            Ok(source) => err("the queued input")(source),
            Err(e) => e,
        })?;
        (output, input)
    };

    Ok(model::Pty {
        index,
        termios: model::Termios {
            iflag: t.iflag,
            oflag: t.oflag,
            cflag: t.cflag,
            lflag: t.lflag,
            line: t.line,
            cc: hex::encode(t.cc),
            ispeed: t.ispeed,
            ospeed: t.ospeed,
        },
        winsize: model::Winsize { rows: w.rows, cols: w.cols, xpixel: w.xpixel, ypixel: w.ypixel },
        locked,
        packet,
        exclusive,
        session,
        foreground,
        output,
        input,
    })
}

/// An error of a system call, or of writing the image.
type DataResult<T> = std::result::Result<T, std::result::Result<torpor_sys::Error, DumpError>>;

/// The bytes programs wrote to the slave that the master has not read yet. A terminal
/// has no way to look at them without taking them, so they are read from the master
/// and at once written back through the slave, output processing off so they arrive
/// unchanged (the master's own line discipline is always raw): the queue is as it was,
/// whether the tree is killed or runs on.
fn save_output(
    index: u32,
    master: &OwnedFd,
    slave: &OwnedFd,
    t: &pty::Termios,
    writer: &mut ImageWriter,
) -> DataResult<Option<String>> {
    let n = pty::queued(master).map_err(Ok)?;
    if n == 0 {
        return Ok(None);
    }
    let bytes = pty::read_queued(master, n).map_err(Ok)?;
    if let Err(e) = pty::inject_output(master, slave, t, &bytes) {
        tracing::warn!("/dev/pts/{index}: the output read from it could not all be put back");
        return Err(Ok(e));
    }
    let name = format!("pty-{index}-output.img");
    writer.write_file(&name, &bytes).map_err(|e| Err(e.into()))?;
    Ok(Some(name))
}

/// The bytes written to the master that programs on the slave side have not read yet,
/// in non-canonical mode: read from the slave and at once written back through the
/// master with input processing and echo off, so they land in the queue unchanged.
///
/// In canonical mode the queue holds lines being edited, whose boundaries and editing
/// state a reader cannot see nor put back: those are left in place, and lost to the
/// image (with a warning for the complete lines the kernel counts).
fn save_input(
    index: u32,
    master: &OwnedFd,
    slave: &OwnedFd,
    t: &pty::Termios,
    writer: &mut ImageWriter,
) -> DataResult<Option<String>> {
    let n = pty::queued(slave).map_err(Ok)?;
    if n == 0 {
        return Ok(None);
    }
    if t.lflag & libc::ICANON != 0 {
        tracing::warn!(
            "/dev/pts/{index}: {n} bytes of input lines not yet read by its programs are not \
             saved (canonical mode)"
        );
        return Ok(None);
    }
    let bytes = pty::read_queued(slave, n).map_err(Ok)?;
    pty::inject_input(master, slave, t, &bytes).map_err(|e| {
        tracing::warn!("/dev/pts/{index}: the input read from it could not all be put back");
        Ok(e)
    })?;
    let name = format!("pty-{index}-input.img");
    writer.write_file(&name, &bytes).map_err(|e| Err(e.into()))?;
    Ok(Some(name))
}
