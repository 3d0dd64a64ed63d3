//! Holding back a hibernated TCP connection's packets with an nftables rule.
//!
//! Between the dump and the restore no socket owns a saved connection's addresses, so the
//! kernel would answer the peer's next packet with a reset. A rule dropping the peer's
//! packets for each connection makes the peer retransmit instead, until the restored
//! socket takes them. The rules live in table `inet torpor`, chain `lock`, each tagged
//! with the image's lock name, and are driven through the `nft` command: the nftables
//! netlink protocol is large, and `nft` is the tool administrators know.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

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
            "add rule inet torpor lock {fam} saddr {} tcp sport {} {fam} daddr {} tcp dport {} drop comment \"{tag}\"\n",
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
