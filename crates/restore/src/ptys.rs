//! Pseudo-terminal pairs of the tree, made again under their old `/dev/pts` numbers.
//!
//! Programs remember their terminal's name (a multiplexer records each pane's), so each
//! pair gets its number back: `/dev/ptmx` is opened until the kernel hands out that
//! number (see `torpor_sys::pty::open_at`). The slave's descriptions are opened from the
//! master (`TIOCGPTPEER`), the modes, window size, queued bytes, packet, exclusive and
//! lock modes set by torpor; the session leader makes the slave its controlling
//! terminal again from inside the restored process (see `state::controlling_ttys`).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;

use torpor_image::{model, ImageReader};
use torpor_sys::pty;

use crate::{RestoreError, Result};

/// One pair made for the tree.
struct Pair {
    master: OwnedFd,
    /// The master has been handed to an open file description of the tree.
    handed: bool,
    /// torpor's own description of the slave: for the ioctls that need one, and for
    /// the session leader to take as its controlling terminal.
    slave: OwnedFd,
    record: model::Pty,
}

/// The tree's pseudo-terminal pairs by slave number.
#[derive(Default)]
pub(crate) struct Pairs {
    made: HashMap<u32, Pair>,
}

/// Refuses, before anything is made, a pair whose number is in use.
pub(crate) fn check_free(tree: &model::Tree) -> Result<()> {
    let max = std::fs::read_to_string("/proc/sys/kernel/pty/max")
        .ok()
        .and_then(|m| m.trim().parse::<u32>().ok())
        .unwrap_or(u32::MAX);
    for t in &tree.ptys {
        if t.index >= max {
            return Err(RestoreError::Unsupported {
                what: format!(
                    "/dev/pts/{}, beyond this system's {max} pseudo-terminals (kernel.pty.max)",
                    t.index
                ),
            });
        }
        let path = format!("/dev/pts/{}", t.index);
        if Path::new(&path).exists() {
            return Err(RestoreError::PtyTaken { index: t.index, holder: holder(&path) });
        }
    }
    Ok(())
}

/// A process holding `path` open, or the master of its pair (whose descriptor shows as
/// `/dev/ptmx`, with the slave number in its fdinfo), for messages.
fn holder(path: &str) -> String {
    let index = path.trim_start_matches("/dev/pts/");
    let Ok(procs) = std::fs::read_dir("/proc") else { return "another process".into() };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for f in fds.flatten() {
            let Ok(link) = std::fs::read_link(f.path()) else { continue };
            let held = link == Path::new(path)
                || (link == Path::new("/dev/ptmx") || link == Path::new("/dev/pts/ptmx"))
                    && std::fs::read_to_string(format!(
                        "/proc/{pid}/fdinfo/{}",
                        f.file_name().to_string_lossy()
                    ))
                    .is_ok_and(|i| {
                        i.lines()
                            .any(|l| l.strip_prefix("tty-index:").map(str::trim) == Some(index))
                    });
            if held {
                return crate::describe_pid(pid);
            }
        }
    }
    "another process".into()
}

fn termios(t: &model::Termios, index: u32) -> Result<pty::Termios> {
    let cc =
        hex::decode(&t.cc).ok().and_then(|b| <[u8; 19]>::try_from(b).ok()).ok_or_else(|| {
            RestoreError::Unsupported { what: format!("malformed modes of /dev/pts/{index}") }
        })?;
    Ok(pty::Termios {
        iflag: t.iflag,
        oflag: t.oflag,
        cflag: t.cflag,
        lflag: t.lflag,
        line: t.line,
        cc,
        ispeed: t.ispeed,
        ospeed: t.ospeed,
    })
}

impl Pairs {
    /// Makes every pair of the tree with its number, modes, window size, packet mode and
    /// queued bytes, the slave unlocked until [`Pairs::finish`].
    pub fn make(reader: &ImageReader, tree: &model::Tree) -> Result<Self> {
        let mut made = HashMap::new();
        for t in &tree.ptys {
            let index = t.index;
            let err = |step: &str| {
                let step = step.to_string();
                move |source| RestoreError::Pty { index, step, source }
            };
            // Each pair opened on the way has a lower number: at most `index` of them.
            let master = pty::open_at(index, index.saturating_add(1)).map_err(|e| match e {
                pty::OpenAtError::Taken { .. } => {
                    let path = format!("/dev/pts/{index}");
                    RestoreError::PtyTaken { index, holder: holder(&path) }
                }
                pty::OpenAtError::TooMany { tries, .. } => RestoreError::Unsupported {
                    what: format!("/dev/pts/{index}, not handed out after {tries} new pairs"),
                },
                pty::OpenAtError::Sys(source) => {
                    RestoreError::Pty { index, step: "open a new pair".into(), source }
                }
            })?;
            pty::set_locked(&master, false).map_err(err("unlock"))?;
            let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC;
            let slave = pty::open_slave(&master, flags).map_err(err("open the slave"))?;
            let modes = termios(&t.termios, index)?;
            pty::set_termios(&master, &modes).map_err(err("set the modes"))?;
            if let Some(name) = &t.input {
                let bytes = reader.read_file(name)?;
                pty::inject_input(&master, &slave, &modes, &bytes)
                    .map_err(err("put back the queued input"))?;
            }
            if let Some(name) = &t.output {
                let bytes = reader.read_file(name)?;
                pty::inject_output(&master, &slave, &modes, &bytes)
                    .map_err(err("put back the queued output"))?;
            }
            let w = &t.winsize;
            let size =
                pty::Winsize { rows: w.rows, cols: w.cols, xpixel: w.xpixel, ypixel: w.ypixel };
            pty::set_winsize(&master, size).map_err(err("set the window size"))?;
            pty::set_packet(&master, t.packet).map_err(err("set the packet mode"))?;
            made.insert(index, Pair { master, handed: false, slave, record: t.clone() });
        }
        Ok(Self { made })
    }

    fn pair(&mut self, index: u32) -> Result<&mut Pair> {
        self.made.get_mut(&index).ok_or_else(|| RestoreError::Unsupported {
            what: format!("a descriptor of /dev/pts/{index}, which has no record"),
        })
    }

    /// The master of pair `index`, for the one open file description that holds it.
    pub fn take_master(&mut self, index: u32) -> Result<OwnedFd> {
        let pair = self.pair(index)?;
        if std::mem::replace(&mut pair.handed, true) {
            return Err(RestoreError::Unsupported {
                what: format!("two masters of /dev/pts/{index}"),
            });
        }
        pair.master.try_clone().map_err(|source| RestoreError::Prepare {
            what: format!("the master of pseudo-terminal /dev/pts/{index}"),
            source,
        })
    }

    /// A new open file description of the slave of pair `index`, with `flags`.
    pub fn open_slave(&mut self, index: u32, flags: i32) -> Result<OwnedFd> {
        let flags = (flags & libc::O_ACCMODE) | libc::O_NOCTTY | libc::O_CLOEXEC;
        pty::open_slave(&self.pair(index)?.master, flags).map_err(|source| RestoreError::Pty {
            index,
            step: "open the slave".into(),
            source,
        })
    }

    /// Once every description of the slaves is open: exclusive and lock modes, which
    /// would refuse further opens.
    pub fn finish(&self) -> Result<()> {
        for (&index, p) in &self.made {
            let err = |step: &str| {
                let step = step.to_string();
                move |source| RestoreError::Pty { index, step, source }
            };
            if p.record.exclusive {
                pty::set_exclusive(&p.slave).map_err(err("set the exclusive mode"))?;
            }
            if p.record.locked {
                pty::set_locked(&p.master, true).map_err(err("lock the slave"))?;
            }
        }
        Ok(())
    }

    /// torpor's description of the slave of pair `index`.
    pub fn slave(&self, index: u32) -> Option<&OwnedFd> {
        self.made.get(&index).map(|p| &p.slave)
    }
}
