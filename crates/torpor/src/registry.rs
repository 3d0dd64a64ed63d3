//! The programs `torpor run` started, for `torpor ps`: one small JSON file per program in
//! a registry directory, written when it starts and removed when it ends.
//!
//! The directory is `$TORPOR_RUN_DIR` when set, else `/run/torpor/run` for root, else
//! `$XDG_RUNTIME_DIR/torpor/run`. An entry outlives its program only when `torpor run`
//! itself was killed; `ps` then finds the pid gone (or given to another program, which
//! its start time tells) and removes the entry.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::human;

/// One program started by `torpor run`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Its pid as seen from outside its pid namespace (the one `torpor dump` takes).
    pub pid: i32,
    /// Its start time in clock ticks after boot (`/proc/PID/stat` field 22), which tells
    /// it from a later process given the same pid.
    pub start_ticks: u64,
    /// When it started, seconds since the Unix epoch.
    pub started_unix: u64,
    /// The command line given to `torpor run`.
    pub command: Vec<String>,
    /// Working directory it started in.
    #[serde(default)]
    pub cwd: String,
}

/// The registry directory.
pub fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TORPOR_RUN_DIR") {
        return PathBuf::from(d);
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/torpor/run");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("torpor/run"),
        None => std::env::temp_dir().join(format!("torpor-{uid}/run")),
    }
}

fn entry_path(dir: &Path, pid: i32) -> PathBuf {
    dir.join(format!("{pid}.json"))
}

/// Start time of PID in clock ticks after boot, if it exists.
pub fn start_ticks(pid: i32) -> Option<u64> {
    parse_start_ticks(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Start time of PID read through `proc`, a descriptor of a `/proc` directory opened
/// before `/proc` was mounted over (as `torpor run` does for its program's namespace).
pub fn start_ticks_at(proc: &fs::File, pid: i32) -> Option<u64> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let name = std::ffi::CString::new(format!("{pid}/stat")).ok()?;
    // SAFETY: openat on a directory descriptor borrowed for the call and a NUL-terminated
    // path alive for it; the descriptor returned is owned by the File below.
    let fd =
        unsafe { libc::openat(proc.as_raw_fd(), name.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        tracing::debug!("cannot open {pid}/stat of /proc: {}", io::Error::last_os_error());
        return None;
    }
    // SAFETY: fd was just opened and nothing else owns it.
    let mut f = unsafe { fs::File::from_raw_fd(fd) };
    let mut stat = String::new();
    io::Read::read_to_string(&mut f, &mut stat).ok()?;
    parse_start_ticks(&stat)
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    // Fields after the command, which is in parentheses and may hold anything.
    let rest = &stat[stat.rfind(')')? + 2..];
    // Field 22 overall is the 20th after the command (field 3 is the first).
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Records PID, just started with COMMAND. A failure is returned for the caller to warn
/// about: the program runs all the same.
pub fn add(pid: i32, start_ticks: u64, command: &[String]) -> Result<PathBuf> {
    let dir = dir();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .with_context(|| format!("cannot create the registry directory {}", dir.display()))?;
    let entry = Entry {
        pid,
        start_ticks,
        started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        command: command.to_vec(),
        cwd: std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default(),
    };
    let path = entry_path(&dir, pid);
    // Written aside and renamed, so `ps` never reads half an entry.
    let tmp = dir.join(format!(".{pid}.json.tmp"));
    fs::write(&tmp, serde_json::to_vec(&entry)?)
        .and_then(|()| fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Removes the entry of PID.
pub fn remove(pid: i32) {
    let path = entry_path(&dir(), pid);
    if let Err(e) = fs::remove_file(&path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

/// The live entries, oldest first; entries of programs that are gone are removed.
pub fn live() -> Result<Vec<Entry>> {
    let dir = dir();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read the registry {}", dir.display()))
        }
    };
    let mut live = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension() != Some(std::ffi::OsStr::new("json")) {
            continue;
        }
        let entry: Option<Entry> =
            fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok());
        match entry {
            Some(entry) if start_ticks(entry.pid) == Some(entry.start_ticks) => live.push(entry),
            // Gone, its pid reused, or unreadable: nothing `ps` can show.
            _ => {
                tracing::debug!("pruning {}", path.display());
                let _ = fs::remove_file(&path);
            }
        }
    }
    live.sort_by_key(|e| (e.started_unix, e.pid));
    Ok(live)
}

/// Processes in the tree of PID (itself included) and their resident memory in bytes.
fn tree_usage(pid: i32) -> (usize, u64) {
    let mut todo = vec![pid];
    let mut seen = std::collections::HashSet::new();
    let mut rss = 0u64;
    while let Some(p) = todo.pop() {
        if !seen.insert(p) {
            continue;
        }
        let status = fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
            .unwrap_or(0);
        rss += kib * 1024;
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for t in tasks.flatten() {
            let children = fs::read_to_string(t.path().join("children")).unwrap_or_default();
            todo.extend(children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
        }
    }
    (seen.len(), rss)
}

/// How long ago a time in seconds since the epoch was, briefly: `5s`, `3m`, `2h`, `4d`.
pub fn age(secs: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let d = now.saturating_sub(secs);
    match d {
        d if d < 120 => format!("{d}s"),
        d if d < 2 * 3600 => format!("{}m", d / 60),
        d if d < 2 * 86400 => format!("{}h", d / 3600),
        d => format!("{}d", d / 86400),
    }
}

/// `torpor ps`.
pub fn ps(json: bool) -> Result<u8> {
    let live = live()?;
    if json {
        #[derive(Serialize)]
        struct Row<'a> {
            pid: i32,
            processes: usize,
            rss_bytes: u64,
            started_unix: u64,
            command: &'a [String],
            cwd: &'a str,
        }
        let rows: Vec<Row> = live
            .iter()
            .map(|e| {
                let (processes, rss_bytes) = tree_usage(e.pid);
                Row {
                    pid: e.pid,
                    processes,
                    rss_bytes,
                    started_unix: e.started_unix,
                    command: &e.command,
                    cwd: &e.cwd,
                }
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    if live.is_empty() {
        println!("no program started with `torpor run` is running (registry: {})", dir().display());
        return Ok(0);
    }
    println!("{:>8} {:>6} {:>10} {:>6}  COMMAND", "PID", "PROCS", "RSS", "AGE");
    for e in &live {
        let (procs, rss) = tree_usage(e.pid);
        println!(
            "{:>8} {:>6} {:>10} {:>6}  {}",
            e.pid,
            procs,
            human(rss),
            age(e.started_unix),
            crate::inspect::command_text(&e.command)
        );
    }
    Ok(0)
}
