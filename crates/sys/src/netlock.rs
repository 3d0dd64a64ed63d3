//! Holding back a hibernated TCP connection's packets with an nftables rule.
//!
//! Between the dump and the restore no socket owns a saved connection's addresses, so the
//! kernel would answer the peer's next packet with a reset. A rule dropping the peer's
//! packets for each connection makes the peer retransmit instead, until the restored
//! socket takes them. The rules live in table `inet torpor`, chain `lock`, each tagged
//! with the image's lock name, and are driven through the `nft` command: the nftables
//! netlink protocol is large, and `nft` is the tool administrators know.
//!
//! Restore sometimes has to hand a rebuilt socket a segment "from the peer" (the FIN that
//! made a connection half-closed): [`send_as_peer`] sends it through a raw socket, marked
//! with [`PASS_MARK`], which the rules let through.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

/// The packet mark (`SO_MARK`) of segments torpor itself sends to a locked connection;
/// the lock rules do not drop them. "torp" in ASCII.
pub const PASS_MARK: u32 = 0x746f_7270;

/// A connection as its two ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// Whether the `nft` command is there to lock connections with.
pub fn available() -> bool {
    Command::new("nft")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn nft(script: &str) -> io::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("piped").write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "nft refused the rules: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Drops the packets peers send to `conns`, under the name `tag`.
pub fn lock(conns: &[Conn], tag: &str) -> io::Result<()> {
    let mut script = String::from(
        "table inet torpor {\n  chain lock {\n    type filter hook input priority -300; policy accept;\n  }\n}\n",
    );
    for c in conns {
        let fam = if c.peer.is_ipv4() { "ip" } else { "ip6" };
        script.push_str(&format!(
            "add rule inet torpor lock {fam} saddr {} tcp sport {} {fam} daddr {} tcp dport {} \
             meta mark != {PASS_MARK:#x} drop comment \"{tag}\"\n",
            c.peer.ip(),
            c.peer.port(),
            c.local.ip(),
            c.local.port()
        ));
    }
    nft(&script)
}

/// Removes the rules named `tag`.
pub fn unlock(tag: &str) -> io::Result<()> {
    let out =
        Command::new("nft").args(["-a", "list", "chain", "inet", "torpor", "lock"]).output()?;
    if !out.status.success() {
        // No chain: nothing is locked.
        return Ok(());
    }
    let listing = String::from_utf8_lossy(&out.stdout);
    let handles: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains(&format!("comment \"{tag}\"")))
        .filter_map(|l| l.rsplit("# handle ").next())
        .map(str::trim)
        .collect();
    if handles.is_empty() {
        return Ok(());
    }
    let script: String =
        handles.iter().map(|h| format!("delete rule inet torpor lock handle {h}\n")).collect();
    nft(&script)
}

/// TCP header flags of the segments [`send_as_peer`] sends.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_ACK: u8 = 0x10;

/// Sends `conn.local` a TCP segment without data that appears to come from `conn.peer`:
/// sequence number `seq`, acknowledging `ack`, with `flags` and the (unscaled) `window`,
/// no options. It goes through a raw socket (so the caller needs `CAP_NET_RAW`) marked
/// with [`PASS_MARK`], so that the lock rules let it in. See raw(7), ipv6(7).
pub fn send_as_peer(conn: Conn, seq: u32, ack: u32, flags: u8, window: u16) -> io::Result<()> {
    let (src, dst) = (unmap(conn.peer.ip()), unmap(conn.local.ip()));
    let packet = segment(src, conn.peer.port(), dst, conn.local.port(), seq, ack, flags, window)
        .ok_or_else(|| io::Error::other("the two ends are of different address families"))?;
    let family = if dst.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket takes integers and returns a new descriptor or -1. IPPROTO_RAW means
    // the packet passed carries its own IP header.
    let fd =
        unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nobody else.
    let raw = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the kernel reads one int from `PASS_MARK`.
    let r = unsafe {
        libc::setsockopt(
            raw.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            &PASS_MARK as *const u32 as *const _,
            4,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // The destination address only routes the packet; its port must be 0.
    // SAFETY: all zeroes is a valid sockaddr_storage (family AF_UNSPEC).
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match dst {
        IpAddr::V4(ip) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            let a = unsafe { &mut *(&mut addr as *mut _ as *mut libc::sockaddr_in) };
            a.sin_family = libc::AF_INET as u16;
            a.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        IpAddr::V6(ip) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in6.
            let a = unsafe { &mut *(&mut addr as *mut _ as *mut libc::sockaddr_in6) };
            a.sin6_family = libc::AF_INET6 as u16;
            a.sin6_addr.s6_addr = ip.octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: sends `packet` to the address in `addr`, both of the lengths passed.
    let n = unsafe {
        libc::sendto(
            raw.as_raw_fd(),
            packet.as_ptr() as *const _,
            packet.len(),
            0,
            &addr as *const _ as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries on the wire.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The bytes of an IP packet holding a TCP segment without options or data, checksums
/// filled in; `None` if the addresses are of different families.
#[allow(clippy::too_many_arguments)]
fn segment(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
) -> Option<Vec<u8>> {
    const TCP_LEN: u16 = 20;
    let mut tcp = Vec::with_capacity(TCP_LEN as usize);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push(((TCP_LEN / 4) as u8) << 4);
    tcp.push(flags);
    tcp.extend_from_slice(&window.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    let mut out = Vec::new();
    // The checksum covers a pseudo-header of the addresses, protocol and length.
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
            pseudo.extend_from_slice(&TCP_LEN.to_be_bytes());
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&(20 + TCP_LEN).to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_TCP as u8, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let sum = checksum(&ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            out.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&(TCP_LEN as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, libc::IPPROTO_TCP as u8]);
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&TCP_LEN.to_be_bytes());
            ip.extend_from_slice(&[libc::IPPROTO_TCP as u8, 64]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            out.extend_from_slice(&ip);
        }
        _ => return None,
    }
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    out.extend_from_slice(&tcp);
    Some(out)
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_to_zero() {
        let p = segment(
            "10.0.0.1".parse().unwrap(),
            80,
            "10.0.0.2".parse().unwrap(),
            4000,
            1,
            2,
            TCP_FIN | TCP_ACK,
            512,
        )
        .unwrap();
        assert_eq!(p.len(), 40);
        // A header with its checksum sums to 0xffff, whose complement is 0.
        assert_eq!(checksum(&p[..20]), 0);
        let mut pseudo = p[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(checksum(&pseudo), 0);
        assert_eq!(p[33], TCP_FIN | TCP_ACK);
    }

    #[test]
    fn mixed_families_are_refused() {
        let v4 = "10.0.0.1".parse().unwrap();
        let v6 = "::1".parse().unwrap();
        assert!(segment(v4, 1, v6, 2, 0, 0, TCP_ACK, 0).is_none());
    }
}
