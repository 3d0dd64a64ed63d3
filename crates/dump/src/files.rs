//! Files a process has open or mapped, and its descriptor table.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

use torpor_image::model::{self, Fd, FileInfo, OpenFile, OpenFileKind};
use torpor_image::{records, ImageWriter};
use torpor_sys::{proc, pty, sock};

use crate::collect::UnsupportedReason;
use crate::ptys::{pty_master, pty_slave};
use crate::{DumpError, Result};

/// Files larger than this are identified by size, mtime and inode only, not by content.
const HASH_LIMIT: u64 = 64 << 20;

/// The files an image refers to, each once.
#[derive(Default)]
pub(crate) struct FileTable {
    infos: Vec<FileInfo>,
    by_inode: HashMap<(u64, u64), usize>,
    /// Deleted files: index and a `/proc` path that still opens the inode.
    deleted: Vec<(usize, String)>,
}

impl FileTable {
    /// Records the file that `open_path` (a `/proc/PID/fd/N` or `/proc/PID/map_files/...`
    /// link, which opens the very inode the process uses) refers to; `name` is the path
    /// the kernel shows for it. A file whose path no longer leads to that inode is saved
    /// whole into the image.
    pub fn add_path(&mut self, _pid: i32, open_path: &str, name: &str) -> io::Result<usize> {
        let meta = fs::metadata(open_path)?;
        let key = (meta.dev(), meta.ino());
        if let Some(&i) = self.by_inode.get(&key) {
            return Ok(i);
        }
        let path = name.strip_suffix(" (deleted)").unwrap_or(name).to_string();
        let still_there = fs::metadata(&path).map(|m| (m.dev(), m.ino()) == key).unwrap_or(false);
        let idx = self.infos.len();
        let content_xxh3 = if meta.is_file() && meta.size() <= HASH_LIMIT {
            Some(torpor_image::hash_file(open_path)?)
        } else {
            None
        };
        let saved_content = if still_there {
            None
        } else {
            self.deleted.push((idx, open_path.to_string()));
            Some(format!("file-{idx}.img"))
        };
        let memfd = path.strip_prefix("/memfd:").map(|name| model::Memfd {
            name: name.to_string(),
            seals: seals(open_path).unwrap_or(0),
        });
        self.infos.push(FileInfo {
            path,
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            mode: meta.mode(),
            content_xxh3,
            saved_content,
            memfd,
        });
        self.by_inode.insert(key, idx);
        Ok(idx)
    }

    /// Copies the content of every deleted file into the image.
    pub fn save_deleted(&self, pid: i32, writer: &mut ImageWriter) -> Result<()> {
        for (idx, open_path) in &self.deleted {
            let info = &self.infos[*idx];
            let name = info.saved_content.as_deref().expect("deleted files have a name");
            let what = format!("the content of deleted file {}", info.path);
            let mut src = File::open(open_path).map_err(|source| DumpError::SaveFile {
                pid,
                what: what.clone(),
                source,
            })?;
            let mut out = writer.create_file(name)?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = src.read(&mut buf).map_err(|source| DumpError::SaveFile {
                    pid,
                    what: what.clone(),
                    source,
                })?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])?;
            }
            writer.finish_file(out)?;
        }
        Ok(())
    }

    pub fn into_infos(self) -> Vec<FileInfo> {
        self.infos
    }
}

/// A memfd's seals (`F_GET_SEALS`), through any path that opens it.
fn seals(open_path: &str) -> Option<u32> {
    let f = File::open(open_path).ok()?;
    // SAFETY: fcntl on a descriptor we own.
    let s = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), libc::F_GET_SEALS) };
    (s >= 0).then_some(s as u32)
}

/// What kind of descriptor a `/proc/PID/fd` link names, for messages.
fn describe(link: &str, ft: Option<fs::FileType>) -> String {
    if let Some(rest) = link.strip_prefix("anon_inode:") {
        return format!("an anonymous-inode descriptor ({rest})");
    }
    if link.starts_with("pipe:") {
        return format!("a pipe ({link})");
    }
    if link.starts_with("socket:") {
        return format!("a socket ({link})");
    }
    if link.starts_with("/memfd:") {
        return format!("a memfd ({link})");
    }
    match ft {
        Some(t) if t.is_fifo() => format!("a FIFO ({link})"),
        Some(t) if t.is_block_device() => format!("a block device ({link})"),
        Some(t) if t.is_socket() => format!("a socket ({link})"),
        _ => format!("an unsupported file ({link})"),
    }
}

/// A descriptor of a process and the open file description it uses.
#[derive(Clone, Copy)]
struct Holder {
    pid: i32,
    fd: i32,
    id: u64,
}

/// What the dump knows of a pipe so far.
struct PipeSeen {
    has_read: bool,
    has_write: bool,
    /// A descriptor holding it, for messages.
    pid: i32,
    fd: i32,
    /// The image file with its unread bytes.
    data: Option<String>,
}

/// Where the dump saw the two sides of a pseudo-terminal pair: (pid, fd) of one
/// descriptor of each.
#[derive(Default)]
pub(crate) struct PtySeen {
    pub master: Option<(i32, i32)>,
    pub slave: Option<(i32, i32)>,
}

/// What the dump learns about descriptors across the whole tree: which open file
/// descriptions processes share, and the pipes and sockets whose ends must all be inside.
#[derive(Default)]
pub(crate) struct FdContext {
    /// Descriptors seen so far, by inode.
    by_inode: HashMap<(u64, u64), Vec<Holder>>,
    next_id: u64,
    /// Pipes by inode.
    pipes: HashMap<u64, PipeSeen>,
    /// Unix sockets of the tree by inode, with their peer and a (pid, fd) holding them.
    sockets: HashMap<u64, (u64, (i32, i32))>,
    pub(crate) unix: Option<HashMap<u64, sock::UnixInfo>>,
    tcp: Option<HashMap<u64, sock::TcpDiag>>,
    /// Save established TCP connections (`--tcp-established`).
    pub tcp_established: bool,
    /// Unix socket peers outside the tree the user named as external (`--external`).
    pub external_unix: Vec<crate::ExternalUnix>,
    /// Terminals on descriptors 0 to 2 are the restoring shell's (`--shell-job`).
    pub shell_job: bool,
    /// The modes of such a terminal, per process.
    pub termios: HashMap<i32, String>,
    /// Pseudo-terminal pairs by slave number: a descriptor of the tree holding each side.
    pub(crate) ptys: std::collections::BTreeMap<u32, PtySeen>,
    /// The modes of a pseudo-terminal on a standard descriptor, per process, for when it
    /// turns out to be the restoring shell's (`--shell-job`).
    pub(crate) pty_termios: HashMap<i32, String>,
    /// Copies of the TCP sockets put in repair mode, to take out of it again if the
    /// process runs on; when it is killed instead, they close silently.
    pub repaired: Vec<std::os::fd::OwnedFd>,
    /// Name of the firewall rules holding back the saved connections' peers, and whether
    /// any rule was set.
    pub lock_tag: String,
    pub locked: bool,
    /// Where each connection put in repair mode and each lock is noted for the guard.
    pub(crate) journal: torpor_sys::guard::Journal,
}

impl FdContext {
    /// Takes the connections torpor put in repair mode out of it, so they carry on (after
    /// a failed dump, or with `--leave-running`).
    pub fn end_repair(&mut self) {
        for s in self.repaired.drain(..) {
            if let Err(e) = sock::set_tcp_opt(&s, sock::tcp_repair::TCP_REPAIR, 0) {
                tracing::warn!("cannot take a TCP connection out of repair mode: {e}");
            }
        }
        if self.locked {
            if let Err(e) = torpor_sys::netlock::unlock(&self.lock_tag) {
                tracing::warn!("cannot remove the firewall rules {}: {e}", self.lock_tag);
            }
            self.locked = false;
        }
    }

    /// Holds back a connection's peer before its state is read: bytes arriving later
    /// would be acknowledged to the peer yet missing from the image.
    fn lock(&mut self, local: &[u8], peer: &[u8]) {
        let (Some(local), Some(peer)) = (sock::to_socket_addr(local), sock::to_socket_addr(peer))
        else {
            return;
        };
        if !self.locked && !torpor_sys::netlock::available() {
            tracing::warn!(
                "nft is not installed: a peer that sends to a hibernated connection before the \
                 restore will get a reset"
            );
            return;
        }
        crate::guard::note(&self.journal, crate::guard::Note::Lock { tag: &self.lock_tag });
        match torpor_sys::netlock::lock(
            &[torpor_sys::netlock::Conn { local, peer }],
            &self.lock_tag,
        ) {
            Ok(()) => {
                self.locked = true;
                torpor_sys::test_point("dump:locked", 0);
            }
            Err(e) => tracing::warn!("cannot hold back the peer {peer} of {local}: {e}"),
        }
    }

    fn unix_info(&mut self, pid: i32) -> Result<&HashMap<u64, sock::UnixInfo>> {
        if self.unix.is_none() {
            let all = sock::unix_sockets().map_err(|source| DumpError::Collect {
                pid,
                what: "the unix sockets of this system".into(),
                source,
            })?;
            self.unix = Some(all);
        }
        Ok(self.unix.as_ref().unwrap())
    }

    /// What sock_diag says of TCP socket `ino`. Read once: it serves for listeners,
    /// whose state torpor does not change, and for the shut-down flags of connections,
    /// which only the process sets.
    fn tcp_diag(&mut self, pid: i32, ino: u64) -> Result<Option<sock::TcpDiag>> {
        if self.tcp.is_none() {
            let all = sock::tcp_sockets().map_err(|source| DumpError::Collect {
                pid,
                what: "the TCP sockets of this system".into(),
                source,
            })?;
            self.tcp = Some(all);
        }
        Ok(self.tcp.as_ref().unwrap().get(&ino).copied())
    }

    /// Refuses pipes and sockets connected to a process outside the tree, or, with
    /// `inherit_stdio`, turns those on descriptors 0 to 2 into ones restore inherits, and
    /// unix sockets whose peer the user named (`external_unix`) into external ones.
    pub fn check_closed(
        &self,
        tree: &[i32],
        processes: &mut [model::Process],
        inherit_stdio: bool,
        writer: &mut ImageWriter,
    ) -> Result<()> {
        let mut external = Vec::new();
        for (&ino, seen) in &self.pipes {
            let (pid, fd) = (seen.pid, seen.fd);
            if seen.has_read && seen.has_write {
                continue;
            }
            if let Some(holder) = outside_holder(&format!("pipe:[{ino}]"), tree) {
                if inherit_stdio
                    && inherit(
                        processes,
                        |k| matches!(k, OpenFileKind::Pipe { ino: i, .. } if *i == ino),
                    )
                {
                    external.push(ino);
                    continue;
                }
                return Err(DumpError::Unsupported {
                    pid,
                    reason: UnsupportedReason::External {
                        fd,
                        what: format!("pipe:[{ino}]"),
                        holder,
                    },
                });
            }
        }
        let mut outside: Vec<_> = self
            .sockets
            .iter()
            .filter(|(_, (peer, _))| *peer != 0 && !self.sockets.contains_key(peer))
            .map(|(&ino, &(peer, at))| ((ino, peer), at))
            .collect();
        // Descriptor order, so that the first refusal is always the same one.
        outside.sort_by_key(|&(_, at)| at);
        for (sock, at) in outside {
            self.outside_unix_peer(tree, processes, sock, at, inherit_stdio)?;
        }
        if processes
            .iter()
            .flat_map(|p| &p.open_files)
            .any(|o| matches!(o.kind, OpenFileKind::UnixExternal { .. }))
        {
            writer.needs_version(3);
        }
        Ok(())
    }
}

/// Turns the open files matching `is` into ones restore inherits, if each of them is on
/// a standard descriptor (0 to 2) of its process; returns whether it did. Restore's own
/// descriptor of that number stands for it, on that descriptor and on any other the
/// process has of the same open file (an interactive shell keeps a copy of its terminal
/// on descriptor 255).
pub(crate) fn inherit(
    processes: &mut [model::Process],
    is: impl Fn(&OpenFileKind) -> bool,
) -> bool {
    // (process index, open file index) -> the lowest standard descriptor on it, if any.
    let mut uses: std::collections::BTreeMap<(usize, usize), Option<i32>> = Default::default();
    for (pi, p) in processes.iter().enumerate() {
        for f in p.fds.iter().filter(|f| is(&p.open_files[f.open_file].kind)) {
            let std_fd = (0..=2).contains(&f.fd).then_some(f.fd);
            let slot = uses.entry((pi, f.open_file)).or_insert(std_fd);
            *slot = match (*slot, std_fd) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
    let on_std: Option<Vec<((usize, usize), i32)>> =
        uses.into_iter().map(|(k, fd)| fd.map(|fd| (k, fd))).collect();
    match on_std {
        Some(all) if !all.is_empty() => {
            for ((pi, of), fd) in all {
                processes[pi].open_files[of].kind = OpenFileKind::Inherited { fd };
            }
            true
        }
        _ => false,
    }
}

/// A process outside `tree` holding a descriptor whose link reads `link`, for messages.
pub(crate) fn outside_holder(link: &str, tree: &[i32]) -> Option<String> {
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if tree.contains(&pid) {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for f in fds.flatten() {
            if fs::read_link(f.path()).map(|l| l.to_string_lossy() == link).unwrap_or(false) {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                return Some(format!("{} (pid {pid})", comm.trim()));
            }
        }
    }
    None
}

/// Reads the descriptor table: each descriptor, the open file descriptions they share
/// with each other and with processes dumped before, and the file locks held through
/// them.
pub(crate) fn collect_fds(
    pid: i32,
    files: &mut FileTable,
    ctx: &mut FdContext,
    writer: &mut ImageWriter,
) -> Result<(Vec<OpenFile>, Vec<Fd>, Vec<model::FileLock>)> {
    let err = |what: String| move |source| DumpError::Collect { pid, what, source };
    let mut open_files: Vec<OpenFile> = Vec::new();
    let mut fds: Vec<Fd> = Vec::new();
    // Description id to its index in this process's `open_files`.
    let mut local: HashMap<u64, usize> = HashMap::new();
    let mut locks: Vec<model::FileLock> = Vec::new();
    // A lock shows under every descriptor of its description (and, for a POSIX lock,
    // of the process): taken once, with the file's identity.
    let mut seen_locks: HashSet<(model::LockKind, bool, u64, Option<u64>, u64, u64)> =
        HashSet::new();

    for fd in proc::fds(pid).map_err(err("its descriptors".into()))? {
        let link_path = format!("/proc/{pid}/fd/{fd}");
        let link = proc::readlink(&link_path).map_err(err(format!("fd {fd}")))?;
        let info = proc::fdinfo(pid, fd).map_err(err(format!("fd {fd}")))?;
        let unsupported = |kind: String| DumpError::Unsupported {
            pid,
            reason: UnsupportedReason::Fd { fd, kind },
        };
        let Some(meta) = fs::metadata(&link_path).ok() else {
            return Err(unsupported(describe(&link, None)));
        };
        let ft = meta.file_type();
        let anon_kind = match link.as_str() {
            "anon_inode:[eventfd]" => Some(eventfd(&info.text).ok_or_else(|| {
                unsupported(format!("an eventfd whose state cannot be read ({link})"))
            })?),
            "anon_inode:[signalfd]" => Some(signalfd(&info.text).ok_or_else(|| {
                unsupported(format!("a signalfd whose mask cannot be read ({link})"))
            })?),
            "anon_inode:[timerfd]" => Some(timerfd(&info.text).ok_or_else(|| {
                unsupported(format!("a timerfd whose state cannot be read ({link})"))
            })?),
            "anon_inode:inotify" => Some(inotify(&info.text).map_err(|why| {
                unsupported(format!("an inotify instance whose watches cannot be saved: {why}"))
            })?),
            "anon_inode:[eventpoll]" => Some(epoll(&info.text).ok_or_else(|| {
                unsupported(format!("an epoll whose registrations cannot be read ({link})"))
            })?),
            _ if link.starts_with("anon_inode:") => {
                return Err(unsupported(describe(&link, Some(ft))));
            }
            _ => None,
        };

        let key = (meta.dev(), meta.ino());
        let mut id = None;
        for h in ctx.by_inode.get(&key).into_iter().flatten() {
            if torpor_sys::same_file_description(pid, fd, h.pid, h.fd)
                .map_err(err(format!("fd {fd}")))?
            {
                id = Some(h.id);
                break;
            }
        }
        let id = id.unwrap_or_else(|| {
            ctx.next_id += 1;
            ctx.next_id
        });
        ctx.by_inode.entry(key).or_default().push(Holder { pid, fd, id });

        let idx = match local.get(&id) {
            Some(&idx) => idx,
            None => {
                let kind = if let Some(k) = anon_kind {
                    k
                } else if ft.is_file() && link.starts_with("/proc/") {
                    OpenFileKind::ProcFile { path: link.clone() }
                } else if ft.is_file() {
                    let file = files.add_path(pid, &link_path, &link).map_err(|source| {
                        DumpError::SaveFile { pid, what: format!("fd {fd} ({link})"), source }
                    })?;
                    OpenFileKind::Regular { file }
                } else if ft.is_dir() {
                    if link.ends_with(" (deleted)") {
                        return Err(unsupported(format!("a deleted directory ({link})")));
                    }
                    OpenFileKind::Directory { path: link.clone() }
                } else if ft.is_char_device() && libc::major(meta.rdev()) == pty::SLAVE_MAJOR {
                    pty_slave(pid, fd, &link, &link_path, &meta, ctx)?
                } else if ft.is_char_device()
                    && libc::major(meta.rdev()) == pty::PTMX_MAJOR
                    && libc::minor(meta.rdev()) == pty::PTMX_MINOR
                {
                    pty_master(pid, fd, &link, ctx)?
                } else if ft.is_char_device()
                    && ctx.shell_job
                    && (0..=2).contains(&fd)
                    && is_tty(&link_path)
                {
                    if let Some(t) = termios(&link_path) {
                        ctx.termios.insert(pid, t);
                    }
                    OpenFileKind::Inherited { fd }
                } else if ft.is_char_device() {
                    OpenFileKind::CharDevice { path: link.clone(), rdev: meta.rdev() }
                } else if ft.is_fifo() && link.starts_with("pipe:") {
                    pipe_end(pid, fd, &link_path, meta.ino(), info.flags, None, ctx, writer)?
                } else if ft.is_fifo() && link.starts_with('/') {
                    let path = link.strip_suffix(" (deleted)").unwrap_or(&link).to_string();
                    pipe_end(pid, fd, &link_path, meta.ino(), info.flags, Some(path), ctx, writer)?
                } else if ft.is_socket() {
                    unix_pair(pid, fd, &link, meta.ino(), ctx, writer)?
                } else {
                    return Err(unsupported(describe(&link, Some(ft))));
                };
                open_files.push(OpenFile {
                    flags: info.flags & !libc::O_CLOEXEC,
                    pos: info.pos,
                    kind,
                    id,
                });
                local.insert(id, open_files.len() - 1);
                open_files.len() - 1
            }
        };
        fds.push(Fd { fd, cloexec: info.flags & libc::O_CLOEXEC != 0, open_file: idx });
        for lock in
            file_locks(fd, &info.text).map_err(|why| unsupported(format!("{link} {why}")))?
        {
            let model::FileLock { kind, write, start, end, .. } = lock;
            if seen_locks.insert((kind, write, start, end, key.0, key.1)) {
                locks.push(lock);
            }
        }
    }
    Ok((open_files, fds, locks))
}

/// The locks held through descriptor `fd`, from the `lock:` lines of its fdinfo, such as
/// `lock:\t1: POSIX  ADVISORY  WRITE 1234 08:02:131 0 EOF`. A lock torpor cannot take
/// again (a lease, a mandatory lock) is an error saying which.
fn file_locks(fd: i32, fdinfo: &str) -> std::result::Result<Vec<model::FileLock>, String> {
    let mut out = Vec::new();
    for l in fdinfo.lines().filter_map(|l| l.strip_prefix("lock:")) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let bad = || format!("with a lock torpor cannot read ({})", l.trim());
        // id:, kind, ADVISORY, READ/WRITE, pid, dev:inode, start, end
        if f.len() < 8 {
            return Err(bad());
        }
        let kind = match f[1] {
            "FLOCK" => model::LockKind::Flock,
            "POSIX" => model::LockKind::Posix,
            "OFDLCK" => model::LockKind::Ofd,
            "LEASE" | "DELEG" => {
                return Err(
                    "holding a file lease (F_SETLEASE), which torpor cannot save".to_string()
                )
            }
            other => {
                return Err(format!("holding a lock of kind {other}, which torpor cannot save"))
            }
        };
        if f[2] != "ADVISORY" {
            return Err(format!(
                "holding a {} lock, which torpor cannot save",
                f[2].to_lowercase()
            ));
        }
        let write = match f[3] {
            "WRITE" => true,
            "READ" => false,
            _ => return Err(bad()),
        };
        let start = f[6].parse().map_err(|_| bad())?;
        let end = match f[7] {
            "EOF" => None,
            n => Some(n.parse().map_err(|_| bad())?),
        };
        out.push(model::FileLock { fd, kind, write, start, end });
    }
    Ok(out)
}

/// Whether a descriptor (by its `/proc` link) is a terminal.
fn is_tty(link_path: &str) -> bool {
    fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(link_path)
        // SAFETY: isatty only inspects the descriptor.
        .map(|f| unsafe { libc::isatty(std::os::fd::AsRawFd::as_raw_fd(&f)) } == 1)
        .unwrap_or(false)
}

/// The modes of a terminal (`tcgetattr`), hex.
pub(crate) fn termios(link_path: &str) -> Option<String> {
    let f = fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(link_path)
        .ok()?;
    // SAFETY: an all-zero termios is valid; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios.
    if unsafe { libc::tcgetattr(std::os::fd::AsRawFd::as_raw_fd(&f), &mut t) } < 0 {
        return None;
    }
    // SAFETY: termios is plain old data; its bytes are read as they are.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            &t as *const _ as *const u8,
            std::mem::size_of::<libc::termios>(),
        )
    };
    Some(hex::encode(bytes))
}

/// An eventfd, from its fdinfo: `eventfd-count` (hex) and `eventfd-semaphore`.
fn eventfd(fdinfo: &str) -> Option<OpenFileKind> {
    let field = |k: &str| {
        fdinfo.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim_start_matches(':').trim())
    };
    let count = u64::from_str_radix(field("eventfd-count")?, 16).ok()?;
    let semaphore = field("eventfd-semaphore").map(|v| v == "1").unwrap_or(false);
    Some(OpenFileKind::EventFd { count, semaphore })
}

/// A signalfd, from its fdinfo: `sigmask` (hex).
fn signalfd(fdinfo: &str) -> Option<OpenFileKind> {
    let mask = fdinfo.lines().find_map(|l| l.strip_prefix("sigmask:"))?.trim();
    Some(OpenFileKind::SignalFd { mask: u64::from_str_radix(mask, 16).ok()? })
}

/// A timerfd, from its fdinfo: clock, ticks, settime flags (octal), and the time left and
/// interval as `(seconds, nanoseconds)`.
fn timerfd(fdinfo: &str) -> Option<OpenFileKind> {
    let field = |k: &str| fdinfo.lines().find_map(|l| l.strip_prefix(k)).map(str::trim);
    let time = |k: &str| -> Option<u64> {
        let v = field(k)?.trim_start_matches('(').trim_end_matches(')');
        let (s, ns) = v.split_once(',')?;
        Some(s.trim().parse::<u64>().ok()? * 1_000_000_000 + ns.trim().parse::<u64>().ok()?)
    };
    Some(OpenFileKind::TimerFd {
        clock: field("clockid:")?.parse().ok()?,
        ticks: field("ticks:")?.parse().ok()?,
        settime_flags: u32::from_str_radix(field("settime flags:")?, 8).ok()?,
        value_ns: time("it_value:")?,
        interval_ns: time("it_interval:")?,
    })
}

/// An inotify instance, from its fdinfo: one `inotify wd:` line per watch, whose file
/// handle gives back the watched path.
fn inotify(fdinfo: &str) -> std::result::Result<OpenFileKind, String> {
    let mut watches = Vec::new();
    for l in fdinfo.lines().filter(|l| l.starts_with("inotify ")) {
        let field = |k: &str| {
            l.split_whitespace().find_map(|w| w.strip_prefix(k)).ok_or(format!("no {k} in {l:?}"))
        };
        let hex = |k: &str| -> std::result::Result<u64, String> {
            u64::from_str_radix(field(k)?, 16).map_err(|_| format!("bad {k} in {l:?}"))
        };
        let wd = hex("wd:")? as i32;
        let mask = hex("mask:")? as u32;
        let sdev = hex("sdev:")?;
        let handle_type = hex("fhandle-type:")? as i32;
        let handle =
            hex::decode(field("f_handle:")?).map_err(|_| format!("bad handle in {l:?}"))?;
        let path = path_from_handle(sdev, handle_type, &handle)
            .ok_or(format!("the file watched by wd {wd} cannot be found (deleted?)"))?;
        watches.push(model::InotifyWatch { wd, path, mask });
    }
    watches.sort_by_key(|w| w.wd);
    Ok(OpenFileKind::Inotify { watches })
}

/// The path of the file a handle names (`open_by_handle_at` on its mount). `sdev` is the
/// kernel's device number (major << 20 | minor).
fn path_from_handle(sdev: u64, handle_type: i32, handle: &[u8]) -> Option<String> {
    let dev = format!("{}:{}", sdev >> 20, sdev & 0xfffff);
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    // A mount of that device, its root first.
    let mut points: Vec<(bool, String)> = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(2) == Some(&dev.as_str())).then(|| (f[3] != "/", f[4].replace("\\040", " ")))
        })
        .collect();
    points.sort();
    let mount = fs::File::open(&points.first()?.1).ok()?;
    // struct file_handle: handle_bytes, handle_type, then the handle.
    let mut fh = (handle.len() as u32).to_ne_bytes().to_vec();
    fh.extend_from_slice(&handle_type.to_ne_bytes());
    fh.extend_from_slice(handle);
    // SAFETY: `fh` is a complete struct file_handle; the call returns a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            std::os::fd::AsRawFd::as_raw_fd(&mount),
            fh.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: just returned, owned by nobody else.
    let f = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let path =
        fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f))).ok()?;
    let path = path.to_string_lossy().into_owned();
    (!path.ends_with(" (deleted)")).then_some(path)
}

/// An epoll instance, from its fdinfo: one `tfd:` line per registration.
fn epoll(fdinfo: &str) -> Option<OpenFileKind> {
    let mut targets = Vec::new();
    for l in fdinfo.lines().filter(|l| l.starts_with("tfd:")) {
        // "tfd: %8d events: %8x data: %16llx pos:%lli ino:%lx sdev:%x"
        let words: Vec<&str> = l.split_whitespace().collect();
        let after = |k: &str| words.iter().position(|w| *w == k).and_then(|i| words.get(i + 1));
        let ino = words.iter().find_map(|w| w.strip_prefix("ino:"))?;
        targets.push(model::EpollTarget {
            fd: after("tfd:")?.parse().ok()?,
            events: u32::from_str_radix(after("events:")?, 16).ok()?,
            data: u64::from_str_radix(after("data:")?, 16).ok()?,
            ino: u64::from_str_radix(ino, 16).ok()?,
        });
    }
    Some(OpenFileKind::Epoll { targets })
}

/// One end of a pipe; its unread bytes are saved the first time the pipe is seen.
#[allow(clippy::too_many_arguments)]
fn pipe_end(
    pid: i32,
    fd: i32,
    link_path: &str,
    ino: u64,
    flags: i32,
    path: Option<String>,
    ctx: &mut FdContext,
    writer: &mut ImageWriter,
) -> Result<OpenFileKind> {
    let write = flags & libc::O_ACCMODE == libc::O_WRONLY;
    let what = || format!("the pipe on fd {fd}");
    let first = !ctx.pipes.contains_key(&ino);
    let entry = ctx.pipes.entry(ino).or_insert(PipeSeen {
        has_read: false,
        has_write: false,
        pid,
        fd,
        data: None,
    });
    // A named pipe may be opened by anyone at any time: never "held outside".
    if write || path.is_some() {
        entry.has_write = true;
    }
    if !write || path.is_some() {
        entry.has_read = true;
    }
    let known = entry.data.clone();
    // A second reader of the pipe sees the same bytes; opening it does not disturb them.
    let reader = fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(link_path)
        .map_err(|source| DumpError::SaveFile { pid, what: what(), source })?;
    let reader = std::os::fd::OwnedFd::from(reader);
    let io = |e: torpor_sys::Error| DumpError::Collect { pid, what: what(), source: e };
    let size = sock::pipe_size(&reader).map_err(io)? as u32;
    let mut data = known;
    if first {
        let bytes = sock::pipe_contents(&reader).map_err(io)?;
        if !bytes.is_empty() {
            let name = format!("pipe-{ino}.img");
            writer.write_file(&name, &bytes)?;
            data = Some(name);
        }
        ctx.pipes.get_mut(&ino).unwrap().data = data.clone();
    }
    Ok(OpenFileKind::Pipe { ino, write, size, data, path })
}

/// One end of a connected pair of unix sockets; its receive queue is saved.
fn unix_pair(
    pid: i32,
    fd: i32,
    link: &str,
    ino: u64,
    ctx: &mut FdContext,
    writer: &mut ImageWriter,
) -> Result<OpenFileKind> {
    let Some(info) = ctx.unix_info(pid)?.get(&ino).cloned() else {
        return inet_socket(pid, fd, link, ctx, writer);
    };
    if info.peer == 0 {
        return unix_bound(pid, fd, link, &info, writer);
    }
    ctx.sockets.insert(ino, (info.peer, (pid, fd)));
    let sock = sock::take_fd(pid, fd).map_err(|source| DumpError::Collect {
        pid,
        what: format!("the socket on fd {fd}"),
        source,
    })?;
    let sock_type = info.sock_type as i32;
    let stream = sock_type == libc::SOCK_STREAM;
    let queue = sock::socket_queue(&sock, stream).map_err(|source| DumpError::Collect {
        pid,
        what: format!("the queue of the socket on fd {fd}"),
        source,
    })?;
    let queue = if queue.is_empty() {
        None
    } else {
        // One record per message; a stream is one record.
        let name = format!("sock-{ino}.img");
        writer.write_file(&name, &records::encode(queue.iter().map(Vec::as_slice)))?;
        Some(name)
    };
    Ok(OpenFileKind::UnixPair {
        ino,
        peer: info.peer,
        sock_type,
        queue,
        name: info.name.clone(),
        options: unix_options(&sock),
        buffers: buffers(&sock),
    })
}

/// Socket options torpor saves and sets again: (level, name, whether it must be set
/// before `bind`). Buffer sizes are left out on purpose: setting them would turn off the
/// kernel's automatic sizing the socket had.
const SOCKET_OPTIONS: &[(i32, i32, bool)] = &[
    (libc::SOL_SOCKET, libc::SO_REUSEADDR, true),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT, true),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE, false),
    (libc::SOL_SOCKET, libc::SO_BROADCAST, false),
    (libc::SOL_SOCKET, libc::SO_PRIORITY, false),
    (libc::SOL_SOCKET, libc::SO_RCVLOWAT, false),
    (libc::SOL_SOCKET, libc::SO_LINGER, false),
    (libc::SOL_SOCKET, libc::SO_RCVTIMEO, false),
    (libc::SOL_SOCKET, libc::SO_SNDTIMEO, false),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE, false),
    (libc::SOL_SOCKET, libc::SO_PASSCRED, false),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY, false),
    (libc::IPPROTO_TCP, libc::TCP_CORK, false),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, false),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, false),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, false),
    (libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, false),
    (libc::IPPROTO_TCP, libc::TCP_FASTOPEN, false),
    (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, false),
    (libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, false),
    (libc::IPPROTO_TCP, libc::TCP_CONGESTION, false),
    (libc::IPPROTO_IP, libc::IP_TOS, false),
    (libc::IPPROTO_IP, libc::IP_TTL, false),
    (libc::IPPROTO_IP, libc::IP_PKTINFO, false),
    (libc::IPPROTO_IP, libc::IP_FREEBIND, true),
    (libc::IPPROTO_IP, libc::IP_TRANSPARENT, true),
    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, true),
    (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, false),
    (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, false),
    (libc::IPPROTO_IPV6, libc::IPV6_TCLASS, false),
];

/// A unix socket's bound name as restore needs it: a path bound relative to the working
/// directory of the time made absolute, with the socket file's mode and owner (0o777 and
/// root when there is no file: an abstract or unbound socket, or one removed since).
pub(crate) fn bound_name(pid: i32, mut name: String) -> (String, u32, u32, u32) {
    if !name.is_empty() && !name.starts_with('@') && !name.starts_with('/') {
        if let Ok(cwd) = proc::readlink(format!("/proc/{pid}/cwd")) {
            name = format!("{cwd}/{name}");
        }
    }
    let (mut file_mode, mut file_uid, mut file_gid) = (0o777, 0, 0);
    if name.starts_with('/') {
        if let Ok(m) = fs::symlink_metadata(&name) {
            (file_mode, file_uid, file_gid) = (m.mode() & 0o7777, m.uid(), m.gid());
        }
    }
    (name, file_mode, file_uid, file_gid)
}
/// A unix socket with no peer: its address, whether it listens, and (datagram) its queue.
fn unix_bound(
    pid: i32,
    fd: i32,
    link: &str,
    info: &sock::UnixInfo,
    writer: &mut ImageWriter,
) -> Result<OpenFileKind> {
    const TCP_LISTEN: u8 = 10;
    let unsupported =
        |kind: String| DumpError::Unsupported { pid, reason: UnsupportedReason::Fd { fd, kind } };
    let listening = info.state == TCP_LISTEN;
    if listening && info.pending > 0 {
        return Err(unsupported(format!(
            "a unix socket listening on {:?} with {} connections not yet accepted ({link})",
            info.name, info.pending
        )));
    }
    let (name, file_mode, file_uid, file_gid) = bound_name(pid, info.name.clone());
    let sock_type = info.sock_type as i32;
    let queue = if sock_type == libc::SOCK_DGRAM {
        let s = sock::take_fd(pid, fd).map_err(|source| DumpError::Collect {
            pid,
            what: format!("the socket on fd {fd}"),
            source,
        })?;
        let q = sock::datagram_queue(&s).map_err(|source| DumpError::Collect {
            pid,
            what: format!("the queue of the socket on fd {fd}"),
            source,
        })?;
        if q.is_empty() {
            None
        } else {
            let file = format!("sock-{}.img", info.ino);
            // Two records per datagram: the sender's address, then the datagram.
            let pairs = q.iter().flat_map(|(from, data)| [from.as_slice(), data.as_slice()]);
            writer.write_file(&file, &records::encode(pairs))?;
            Some(file)
        }
    } else {
        None
    };
    let copy = sock::take_fd(pid, fd).ok();
    let options = copy.as_ref().map(unix_options).unwrap_or_default();
    Ok(OpenFileKind::UnixBound {
        sock_type,
        name,
        listen_backlog: listening.then_some(info.backlog as i32),
        file_mode,
        file_uid,
        file_gid,
        queue,
        options,
        buffers: copy.as_ref().and_then(buffers),
        queue_senders: true,
    })
}

/// A socket's buffer sizes.
fn buffers(sock: &std::os::fd::OwnedFd) -> Option<model::SockBuffers> {
    Some(model::SockBuffers {
        rcvbuf: sock::sockopt(sock, libc::SO_RCVBUF).ok()? as u32,
        sndbuf: sock::sockopt(sock, libc::SO_SNDBUF).ok()? as u32,
    })
}

/// The options of a unix socket worth setting again: passing of credentials and security
/// labels with messages.
fn unix_options(sock: &std::os::fd::OwnedFd) -> Vec<model::SockOpt> {
    [libc::SO_PASSCRED, libc::SO_PASSSEC]
        .into_iter()
        .filter_map(|name| {
            let v = sock::sockopt_raw(sock, libc::SOL_SOCKET, name).ok()?;
            Some(model::SockOpt { level: libc::SOL_SOCKET, name, value: hex::encode(v) })
        })
        .collect()
}

/// A TCP or UDP socket: its address, options and, for UDP, the datagrams queued.
fn inet_socket(
    pid: i32,
    fd: i32,
    link: &str,
    ctx: &mut FdContext,
    writer: &mut ImageWriter,
) -> Result<OpenFileKind> {
    let unsupported =
        |kind: String| DumpError::Unsupported { pid, reason: UnsupportedReason::Fd { fd, kind } };
    let err = |what: &str| {
        let what = format!("{what} of the socket on fd {fd}");
        move |source| DumpError::Collect { pid, what, source }
    };
    let sock = sock::take_fd(pid, fd).map_err(err("a copy"))?;
    let family = sock::sockopt(&sock, libc::SO_DOMAIN).map_err(err("the family"))?;
    let sock_type = sock::sockopt(&sock, libc::SO_TYPE).map_err(err("the type"))?;
    let protocol = sock::sockopt(&sock, libc::SO_PROTOCOL).map_err(err("the protocol"))?;
    let inet = family == libc::AF_INET || family == libc::AF_INET6;
    let tcp = sock_type == libc::SOCK_STREAM && protocol == libc::IPPROTO_TCP;
    let udp = sock_type == libc::SOCK_DGRAM && protocol == libc::IPPROTO_UDP;
    if !inet || !(tcp || udp) {
        return Err(unsupported(format!(
            "a socket of family {family}, type {sock_type}, protocol {protocol} ({link})"
        )));
    }
    let local = sock::sock_addr(&sock, false).unwrap_or_default();
    let peer = sock::sock_addr(&sock, true);
    let listening =
        tcp && sock::sockopt(&sock, libc::SO_ACCEPTCONN).map_err(err("the state"))? != 0;
    // struct tcp_info starts with the state.
    let info =
        if tcp { sock::sockopt_raw(&sock, libc::IPPROTO_TCP, libc::TCP_INFO).ok() } else { None };
    let state = info.as_ref().and_then(|i| i.first().copied()).unwrap_or(0);
    if tcp && !listening && peer.is_none() && state != TCP_CLOSE {
        // Connecting (SYN_SENT) or a connection ended while the socket stays open: the
        // kernel tells neither its peer nor how it ended.
        return Err(unsupported(format!(
            "a TCP socket in state {} ({link}), whose connection torpor cannot rebuild",
            tcp_state_name(state)
        )));
    }
    // tcpi_segs_out, at byte 136: a closed socket that sent anything had a connection.
    let segs_out = info
        .as_ref()
        .and_then(|i| i.get(136..140))
        .map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap()));
    let ended = tcp && !listening && peer.is_none() && segs_out > 0;
    if ended {
        // What the peer sent before the end and the program has not read yet: a new
        // socket cannot be given it back (repair mode fills only established ones).
        let unread = sock::queued_bytes(&sock, false).map_err(err("the queue"))?;
        if unread > 0 {
            return Err(unsupported(format!(
                "a TCP socket whose connection has ended (state CLOSE, {}, {link}) with \
                 {unread} bytes received and not yet read; torpor cannot give them back",
                sock::describe_addr(&local)
            )));
        }
        writer.needs_version(4);
    }
    let mut tcp_state = None;
    if tcp && !listening && peer.is_some() {
        let conn = format!(
            "{} -> {}",
            sock::describe_addr(&local),
            sock::describe_addr(peer.as_deref().unwrap_or_default())
        );
        if !ctx.tcp_established {
            return Err(DumpError::Unsupported {
                pid,
                reason: UnsupportedReason::NeedsFlag {
                    fd,
                    what: if state == 1 {
                        format!("an established TCP connection {conn} ({link})")
                    } else {
                        format!(
                            "a TCP connection {conn} in state {} ({link})",
                            tcp_state_name(state)
                        )
                    },
                    flag: "--tcp-established",
                },
            });
        }
        if model::TcpConnState::from_kernel(state).is_none() {
            return Err(unsupported(format!(
                "a TCP connection {conn} in state {} ({link}); only connections that are \
                 established or closing (FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING) \
                 can be saved",
                tcp_state_name(state)
            )));
        }
        let ino = fs::metadata(format!("/proc/{pid}/fd/{fd}")).map(|m| m.ino()).unwrap_or(0);
        ctx.lock(&local, peer.as_deref().unwrap_or_default());
        crate::guard::note(&ctx.journal, crate::guard::Note::Repair { pid, fd });
        let copy = sock::take_fd(pid, fd).map_err(err("a copy"))?;
        let state = tcp_connection(&copy, ino, writer).map_err(|e| match e {
            Ok(source) => DumpError::Collect {
                pid,
                what: format!("the TCP connection {conn} on fd {fd}"),
                source,
            },
            Err(e) => e,
        });
        // In repair mode from here: it stays so until the process is gone, which closes
        // it without a word to the peer, or until torpor lets the process run on.
        ctx.repaired.push(copy);
        let mut state = state?;
        // Reading shut down by the program (shutdown(SHUT_RD)), not by the peer's FIN.
        const RCV_SHUTDOWN: u8 = 1;
        let shut = ctx.tcp_diag(pid, ino)?.map_or(0, |d| d.shutdown);
        state.read_shut = shut & RCV_SHUTDOWN != 0 && !state.state.fin_received();
        tcp_state = Some(state);
    }
    let mut options = Vec::new();
    for &(level, name, _) in SOCKET_OPTIONS {
        if (level == libc::IPPROTO_TCP && !tcp)
            || (level == libc::IPPROTO_IPV6 && family != libc::AF_INET6)
            || (level == libc::IPPROTO_IP && family != libc::AF_INET)
        {
            continue;
        }
        // An option this kernel or socket does not have is simply not saved.
        if let Ok(v) = sock::sockopt_raw(&sock, level, name) {
            options.push(model::SockOpt { level, name, value: hex::encode(v) });
        }
    }
    let queue = if udp {
        let q = sock::datagram_queue(&sock).map_err(err("the queue"))?;
        if q.is_empty() {
            None
        } else {
            let ino =
                std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).map(|m| m.ino()).unwrap_or(0);
            let name = format!("sock-{ino}.img");
            // Two records per datagram: the sender's address, then the datagram.
            let pairs = q.iter().flat_map(|(from, data)| [from.as_slice(), data.as_slice()]);
            writer.write_file(&name, &records::encode(pairs))?;
            Some(name)
        }
    } else {
        None
    };
    let backlog = if listening {
        let ino = fs::metadata(format!("/proc/{pid}/fd/{fd}")).map(|m| m.ino()).unwrap_or(0);
        let info = ctx.tcp_diag(pid, ino)?.ok_or_else(|| DumpError::Collect {
            pid,
            what: format!("the backlog of the socket on fd {fd}"),
            source: torpor_sys::Error::Syscall {
                call: "sock_diag",
                source: std::io::Error::other(format!("socket:[{ino}] is not listed")),
            },
        })?;
        if info.rqueue > 0 {
            return Err(unsupported(format!(
                "a TCP socket listening on {} with {} connections not yet accepted ({link})",
                sock::describe_addr(&local),
                info.rqueue
            )));
        }
        Some(info.wqueue as i32)
    } else {
        None
    };
    Ok(OpenFileKind::Inet {
        family,
        sock_type,
        protocol,
        local: hex::encode(&local),
        peer: if udp || tcp_state.is_some() { peer.map(hex::encode) } else { None },
        listen_backlog: backlog,
        options,
        queue,
        tcp: tcp_state,
        buffers: buffers(&sock),
        ended,
    })
}

/// The kernel's `TCP_CLOSE` state number.
const TCP_CLOSE: u8 = 7;

/// The kernel's name of TCP state number `state`, for messages.
fn tcp_state_name(state: u8) -> &'static str {
    const NAMES: [&str; 13] = [
        "?",
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSE",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
        "NEW_SYN_RECV",
    ];
    NAMES.get(state as usize).unwrap_or(&"?")
}

/// Saves an established or closing TCP connection with `TCP_REPAIR`: its state, sequence
/// numbers, the bytes in flight each way, the negotiated options, window and timestamp. The socket is left in
/// repair mode. The error is a system error or an image write error.
fn tcp_connection(
    s: &std::os::fd::OwnedFd,
    ino: u64,
    writer: &mut ImageWriter,
) -> std::result::Result<model::TcpState, std::result::Result<torpor_sys::Error, DumpError>> {
    use sock::tcp_repair::*;
    let sys = |call: &'static str| {
        move |source: std::io::Error| Ok(torpor_sys::Error::Syscall { call, source })
    };
    sock::set_tcp_opt(s, TCP_REPAIR, 1).map_err(sys("TCP_REPAIR"))?;

    // Read again now that the peer is held back: a FIN may have arrived since.
    let info = sock::sockopt_raw(s, libc::IPPROTO_TCP, libc::TCP_INFO).map_err(Ok)?;
    let kernel_state = info.first().copied().unwrap_or(0);
    let state = model::TcpConnState::from_kernel(kernel_state).ok_or_else(|| {
        Ok(torpor_sys::Error::Syscall {
            call: "getsockopt(TCP_INFO)",
            source: std::io::Error::other(format!(
                "the connection went to state {} while being saved",
                tcp_state_name(kernel_state)
            )),
        })
    })?;

    let mut queue = |q: i32,
                     out: bool,
                     tag: &str|
     -> std::result::Result<
        (u32, u32, Option<String>),
        std::result::Result<torpor_sys::Error, DumpError>,
    > {
        sock::set_tcp_opt(s, TCP_REPAIR_QUEUE, q).map_err(sys("TCP_REPAIR_QUEUE"))?;
        let seq = sock::tcp_opt(s, TCP_QUEUE_SEQ).map_err(Ok)?;
        // The send queue's count includes this end's FIN while it is not acknowledged;
        // the receive queue's never includes the peer's.
        let len = sock::queued_bytes(s, out)
            .map_err(Ok)?
            .saturating_sub(u32::from(out && state.fin_unacked()));
        let file = if len > 0 {
            let bytes = sock::peek_exact(s, len as usize).map_err(Ok)?;
            let name = format!("tcp-{ino}-{tag}.img");
            writer.write_file(&name, &bytes).map_err(|e| Err(e.into()))?;
            Some(name)
        } else {
            None
        };
        Ok((seq, len, file))
    };
    let (send_seq, send_len, send_queue) = queue(TCP_SEND_QUEUE, true, "send")?;
    let (recv_seq, recv_len, recv_queue) = queue(TCP_RECV_QUEUE, false, "recv")?;

    // struct tcp_info: tcpi_options at byte 5, the window scales in byte 6 (send in the
    // low nibble), tcpi_snd_mss at byte 16.
    let options = info.get(5).copied().unwrap_or(0);
    let scales = info.get(6).copied().unwrap_or(0);
    let mss = info.get(16..20).map_or(536, |b| u32::from_ne_bytes(b.try_into().unwrap()));
    let win = sock::sockopt_sized(s, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, 20).map_err(Ok)?;
    let mut window = [0u32; 5];
    for (i, w) in window.iter_mut().enumerate() {
        *w = win.get(i * 4..i * 4 + 4).map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap()));
    }
    let timestamp = sock::tcp_opt(s, TCP_TIMESTAMP).map_err(Ok)?;
    Ok(model::TcpState {
        send_seq,
        recv_seq,
        send_queue,
        recv_queue,
        send_len,
        recv_len,
        mss,
        snd_wscale: scales & 0xf,
        rcv_wscale: scales >> 4,
        wscale: options & TCPI_OPT_WSCALE != 0,
        timestamps: options & TCPI_OPT_TIMESTAMPS != 0,
        sack: options & TCPI_OPT_SACK != 0,
        window,
        timestamp,
        state,
        read_shut: false,
    })
}
