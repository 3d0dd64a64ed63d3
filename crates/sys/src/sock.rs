//! Descriptors torpor takes from other processes, and what the kernel tells about
//! sockets: `pidfd_getfd`, `tee`, and `NETLINK_SOCK_DIAG` for unix sockets.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::{last, Result};

/// A copy of descriptor `fd` of process `pid`, sharing its open file description.
/// Needs ptrace access to `pid`. See pidfd_open(2), pidfd_getfd(2).
pub fn take_fd(pid: i32, fd: i32) -> Result<OwnedFd> {
    // SAFETY: both calls take integers and return a new descriptor or -1.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(last("pidfd_open"));
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if got < 0 {
            return Err(last("pidfd_getfd"));
        }
        Ok(OwnedFd::from_raw_fd(got as i32))
    }
}

/// The bytes in a pipe, copied without being consumed (`tee`). `pipe` must be a read
/// end (one may be opened through `/proc/PID/fd/N`).
pub fn pipe_contents(pipe: &OwnedFd) -> Result<Vec<u8>> {
    let size = pipe_size(pipe)?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
        return Err(last("pipe2"));
    }
    // SAFETY: both descriptors were just created and belong to nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on our own descriptor; room for everything the source may hold.
    if unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size) } < 0 {
        return Err(last("F_SETPIPE_SZ"));
    }
    // SAFETY: tee takes descriptors and integers; it duplicates pipe buffers.
    let n = unsafe {
        libc::tee(pipe.as_raw_fd(), w.as_raw_fd(), size as usize, libc::SPLICE_F_NONBLOCK)
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        // An empty pipe.
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(Vec::new());
        }
        return Err(crate::Error::Syscall { call: "tee", source: e });
    }
    let mut out = vec![0u8; n as usize];
    let mut at = 0;
    while at < out.len() {
        // SAFETY: reads into the unfilled part of `out`.
        let k = unsafe {
            libc::read(r.as_raw_fd(), out[at..].as_mut_ptr() as *mut libc::c_void, out.len() - at)
        };
        if k <= 0 {
            return Err(last("read"));
        }
        at += k as usize;
    }
    Ok(out)
}

/// `F_GETPIPE_SZ`.
pub fn pipe_size(pipe: &OwnedFd) -> Result<i32> {
    // SAFETY: fcntl on a descriptor we own.
    let size = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if size < 0 {
        return Err(last("F_GETPIPE_SZ"));
    }
    Ok(size)
}

/// `getsockopt(SOL_SOCKET, opt)` for an integer option.
pub fn sockopt(fd: &OwnedFd, opt: i32) -> Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `v`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &mut v as *mut _ as *mut _,
            &mut len,
        )
    };
    if r < 0 {
        return Err(last("getsockopt"));
    }
    Ok(v)
}

/// `setsockopt(SOL_SOCKET, opt)` for an integer option.
pub fn set_sockopt(fd: &OwnedFd, opt: i32, v: i32) -> Result<()> {
    // SAFETY: the kernel reads one int from `v`.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &v as *const _ as *const _,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(last("setsockopt"));
    }
    Ok(())
}

/// The messages queued on a socket for reading, oldest first, without consuming them:
/// `MSG_PEEK` from a moving `SO_PEEK_OFF`, which is put back afterwards. A stream socket
/// gives its bytes in one piece.
pub fn socket_queue(sock: &OwnedFd, stream: bool) -> Result<Vec<Vec<u8>>> {
    let old_off = sockopt(sock, libc::SO_PEEK_OFF)?;
    set_sockopt(sock, libc::SO_PEEK_OFF, 0)?;
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let result = loop {
        // SAFETY: receives into `buf`, which has the length passed.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                break Ok(());
            }
            break Err(crate::Error::Syscall { call: "recv(MSG_PEEK)", source: e });
        }
        let n = n as usize;
        if n > buf.len() {
            break Err(crate::Error::Syscall {
                call: "recv(MSG_PEEK)",
                source: io::Error::other(format!("a queued message of {n} bytes is too large")),
            });
        }
        if n == 0 && stream {
            break Ok(());
        }
        if stream {
            out.first_mut()
                .map(|v| v.extend_from_slice(&buf[..n]))
                .unwrap_or_else(|| out.push(buf[..n].to_vec()));
        } else {
            out.push(buf[..n].to_vec());
            // An empty datagram does not move the peek offset: count them.
            if n == 0 && out.len() > 1 << 16 {
                break Ok(());
            }
        }
    };
    set_sockopt(sock, libc::SO_PEEK_OFF, old_off)?;
    result.map(|()| out)
}

/// The datagrams queued on a socket for reading, oldest first, each with the address it
/// came from (raw bytes, empty when the sender had none), without consuming them
/// (`MSG_PEEK` from a moving `SO_PEEK_OFF`, put back afterwards).
pub fn datagram_queue(sock: &OwnedFd) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let old_off = sockopt(sock, libc::SO_PEEK_OFF)?;
    set_sockopt(sock, libc::SO_PEEK_OFF, 0)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let result = loop {
        let mut addr = [0u8; 128];
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut _, iov_len: buf.len() };
        // SAFETY: an all-zero msghdr is valid; the fields set point at live buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = addr.as_mut_ptr() as *mut _;
        msg.msg_namelen = addr.len() as _;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // SAFETY: the kernel writes into `buf` and `addr` within the lengths given.
        let n = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut msg,
                libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                break Ok(());
            }
            break Err(crate::Error::Syscall { call: "recvmsg(MSG_PEEK)", source: e });
        }
        let n = n as usize;
        if n > buf.len() {
            break Err(crate::Error::Syscall {
                call: "recvmsg(MSG_PEEK)",
                source: io::Error::other(format!("a queued datagram of {n} bytes is too large")),
            });
        }
        let namelen = (msg.msg_namelen as usize).min(addr.len());
        // A sender without an address leaves only the family, or nothing.
        let from = if namelen > 2 { addr[..namelen].to_vec() } else { Vec::new() };
        out.push((from, buf[..n].to_vec()));
        // The kernel marks an empty datagram peeked and skips it next time; this only
        // guards against a kernel that would not.
        if out.len() > 1 << 16 {
            break Err(crate::Error::Syscall {
                call: "recvmsg(MSG_PEEK)",
                source: io::Error::other("more than 65536 datagrams queued"),
            });
        }
    };
    set_sockopt(sock, libc::SO_PEEK_OFF, old_off)?;
    result.map(|()| out)
}

/// What sock_diag tells about one unix socket.
#[derive(Debug, Clone, Default)]
pub struct UnixInfo {
    pub ino: u64,
    pub sock_type: u8,
    pub state: u8,
    /// Inode of the connected peer, 0 for none.
    pub peer: u64,
    /// Bound address (path, or `@name` for an abstract one), empty for none.
    pub name: String,
    /// For a listening socket: connections waiting to be accepted.
    pub pending: u32,
    /// For a listening socket: its backlog.
    pub backlog: u32,
    /// Directions shut down (`sk_shutdown`: 1 receiving, 2 sending), by this socket
    /// (`shutdown`) or by its peer's shutting down the other way.
    pub shutdown: u8,
}

/// Every unix socket of this network namespace, by inode (`NETLINK_SOCK_DIAG`).
pub fn unix_sockets() -> Result<HashMap<u64, UnixInfo>> {
    const UDIAG_SHOW_NAME: u32 = 1;
    const UDIAG_SHOW_PEER: u32 = 4;
    const UNIX_DIAG_NAME: u16 = 0;
    const UNIX_DIAG_PEER: u16 = 2;
    const UDIAG_SHOW_RQLEN: u32 = 16;
    const UNIX_DIAG_RQLEN: u16 = 4;
    // Sent for every socket, unasked.
    const UNIX_DIAG_SHUTDOWN: u16 = 6;

    // struct unix_diag_req.
    let mut req = Vec::with_capacity(24);
    req.push(libc::AF_UNIX as u8);
    req.push(0);
    req.extend_from_slice(&0u16.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // all states
    req.extend_from_slice(&0u32.to_ne_bytes()); // any inode
    req.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN).to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]); // no cookie

    let mut out = HashMap::new();
    for body in diag_dump(&req, "unix")? {
        // struct unix_diag_msg: family, type, state, pad, ino, cookie[2].
        if body.len() < 16 {
            continue;
        }
        let mut info = UnixInfo {
            sock_type: body[1],
            state: body[2],
            ino: u32::from_ne_bytes(body[4..8].try_into().unwrap()) as u64,
            ..Default::default()
        };
        for (atype, data) in diag_attrs(&body[16..]) {
            match atype {
                UNIX_DIAG_PEER if data.len() >= 4 => {
                    info.peer = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as u64
                }
                UNIX_DIAG_SHUTDOWN if !data.is_empty() => info.shutdown = data[0],
                UNIX_DIAG_RQLEN if data.len() >= 8 => {
                    info.pending = u32::from_ne_bytes(data[0..4].try_into().unwrap());
                    info.backlog = u32::from_ne_bytes(data[4..8].try_into().unwrap());
                }
                UNIX_DIAG_NAME if !data.is_empty() => {
                    info.name = if data[0] == 0 {
                        format!("@{}", String::from_utf8_lossy(&data[1..]))
                    } else {
                        String::from_utf8_lossy(data.split(|&b| b == 0).next().unwrap_or(&[]))
                            .into_owned()
                    }
                }
                _ => {}
            }
        }
        out.insert(info.ino, info);
    }
    Ok(out)
}

/// What sock_diag tells about one TCP socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpDiag {
    /// The kernel's `TCP_*` state.
    pub state: u8,
    /// Listening: connections waiting to be accepted. Else bytes not yet read.
    pub rqueue: u32,
    /// Listening: the backlog `listen` was given, as the kernel capped it
    /// (`net.core.somaxconn`). Else bytes not yet acknowledged.
    pub wqueue: u32,
    /// `sk_shutdown`: 1 reading is shut down, 2 sending is.
    pub shutdown: u8,
}

/// Every TCP socket of this network namespace, IPv4 and IPv6, by inode
/// (`NETLINK_SOCK_DIAG` with `inet_diag`).
pub fn tcp_sockets() -> Result<HashMap<u64, TcpDiag>> {
    const INET_DIAG_SHUTDOWN: u16 = 8;
    let mut out = HashMap::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        // struct inet_diag_req_v2: family, protocol, ext, pad, states (all), then a
        // zeroed struct inet_diag_sockid (any address) with no cookie.
        let mut req = vec![family as u8, libc::IPPROTO_TCP as u8, 0, 0];
        req.extend_from_slice(&u32::MAX.to_ne_bytes());
        req.extend_from_slice(&[0; 40]);
        req.extend_from_slice(&[0xff; 8]);
        for body in diag_dump(&req, "TCP")? {
            // struct inet_diag_msg: family, state, timer, retrans, id (48 bytes),
            // expires, rqueue, wqueue, uid, inode; then attributes.
            if body.len() < 72 {
                continue;
            }
            let word = |at: usize| u32::from_ne_bytes(body[at..at + 4].try_into().unwrap());
            let mut diag =
                TcpDiag { state: body[1], rqueue: word(56), wqueue: word(60), shutdown: 0 };
            for (atype, data) in diag_attrs(&body[72..]) {
                if atype == INET_DIAG_SHUTDOWN && !data.is_empty() {
                    diag.shutdown = data[0];
                }
            }
            // Sockets in TIME_WAIT and requests have no inode: they belong to no process.
            let ino = word(68) as u64;
            if ino != 0 {
                out.insert(ino, diag);
            }
        }
    }
    Ok(out)
}

/// Sends one `SOCK_DIAG_BY_FAMILY` dump request with the family's request structure
/// `req`, and returns the body of every answer (the bytes after each `nlmsghdr`).
/// `what` names the query in errors.
fn diag_dump(req: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    // SAFETY: socket() takes integers and returns a new descriptor or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(last("socket(NETLINK_SOCK_DIAG)"));
    }
    // SAFETY: just created, owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    // struct nlmsghdr, then the request.
    let mut msg = Vec::with_capacity(16 + req.len());
    msg.extend_from_slice(&(16 + req.len() as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(req);
    // SAFETY: sends `msg`, which has the length passed.
    if unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr() as *const _, msg.len(), 0) } < 0 {
        return Err(last("send(sock_diag)"));
    }

    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: receives into `buf`, which has the length passed.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr() as *mut _, buf.len(), 0) };
        if n < 0 {
            return Err(last("recv(sock_diag)"));
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= 16 {
            let len = u32::from_ne_bytes(msgs[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(msgs[4..6].try_into().unwrap());
            if len < 16 || len > msgs.len() {
                break;
            }
            if kind == libc::NLMSG_DONE as u16 {
                return Ok(out);
            }
            if kind == libc::NLMSG_ERROR as u16 {
                return Err(crate::Error::Syscall {
                    call: "sock_diag",
                    source: io::Error::other(format!("the kernel refused the {what} socket query")),
                });
            }
            out.push(msgs[16..len].to_vec());
            let step = (len + 3) & !3;
            msgs = &msgs[step.min(msgs.len())..];
        }
    }
}

/// The netlink attributes in `attrs`, as (type, payload), up to the first malformed one.
fn diag_attrs(mut attrs: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while attrs.len() >= 4 {
        let alen = u16::from_ne_bytes(attrs[0..2].try_into().unwrap()) as usize;
        let atype = u16::from_ne_bytes(attrs[2..4].try_into().unwrap());
        if alen < 4 || alen > attrs.len() {
            break;
        }
        out.push((atype, &attrs[4..alen]));
        let step = (alen + 3) & !3;
        attrs = &attrs[step.min(attrs.len())..];
    }
    out
}

/// `getsockopt` of any option, as raw bytes (at most 256).
pub fn sockopt_raw(fd: &OwnedFd, level: i32, name: i32) -> Result<Vec<u8>> {
    sockopt_sized(fd, level, name, 256)
}

/// `getsockopt` asking for exactly `size` bytes (some options take no other length).
pub fn sockopt_sized(fd: &OwnedFd, level: i32, name: i32, size: usize) -> Result<Vec<u8>> {
    let mut buf = [0u8; 256];
    let mut len = size.min(buf.len()) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `buf` and updates `len`.
    let r = unsafe {
        libc::getsockopt(fd.as_raw_fd(), level, name, buf.as_mut_ptr() as *mut _, &mut len)
    };
    if r < 0 {
        return Err(last("getsockopt"));
    }
    Ok(buf[..len as usize].to_vec())
}

/// `setsockopt` of any option from raw bytes.
pub fn set_sockopt_raw(fd: &OwnedFd, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
    // SAFETY: the kernel reads `value.len()` bytes from `value`.
    let r = unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, value.as_ptr() as *const _, value.len() as _)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The local (`getsockname`) or peer (`getpeername`) address of a socket, raw bytes;
/// `None` when it has none.
pub fn sock_addr(fd: &OwnedFd, peer: bool) -> Option<Vec<u8>> {
    let mut buf = [0u8; 128];
    let mut len = buf.len() as libc::socklen_t;
    let p = buf.as_mut_ptr() as *mut libc::sockaddr;
    // SAFETY: the kernel writes at most `len` bytes into `buf` and updates `len`.
    let r = unsafe {
        if peer {
            libc::getpeername(fd.as_raw_fd(), p, &mut len)
        } else {
            libc::getsockname(fd.as_raw_fd(), p, &mut len)
        }
    };
    (r == 0).then(|| buf[..len as usize].to_vec())
}

/// A raw IPv4 or IPv6 socket address as a `SocketAddr`.
pub fn to_socket_addr(raw: &[u8]) -> Option<std::net::SocketAddr> {
    let fam = u16::from_ne_bytes([*raw.first()?, *raw.get(1)?]) as i32;
    let port = u16::from_be_bytes([*raw.get(2)?, *raw.get(3)?]);
    match fam {
        libc::AF_INET => {
            let a: [u8; 4] = raw.get(4..8)?.try_into().ok()?;
            Some((std::net::Ipv4Addr::from(a), port).into())
        }
        libc::AF_INET6 => {
            let a: [u8; 16] = raw.get(8..24)?.try_into().ok()?;
            Some((std::net::Ipv6Addr::from(a), port).into())
        }
        _ => None,
    }
}

/// A readable form of a raw IPv4 or IPv6 socket address, for messages.
pub fn describe_addr(raw: &[u8]) -> String {
    let fam = raw.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]]) as i32);
    let port = |b: &[u8]| u16::from_be_bytes([b[2], b[3]]);
    match fam {
        Some(libc::AF_INET) if raw.len() >= 8 => {
            format!("{}.{}.{}.{}:{}", raw[4], raw[5], raw[6], raw[7], port(raw))
        }
        Some(libc::AF_INET6) if raw.len() >= 24 => {
            let a: [u8; 16] = raw[8..24].try_into().unwrap();
            format!("[{}]:{}", std::net::Ipv6Addr::from(a), port(raw))
        }
        _ => "an unknown address".into(),
    }
}

/// `TCP_REPAIR` and friends, see `Documentation/networking/tcp_repair` in the kernel:
/// reading and setting an established connection's state without talking to the peer.
pub mod tcp_repair {
    pub const TCP_REPAIR: i32 = 19;
    pub const TCP_REPAIR_QUEUE: i32 = 20;
    pub const TCP_QUEUE_SEQ: i32 = 21;
    pub const TCP_REPAIR_OPTIONS: i32 = 22;
    pub const TCP_TIMESTAMP: i32 = 24;
    pub const TCP_REPAIR_WINDOW: i32 = 29;
    pub const TCP_RECV_QUEUE: i32 = 1;
    pub const TCP_SEND_QUEUE: i32 = 2;
    pub const TCPOPT_MSS: u32 = 2;
    pub const TCPOPT_WINDOW: u32 = 3;
    pub const TCPOPT_SACK_PERM: u32 = 4;
    pub const TCPOPT_TIMESTAMP: u32 = 8;
    /// `tcpi_options` bits of `struct tcp_info`.
    pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
    pub const TCPI_OPT_SACK: u8 = 2;
    pub const TCPI_OPT_WSCALE: u8 = 4;
}

/// `setsockopt(IPPROTO_TCP, name)` for an integer option.
pub fn set_tcp_opt(fd: &OwnedFd, name: i32, v: i32) -> io::Result<()> {
    set_sockopt_raw(fd, libc::IPPROTO_TCP, name, &v.to_ne_bytes())
}

/// `getsockopt(IPPROTO_TCP, name)` for an integer option.
pub fn tcp_opt(fd: &OwnedFd, name: i32) -> Result<u32> {
    let v = sockopt_raw(fd, libc::IPPROTO_TCP, name)?;
    Ok(u32::from_ne_bytes(v.get(..4).and_then(|b| b.try_into().ok()).unwrap_or([0; 4])))
}

/// Bytes queued on a socket: for reading (`SIOCINQ`) or not yet acknowledged
/// (`SIOCOUTQ`).
pub fn queued_bytes(fd: &OwnedFd, out: bool) -> Result<u32> {
    let req = if out { libc::TIOCOUTQ } else { libc::FIONREAD };
    let mut n: libc::c_int = 0;
    // SAFETY: the ioctl writes one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut n) } < 0 {
        return Err(last("ioctl(SIOCINQ/SIOCOUTQ)"));
    }
    Ok(n as u32)
}

/// Copies `len` bytes from the front of the socket's current repair queue without
/// consuming them.
pub fn peek_exact(fd: &OwnedFd, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut at = 0;
    while at < len {
        // SAFETY: receives into the unfilled part of `buf`. Each peek starts at the front,
        // so the whole length is asked for each time.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut _,
                len,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            return Err(last("recv(MSG_PEEK)"));
        }
        at = n as usize;
        if at < len {
            // A peek returns at most one contiguous piece; ask again with a moving offset.
            let _ = set_sockopt(fd, libc::SO_PEEK_OFF, 0);
            let mut got = 0usize;
            while got < len {
                // SAFETY: as above, into the unfilled tail of `buf`.
                let n = unsafe {
                    libc::recv(
                        fd.as_raw_fd(),
                        buf[got..].as_mut_ptr() as *mut _,
                        len - got,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                };
                if n <= 0 {
                    let _ = set_sockopt(fd, libc::SO_PEEK_OFF, -1);
                    return Err(last("recv(MSG_PEEK)"));
                }
                got += n as usize;
            }
            let _ = set_sockopt(fd, libc::SO_PEEK_OFF, -1);
            return Ok(buf);
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socketpair_peers_and_queue() {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two new descriptors.
        assert_eq!(
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) },
            0
        );
        // SAFETY: just created.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: writes 5 bytes from a static string.
        assert_eq!(unsafe { libc::write(b.as_raw_fd(), b"hello".as_ptr() as *const _, 5) }, 5);
        let meta = |f: &OwnedFd| {
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat writes one struct stat.
            unsafe { libc::fstat(f.as_raw_fd(), &mut st) };
            st.st_ino
        };
        let all = unix_sockets().unwrap();
        assert_eq!(all[&meta(&a)].peer, meta(&b));
        assert_eq!(socket_queue(&a, true).unwrap(), vec![b"hello".to_vec()]);
        // Still there after peeking.
        assert_eq!(socket_queue(&a, true).unwrap(), vec![b"hello".to_vec()]);
    }

    #[test]
    fn datagram_queue_keeps_senders_and_empty_datagrams() {
        use std::os::unix::net::UnixDatagram;
        let dir = std::env::temp_dir().join(format!("torpor-dgq-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let rx = UnixDatagram::bind(dir.join("rx")).unwrap();
        let named = UnixDatagram::bind(dir.join("tx")).unwrap();
        let unnamed = UnixDatagram::unbound().unwrap();
        named.send_to(b"one", dir.join("rx")).unwrap();
        unnamed.send_to(b"", dir.join("rx")).unwrap();
        named.send_to(b"three", dir.join("rx")).unwrap();
        let q = datagram_queue(&OwnedFd::from(rx.try_clone().unwrap())).unwrap();
        let tx = dir.join("tx");
        let from: Vec<u8> =
            [&(libc::AF_UNIX as u16).to_ne_bytes()[..], tx.as_os_str().as_encoded_bytes(), &[0]]
                .concat();
        assert_eq!(
            q,
            vec![(from.clone(), b"one".to_vec()), (vec![], vec![]), (from, b"three".to_vec())]
        );
        // Nothing consumed.
        let mut buf = [0u8; 8];
        assert_eq!(rx.recv(&mut buf).unwrap(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tcp_listener_backlog() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: listen on a socket we own; a second listen changes the backlog.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 7) }, 0);
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        // SAFETY: all zeroes is a valid struct stat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes one struct stat.
        unsafe { libc::fstat(l.as_raw_fd(), &mut st) };
        let info = tcp_sockets().unwrap()[&st.st_ino];
        assert_eq!(info, TcpDiag { state: 10, rqueue: 1, wqueue: 7, shutdown: 0 });
    }
}
