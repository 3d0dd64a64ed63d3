//! Refuses processes in namespaces that restore would not give back. A woken process
//! joins torpor's own namespaces, except for the pid namespace (and the private mount
//! namespace with its own /proc) that restore makes for a tree led by a pid namespace's
//! first process; any other namespace of its own would be lost without a word, so the
//! process would wake with the host's network, hostname or IPC objects instead of its
//! own.

use crate::collect::UnsupportedReason;
use crate::{DumpError, Result};

/// The namespaces checked, with the name the message gives each. `pid` is left to
/// `pid_namespace`; `time_for_children` catches a process that unshared a time
/// namespace its next children would enter. The mount namespace is checked apart, by
/// what it holds.
const KINDS: [(&str, &str); 7] = [
    ("net", "network"),
    ("uts", "UTS (hostname)"),
    ("ipc", "IPC"),
    ("user", "user"),
    ("cgroup", "cgroup"),
    ("time", "time"),
    ("time_for_children", "time (for its children)"),
];

/// Refuses `pid` when one of its namespaces differs from `reference`'s: torpor's own for
/// the tree's root (`root`), the root's for the others.
///
/// A mount namespace of its own is accepted when it holds the same mounts as the
/// reference's, leaving out those at and under /proc and /sys: a pid namespace's first
/// process has its own /proc, which restore makes again, and `ip netns exec` gives each
/// command a mount namespace of its own with only /sys mounted again.
pub(crate) fn check(pid: i32, reference: i32, root: bool) -> Result<()> {
    let refuse = |kind: &str, name: &'static str, detail: Option<String>| {
        let id = link(pid, kind).unwrap_or_default();
        Err(DumpError::Unsupported {
            pid,
            reason: UnsupportedReason::Namespace { name, id, of_root: !root, detail },
        })
    };
    for (kind, name) in KINDS {
        // A kernel without this namespace type has the link in neither process.
        let Some(own) = link(pid, kind) else { continue };
        if Some(&own) != link(reference, kind).as_ref() {
            return refuse(kind, name, None);
        }
    }
    // A zombie has no namespaces left to read.
    let own = link(pid, "mnt");
    if own.is_some() && own != link(reference, "mnt") {
        match (mounts(pid), mounts(reference)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(a), Some(b)) => {
                let differ =
                    a.iter().find(|m| !b.contains(m)).or(b.iter().find(|m| !a.contains(m)));
                let detail = differ.map(|m| format!("its mounts differ at {}", m.point));
                return refuse("mnt", "mount", detail);
            }
            _ => return refuse("mnt", "mount", None),
        }
    }
    Ok(())
}

/// The namespace `/proc/PID/ns/KIND` links to, e.g. `net:[4026531840]`.
fn link(pid: i32, kind: &str) -> Option<String> {
    let target = std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok()?;
    Some(target.to_string_lossy().into_owned())
}

/// One mount as far as what a process sees through it goes.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Mount {
    point: String,
    /// The directory of the filesystem mounted there (not `/` for a bind mount).
    root: String,
    fstype: String,
    source: String,
}

/// The mounts of `pid`'s mount namespace outside /proc and /sys, but for namespace
/// bindings, sorted, from
/// `/proc/PID/mountinfo` (`ID PARENT MAJ:MIN ROOT POINT OPTIONS [TAGS] - TYPE SOURCE
/// SUPER-OPTIONS`).
fn mounts(pid: i32) -> Option<Vec<Mount>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
    let under =
        |p: &str, dir: &str| p == dir || p.strip_prefix(dir).is_some_and(|r| r.starts_with('/'));
    let mut all: Vec<Mount> = text
        .lines()
        .filter_map(|l| {
            let (head, tail) = l.split_once(" - ")?;
            let h: Vec<&str> = head.split(' ').collect();
            let mut t = tail.split(' ');
            Some(Mount {
                root: h.get(3)?.to_string(),
                point: h.get(4)?.to_string(),
                fstype: t.next()?.to_string(),
                source: t.next()?.to_string(),
            })
        })
        // Namespaces bound to paths (`ip netns add`) come and go and hold no files.
        .filter(|m| !under(&m.point, "/proc") && !under(&m.point, "/sys") && m.fstype != "nsfs")
        .collect();
    all.sort();
    Some(all)
}
