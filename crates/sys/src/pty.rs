//! Pseudo-terminal pairs: the `ioctl`s that read and set what a pair holds, and opening
//! a new pair under a chosen `/dev/pts` number.
//!
//! Requests made on a master descriptor that concern the terminal (its modes, window
//! size, process groups) act on the slave side, as tty_ioctl(4) describes for pty
//! masters; so torpor can read and set them through the master alone. See pty(7),
//! ioctl_tty(2).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::{last, Result};

/// Major device number of every `/dev/pts/N` slave (`UNIX98_PTY_SLAVE_MAJOR`); the minor
/// is `N`.
pub const SLAVE_MAJOR: u32 = 136;
/// Device number of `/dev/ptmx` (and of each devpts instance's `ptmx`): major 5, minor 2.
pub const PTMX_MAJOR: u32 = 5;
pub const PTMX_MINOR: u32 = 2;

/// The kernel's `struct termios2`: modes with arbitrary speeds (`TCGETS2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Termios {
    pub iflag: u32,
    pub oflag: u32,
    pub cflag: u32,
    pub lflag: u32,
    pub line: u8,
    pub cc: [u8; 19],
    pub ispeed: u32,
    pub ospeed: u32,
}

/// `struct winsize`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Winsize {
    pub rows: u16,
    pub cols: u16,
    pub xpixel: u16,
    pub ypixel: u16,
}

/// `ioctl(fd, request, &mut int)` for requests that write one int.
fn get_int(fd: &impl AsRawFd, request: libc::Ioctl, name: &'static str) -> Result<i32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the requests passed here write exactly one int into `v`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut v as *mut libc::c_int) } < 0 {
        return Err(last(name));
    }
    Ok(v)
}

/// `ioctl(fd, request, &int)` for requests that read one int.
fn set_int(fd: &impl AsRawFd, request: libc::Ioctl, v: i32, name: &'static str) -> Result<()> {
    // SAFETY: the requests passed here read exactly one int from `v`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, &v as *const libc::c_int) } < 0 {
        return Err(last(name));
    }
    Ok(())
}

/// `TIOCGPTN`: the number N of the master's slave, `/dev/pts/N`.
pub fn index(master: &impl AsRawFd) -> Result<u32> {
    get_int(master, libc::TIOCGPTN, "TIOCGPTN").map(|n| n as u32)
}

/// `TCGETS2`: the terminal's modes (through a master: its slave's).
pub fn termios(fd: &impl AsRawFd) -> Result<Termios> {
    // SAFETY: an all-zero termios2 is valid; TCGETS2 fills one.
    let mut t: libc::termios2 = unsafe { std::mem::zeroed() };
    // SAFETY: TCGETS2 writes one struct termios2 into `t`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCGETS2, &mut t as *mut libc::termios2) } < 0 {
        return Err(last("TCGETS2"));
    }
    Ok(Termios {
        iflag: t.c_iflag,
        oflag: t.c_oflag,
        cflag: t.c_cflag,
        lflag: t.c_lflag,
        line: t.c_line,
        cc: t.c_cc,
        ispeed: t.c_ispeed,
        ospeed: t.c_ospeed,
    })
}

/// `TCSETS2`: sets the terminal's modes at once.
pub fn set_termios(fd: &impl AsRawFd, m: &Termios) -> Result<()> {
    // SAFETY: an all-zero termios2 is valid; every field is set below.
    let mut t: libc::termios2 = unsafe { std::mem::zeroed() };
    t.c_iflag = m.iflag;
    t.c_oflag = m.oflag;
    t.c_cflag = m.cflag;
    t.c_lflag = m.lflag;
    t.c_line = m.line;
    t.c_cc = m.cc;
    t.c_ispeed = m.ispeed;
    t.c_ospeed = m.ospeed;
    // SAFETY: TCSETS2 reads one struct termios2 from `t`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCSETS2, &t as *const libc::termios2) } < 0 {
        return Err(last("TCSETS2"));
    }
    Ok(())
}

/// `TIOCGWINSZ`: the window size.
pub fn winsize(fd: &impl AsRawFd) -> Result<Winsize> {
    let mut w = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one struct winsize into `w`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut w as *mut libc::winsize) } < 0 {
        return Err(last("TIOCGWINSZ"));
    }
    Ok(Winsize { rows: w.ws_row, cols: w.ws_col, xpixel: w.ws_xpixel, ypixel: w.ws_ypixel })
}

/// `TIOCSWINSZ`: sets the window size.
pub fn set_winsize(fd: &impl AsRawFd, s: Winsize) -> Result<()> {
    let w =
        libc::winsize { ws_row: s.rows, ws_col: s.cols, ws_xpixel: s.xpixel, ws_ypixel: s.ypixel };
    // SAFETY: TIOCSWINSZ reads one struct winsize from `w`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &w as *const libc::winsize) } < 0 {
        return Err(last("TIOCSWINSZ"));
    }
    Ok(())
}

/// `TIOCGPTLCK`: whether the slave is locked (no `unlockpt` yet).
pub fn locked(master: &impl AsRawFd) -> Result<bool> {
    get_int(master, libc::TIOCGPTLCK, "TIOCGPTLCK").map(|v| v != 0)
}

/// `TIOCSPTLCK`: locks or unlocks the slave.
pub fn set_locked(master: &impl AsRawFd, on: bool) -> Result<()> {
    set_int(master, libc::TIOCSPTLCK, on as i32, "TIOCSPTLCK")
}

/// `TIOCGPKT`: whether the master is in packet mode.
pub fn packet(master: &impl AsRawFd) -> Result<bool> {
    get_int(master, libc::TIOCGPKT, "TIOCGPKT").map(|v| v != 0)
}

/// `TIOCPKT`: turns packet mode on or off.
pub fn set_packet(master: &impl AsRawFd, on: bool) -> Result<()> {
    set_int(master, libc::TIOCPKT, on as i32, "TIOCPKT")
}

/// `TIOCGEXCL`: whether the terminal is in exclusive mode (further opens fail).
pub fn exclusive(fd: &impl AsRawFd) -> Result<bool> {
    get_int(fd, libc::TIOCGEXCL, "TIOCGEXCL").map(|v| v != 0)
}

/// `TIOCEXCL`: puts the terminal in exclusive mode.
pub fn set_exclusive(fd: &impl AsRawFd) -> Result<()> {
    // SAFETY: TIOCEXCL takes no argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCEXCL) } < 0 {
        return Err(last("TIOCEXCL"));
    }
    Ok(())
}

/// `TIOCGSID` on a master: the session its slave controls, 0 when none.
pub fn session(master: &impl AsRawFd) -> Result<i32> {
    match get_int(master, libc::TIOCGSID, "TIOCGSID") {
        // The slave is nobody's controlling terminal.
        Err(crate::Error::Syscall { source, .. })
            if source.raw_os_error() == Some(libc::ENOTTY) =>
        {
            Ok(0)
        }
        other => other,
    }
}

/// `TIOCGPGRP` on a master: the slave's foreground process group, 0 when none.
pub fn foreground(master: &impl AsRawFd) -> Result<i32> {
    get_int(master, libc::TIOCGPGRP, "TIOCGPGRP")
}

/// `FIONREAD`: bytes that a read on `fd` would find.
pub fn queued(fd: &impl AsRawFd) -> Result<usize> {
    get_int(fd, libc::FIONREAD, "FIONREAD").map(|v| v.max(0) as usize)
}

/// `TIOCGPTPEER`: opens the master's slave with `flags` (`O_RDWR`, `O_NOCTTY`...), a new
/// open file description, without a path (so whatever devpts is mounted where).
pub fn open_slave(master: &impl AsRawFd, flags: i32) -> Result<OwnedFd> {
    // SAFETY: TIOCGPTPEER takes the open flags as its argument and returns a new
    // descriptor or -1.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if fd < 0 {
        return Err(last("TIOCGPTPEER"));
    }
    // SAFETY: just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Why [`open_at`] could not make the pair.
#[derive(Debug, thiserror::Error)]
pub enum OpenAtError {
    #[error("/dev/pts/{index} is in use")]
    Taken { index: u32 },
    #[error("no /dev/pts/{index} after {tries} new pairs")]
    TooMany { index: u32, tries: u32 },
    #[error(transparent)]
    Sys(#[from] crate::Error),
}

/// Opens a new pseudo-terminal pair whose slave is `/dev/pts/index`, returning its
/// master (`O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC`: a write that does not fit
/// fails instead of waiting for a reader that does not exist yet).
///
/// Linux has no call to choose the number: each open of `/dev/ptmx` takes the lowest
/// free one. So the pairs opened on the way, with lower numbers, are held until the
/// wanted one comes and closed after; a number above the wanted one means it is taken.
/// At most `max_tries` pairs are opened.
pub fn open_at(index: u32, max_tries: u32) -> std::result::Result<OwnedFd, OpenAtError> {
    let mut fillers = Vec::new();
    for _ in 0..max_tries {
        // SAFETY: a NUL-terminated path and flags; returns a new descriptor or -1.
        let fd = unsafe {
            libc::open(
                c"/dev/ptmx".as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(last("open /dev/ptmx").into());
        }
        // SAFETY: just returned, owned by nobody else.
        let master = unsafe { OwnedFd::from_raw_fd(fd) };
        let got = self::index(&master)?;
        if got == index {
            return Ok(master);
        }
        if got > index {
            return Err(OpenAtError::Taken { index });
        }
        fillers.push(master);
    }
    Err(OpenAtError::TooMany { index, tries: max_tries })
}

/// Reads exactly `len` bytes that are known to be queued on `fd`.
pub fn read_queued(fd: &impl AsRawFd, len: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    let mut at = 0;
    while at < len {
        // SAFETY: reads into the unfilled part of `out`.
        let n = unsafe {
            libc::read(fd.as_raw_fd(), out[at..].as_mut_ptr() as *mut libc::c_void, len - at)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(crate::Error::Syscall { call: "read", source: e });
        }
        if n == 0 {
            break;
        }
        at += n as usize;
    }
    out.truncate(at);
    Ok(out)
}

/// Writes all of `bytes` to `fd`.
pub fn write_all(fd: &impl AsRawFd, bytes: &[u8]) -> Result<()> {
    let mut at = 0;
    while at < bytes.len() {
        // SAFETY: writes from the unwritten part of `bytes`.
        let n = unsafe {
            libc::write(
                fd.as_raw_fd(),
                bytes[at..].as_ptr() as *const libc::c_void,
                bytes.len() - at,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(crate::Error::Syscall { call: "write", source: e });
        }
        at += n as usize;
    }
    Ok(())
}

/// Puts `bytes` into the master's read queue unchanged, as if programs had written them
/// to the slave: written to the slave with output processing off (the master's own line
/// discipline is always raw), then the modes `t` again.
pub fn inject_output(
    master: &impl AsRawFd,
    slave: &impl AsRawFd,
    t: &Termios,
    bytes: &[u8],
) -> Result<()> {
    let raw_out = Termios { oflag: t.oflag & !libc::OPOST, ..*t };
    set_termios(master, &raw_out)?;
    let written = write_all(slave, bytes);
    set_termios(master, t)?;
    written
}

/// Puts `bytes` into the slave's input queue unchanged, as if typed and not yet read:
/// written to the master while the slave's input processing, echo and signals are off,
/// then the modes `t` again once the line discipline has taken every byte (it takes
/// them asynchronously, from a kernel worker).
pub fn inject_input(
    master: &impl AsRawFd,
    slave: &impl AsRawFd,
    t: &Termios,
    bytes: &[u8],
) -> Result<()> {
    let before = queued(slave)?;
    let raw_in = Termios { iflag: 0, lflag: 0, ..*t };
    set_termios(master, &raw_in)?;
    let written = write_all(master, bytes);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while written.is_ok()
        && queued(slave)? < before + bytes.len()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let arrived = queued(slave)? >= before + bytes.len();
    set_termios(master, t)?;
    written?;
    if !arrived {
        return Err(crate::Error::Syscall {
            call: "write",
            source: io::Error::other("the terminal did not take every byte in time"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new pair: its master and a description of its slave.
    fn pair() -> (OwnedFd, OwnedFd) {
        // SAFETY: a NUL-terminated path and flags; returns a new descriptor or -1.
        let fd = unsafe { libc::open(c"/dev/ptmx".as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
        assert!(fd >= 0, "open /dev/ptmx: {}", io::Error::last_os_error());
        // SAFETY: just returned, owned by nobody else.
        let master = unsafe { OwnedFd::from_raw_fd(fd) };
        set_locked(&master, false).unwrap();
        let slave = open_slave(&master, libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK).unwrap();
        (master, slave)
    }

    #[test]
    fn open_at_gets_the_number_asked_for_or_says_it_is_taken() {
        let (master, _slave) = pair();
        let n = index(&master).unwrap();
        match open_at(n, n + 1) {
            Err(OpenAtError::Taken { index }) => assert_eq!(index, n),
            other => panic!("/dev/pts/{n} is held, yet open_at says {other:?}"),
        }
        drop((master, _slave));
        // Someone else on the machine may take it meanwhile; then it says so.
        match open_at(n, n + 1) {
            Ok(m) => assert_eq!(index(&m).unwrap(), n),
            Err(OpenAtError::Taken { index }) => assert_eq!(index, n),
            Err(e) => panic!("open_at({n}): {e}"),
        }
    }

    #[test]
    fn queued_bytes_are_put_back_unchanged() {
        let (master, slave) = pair();
        let mut t = termios(&master).unwrap();
        // Output processing on (\n becomes \r\n when written normally).
        t.oflag |= libc::OPOST | libc::ONLCR;
        set_termios(&master, &t).unwrap();
        inject_output(&master, &slave, &t, b"a\nb").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while queued(&master).unwrap() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(read_queued(&master, queued(&master).unwrap()).unwrap(), b"a\nb");
        assert_eq!(termios(&master).unwrap(), t, "the modes are put back");

        // Non-canonical, with CR translated to NL and echo on when typed normally.
        t.lflag = (t.lflag & !libc::ICANON) | libc::ECHO;
        t.iflag |= libc::ICRNL;
        set_termios(&master, &t).unwrap();
        inject_input(&master, &slave, &t, b"x\ry").unwrap();
        assert_eq!(read_queued(&slave, queued(&slave).unwrap()).unwrap(), b"x\ry");
        assert_eq!(queued(&master).unwrap(), 0, "nothing was echoed");
        assert_eq!(termios(&master).unwrap(), t, "the modes are put back");
    }
}
