//! Parsers for the `/proc/PID` files torpor reads.
//!
//! These are small hand-written parsers rather than the `procfs` crate: torpor needs the
//! raw kernel values (octal `flags` in fdinfo, the mm fields of `stat`, the exact text of
//! `timers`, per-mapping VmFlags), read once per dump from a stopped process, and
//! nothing of the rest.

use std::fs;
use std::io;
use std::path::Path;

use crate::{Error, Result};

pub fn read(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    fs::read_to_string(path)
        .map_err(|source| Error::Io { what: path.display().to_string(), source })
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// Path or pseudo-name (`[heap]`, `[stack]`, `[vdso]`...), empty for anonymous.
    pub name: String,
    /// VmFlags from smaps, when read from there.
    pub vm_flags: Vec<String>,
}

impl MapEntry {
    /// True for a file that was deleted while mapped.
    pub fn deleted(&self) -> bool {
        self.name.ends_with(" (deleted)")
    }

    /// The path without the " (deleted)" suffix.
    pub fn path(&self) -> &str {
        self.name.strip_suffix(" (deleted)").unwrap_or(&self.name)
    }
}

fn parse_map_line(line: &str) -> Option<MapEntry> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let dev = it.next()?;
    let inode = it.next()?.parse().ok()?;
    let name = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    let (maj, min) = dev.split_once(':')?;
    if perms.len() < 4 {
        return None;
    }
    Some(MapEntry {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset,
        dev_major: u32::from_str_radix(maj, 16).ok()?,
        dev_minor: u32::from_str_radix(min, 16).ok()?,
        inode,
        name,
        vm_flags: Vec::new(),
    })
}

/// Parses `/proc/PID/maps`.
pub fn maps(pid: i32) -> Result<Vec<MapEntry>> {
    let path = format!("/proc/{pid}/maps");
    let text = read(&path)?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            parse_map_line(l).ok_or_else(|| Error::Parse { what: path.clone(), line: l.into() })
        })
        .collect()
}

/// Parses `/proc/PID/smaps`: the maps entries with their VmFlags.
pub fn smaps(pid: i32) -> Result<Vec<MapEntry>> {
    let path = format!("/proc/{pid}/smaps");
    let text = read(&path)?;
    let mut out: Vec<MapEntry> = Vec::new();
    for l in text.lines() {
        if let Some(flags) = l.strip_prefix("VmFlags:") {
            if let Some(last) = out.last_mut() {
                last.vm_flags = flags.split_whitespace().map(String::from).collect();
            }
            continue;
        }
        // Mapping header lines start with a hex range; field lines with "Name:".
        let first = l.split(' ').next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            out.push(
                parse_map_line(l)
                    .ok_or_else(|| Error::Parse { what: path.clone(), line: l.into() })?,
            );
        }
    }
    Ok(out)
}

/// The fields of `/proc/PID/status` torpor uses.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub name: String,
    pub state: char,
    pub tgid: i32,
    pub ppid: i32,
    pub tracer_pid: i32,
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub threads: u32,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: bool,
    /// Seccomp: 0 off, 1 strict, 2 filters; and Seccomp_filters, how many filters.
    pub seccomp: u32,
    pub seccomp_filters: u32,
    pub umask: u32,
    /// SigCgt and SigIgn: the signals with a handler, and those ignored (bit N-1 for
    /// signal N), process-wide.
    pub sig_caught: u64,
    pub sig_ignored: u64,
    /// NSpid: the pid in each pid namespace, outermost first.
    pub ns_pids: Vec<i32>,
}

pub fn status(pid: i32) -> Result<Status> {
    let path = format!("/proc/{pid}/status");
    parse_status(&read(&path)?, &path)
}

pub fn task_status(pid: i32, tid: i32) -> Result<Status> {
    let path = format!("/proc/{pid}/task/{tid}/status");
    parse_status(&read(&path)?, &path)
}

fn parse_status(text: &str, path: &str) -> Result<Status> {
    let bad = |l: &str| Error::Parse { what: path.to_string(), line: l.to_string() };
    let mut s = Status::default();
    for l in text.lines() {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        let four = |v: &str| -> Option<[u32; 4]> {
            let n: Vec<u32> = v.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            n.try_into().ok()
        };
        let hex = |v: &str| u64::from_str_radix(v, 16).map_err(|_| bad(l));
        match k {
            "Name" => s.name = v.to_string(),
            "State" => s.state = v.chars().next().unwrap_or('?'),
            "Tgid" => s.tgid = v.parse().map_err(|_| bad(l))?,
            "PPid" => s.ppid = v.parse().map_err(|_| bad(l))?,
            "TracerPid" => s.tracer_pid = v.parse().map_err(|_| bad(l))?,
            "Uid" => s.uids = four(v).ok_or_else(|| bad(l))?,
            "Gid" => s.gids = four(v).ok_or_else(|| bad(l))?,
            "Groups" => s.groups = v.split_whitespace().filter_map(|x| x.parse().ok()).collect(),
            "Threads" => s.threads = v.parse().map_err(|_| bad(l))?,
            "CapInh" => s.cap_inh = hex(v)?,
            "CapPrm" => s.cap_prm = hex(v)?,
            "CapEff" => s.cap_eff = hex(v)?,
            "CapBnd" => s.cap_bnd = hex(v)?,
            "CapAmb" => s.cap_amb = hex(v)?,
            "SigCgt" => s.sig_caught = hex(v)?,
            "SigIgn" => s.sig_ignored = hex(v)?,
            "NoNewPrivs" => s.no_new_privs = v == "1",
            "Seccomp" => s.seccomp = v.parse().map_err(|_| bad(l))?,
            "Seccomp_filters" => s.seccomp_filters = v.parse().map_err(|_| bad(l))?,
            "Umask" => s.umask = u32::from_str_radix(v, 8).map_err(|_| bad(l))?,
            "NSpid" => s.ns_pids = v.split_whitespace().filter_map(|x| x.parse().ok()).collect(),
            _ => {}
        }
    }
    Ok(s)
}

/// `/proc/PID/cgroup`: for each hierarchy, its controllers (empty for the unified
/// hierarchy) and the process's group path in it.
pub fn cgroups(pid: i32) -> Result<Vec<(String, String)>> {
    let path = format!("/proc/{pid}/cgroup");
    parse_cgroups(&read(&path)?, &path)
}

fn parse_cgroups(text: &str, path: &str) -> Result<Vec<(String, String)>> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            // hierarchy-id:controllers:path; the path itself may hold colons.
            let mut parts = l.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(_), Some(controllers), Some(group)) => {
                    Ok((controllers.to_string(), group.to_string()))
                }
                _ => Err(Error::Parse { what: path.to_string(), line: l.to_string() }),
            }
        })
        .collect()
}

/// The fields of `/proc/PID/stat` torpor uses.
#[derive(Debug, Clone, Default)]
pub struct Stat {
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    pub start_time: u64,
    pub start_code: u64,
    pub end_code: u64,
    pub start_stack: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// The wait status of an exited task (field 52).
    pub exit_code: i32,
}

pub fn stat(pid: i32) -> Result<Stat> {
    let path = format!("/proc/{pid}/stat");
    let text = read(&path)?;
    let bad = || Error::Parse { what: path.clone(), line: text.clone() };
    // The command name may contain spaces and parentheses: it ends at the last ')'.
    let open = text.find('(').ok_or_else(bad)?;
    let close = text.rfind(')').ok_or_else(bad)?;
    let comm = text[open + 1..close].to_string();
    let f: Vec<&str> = text[close + 2..].split_whitespace().collect();
    // f[0] is field 3 (state) of proc(5).
    let n = |i: usize| -> Result<u64> { f.get(i - 3).and_then(|v| v.parse().ok()).ok_or_else(bad) };
    Ok(Stat {
        comm,
        state: f.first().and_then(|s| s.chars().next()).unwrap_or('?'),
        ppid: n(4)? as i32,
        pgrp: n(5)? as i32,
        session: n(6)? as i32,
        start_time: n(22)?,
        start_code: n(26)?,
        end_code: n(27)?,
        start_stack: n(28)?,
        start_data: n(45)?,
        end_data: n(46)?,
        start_brk: n(47)?,
        arg_start: n(48)?,
        arg_end: n(49)?,
        env_start: n(50)?,
        env_end: n(51)?,
        exit_code: n(52).unwrap_or(0) as i32,
    })
}

/// `/proc/PID/fdinfo/FD`: position, flags and mount id.
#[derive(Debug, Clone, Default)]
pub struct FdInfo {
    pub pos: u64,
    pub flags: i32,
    pub mnt_id: i32,
    /// Every line, for kinds whose details live there.
    pub text: String,
}

pub fn fdinfo(pid: i32, fd: i32) -> Result<FdInfo> {
    let path = format!("/proc/{pid}/fdinfo/{fd}");
    let text = read(&path)?;
    let mut fi = FdInfo::default();
    for l in text.lines() {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        let bad = || Error::Parse { what: path.clone(), line: l.to_string() };
        match k {
            "pos" => fi.pos = v.parse().map_err(|_| bad())?,
            "flags" => fi.flags = i32::from_str_radix(v, 8).map_err(|_| bad())?,
            "mnt_id" => fi.mnt_id = v.parse().map_err(|_| bad())?,
            _ => {}
        }
    }
    fi.text = text;
    Ok(fi)
}

/// The entries of a `/proc` directory named by numbers, ascending.
fn numbered_entries(path: &str) -> Result<Vec<i32>> {
    let mut v: Vec<i32> = fs::read_dir(path)
        .map_err(|source| Error::Io { what: path.to_string(), source })?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Open descriptor numbers of a process, ascending.
pub fn fds(pid: i32) -> Result<Vec<i32>> {
    numbered_entries(&format!("/proc/{pid}/fd"))
}

/// Thread ids of a process, ascending.
pub fn tids(pid: i32) -> Result<Vec<i32>> {
    numbered_entries(&format!("/proc/{pid}/task"))
}

/// Direct children of a process (over all its threads).
pub fn children(pid: i32) -> Result<Vec<i32>> {
    let mut out = Vec::new();
    for tid in tids(pid)? {
        let path = format!("/proc/{pid}/task/{tid}/children");
        match fs::read_to_string(&path) {
            Ok(t) => out.extend(t.split_whitespace().filter_map(|x| x.parse::<i32>().ok())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::Io { what: path, source }),
        }
    }
    Ok(out)
}

/// One POSIX timer from `/proc/PID/timers`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimerInfo {
    pub id: i32,
    pub signo: i32,
    pub sigval: u64,
    /// "signal", "none" or "thread".
    pub notify: String,
    /// True when the notification goes to one thread (`SIGEV_THREAD_ID`).
    pub to_thread: bool,
    pub notify_pid: i32,
    pub clock: i32,
}

pub fn timers(pid: i32) -> Result<Vec<TimerInfo>> {
    let path = format!("/proc/{pid}/timers");
    let text = read(&path)?;
    parse_timers(&text, &path)
}

fn parse_timers(text: &str, path: &str) -> Result<Vec<TimerInfo>> {
    let mut out: Vec<TimerInfo> = Vec::new();
    for l in text.lines() {
        let bad = || Error::Parse { what: path.to_string(), line: l.to_string() };
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "ID" => out.push(TimerInfo { id: v.parse().map_err(|_| bad())?, ..Default::default() }),
            "signal" => {
                let t = out.last_mut().ok_or_else(bad)?;
                let (s, val) = v.split_once('/').ok_or_else(bad)?;
                t.signo = s.parse().map_err(|_| bad())?;
                t.sigval =
                    u64::from_str_radix(val.trim_start_matches("0x"), 16).map_err(|_| bad())?;
            }
            "notify" => {
                let t = out.last_mut().ok_or_else(bad)?;
                let (kind, who) = v.split_once('/').ok_or_else(bad)?;
                let (tp, p) = who.split_once('.').ok_or_else(bad)?;
                t.notify = kind.to_string();
                t.to_thread = tp == "tid";
                t.notify_pid = p.parse().map_err(|_| bad())?;
            }
            "ClockID" => out.last_mut().ok_or_else(bad)?.clock = v.parse().map_err(|_| bad())?,
            _ => {}
        }
    }
    Ok(out)
}

/// The auxiliary vector, as (type, value) words.
pub fn auxv(pid: i32) -> Result<Vec<u64>> {
    let path = format!("/proc/{pid}/auxv");
    let bytes = fs::read(&path).map_err(|source| Error::Io { what: path, source })?;
    Ok(bytes.chunks_exact(8).map(|c| u64::from_ne_bytes(c.try_into().unwrap())).collect())
}

pub fn readlink(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    fs::read_link(path)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|source| Error::Io { what: path.display().to_string(), source })
}

/// Contents of `/proc/PID/personality` (hex).
pub fn personality(pid: i32) -> Result<u32> {
    let path = format!("/proc/{pid}/personality");
    let t = read(&path)?;
    u32::from_str_radix(t.trim(), 16).map_err(|_| Error::Parse { what: path, line: t })
}

/// The command line, split at NUL bytes.
pub fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The sixteen resource limits of a process as `/proc/PID/limits` shows them, soft and
/// hard, in resource order (`RLIMIT_CPU` first). For when `prlimit` is refused: reading
/// another user's limits needs `CAP_SYS_RESOURCE`, which root may lack (in a container),
/// while the file is readable by whoever may trace the process.
pub fn limits(pid: i32) -> Result<Vec<(u64, u64)>> {
    let path = format!("/proc/{pid}/limits");
    let text = read(&path)?;
    let value = |v: &str| match v {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    };
    // "Max cpu time              unlimited            unlimited            seconds": the
    // name takes 26 columns, then soft, hard and units separated by spaces.
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut f = l.get(26..).unwrap_or("").split_whitespace();
            match (f.next().and_then(value), f.next().and_then(value)) {
                (Some(soft), Some(hard)) => Ok((soft, hard)),
                _ => Err(Error::Parse { what: path.clone(), line: l.into() }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_line_with_spaces_and_deleted() {
        let e = parse_map_line(
            "7f00-7f10 r-xp 00001000 fd:01 1234                       /tmp/a b (deleted)",
        )
        .unwrap();
        assert_eq!((e.start, e.end, e.offset, e.inode), (0x7f00, 0x7f10, 0x1000, 1234));
        assert!(e.read && e.exec && !e.write && !e.shared);
        assert!(e.deleted());
        assert_eq!(e.path(), "/tmp/a b");
        let a = parse_map_line("7f00-7f10 rw-s 00000000 00:00 0 ").unwrap();
        assert_eq!(a.name, "");
        assert!(a.shared);
    }

    #[test]
    fn cgroup_lines() {
        let text = "9:name=systemd:/\n1:cpu,cpuacct:/a:b\n0::/user.slice/x.scope\n";
        let got = parse_cgroups(text, "cgroup").expect("parse");
        assert_eq!(got.len(), 3);
        assert_eq!(got[1], ("cpu,cpuacct".to_string(), "/a:b".to_string()));
        assert_eq!(got[2], (String::new(), "/user.slice/x.scope".to_string()));
        assert!(parse_cgroups("garbage\n", "cgroup").is_err());
    }

    #[test]
    fn timers_text() {
        let t = parse_timers(
            "ID: 0\nsignal: 34/0000000000001092\nnotify: signal/pid.77\nClockID: 1\n\
             ID: 1\nsignal: 14/0000000000000000\nnotify: none/pid.77\nClockID: 0\n",
            "x",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].id, t[0].signo, t[0].sigval, t[0].clock), (0, 34, 0x1092, 1));
        assert_eq!(t[1].notify, "none");
        assert!(!t[0].to_thread);
    }

    #[test]
    fn own_stat_and_status() {
        let me = std::process::id() as i32;
        let s = stat(me).unwrap();
        assert!(s.start_code > 0 && s.end_code > s.start_code);
        let st = status(me).unwrap();
        assert_eq!(st.tgid, me);
        assert!(maps(me).unwrap().iter().any(|m| m.name == "[vdso]"));
        assert!(smaps(me).unwrap().iter().all(|m| !m.vm_flags.is_empty()));
    }

    #[test]
    fn limits_from_proc_match_prlimit() {
        let me = std::process::id() as i32;
        let shown = super::limits(me).unwrap();
        assert_eq!(shown.len(), 16);
        for (resource, &(soft, hard)) in shown.iter().enumerate() {
            assert_eq!(crate::get_rlimit(me, resource as u32).unwrap(), (soft, hard), "{resource}");
        }
    }
}
