//! Unix sockets whose peer is outside the dumped tree.
//!
//! Such a peer cannot be saved, and by default dump refuses the socket. The user may name
//! the peer as external (`--external unix:PEER`) when it will still be there at restore: the
//! socket is then saved as [`OpenFileKind::UnixExternal`], and restore makes a new socket
//! and connects it to the peer's address. That needs an address (a peer that never bound
//! one cannot be found again), an empty receive queue (only the peer can put bytes into
//! it, and the peer's end is not the one restore connects to), and a connection open both
//! ways (as a new one would be).

use std::fmt;
use std::fs;
use std::str::FromStr;

use torpor_image::model::{self, OpenFileKind};
use torpor_sys::sock;

use crate::collect::UnsupportedReason;
use crate::files::{inherit, outside_holder, FdContext};
use crate::{DumpError, Result};

/// A peer outside the tree named by `--external`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExternalUnix {
    /// Every unix peer outside the tree that has an address (`--external unix`).
    Any,
    /// The peer bound to this address: an absolute path, or `@name` for an abstract one.
    Address(String),
    /// The socket with this inode (as `socket:[INODE]` shows it): the peer, or the tree's
    /// own end connected to it.
    Inode(u64),
}

impl FromStr for ExternalUnix {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let usage = "want unix, or unix: followed by an absolute path, @name, socket:[INODE] \
                     or INODE";
        let Some(rest) = s.strip_prefix("unix") else {
            return Err(format!("{s:?}: only unix socket peers can be external; {usage}"));
        };
        if rest.is_empty() {
            return Ok(Self::Any);
        }
        let Some(spec) = rest.strip_prefix(':').filter(|r| !r.is_empty()) else {
            return Err(format!("{s:?}: {usage}"));
        };
        let ino = spec.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')).unwrap_or(spec);
        if let Ok(ino) = ino.parse::<u64>() {
            return Ok(Self::Inode(ino));
        }
        if spec.starts_with('/') || spec.starts_with('@') {
            return Ok(Self::Address(spec.to_string()));
        }
        Err(format!("{s:?}: {usage}"))
    }
}

impl fmt::Display for ExternalUnix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => write!(f, "unix"),
            Self::Address(a) => write!(f, "unix:{a}"),
            Self::Inode(i) => write!(f, "unix:socket:[{i}]"),
        }
    }
}

/// The kernel's name of a socket type, for messages.
fn type_name(sock_type: i32) -> &'static str {
    match sock_type {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "datagram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "unknown-type",
    }
}

/// Whether two socket addresses name the same place: equal, or paths to the same file.
fn same_address(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    if !a.starts_with('/') || !b.starts_with('/') {
        return false;
    }
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

impl FdContext {
    /// Handles unix socket `ino` of the tree (held on `fd` of `pid`), whose peer `peer` is
    /// outside it: saves it as external if the user named the peer, else as inherited with
    /// `inherit_stdio` if only descriptors 0 to 2 use it, else as external if the user
    /// named every peer (`--external unix`); refuses it otherwise, saying what to pass, and
    /// refuses a peer it could not connect to again.
    pub(crate) fn outside_unix_peer(
        &self,
        tree: &[i32],
        processes: &mut [model::Process],
        (ino, peer): (u64, u64),
        (pid, fd): (i32, i32),
        inherit_stdio: bool,
    ) -> Result<()> {
        let info = self.unix.as_ref().and_then(|m| m.get(&ino));
        let sock_type = info.map_or(0, |i| i.sock_type as i32);
        let listed = self.unix.as_ref().and_then(|m| m.get(&peer));
        // A peer of another network namespace (a datagram socket reached through a path)
        // is not listed: the kernel still gives its address to the socket's getpeername.
        let peer_name = match listed {
            Some(i) => i.name.clone(),
            None => sock::take_fd(pid, fd)
                .ok()
                .and_then(|s| sock::sock_addr(&s, true))
                .map(|raw| unix_name(&raw))
                .unwrap_or_default(),
        };
        let holder = outside_holder(&format!("socket:[{peer}]"), tree)
            .unwrap_or_else(|| "no process (a connection in flight?)".into());
        let refuse = |what: String, advice: String| DumpError::Unsupported {
            pid,
            reason: UnsupportedReason::UnixOutside { fd, what, advice },
        };
        let kind = type_name(sock_type);
        let what = if peer_name.is_empty() {
            format!(
                "a unix {kind} socket (socket:[{ino}]) whose other end (socket:[{peer}]) is \
                 held by {holder} outside the dumped tree"
            )
        } else {
            format!(
                "a unix {kind} socket (socket:[{ino}]) connected to {peer_name}, whose other \
                 end (socket:[{peer}]) is held by {holder} outside the dumped tree"
            )
        };

        let named = self.external_unix.iter().any(|e| match e {
            ExternalUnix::Any => false,
            ExternalUnix::Inode(i) => *i == ino || *i == peer,
            ExternalUnix::Address(a) => !peer_name.is_empty() && same_address(a, &peer_name),
        });
        let is_it =
            |k: &OpenFileKind| matches!(k, OpenFileKind::UnixPair { ino: i, .. } if *i == ino);
        if !named && inherit_stdio && inherit(processes, is_it) {
            return Ok(());
        }
        let why_not = self.why_not_reconnectable(sock_type, &peer_name, info);
        if !named && !self.external_unix.contains(&ExternalUnix::Any) {
            let advice = why_not.unwrap_or_else(|| {
                let waiting = if sock_type == libc::SOCK_DGRAM {
                    "a socket will still be bound there"
                } else {
                    "its server will still be listening"
                };
                format!(
                    "if {waiting} at restore, dump with --external unix:{peer_name} (restore \
                     connects a new socket to it)"
                )
            });
            return Err(refuse(what, advice));
        }

        // Named, or taken by `--external unix`: it must be possible to connect again.
        if let Some(why) = why_not {
            return Err(refuse(what, why));
        }
        let uses = processes.iter().flat_map(|p| &p.open_files);
        let mut own = None;
        for o in uses {
            if let OpenFileKind::UnixPair { ino: i, queue, name, options, buffers, .. } = &o.kind {
                if *i != ino {
                    continue;
                }
                if queue.is_some() {
                    return Err(refuse(
                        what,
                        "it has data queued for reading, which torpor cannot put back (only \
                         its peer can send into it, and restore connects anew): dump again \
                         once the program has read it"
                            .into(),
                    ));
                }
                own = Some((name.clone(), options.clone(), *buffers));
            }
        }
        let Some((name, options, buffers)) = own else {
            // Converted already through another descriptor of the same socket.
            return Ok(());
        };
        let (name, file_mode, file_uid, file_gid) = crate::files::bound_name(pid, name);
        let external = OpenFileKind::UnixExternal {
            sock_type,
            name,
            file_mode,
            file_uid,
            file_gid,
            peer_name: peer_name.clone(),
            options,
            buffers,
        };
        for o in processes.iter_mut().flat_map(|p| &mut p.open_files) {
            if matches!(o.kind, OpenFileKind::UnixPair { ino: i, .. } if i == ino) {
                o.kind = external.clone();
            }
        }
        tracing::info!("pid {pid} fd {fd}: {what}, saved as external ({peer_name})");
        Ok(())
    }

    /// Why a new socket of type `sock_type` could not take the place of `info`'s connection
    /// to the peer on `peer_name` (as sock_diag shows it, empty for none), if it could not.
    fn why_not_reconnectable(
        &self,
        sock_type: i32,
        peer_name: &str,
        info: Option<&sock::UnixInfo>,
    ) -> Option<String> {
        if peer_name.is_empty() {
            return Some(
                "that end has no address (one end of an unnamed socket pair, or a client that \
                 never bound one), so torpor could not connect to it again, with or without \
                 --external"
                    .into(),
            );
        }
        if !peer_name.starts_with('/') && !peer_name.starts_with('@') {
            return Some(format!(
                "its address {peer_name:?} is a path relative to a directory torpor cannot \
                 know, so it could not connect to it again"
            ));
        }
        // A connection accepted from a listener carries the listener's name: if this
        // socket is one, its peer is the client, which nobody can connect to. (The
        // accepted end of a client of this tree is made in the client's network
        // namespace, so it is listed even when its listener, in another, is not.)
        const LISTEN: u8 = 10;
        let own = info.map_or("", |i| i.name.as_str());
        let accepted = !own.is_empty()
            && self
                .unix
                .iter()
                .flat_map(|m| m.values())
                .any(|i| i.state == LISTEN && i.sock_type as i32 == sock_type && i.name == own);
        if sock_type != libc::SOCK_DGRAM && accepted {
            return Some(format!(
                "its peer is a client bound to {peer_name}, not a server listening there (this \
                 socket is the one that accepted the connection), so torpor could not connect \
                 to it again"
            ));
        }
        // A new connection would be open both ways.
        let how = info.map_or(0, |i| i.shutdown);
        if how != 0 {
            let dirs = match how {
                1 => "for reading",
                2 => "for writing",
                _ => "both ways",
            };
            return Some(format!(
                "its connection is shut down {dirs} (by the program or its peer), which a new \
                 connection would not be, so torpor cannot connect it again"
            ));
        }
        None
    }
}

/// A unix address as sock_diag names it (path, `@name`, or empty for none) from a raw
/// `sockaddr_un`.
fn unix_name(raw: &[u8]) -> String {
    match raw.get(2..) {
        None | Some([]) => String::new(),
        Some([0, abs @ ..]) => format!("@{}", String::from_utf8_lossy(abs)),
        Some(path) => {
            String::from_utf8_lossy(path.split(|&b| b == 0).next().unwrap_or(&[])).into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_way_of_naming_a_peer() {
        let p = |s: &str| s.parse::<ExternalUnix>();
        assert_eq!(p("unix"), Ok(ExternalUnix::Any));
        assert_eq!(p("unix:/run/app.sock"), Ok(ExternalUnix::Address("/run/app.sock".into())));
        assert_eq!(p("unix:@bus"), Ok(ExternalUnix::Address("@bus".into())));
        assert_eq!(p("unix:socket:[12345]"), Ok(ExternalUnix::Inode(12345)));
        assert_eq!(p("unix:12345"), Ok(ExternalUnix::Inode(12345)));
        for bad in ["tcp:1.2.3.4:80", "unix:", "unix:relative.sock", "unixx", "unix:socket:[x]"] {
            assert!(p(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn reads_unix_addresses_as_sock_diag_names_them() {
        let fam = (libc::AF_UNIX as u16).to_ne_bytes();
        let raw = |rest: &[u8]| [&fam[..], rest].concat();
        assert_eq!(unix_name(&raw(b"")), "");
        assert_eq!(unix_name(&raw(b"/run/app.sock\0")), "/run/app.sock");
        assert_eq!(unix_name(&raw(b"\0bus")), "@bus");
    }

    #[test]
    fn shows_as_it_is_written() {
        for s in ["unix", "unix:/run/app.sock", "unix:@bus", "unix:socket:[7]"] {
            assert_eq!(s.parse::<ExternalUnix>().unwrap().to_string(), s);
        }
    }
}
