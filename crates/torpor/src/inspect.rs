//! `torpor inspect`: what an image holds, for people (text) and for scripts (`--json`).
//!
//! The JSON form is built from the structs of this module, not from the image's own
//! records, so that the image format can change without breaking the scripts that read
//! it. Its schema is in `docs/inspect-json.md`; [`SCHEMA_VERSION`] changes only when a
//! field changes meaning or goes away (fields may be added within one version).
//!
//! Inspect works on damaged and partial images too: it shows what it could read and lists
//! every fault it found. Nothing in an image is trusted to be in range, so a corrupt index
//! shows as "invalid" instead of stopping it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde::Serialize;
use torpor_image::model::{self, OpenFileKind, Tree, VmaKind};
use torpor_image::{Manifest, PartialImage};

use crate::human;

/// Version of the JSON schema `--json` prints.
pub const SCHEMA_VERSION: u32 = 1;

const PAGE_SIZE: u64 = 4096;

/// The whole of `torpor inspect --json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub dir: String,
    /// No fault was found in the manifest, in the records, or in the list of files.
    pub complete: bool,
    /// Every fault found, one sentence each.
    pub problems: Vec<String>,
    /// What the manifest says; `null` when it could not be read.
    pub image: Option<ImageInfo>,
    /// The pid given to `torpor dump`; `null` when neither manifest nor records say.
    pub root_pid: Option<i32>,
    /// The tree ran in its own pid namespace (`torpor run`).
    pub pid_namespace: bool,
    /// Parents before children; empty when the records could not be read.
    pub processes: Vec<ProcessInfo>,
    pub zombies: Vec<ZombieInfo>,
}

#[derive(Debug, Serialize)]
pub struct ImageInfo {
    pub format_version: u32,
    pub torpor_version: String,
    pub kernel_release: String,
    pub arch: String,
    /// When the dump finished, seconds since the Unix epoch, and the same in RFC 3339.
    pub created_unix: u64,
    pub created: String,
    /// Files of the image besides the manifest, and their total size in bytes.
    pub files: usize,
    pub bytes: u64,
    /// For an incremental image: the directory of the image it was dumped over.
    pub parent: Option<String>,
    /// Whether the image is encrypted (`dump --encrypt-key`).
    pub encrypted: bool,
}

#[derive(Debug, Serialize)]
pub struct ProcessInfo {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// The command line; may be empty (a kernel-made name only, see `name`).
    pub command: Vec<String>,
    /// The leader thread's name (`comm`).
    pub name: String,
    pub cwd: String,
    /// Effective user and group ids.
    pub uid: u32,
    pub gid: u32,
    pub threads: Vec<ThreadInfo>,
    pub memory: MemoryInfo,
    pub descriptors: Vec<FdInfo>,
}

#[derive(Debug, Serialize)]
pub struct ThreadInfo {
    pub tid: i32,
    pub name: String,
}

#[derive(Debug, Serialize)]
pub struct MemoryInfo {
    /// Bytes of address space mapped.
    pub mapped_bytes: u64,
    /// Bytes of page data this process's page file holds.
    pub stored_bytes: u64,
    /// Bytes this process shares copy-on-write with another, stored once in the other's.
    pub shared_stored_bytes: u64,
    /// Bytes of unchanged pages an incremental image leaves in its parent images.
    pub parent_stored_bytes: u64,
    /// Size of the page file on disk when it is compressed; `null` when it is not.
    pub compressed_bytes: Option<u64>,
    /// Totals per kind of mapping, in the order of [`MEMORY_KINDS`].
    pub by_kind: Vec<MemoryKindInfo>,
    pub mappings: Vec<MappingInfo>,
}

/// The kinds of mapping, in the order they are reported.
pub const MEMORY_KINDS: [&str; 10] = [
    "heap",
    "anon",
    "stack",
    "shared_anon",
    "file",
    "shared_file",
    "sysv_shm",
    "vdso",
    "vvar",
    "vsyscall",
];

#[derive(Debug, Serialize)]
pub struct MemoryKindInfo {
    pub kind: &'static str,
    pub mappings: usize,
    pub mapped_bytes: u64,
    pub stored_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct MappingInfo {
    /// First address and the address after the last byte, `0x` hex.
    pub start: String,
    pub end: String,
    /// `rwxp` or `rwxs` as `/proc/PID/maps` writes it.
    pub perms: String,
    pub kind: &'static str,
    /// The mapped file, or the SysV segment as `SYSV key=.. shmid=..`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub mapped_bytes: u64,
    /// Bytes of this mapping stored in the image (in this process's page file or, when
    /// shared copy-on-write, in another's).
    pub stored_bytes: u64,
}

/// One descriptor. `kind` says which of the optional fields are present; see
/// `docs/inspect-json.md`.
#[derive(Debug, Default, Serialize)]
pub struct FdInfo {
    pub fd: i32,
    pub kind: &'static str,
    pub cloexec: bool,
    /// A one-line description, the same as the text output shows.
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `read`, `write` or `read_write` for files and pipes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// The file was deleted while open; its content is saved in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted: Option<bool>,
    /// Pipe or socket inode, the same at both ends of a pipe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inode: Option<u64>,
    /// Bytes written and not yet read, saved in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued_bytes: Option<u64>,
    /// `ipv4`, `ipv6` or `unix`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<&'static str>,
    /// `stream`, `dgram` or `seqpacket`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_type: Option<&'static str>,
    /// `listening`, `bound`, `unbound`, `connected` or `established`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The other end of a unix socket pair inside the tree.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_fd: Option<i32>,
    /// Pseudo-terminal number N of `/dev/pts/N`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pty: Option<u32>,
    /// The eventfd counter, or the timerfd's expirations not yet read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Watched paths (inotify) or registered descriptors (epoll).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watches: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<i32>>,
    /// File locks the process holds through this descriptor, taken again on restore.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ZombieInfo {
    pub pid: i32,
    pub ppid: i32,
    pub name: String,
    /// Exit code, or `null` when it was killed by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
}

pub fn run(dir: &Path, json: bool, key: Option<&torpor_image::crypt::Key>) -> Result<u8> {
    let partial = match key {
        // A single file is read whole: every member's checksum is checked on the way.
        None => crate::single::read_partial(dir, true)?,
        // Sealed records are read from a directory: a single file is unpacked first.
        Some(key) => {
            let opened = crate::single::open(dir, false)?;
            let mut p = torpor_image::read_partial_keyed(&opened.dir, Some(key));
            p.dir = opened.shown.clone();
            p
        }
    };
    let encrypted = partial.manifest.as_ref().and_then(|m| m.encryption.as_ref());
    if key.is_none() && encrypted.is_some() {
        anyhow::bail!(
            "{} is encrypted: give its key to see what it holds (`torpor inspect \
             --encrypt-key FILE {}`)",
            partial.dir.display(),
            dir.display()
        );
    }
    let report = build(&partial);
    if !json && report.image.is_none() && report.processes.is_empty() {
        anyhow::bail!(
            "{} holds nothing torpor can read: {}",
            dir.display(),
            report.problems.join("; ")
        );
    }
    let mut out = String::new();
    if json {
        out = serde_json::to_string_pretty(&report)?;
        out.push('\n');
    } else {
        render(&report, &mut out);
    }
    print_out(&out);
    // A damaged image still exits 1, so scripts notice; what could be read is printed.
    Ok(if report.complete { 0 } else { 1 })
}

/// Prints to stdout, ignoring a closed pipe (`torpor inspect DIR | head`).
fn print_out(s: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(s.as_bytes());
}

/// Builds the report from what could be read.
pub fn build(p: &PartialImage) -> Report {
    let problems: Vec<String> = p.problems.iter().map(|e| chain(e)).collect();
    let image = p.manifest.as_ref().map(image_info);
    let root_pid =
        p.manifest.as_ref().map(|m| m.root_pid).or_else(|| p.tree.as_ref().map(|t| t.root_pid));
    let (processes, zombies, pid_namespace) = match &p.tree {
        Some(t) => {
            (processes(t, p.manifest.as_ref()), t.zombies.iter().map(zombie).collect(), t.pid_ns)
        }
        None => (Vec::new(), Vec::new(), false),
    };
    Report {
        schema_version: SCHEMA_VERSION,
        dir: p.dir.display().to_string(),
        complete: problems.is_empty(),
        problems,
        image,
        root_pid,
        pid_namespace,
        processes,
        zombies,
    }
}

/// An error and its causes, "outer: inner: innermost".
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let _ = write!(s, ": {c}");
        cause = c.source();
    }
    s
}

fn image_info(m: &Manifest) -> ImageInfo {
    ImageInfo {
        format_version: m.format_version,
        torpor_version: m.torpor_version.clone(),
        kernel_release: m.kernel_release.clone(),
        arch: m.arch.clone(),
        created_unix: m.created_unix,
        created: rfc3339(m.created_unix),
        files: m.files.len(),
        bytes: m.files.iter().map(|f| f.len).fold(0, u64::saturating_add),
        parent: m.parent.as_ref().map(|p| p.path.clone()),
        encrypted: m.encryption.is_some(),
    }
}

pub(crate) fn rfc3339(secs: u64) -> String {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| format!("{secs} s after the epoch"))
}

fn zombie(z: &model::Zombie) -> ZombieInfo {
    // A wait status: exit code in bits 8-15 when the low 7 bits are 0, else the signal.
    let sig = z.exit_status & 0x7f;
    ZombieInfo {
        pid: z.pid,
        ppid: z.ppid,
        name: z.comm.clone(),
        exit_code: (sig == 0).then_some((z.exit_status >> 8) & 0xff),
        signal: (sig != 0).then_some(sig),
    }
}

/// Length of an image file the manifest lists.
fn file_len(m: Option<&Manifest>, name: &str) -> Option<u64> {
    m?.files.iter().find(|f| f.name == name).map(|f| f.len)
}

fn processes(t: &Tree, m: Option<&Manifest>) -> Vec<ProcessInfo> {
    // Where each unix socket lives, to name the other end of a pair.
    let mut sockets: HashMap<u64, (i32, i32)> = HashMap::new();
    for p in &t.processes {
        for fd in &p.fds {
            if let Some(OpenFileKind::UnixPair { ino, .. }) =
                p.open_files.get(fd.open_file).map(|o| &o.kind)
            {
                sockets.entry(*ino).or_insert((p.pid, fd.fd));
            }
        }
    }
    t.processes.iter().map(|p| process(p, t, m, &sockets)).collect()
}

fn process(
    p: &model::Process,
    t: &Tree,
    m: Option<&Manifest>,
    sockets: &HashMap<u64, (i32, i32)>,
) -> ProcessInfo {
    ProcessInfo {
        pid: p.pid,
        ppid: p.ppid,
        pgid: p.pgid,
        sid: p.sid,
        command: p.cmdline.clone(),
        name: p.threads.first().map(|t| t.comm.clone()).unwrap_or_default(),
        cwd: p.cwd.clone(),
        uid: p.creds.uids[1],
        gid: p.creds.gids[1],
        threads: p
            .threads
            .iter()
            .map(|t| ThreadInfo { tid: t.tid, name: t.comm.clone() })
            .collect(),
        memory: memory(p, t),
        descriptors: p.fds.iter().map(|fd| descriptor(fd, p, t, m, sockets)).collect(),
    }
}

fn memory(p: &model::Process, t: &Tree) -> MemoryInfo {
    let mut by_kind: BTreeMap<usize, MemoryKindInfo> = BTreeMap::new();
    let mut mappings = Vec::with_capacity(p.vmas.len());
    let (mut mapped, mut stored, mut shared_stored, mut parent_stored) = (0u64, 0u64, 0u64, 0u64);
    for v in &p.vmas {
        let (kind, path) = vma_kind(v, t);
        let len = v.end.saturating_sub(v.start);
        let mut vma_stored = 0u64;
        for run in v.pages.iter().filter(|r| r.offset.is_some()) {
            let bytes = run.pages.saturating_mul(PAGE_SIZE);
            vma_stored = vma_stored.saturating_add(bytes);
            match (run.image, run.from_pid) {
                (1.., _) => parent_stored = parent_stored.saturating_add(bytes),
                (0, Some(_)) => shared_stored = shared_stored.saturating_add(bytes),
                (0, None) => stored = stored.saturating_add(bytes),
            }
        }
        mapped = mapped.saturating_add(len);
        let idx = MEMORY_KINDS.iter().position(|k| *k == kind).unwrap_or(0);
        let k = by_kind.entry(idx).or_insert(MemoryKindInfo {
            kind: MEMORY_KINDS[idx],
            mappings: 0,
            mapped_bytes: 0,
            stored_bytes: 0,
        });
        k.mappings += 1;
        k.mapped_bytes = k.mapped_bytes.saturating_add(len);
        k.stored_bytes = k.stored_bytes.saturating_add(vma_stored);
        mappings.push(MappingInfo {
            start: format!("{:#x}", v.start),
            end: format!("{:#x}", v.end),
            perms: perms(v),
            kind,
            path,
            mapped_bytes: len,
            stored_bytes: vma_stored,
        });
    }
    MemoryInfo {
        mapped_bytes: mapped,
        stored_bytes: stored,
        shared_stored_bytes: shared_stored,
        parent_stored_bytes: parent_stored,
        compressed_bytes: p
            .page_frames
            .as_ref()
            .map(|f| f.frames.iter().map(|&n| u64::from(n)).fold(0, u64::saturating_add)),
        by_kind: by_kind.into_values().collect(),
        mappings,
    }
}

fn perms(v: &model::Vma) -> String {
    use model::prot::{EXEC, READ, WRITE};
    let bit = |b: u32, c: char| if v.prot & b != 0 { c } else { '-' };
    [bit(READ, 'r'), bit(WRITE, 'w'), bit(EXEC, 'x'), if v.shared { 's' } else { 'p' }]
        .iter()
        .collect()
}

fn file_path(t: &Tree, index: usize) -> String {
    match t.files.get(index) {
        Some(f) => match &f.memfd {
            Some(m) => format!("memfd:{}", m.name),
            None => f.path.clone(),
        },
        None => format!("<invalid file index {index}>"),
    }
}

fn vma_kind(v: &model::Vma, t: &Tree) -> (&'static str, Option<String>) {
    match &v.kind {
        VmaKind::Anon { heap: true } => ("heap", None),
        VmaKind::Anon { heap: false } if v.shared => ("shared_anon", None),
        VmaKind::Anon { heap: false } => ("anon", None),
        VmaKind::Stack => ("stack", None),
        VmaKind::File { file, .. } => {
            (if v.shared { "shared_file" } else { "file" }, Some(file_path(t, *file)))
        }
        VmaKind::Vdso { .. } => ("vdso", None),
        VmaKind::Vvar { name } => ("vvar", Some(name.clone())),
        VmaKind::SysvShm { shmid, key, .. } => {
            ("sysv_shm", Some(format!("SYSV key={key:#x} shmid={shmid}")))
        }
        VmaKind::Vsyscall => ("vsyscall", None),
    }
}

fn access(flags: i32) -> &'static str {
    match flags & libc::O_ACCMODE {
        libc::O_RDONLY => "read",
        libc::O_WRONLY => "write",
        _ => "read_write",
    }
}

fn sock_type(t: i32) -> &'static str {
    match t {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "dgram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "other",
    }
}

fn addr(hex_sockaddr: &str) -> String {
    match hex::decode(hex_sockaddr) {
        Ok(raw) if raw.is_empty() => "unbound".into(),
        Ok(raw) => torpor_sys::sock::describe_addr(&raw),
        Err(_) => "an unreadable address".into(),
    }
}

fn descriptor(
    fd: &model::Fd,
    p: &model::Process,
    t: &Tree,
    m: Option<&Manifest>,
    sockets: &HashMap<u64, (i32, i32)>,
) -> FdInfo {
    let mut d = FdInfo { fd: fd.fd, cloexec: fd.cloexec, ..FdInfo::default() };
    let Some(of) = p.open_files.get(fd.open_file) else {
        d.kind = "invalid";
        d.summary = format!("open file index {} out of range", fd.open_file);
        return d;
    };
    let queued = |name: &Option<String>| name.as_deref().and_then(|n| file_len(m, n));
    match &of.kind {
        OpenFileKind::Regular { file } => {
            d.kind = "file";
            d.path = Some(file_path(t, *file));
            d.access = Some(access(of.flags));
            d.position = Some(of.pos);
            let deleted = t.files.get(*file).is_some_and(|f| f.saved_content.is_some());
            d.deleted = Some(deleted);
            d.summary = format!(
                "{}{} ({}, offset {})",
                d.path.as_deref().unwrap_or_default(),
                if deleted { " (deleted, content saved)" } else { "" },
                access(of.flags),
                of.pos
            );
        }
        OpenFileKind::ProcFile { path } => {
            d.kind = "proc_file";
            d.path = Some(path.clone());
            d.access = Some(access(of.flags));
            d.summary = format!("{path} ({})", access(of.flags));
        }
        OpenFileKind::Directory { path } => {
            d.kind = "directory";
            d.path = Some(path.clone());
            d.summary = path.clone();
        }
        OpenFileKind::CharDevice { path, .. } => {
            d.kind = "char_device";
            d.path = Some(path.clone());
            d.access = Some(access(of.flags));
            d.summary = format!("{path} ({})", access(of.flags));
        }
        OpenFileKind::Pipe { ino, write, data, path, .. } => {
            d.kind = if path.is_some() { "fifo" } else { "pipe" };
            d.path = path.clone();
            d.inode = Some(*ino);
            let end = if *write { "write" } else { "read" };
            d.access = Some(end);
            d.queued_bytes = Some(queued(data).unwrap_or(0));
            d.summary = format!(
                "{} {end} end, inode {ino}{}",
                match path {
                    Some(p) => format!("FIFO {p},"),
                    None => "pipe,".into(),
                },
                match d.queued_bytes {
                    Some(n) if n > 0 => format!(", {n} bytes unread"),
                    _ => String::new(),
                }
            );
        }
        OpenFileKind::PtyMaster { index } => {
            d.kind = "pty_master";
            d.pty = Some(*index);
            d.summary = format!("pseudo-terminal master of /dev/pts/{index}");
        }
        OpenFileKind::PtySlave { index } => {
            d.kind = "pty_slave";
            d.pty = Some(*index);
            d.path = Some(format!("/dev/pts/{index}"));
            d.summary = format!("pseudo-terminal /dev/pts/{index}");
        }
        OpenFileKind::Inherited { fd } => {
            d.kind = "inherited";
            d.summary = format!("connected on restore to torpor's own descriptor {fd}");
        }
        OpenFileKind::Inet {
            family,
            sock_type: st,
            local,
            peer,
            listen_backlog,
            tcp,
            queue,
            ended,
            ..
        } => {
            let is_tcp = *st == libc::SOCK_STREAM;
            d.kind = if is_tcp { "tcp" } else { "udp" };
            d.family = Some(if *family == libc::AF_INET6 { "ipv6" } else { "ipv4" });
            d.socket_type = Some(sock_type(*st));
            d.local = Some(addr(local));
            d.peer = peer.as_deref().map(addr);
            d.state = Some(match (listen_backlog, tcp, &d.peer, local.is_empty()) {
                _ if *ended => "ended",
                (Some(_), _, _, _) => "listening",
                (_, Some(_), _, _) => "established",
                (_, _, Some(_), _) => "connected",
                (_, _, _, true) => "unbound",
                _ => "bound",
            });
            if let Some(tcp) = tcp {
                d.queued_bytes = Some(u64::from(tcp.recv_len));
            } else if queue.is_some() {
                d.queued_bytes = queued(queue);
            }
            let proto = if is_tcp { "TCP" } else { "UDP" };
            let local = d.local.as_deref().unwrap_or_default();
            d.summary = match (d.state, &d.peer) {
                (Some("listening"), _) => format!("{proto} listening on {local}"),
                (Some("unbound"), _) => format!("{proto} socket, unbound"),
                (Some("ended"), _) => {
                    format!("{proto} socket on {local} whose connection has ended")
                }
                (_, Some(peer)) => {
                    format!("{proto} {local} -> {peer} ({})", d.state.unwrap_or_default())
                }
                _ => format!("{proto} bound to {local}"),
            };
        }
        OpenFileKind::EventFd { count, semaphore } => {
            d.kind = "eventfd";
            d.count = Some(*count);
            d.summary =
                format!("eventfd, count {count}{}", if *semaphore { ", semaphore" } else { "" });
        }
        OpenFileKind::SignalFd { mask } => {
            d.kind = "signalfd";
            let sigs: Vec<String> =
                (1..=64).filter(|s| mask & (1u64 << (s - 1)) != 0).map(|s| s.to_string()).collect();
            d.summary = format!("signalfd for signals {}", sigs.join(","));
        }
        OpenFileKind::TimerFd { ticks, value_ns, interval_ns, .. } => {
            d.kind = "timerfd";
            d.count = Some(*ticks);
            d.summary = if *value_ns == 0 && *interval_ns == 0 {
                "timerfd, disarmed".into()
            } else {
                format!(
                    "timerfd, next in {}, every {}",
                    ns(*value_ns),
                    if *interval_ns == 0 { "once".into() } else { ns(*interval_ns) }
                )
            };
        }
        OpenFileKind::Inotify { watches } => {
            d.kind = "inotify";
            let paths: Vec<String> = watches.iter().map(|w| w.path.clone()).collect();
            d.summary = format!("inotify watching {}", list_or_none(&paths));
            d.watches = Some(paths);
        }
        OpenFileKind::Epoll { targets } => {
            d.kind = "epoll";
            let fds: Vec<i32> = targets.iter().map(|e| e.fd).collect();
            let names: Vec<String> = fds.iter().map(|f| f.to_string()).collect();
            d.summary = format!("epoll watching fds {}", list_or_none(&names));
            d.targets = Some(fds);
        }
        OpenFileKind::UnixBound { sock_type: st, name, listen_backlog, queue, .. } => {
            d.kind = "unix";
            d.family = Some("unix");
            d.socket_type = Some(sock_type(*st));
            d.local = Some(name.clone());
            d.state = Some(match (listen_backlog, name.is_empty()) {
                (Some(_), _) => "listening",
                (None, true) => "unbound",
                (None, false) => "bound",
            });
            d.queued_bytes = queued(queue);
            d.summary = match d.state {
                Some("listening") => format!("unix {} listening on {name}", sock_type(*st)),
                Some("bound") => format!("unix {} bound to {name}", sock_type(*st)),
                _ => format!("unix {} socket, unbound", sock_type(*st)),
            };
        }
        OpenFileKind::UnixExternal { sock_type: st, name, peer_name, .. } => {
            d.kind = "unix";
            d.family = Some("unix");
            d.socket_type = Some(sock_type(*st));
            d.state = Some("external");
            d.local = (!name.is_empty()).then(|| name.clone());
            d.peer = Some(peer_name.clone());
            d.queued_bytes = Some(0);
            d.summary = format!(
                "unix {} connected outside the tree to {peer_name} (connected again on restore)",
                sock_type(*st)
            );
        }
        OpenFileKind::UnixPair { ino, peer, sock_type: st, queue, name, .. } => {
            d.kind = "unix";
            d.family = Some("unix");
            d.socket_type = Some(sock_type(*st));
            d.state = Some("connected");
            d.inode = Some(*ino);
            d.local = (!name.is_empty()).then(|| name.clone());
            d.queued_bytes = Some(queued(queue).unwrap_or(0));
            let other = sockets.get(peer);
            d.peer_pid = other.map(|o| o.0);
            d.peer_fd = other.map(|o| o.1);
            d.summary = format!(
                "unix {} connected to {}{}",
                sock_type(*st),
                match other {
                    Some((pid, fd)) => format!("pid {pid} fd {fd}"),
                    None => format!("socket inode {peer}"),
                },
                match d.queued_bytes {
                    Some(n) if n > 0 => format!(", {n} bytes unread"),
                    _ => String::new(),
                }
            );
        }
    }
    d.locks = p.file_locks.iter().filter(|l| l.fd == fd.fd).map(describe_lock).collect();
    if !d.locks.is_empty() {
        d.summary += &format!(", holding {}", d.locks.join(", "));
    }
    d
}

/// A file lock in words: `flock write lock`, `POSIX read lock on bytes 0-99`.
fn describe_lock(l: &model::FileLock) -> String {
    let kind = match l.kind {
        model::LockKind::Flock => return format!("flock {} lock", rw(l.write)),
        model::LockKind::Posix => "POSIX",
        model::LockKind::Ofd => "OFD",
    };
    match l.end {
        Some(end) => format!("{kind} {} lock on bytes {}-{end}", rw(l.write), l.start),
        None => format!("{kind} {} lock from byte {} to the end", rw(l.write), l.start),
    }
}

fn rw(write: bool) -> &'static str {
    if write {
        "write"
    } else {
        "read"
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "nothing".into()
    } else {
        items.join(", ")
    }
}

fn ns(v: u64) -> String {
    match v {
        v if v >= 1_000_000_000 => format!("{:.1} s", v as f64 / 1e9),
        v if v >= 1_000_000 => format!("{:.1} ms", v as f64 / 1e6),
        v => format!("{:.1} us", v as f64 / 1e3),
    }
}

/// "5 minutes ago" for a time in the past, for the text form.
fn ago(secs: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let Some(d) = now.checked_sub(secs) else { return "in the future".into() };
    let (n, unit) = match d {
        d if d < 120 => (d, "seconds"),
        d if d < 2 * 3600 => (d / 60, "minutes"),
        d if d < 2 * 86400 => (d / 3600, "hours"),
        d => (d / 86400, "days"),
    };
    format!("{n} {unit} ago")
}

fn command_line(p: &ProcessInfo) -> String {
    if p.command.is_empty() {
        format!("[{}]", one_line(&p.name))
    } else {
        command_text(&p.command)
    }
}

/// A command line on one line of text: arguments joined by spaces, control characters
/// (a newline in `python3 -c '...'`) escaped as in Rust strings.
pub(crate) fn command_text(args: &[String]) -> String {
    args.iter().map(|a| one_line(a)).collect::<Vec<_>>().join(" ")
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
        .collect()
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The text form.
pub fn render(r: &Report, out: &mut String) {
    let status = if r.complete { "complete" } else { "DAMAGED or incomplete" };
    let _ = writeln!(out, "Image {}: {status}", r.dir);
    match &r.image {
        Some(i) => {
            let _ = writeln!(
                out,
                "  made by torpor {} on Linux {} ({}), {} ({})",
                i.torpor_version,
                i.kernel_release,
                i.arch,
                i.created,
                ago(i.created_unix)
            );
            let _ = writeln!(
                out,
                "  format version {}{}, {}, {}",
                i.format_version,
                if i.encrypted { ", encrypted" } else { "" },
                plural(i.files, "file", "files"),
                human(i.bytes)
            );
            if let Some(parent) = &i.parent {
                let _ = writeln!(out, "  incremental: unchanged pages are in {parent}");
            }
        }
        None => out.push_str("  manifest unreadable: version and creation time unknown\n"),
    }
    if !r.problems.is_empty() {
        out.push_str("\nProblems:\n");
        for p in &r.problems {
            let _ = writeln!(out, "  - {p}");
        }
        out.push_str(
            "  (what could be read is shown below; `torpor verify -D DIR` checks the page data \
             too)\n",
        );
    }
    if r.processes.is_empty() && r.zombies.is_empty() {
        out.push_str("\nNo process records could be read.\n");
        return;
    }

    let _ = writeln!(
        out,
        "\nProcesses (root {}, {}{}{}):",
        r.root_pid.map_or("unknown".to_string(), |p| p.to_string()),
        plural(r.processes.len(), "process", "processes"),
        if r.zombies.is_empty() {
            String::new()
        } else {
            format!(", {}", plural(r.zombies.len(), "zombie", "zombies"))
        },
        if r.pid_namespace { ", own pid namespace" } else { "" }
    );
    render_tree(r, out);

    for p in &r.processes {
        render_process(p, out);
    }
}

/// The process tree, drawn with box characters, zombies under their parents.
fn render_tree(r: &Report, out: &mut String) {
    enum Node<'a> {
        Live(&'a ProcessInfo),
        Zombie(&'a ZombieInfo),
    }
    let pids: HashSet<i32> = r.processes.iter().map(|p| p.pid).collect();
    let mut children: HashMap<i32, Vec<Node>> = HashMap::new();
    let mut roots = Vec::new();
    for p in &r.processes {
        if pids.contains(&p.ppid) && p.ppid != p.pid {
            children.entry(p.ppid).or_default().push(Node::Live(p));
        } else {
            roots.push(Node::Live(p));
        }
    }
    for z in &r.zombies {
        if pids.contains(&z.ppid) {
            children.entry(z.ppid).or_default().push(Node::Zombie(z));
        } else {
            roots.push(Node::Zombie(z));
        }
    }

    fn line(n: &Node, out: &mut String, lead: &str, branch: &str) {
        match n {
            Node::Live(p) => {
                let _ = writeln!(
                    out,
                    "  {} {:<40} {:>11}  {:>9} stored / {} mapped",
                    pad(&format!("{lead}{branch}{}", p.pid), 16),
                    truncate(&command_line(p), 40),
                    plural(p.threads.len(), "thread", "threads"),
                    human(p.memory.stored_bytes),
                    human(p.memory.mapped_bytes)
                );
            }
            Node::Zombie(z) => {
                let how = match (z.exit_code, z.signal) {
                    (Some(c), _) => format!("exited with code {c}"),
                    (_, Some(s)) => format!("killed by signal {s}"),
                    _ => "exited".into(),
                };
                let _ = writeln!(
                    out,
                    "  {} [{}] zombie: {how}, not yet reaped",
                    pad(&format!("{lead}{branch}{}", z.pid), 16),
                    one_line(&z.name)
                );
            }
        }
    }
    fn walk(
        n: &Node,
        children: &HashMap<i32, Vec<Node>>,
        seen: &mut HashSet<i32>,
        out: &mut String,
        lead: &str,
        branch: &str,
        next_lead: &str,
    ) {
        line(n, out, lead, branch);
        let Node::Live(p) = n else { return };
        // A damaged image may hold a cycle of parents: each process is drawn once.
        if !seen.insert(p.pid) {
            return;
        }
        let kids = children.get(&p.pid).map(Vec::as_slice).unwrap_or_default();
        for (i, k) in kids.iter().enumerate() {
            let last = i + 1 == kids.len();
            let (b, nl) = if last { ("└─ ", "   ") } else { ("├─ ", "│  ") };
            let lead = format!("{lead}{next_lead}");
            walk(k, children, seen, out, &lead, b, nl);
        }
    }
    let mut seen = HashSet::new();
    for n in &roots {
        walk(n, &children, &mut seen, out, "", "", "");
    }
    // Processes whose parents form a cycle (a damaged image) are reached from no root.
    for p in &r.processes {
        if !seen.contains(&p.pid) {
            walk(&Node::Live(p), &children, &mut seen, out, "", "", "");
        }
    }
}

/// `s` padded with spaces to `width` characters (box characters count as one).
fn pad(s: &str, width: usize) -> String {
    let n = s.chars().count();
    format!("{s}{}", " ".repeat(width.saturating_sub(n)))
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// How many threads the text form names before it sums up the rest.
const THREADS_SHOWN: usize = 8;

fn render_process(p: &ProcessInfo, out: &mut String) {
    let _ = writeln!(out, "\nProcess {}: {}", p.pid, command_line(p));
    let _ = writeln!(
        out,
        "  parent {}, group {}, session {}, uid {}, gid {}, cwd {}",
        p.ppid, p.pgid, p.sid, p.uid, p.gid, p.cwd
    );
    let mut names: Vec<String> = p
        .threads
        .iter()
        .take(THREADS_SHOWN)
        .map(|t| format!("{} {}", t.tid, one_line(&t.name)))
        .collect();
    if p.threads.len() > THREADS_SHOWN {
        names.push(format!("and {} more", p.threads.len() - THREADS_SHOWN));
    }
    let _ = writeln!(out, "  threads ({}): {}", p.threads.len(), names.join(", "));

    let m = &p.memory;
    let mut extra = Vec::new();
    if let Some(c) = m.compressed_bytes.filter(|_| m.stored_bytes > 0) {
        extra.push(format!("compressed to {}", human(c)));
    }
    if m.shared_stored_bytes > 0 {
        extra.push(format!("+ {} shared with another process", human(m.shared_stored_bytes)));
    }
    if m.parent_stored_bytes > 0 {
        extra.push(format!("+ {} unchanged, in the parent image", human(m.parent_stored_bytes)));
    }
    let _ = writeln!(
        out,
        "  memory: {} mapped, {} stored{}",
        human(m.mapped_bytes),
        human(m.stored_bytes),
        if extra.is_empty() { String::new() } else { format!(" ({})", extra.join(", ")) }
    );
    let _ = writeln!(out, "    {:<12} {:>8} {:>11} {:>11}", "kind", "mappings", "mapped", "stored");
    for k in &m.by_kind {
        let _ = writeln!(
            out,
            "    {:<12} {:>8} {:>11} {:>11}",
            k.kind,
            k.mappings,
            human(k.mapped_bytes),
            human(k.stored_bytes)
        );
    }
    if p.descriptors.is_empty() {
        out.push_str("  descriptors: none\n");
        return;
    }
    out.push_str("  descriptors:\n");
    for d in &p.descriptors {
        let _ = writeln!(out, "    {:>4}  {:<12} {}", d.fd, d.kind, d.summary);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_status_reads_as_exit_code_or_signal() {
        let z = |exit_status| model::Zombie {
            pid: 2,
            ppid: 1,
            pgid: 1,
            sid: 1,
            exit_status,
            comm: "x".into(),
        };
        let exited = zombie(&z(42 << 8));
        assert_eq!((exited.exit_code, exited.signal), (Some(42), None));
        let killed = zombie(&z(libc::SIGKILL));
        assert_eq!((killed.exit_code, killed.signal), (None, Some(libc::SIGKILL)));
    }

    #[test]
    fn socket_addresses_read_as_people_write_them() {
        // sockaddr_in for 127.0.0.1:8080, then sockaddr_in6 for [::1]:443.
        let mut v4 = vec![0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(addr(&hex::encode(&v4)), "127.0.0.1:8080");
        let mut v6 = vec![0u8; 28];
        v6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&443u16.to_be_bytes());
        v6[23] = 1;
        assert_eq!(addr(&hex::encode(&v6)), "[::1]:443");
        assert_eq!(addr(""), "unbound");
        assert_eq!(addr("zz"), "an unreadable address");
    }

    #[test]
    fn control_characters_are_escaped_on_one_line() {
        let args = ["sh".to_string(), "-c".into(), "a\nb\tc".into()];
        assert_eq!(command_text(&args), "sh -c a\\nb\\tc");
    }

    #[test]
    fn padding_and_truncation_count_characters() {
        assert_eq!(pad("├─ 12", 8), "├─ 12   ");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }

    #[test]
    fn an_empty_report_renders_without_records() {
        let p = PartialImage {
            dir: "/nowhere".into(),
            manifest: None,
            tree: None,
            problems: vec![torpor_image::ImageError::NoManifest { dir: "/nowhere".into() }],
        };
        let r = build(&p);
        assert!(!r.complete);
        let mut out = String::new();
        render(&r, &mut out);
        assert!(out.contains("DAMAGED") && out.contains("No process records"), "{out}");
    }
}
