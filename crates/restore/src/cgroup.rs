//! Control groups: each woken process joins the groups it was in, one per hierarchy.
//!
//! A new process starts in the groups of `torpor restore`; a program dumped from a
//! service's group, or from one with a memory or pids limit, would otherwise run on
//! outside it, its limits and accounting silently gone. The groups are joined by path:
//! the group must exist at restore (its limits are the group's own, not part of the
//! image). One that does not, or that cannot be joined, is named in a warning and the
//! process stays where `torpor restore` is.

use std::path::PathBuf;

use torpor_image::model::{Cgroup, Process};

/// A mounted cgroup hierarchy: its controllers (empty for the unified one), the group
/// mounted at its root, and where.
struct Mount {
    controllers: Option<Vec<String>>,
    root: String,
    at: PathBuf,
}

/// Moves process `pid` (as torpor sees it; every thread goes along) into each group of
/// `p` that is not the one `torpor restore` itself is in.
pub(crate) fn join(pid: i32, p: &Process) {
    if p.cgroups.is_empty() {
        return;
    }
    let own = torpor_sys::proc::cgroups(std::process::id() as i32).unwrap_or_default();
    let mounts = mounts();
    for g in &p.cgroups {
        if own.iter().any(|(c, path)| *c == g.controllers && *path == g.path) {
            continue;
        }
        if let Err(why) = join_one(pid, g, &mounts) {
            tracing::warn!(
                "pid {pid}: stays in torpor's control group instead of {} ({}): {why}",
                g.path,
                if g.controllers.is_empty() { "unified hierarchy" } else { &g.controllers },
            );
        }
    }
}

fn join_one(pid: i32, g: &Cgroup, mounts: &[Mount]) -> Result<(), String> {
    let wanted: Option<Vec<&str>> =
        (!g.controllers.is_empty()).then(|| g.controllers.split(',').collect());
    let m = mounts
        .iter()
        .find(|m| match (&m.controllers, &wanted) {
            (None, None) => true,
            (Some(have), Some(want)) => want.iter().all(|w| have.iter().any(|h| h == w)),
            _ => false,
        })
        .ok_or("its hierarchy is not mounted here")?;
    let rel = if m.root == "/" { Some(g.path.as_str()) } else { g.path.strip_prefix(&m.root) }
        .ok_or_else(|| format!("it is outside the part mounted at {}", m.at.display()))?;
    let dir = m.at.join(rel.trim_start_matches('/'));
    if !dir.is_dir() {
        return Err(format!("{} does not exist", dir.display()));
    }
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
        .map_err(|e| format!("cannot write {}: {e}", dir.join("cgroup.procs").display()))
}

/// The cgroup hierarchies mounted in torpor's mount namespace (`/proc/self/mountinfo`).
fn mounts() -> Vec<Mount> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines().filter_map(parse_mount).collect()
}

/// One mountinfo line: `id parent major:minor root mountpoint options... - fstype
/// source superoptions`, kept when it mounts a cgroup hierarchy.
fn parse_mount(line: &str) -> Option<Mount> {
    let (before, after) = line.split_once(" - ")?;
    let fields: Vec<&str> = before.split(' ').collect();
    let mut tail = after.split(' ');
    let (fstype, _source, options) = (tail.next()?, tail.next()?, tail.next().unwrap_or(""));
    let controllers = match fstype {
        "cgroup2" => None,
        "cgroup" => Some(options.split(',').map(String::from).collect()),
        _ => return None,
    };
    Some(Mount {
        controllers,
        root: unescape(fields.get(3)?),
        at: PathBuf::from(unescape(fields.get(4)?)),
    })
}

/// mountinfo writes space, tab, newline and backslash in paths as octal escapes.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let v1 = "35 25 0:30 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids";
        let m = parse_mount(v1).expect("v1 mount");
        assert_eq!(m.controllers, Some(vec!["rw".to_string(), "pids".to_string()]));
        assert_eq!(m.at, PathBuf::from("/sys/fs/cgroup/pids"));
        let v2 = "30 25 0:26 /sub /sys/fs/cgroup\\040x rw - cgroup2 cgroup2 rw,nsdelegate";
        let m = parse_mount(v2).expect("v2 mount");
        assert!(m.controllers.is_none());
        assert_eq!((m.root.as_str(), m.at.to_str()), ("/sub", Some("/sys/fs/cgroup x")));
        assert!(parse_mount("22 1 8:1 / / rw - ext4 /dev/sda1 rw").is_none());
    }
}
