//! Checks made before anything is created, and the files opened for the new process.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use torpor_image::model::{self, OpenFileKind, VmaKind};
use torpor_image::pages::PageSource;
use torpor_image::{records, ImageReader};

use crate::child::Plan;
use crate::{RestoreError, Result};

/// Checks what the image asks for against what this version and this machine can do.
pub(crate) fn validate(reader: &ImageReader, tree: &model::Tree) -> Result<()> {
    let m = reader.manifest();
    if m.arch != std::env::consts::ARCH {
        return Err(RestoreError::Arch { arch: m.arch.clone(), here: std::env::consts::ARCH });
    }
    let have = torpor_sys::xcr0();
    let missing = m.cpu.xfeatures_used & !have;
    if missing != 0 {
        return Err(RestoreError::Cpu { used: m.cpu.xfeatures_used, have, missing });
    }
    if tree.processes.len() > 65536 {
        return Err(RestoreError::Unsupported {
            what: format!("{} processes", tree.processes.len()),
        });
    }
    // The image crate checked indices and ranges (check_tree); what is left is what this
    // version supports.
    for p in &tree.processes {
        let unsupported = |what: String| Err(RestoreError::Unsupported { what });
        if p.threads.is_empty() || p.threads.len() > 65536 {
            return unsupported(format!("{} threads in pid {}", p.threads.len(), p.pid));
        }
        if p.sigactions.len() != 64 {
            return unsupported(format!("{} signal actions in pid {}", p.sigactions.len(), p.pid));
        }
        if p.pid != tree.root_pid && !tree.processes.iter().any(|q| q.pid == p.ppid) {
            return unsupported(format!(
                "pid {} whose parent {} is not in the image",
                p.pid, p.ppid
            ));
        }
    }
    for z in &tree.zombies {
        if !tree.processes.iter().any(|q| q.pid == z.ppid) {
            return Err(RestoreError::Unsupported {
                what: format!("zombie {} whose parent {} is not in the image", z.pid, z.ppid),
            });
        }
    }
    Ok(())
}

pub(crate) fn check_pid_free(pid: i32) -> Result<()> {
    let taken = || Path::new(&format!("/proc/{pid}")).exists();
    // A zombie is usually the dumped process itself, killed a moment ago and not yet
    // reaped by its parent: give the parent a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while taken()
        && torpor_sys::proc::status(pid).map(|s| s.state == 'Z').unwrap_or(false)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if taken() {
        return Err(RestoreError::PidTaken { pid, holder: crate::describe_pid(pid) });
    }
    Ok(())
}

/// Refuses when a file the process uses is not the one it used.
pub(crate) fn check_files(tree: &model::Tree) -> Result<()> {
    for f in &tree.files {
        if f.saved_content.is_some() {
            continue;
        }
        let changed = |why: String| RestoreError::FileChanged { path: f.path.clone(), why };
        let meta = fs::metadata(&f.path).map_err(|e| changed(format!("it cannot be read: {e}")))?;
        if meta.mode() & libc::S_IFMT != f.mode & libc::S_IFMT {
            return Err(changed("it is now another kind of file".into()));
        }
        if !meta.is_file() {
            continue;
        }
        let mtime = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
        if meta.size() == f.size && mtime == f.mtime_ns && meta.ino() == f.ino {
            continue;
        }
        // Another inode or timestamp (a copy, another machine, a reboot): the content
        // decides, when the image has its checksum.
        let why = if meta.size() != f.size {
            format!("size {} bytes, was {}", meta.size(), f.size)
        } else {
            "its modification time or inode differs".to_string()
        };
        match &f.content_xxh3 {
            Some(h)
                if meta.size() == f.size
                    && torpor_image::hash_file(&f.path).as_deref().ok() == Some(h) => {}
            _ => return Err(changed(why)),
        }
    }
    Ok(())
}

/// (pid, index into its `open_files`) to an index into the objects torpor made.
pub(crate) type FdObjects = HashMap<(i32, usize), usize>;

/// Everything torpor opened for the tree, and where its own files sit in every process.
pub(crate) struct Prepared {
    pub plan: Plan,
    /// Auxiliary descriptor numbers inside every process of the tree.
    pub pages_fds: HashMap<i32, i32>,
    pub zero_fd: i32,
    pub exe_fds: HashMap<i32, i32>,
    /// Mapped file (index into the tree's files) to its descriptor in the processes.
    pub map_fds: HashMap<usize, i32>,
    /// The processes' end of the descriptor transfer socket, and torpor's.
    pub transfer_fd: i32,
    pub transfer: OwnedFd,
    /// Open file descriptions, created once each.
    pub objects: Vec<OwnedFd>,
    /// (pid, index into its `open_files`) to the object it uses.
    pub fd_objects: FdObjects,
    /// SysV segments made for the tree, and those to mark for removal once attached.
    pub sysv: SysvSegments,
    /// Shared anonymous memory objects by identity, as descriptors in the processes.
    pub shmem_fds: HashMap<u64, i32>,
    /// Pseudo-terminal pairs of the tree.
    pub ptys: crate::ptys::Pairs,
    /// Compressed page files, which torpor reads for the processes.
    pub unpacker: Option<crate::fill::Unpacker>,
}

/// Opens a `/proc` file for a process now that the processes exist, at its saved offset;
/// `None` for any other kind, whose object was made beforehand.
pub(crate) fn late_open(o: &model::OpenFile) -> Result<Option<OwnedFd>> {
    let OpenFileKind::ProcFile { path } = &o.kind else { return Ok(None) };
    let fd = OpenOptions::new().open_flags(path, o.flags)?;
    let mut f = File::from(fd);
    // A seq file regenerates its text; the offset may lie past a shorter one.
    let _ = f.seek(SeekFrom::Start(o.pos));
    Ok(Some(OwnedFd::from(f)))
}

/// Opens everything the new processes need.
pub(crate) fn prepare(reader: &ImageReader, tree: &model::Tree) -> Result<Prepared> {
    // First, so that a peer gone since the dump stops the restore before anything is made.
    let mut externals = connect_externals(tree)?;
    let mut ghosts = Ghosts::default();
    let mut ptys = crate::ptys::Pairs::make(reader, tree)?;
    let (objects, fd_objects) = open_objects(reader, tree, &mut ghosts, &mut ptys, &mut externals)?;
    ptys.finish()?;
    let shmem = shmem_objects(tree)?;
    let sysv = make_sysv_segments(reader, tree)?;
    // Opened before `base` is chosen below, which must be above every torpor descriptor.
    let unpacker = crate::fill::Unpacker::open(reader, tree)?;

    let mut aux: Vec<OwnedFd> = Vec::new();
    let mut add_aux = |f: OwnedFd| {
        aux.push(f);
        aux.len() - 1
    };
    let mut pages_i = HashMap::new();
    let mut exe_i = HashMap::new();
    let mut map_idx = HashMap::new();
    for p in &tree.processes {
        let pages = open_ro(&reader.path(&p.pages_file)?.to_string_lossy())?;
        pages_i.insert(p.pid, add_aux(pages));
        let exe = open_tree_file(reader, tree, p.mm.exe_file, libc::O_RDONLY, &mut ghosts)?;
        exe_i.insert(p.pid, add_aux(exe));
        for v in &p.vmas {
            if let VmaKind::File { file, .. } = v.kind {
                if map_idx.contains_key(&file) {
                    continue;
                }
                let mode = if v.shared && v.prot & model::prot::WRITE != 0 {
                    libc::O_RDWR
                } else {
                    libc::O_RDONLY
                };
                let fd = open_tree_file(reader, tree, file, mode, &mut ghosts)?;
                map_idx.insert(file, add_aux(fd));
            }
        }
    }
    let shmem_i: HashMap<u64, usize> = shmem.into_iter().map(|(id, f)| (id, add_aux(f))).collect();
    let zero_i = add_aux(open_ro("/dev/zero")?);
    let (transfer, theirs) = socketpair(libc::SOCK_DGRAM)?;
    let transfer_i = add_aux(theirs);

    let report = crate::child::pipe()?;
    // Every number a process inherits or installs lies below `base`.
    let max_target = tree.processes.iter().flat_map(|p| &p.fds).map(|f| f.fd).max().unwrap_or(0);
    let max_own = fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()).max().unwrap_or(0)
        })
        .unwrap_or(1024);
    let base = max_target.max(max_own) + 1;
    let plan = Plan {
        pid: tree.root_pid,
        new_pid_ns: tree.pid_ns,
        sources: aux,
        base,
        report: Some(report),
    };
    Ok(Prepared {
        pages_fds: pages_i.into_iter().map(|(k, i)| (k, plan.aux_fd(i))).collect(),
        zero_fd: plan.aux_fd(zero_i),
        exe_fds: exe_i.into_iter().map(|(k, i)| (k, plan.aux_fd(i))).collect(),
        map_fds: map_idx.into_iter().map(|(k, i)| (k, plan.aux_fd(i))).collect(),
        transfer_fd: plan.aux_fd(transfer_i),
        transfer,
        objects,
        fd_objects,
        shmem_fds: shmem_i.into_iter().map(|(k, i)| (k, plan.aux_fd(i))).collect(),
        sysv,
        ptys,
        unpacker,
        plan,
    })
}

fn socketpair(kind: i32) -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two new descriptors into `fds`.
    if unsafe { libc::socketpair(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) }
        < 0
    {
        return Err(RestoreError::Prepare {
            what: "a unix socket pair".into(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: both were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Creates each open file description of the tree once: descriptors that shared one
/// (same non-zero id) get the same object.
fn open_objects(
    reader: &ImageReader,
    tree: &model::Tree,
    ghosts: &mut Ghosts,
    ptys: &mut crate::ptys::Pairs,
    externals: &mut HashMap<(i32, usize), OwnedFd>,
) -> Result<(Vec<OwnedFd>, FdObjects)> {
    let mut objects: Vec<OwnedFd> = Vec::new();
    let mut fd_objects = HashMap::new();
    let mut by_id: HashMap<u64, usize> = HashMap::new();
    // Pipes and socket pairs by inode: the ends made so far, not yet handed out.
    let mut pipes: HashMap<u64, (Option<OwnedFd>, Option<OwnedFd>)> = HashMap::new();
    let mut sockets: HashMap<u64, OwnedFd> = HashMap::new();
    // Named pipes by inode: an end opened for reading and writing that holds each open
    // (and its bytes) until every end the processes use exists.
    let mut fifo_keepers: HashMap<u64, OwnedFd> = HashMap::new();

    // Names of connected unix sockets by inode; listeners are made first, so that
    // connections accepted from them can be made again through them.
    let peer_names: HashMap<u64, String> = tree
        .processes
        .iter()
        .flat_map(|p| &p.open_files)
        .filter_map(|o| match &o.kind {
            OpenFileKind::UnixPair { ino, name, .. } => Some((*ino, name.clone())),
            _ => None,
        })
        .collect();
    let mut listeners: HashMap<String, usize> = HashMap::new();
    let mut order: Vec<(&model::Process, usize)> = Vec::new();
    for pass in 0..2 {
        for p in &tree.processes {
            for (i, o) in p.open_files.iter().enumerate() {
                let is_pair = matches!(o.kind, OpenFileKind::UnixPair { .. });
                if is_pair == (pass == 1) {
                    order.push((p, i));
                }
            }
        }
    }
    for (p, i) in order {
        let o = &p.open_files[i];
        {
            if o.id != 0 {
                if let Some(&obj) = by_id.get(&o.id) {
                    fd_objects.insert((p.pid, i), obj);
                    continue;
                }
            }
            let fd = match &o.kind {
                OpenFileKind::Pipe { ino, size, data, path: Some(path), .. } => {
                    let keeper = match fifo_keepers.entry(*ino) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(make_fifo(reader, path, *size, data.as_deref())?)
                        }
                    };
                    let _ = keeper;
                    // Non-blocking, so opening a writing end needs no reader but the
                    // keeper; the saved flags are set afterwards.
                    OpenOptions::new().open_flags(path, o.flags | libc::O_NONBLOCK)?
                }
                OpenFileKind::Pipe { ino, write, size, data, path: None } => {
                    let ends = match pipes.entry(*ino) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(make_pipe(reader, *size, data.as_deref())?)
                        }
                    };
                    let end = if *write { &mut ends.1 } else { &mut ends.0 };
                    match end.take() {
                        Some(f) => f,
                        // Another description of the same end: open the end again.
                        None => reopen_pipe_end(*ino, *write, &objects, &fd_objects, tree)?,
                    }
                }
                OpenFileKind::UnixPair { ino, peer, sock_type, name, .. } => {
                    if let Some(f) = sockets.remove(ino) {
                        f
                    } else {
                        // Accepted from a listener of the tree: connect to it again, so both
                        // ends carry the names they had. Otherwise a plain pair.
                        let server_name = if name.is_empty() {
                            peer_names.get(peer).cloned().unwrap_or_default()
                        } else {
                            name.clone()
                        };
                        let listener = listeners.get(&server_name).map(|&i| &objects[i]);
                        let (mine, theirs) = match listener {
                            Some(l) if !server_name.is_empty() => {
                                let (client, server) = connect_accept(l, &server_name, *sock_type)?;
                                if name.is_empty() {
                                    (client, server)
                                } else {
                                    (server, client)
                                }
                            }
                            _ => socketpair(*sock_type)?,
                        };
                        sockets.insert(*peer, theirs);
                        mine
                    }
                }
                OpenFileKind::UnixExternal { peer_name, .. } => {
                    externals.remove(&(p.pid, i)).ok_or_else(|| RestoreError::Unsupported {
                        what: format!("a second unix socket of pid {} on {peer_name}", p.pid),
                    })?
                }
                OpenFileKind::PtyMaster { index } => ptys.take_master(*index)?,
                OpenFileKind::PtySlave { index } => ptys.open_slave(*index, o.flags)?,
                // Whatever the restoring torpor has on that descriptor; its flags belong
                // to whoever gave it to torpor.
                OpenFileKind::Inherited { fd } => {
                    // SAFETY: fcntl on a number; it fails cleanly if nothing is open there.
                    let dup = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 0) };
                    if dup < 0 {
                        return Err(RestoreError::Prepare {
                            what: format!("descriptor {fd} of torpor restore, to hand down"),
                            source: io::Error::last_os_error(),
                        });
                    }
                    // SAFETY: just created, owned by nobody else.
                    let dup = unsafe { OwnedFd::from_raw_fd(dup) };
                    objects.push(dup);
                    let obj = objects.len() - 1;
                    if o.id != 0 {
                        by_id.insert(o.id, obj);
                    }
                    fd_objects.insert((p.pid, i), obj);
                    continue;
                }
                _ => open_file(reader, tree, o, ghosts)?,
            };
            set_status_flags(&fd, o.flags)?;
            if let OpenFileKind::UnixPair { options, buffers, .. }
            | OpenFileKind::UnixBound { options, buffers, .. }
            | OpenFileKind::UnixExternal { options, buffers, .. } = &o.kind
            {
                for opt in options {
                    set_option(&fd, opt, "a unix socket")?;
                }
                set_buffers(&fd, buffers.as_ref(), None, "a unix socket")?;
            }
            objects.push(fd);
            let obj = objects.len() - 1;
            if o.id != 0 {
                by_id.insert(o.id, obj);
            }
            if let OpenFileKind::UnixBound { name, listen_backlog: Some(_), .. } = &o.kind {
                listeners.insert(name.clone(), obj);
            }
            fd_objects.insert((p.pid, i), obj);
        }
    }

    // Queued socket data goes in through the other end, once both ends exist.
    let mut by_ino: HashMap<u64, usize> = HashMap::new();
    for p in &tree.processes {
        for (i, o) in p.open_files.iter().enumerate() {
            if let OpenFileKind::UnixPair { ino, .. } = o.kind {
                by_ino.insert(ino, fd_objects[&(p.pid, i)]);
            }
        }
    }
    let mut filled = std::collections::HashSet::new();
    for p in &tree.processes {
        for o in &p.open_files {
            let OpenFileKind::UnixPair { ino, peer, queue: Some(queue), .. } = &o.kind else {
                continue;
            };
            if !filled.insert(*ino) {
                continue;
            }
            let sender = by_ino.get(peer).map(|&i| &objects[i]).ok_or_else(|| {
                RestoreError::Unsupported { what: format!("socket {ino} without its peer {peer}") }
            })?;
            fill_socket(reader, sender, queue)?;
        }
    }
    refill_datagrams(reader, tree, &objects, &fd_objects)?;
    refill_unix_datagrams(reader, tree, &objects, &fd_objects)?;
    Ok((objects, fd_objects))
}

/// Puts queued datagrams back into bound unix sockets, once every socket exists, each
/// sent from the address it came from, so that `recvfrom` names the same sender: through
/// the tree's own datagram socket on that address when there is one, else from a socket
/// bound to the address for the moment (a path's socket file is removed again), else,
/// when the address is taken, from an unbound socket (with a warning).
fn refill_unix_datagrams(
    reader: &ImageReader,
    tree: &model::Tree,
    objects: &[OwnedFd],
    fd_objects: &FdObjects,
) -> Result<()> {
    use torpor_sys::sock;
    let mut by_addr: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut queues = Vec::new();
    for p in &tree.processes {
        for (i, o) in p.open_files.iter().enumerate() {
            let obj = fd_objects[&(p.pid, i)];
            match &o.kind {
                OpenFileKind::UnixPair { sock_type: libc::SOCK_DGRAM, .. }
                | OpenFileKind::UnixBound { sock_type: libc::SOCK_DGRAM, .. }
                | OpenFileKind::UnixExternal { sock_type: libc::SOCK_DGRAM, .. } => {
                    if let Some(a) = sock::sock_addr(&objects[obj], false).filter(|a| a.len() > 2) {
                        by_addr.insert(a, obj);
                    }
                }
                _ => {}
            }
            if let OpenFileKind::UnixBound { name, queue: Some(q), queue_senders, .. } = &o.kind {
                queues.push((obj, name.clone(), q.clone(), *queue_senders));
            }
        }
    }
    queues.sort();
    queues.dedup();
    for (obj, name, file, senders) in queues {
        let err = |source| RestoreError::Prepare {
            what: format!("the queued datagrams of the unix socket on {name:?}"),
            source,
        };
        // Where the socket is bound now: its name as restored.
        let to = sock::sock_addr(&objects[obj], false).unwrap_or_else(|| unix_addr(&name));
        let bytes = reader.read_file(&file)?;
        let recs = records::decode(&bytes).ok_or_else(|| {
            err(io::Error::other("the saved queue is cut short or holds too many records"))
        })?;
        if senders && recs.len() % 2 != 0 {
            return Err(err(io::Error::other("the saved queue has a sender without datagram")));
        }
        let pairs: Vec<(&[u8], &[u8])> = if senders {
            recs.chunks_exact(2).map(|p| (p[0], p[1])).collect()
        } else {
            recs.iter().map(|d| (&[][..], *d)).collect()
        };
        for (from, data) in pairs {
            let own;
            let sender = match by_addr.get(from) {
                Some(&o) => &objects[o],
                None => {
                    own = unix_sender(from).map_err(err)?;
                    &own
                }
            };
            // SAFETY: sends `data` to the address in `to`, both of the lengths passed.
            let n = unsafe {
                libc::sendto(
                    sender.as_raw_fd(),
                    data.as_ptr() as *const _,
                    data.len(),
                    libc::MSG_DONTWAIT,
                    to.as_ptr() as *const _,
                    to.len() as _,
                )
            };
            if n < 0 {
                return Err(err(io::Error::last_os_error()));
            }
        }
    }
    Ok(())
}

/// A unix datagram socket to resend a datagram from `from` (a raw `sockaddr_un`, empty
/// for none) with: bound to it when it is free, else unbound.
fn unix_sender(from: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: socket takes integers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nobody else.
    let s = unsafe { OwnedFd::from_raw_fd(fd) };
    if from.len() <= 2 {
        return Ok(s);
    }
    // SAFETY: `from` holds a socket address of the length passed.
    if unsafe { libc::bind(s.as_raw_fd(), from.as_ptr() as *const _, from.len() as _) } < 0 {
        tracing::warn!(
            "a queued datagram from {} goes back from an unnamed sender: {}",
            describe_unix(from),
            io::Error::last_os_error()
        );
        // A fresh socket, since a failed bind may leave one half-named.
        return unix_sender(&[]);
    }
    // A path's socket file: the socket keeps its name once bound, and the datagrams it
    // sends carry it, so the file that bind made can go at once.
    if from[2] != 0 {
        let p = from[2..].split(|&b| b == 0).next().unwrap_or_default();
        let _ = fs::remove_file(std::ffi::OsStr::from_bytes(p));
    }
    Ok(s)
}

/// A raw `sockaddr_un` as a path or `@name`, for messages.
fn describe_unix(addr: &[u8]) -> String {
    match addr.get(2..) {
        Some([0, abs @ ..]) => format!("@{}", String::from_utf8_lossy(abs)),
        Some(path) => {
            String::from_utf8_lossy(path.split(|&b| b == 0).next().unwrap_or_default()).into()
        }
        None => "an unnamed socket".into(),
    }
}

/// Puts queued datagrams back into their UDP sockets, once every socket exists, each sent
/// from the address it came from: through the tree's own socket on that address when
/// there is one (so a connected receiver, which takes datagrams from its peer only,
/// accepts it), else from a socket bound to that address for the purpose.
fn refill_datagrams(
    reader: &ImageReader,
    tree: &model::Tree,
    objects: &[OwnedFd],
    fd_objects: &FdObjects,
) -> Result<()> {
    use torpor_sys::sock;
    let mut by_addr: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut queues = Vec::new();
    for p in &tree.processes {
        for (i, o) in p.open_files.iter().enumerate() {
            if let OpenFileKind::Inet { sock_type, queue, .. } = &o.kind {
                let obj = fd_objects[&(p.pid, i)];
                if *sock_type == libc::SOCK_DGRAM {
                    if let Some(a) = sock::sock_addr(&objects[obj], false) {
                        by_addr.insert(a, obj);
                    }
                    if let Some(q) = queue {
                        queues.push((obj, q.clone()));
                    }
                }
            }
        }
    }
    queues.sort();
    queues.dedup();
    for (obj, name) in queues {
        let dest = &objects[obj];
        let to = sock::sock_addr(dest, false).unwrap_or_default();
        let where_ = sock::describe_addr(&to);
        let err = |source| RestoreError::Prepare {
            what: format!("the queued datagrams of the socket on {where_}"),
            source,
        };
        let bytes = reader.read_file(&name)?;
        let recs = records::decode(&bytes).ok_or_else(|| {
            err(io::Error::other("the saved queue is cut short or holds too many records"))
        })?;
        for pair in recs.chunks_exact(2) {
            let (from, data) = (pair[0].to_vec(), pair[1]);
            let own;
            let sender = match by_addr.get(&from) {
                Some(&o) => &objects[o],
                None => {
                    own = sender_socket(&from, &to).map_err(err)?;
                    &own
                }
            };
            // SAFETY: sends `data` to the address in `to`, both of the lengths passed.
            let n = unsafe {
                libc::sendto(
                    sender.as_raw_fd(),
                    data.as_ptr() as *const _,
                    data.len(),
                    0,
                    to.as_ptr() as *const _,
                    to.len() as _,
                )
            };
            if n < 0 {
                return Err(err(io::Error::last_os_error()));
            }
        }
    }
    Ok(())
}

/// A UDP socket to resend a datagram with: bound to its original sender's address when
/// that is free, else to any (the receiver then sees another sender).
fn sender_socket(from: &[u8], to: &[u8]) -> io::Result<OwnedFd> {
    let family = to.get(..2).map_or(libc::AF_INET, |b| u16::from_ne_bytes([b[0], b[1]]) as i32);
    // SAFETY: socket takes integers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nobody else.
    let s = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = torpor_sys::sock::set_sockopt(&s, libc::SO_REUSEADDR, 1);
    // SAFETY: `from` holds a socket address of the length passed.
    if unsafe { libc::bind(s.as_raw_fd(), from.as_ptr() as *const _, from.len() as _) } < 0 {
        tracing::warn!(
            "a queued datagram from {} goes back with another sender: that address is taken",
            torpor_sys::sock::describe_addr(from)
        );
    }
    Ok(s)
}

/// A connection to the listener bound to `name`, and its accepted end: (client, server).
fn connect_accept(listener: &OwnedFd, name: &str, sock_type: i32) -> Result<(OwnedFd, OwnedFd)> {
    let err = |source| RestoreError::Prepare {
        what: format!("a connection to the unix socket listening on {name:?}"),
        source,
    };
    let addr = unix_addr(name);
    // SAFETY: socket takes integers; connect reads the address of the length passed; a
    // unix connection to a listener is queued at once.
    let client = unsafe { libc::socket(libc::AF_UNIX, sock_type | libc::SOCK_CLOEXEC, 0) };
    if client < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: just created, owned by nobody else.
    let client = unsafe { OwnedFd::from_raw_fd(client) };
    // SAFETY: as above.
    if unsafe { libc::connect(client.as_raw_fd(), addr.as_ptr() as *const _, addr.len() as _) } < 0
    {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: accept4 returns a new descriptor or -1; no peer address is asked for.
    let server = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if server < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: just created, owned by nobody else.
    Ok((client, unsafe { OwnedFd::from_raw_fd(server) }))
}

/// Another open file description of a pipe end already handed out.
fn reopen_pipe_end(
    ino: u64,
    write: bool,
    objects: &[OwnedFd],
    fd_objects: &FdObjects,
    tree: &model::Tree,
) -> Result<OwnedFd> {
    for p in &tree.processes {
        for (i, o) in p.open_files.iter().enumerate() {
            if let OpenFileKind::Pipe { ino: other, .. } = o.kind {
                if other == ino {
                    if let Some(&obj) = fd_objects.get(&(p.pid, i)) {
                        let path = format!("/proc/self/fd/{}", objects[obj].as_raw_fd());
                        let flags = if write { libc::O_WRONLY } else { libc::O_RDONLY };
                        return OpenOptions::new().open_flags(&path, flags | libc::O_NONBLOCK);
                    }
                }
            }
        }
    }
    Err(RestoreError::Unsupported { what: format!("pipe {ino} with no end to reopen") })
}

/// A named pipe at `path` (made if missing), opened for reading and writing, holding the
/// saved unread bytes.
fn make_fifo(reader: &ImageReader, path: &str, size: u32, data: Option<&str>) -> Result<OwnedFd> {
    let err = |source| RestoreError::Prepare { what: format!("the named pipe {path}"), source };
    if fs::symlink_metadata(path).is_err() {
        let c =
            std::ffi::CString::new(path).map_err(|_| err(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: mkfifo takes a NUL-terminated path and a mode.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
    }
    let keeper = OpenOptions::new().open_flags(path, libc::O_RDWR | libc::O_NONBLOCK)?;
    // SAFETY: fcntl on our own descriptor.
    if unsafe { libc::fcntl(keeper.as_raw_fd(), libc::F_SETPIPE_SZ, size as i32) } < 0 {
        tracing::warn!(
            "cannot give {path} its size of {size} bytes: {}",
            io::Error::last_os_error()
        );
    }
    if let Some(name) = data {
        let bytes = reader.read_file(name)?;
        let mut f = File::from(keeper.try_clone().map_err(err)?);
        f.write_all(&bytes).map_err(err)?;
    }
    Ok(keeper)
}

/// A pipe of `size` bytes holding the saved unread bytes: (read end, write end).
fn make_pipe(
    reader: &ImageReader,
    size: u32,
    data: Option<&str>,
) -> Result<(Option<OwnedFd>, Option<OwnedFd>)> {
    let err = |source| RestoreError::Prepare { what: "a pipe".into(), source };
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: both were just created and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on our own descriptor.
    if unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as i32) } < 0 {
        tracing::warn!(
            "cannot give a pipe its size of {size} bytes: {}",
            io::Error::last_os_error()
        );
    }
    if let Some(name) = data {
        let bytes = reader.read_file(name)?;
        let mut f = File::from(w.try_clone().map_err(err)?);
        f.write_all(&bytes).map_err(err)?;
    }
    Ok((Some(r), Some(w)))
}

/// Sends a socket's saved queue to it through its peer `sender`.
fn fill_socket(reader: &ImageReader, sender: &OwnedFd, queue: &str) -> Result<()> {
    let err = |source| RestoreError::Prepare { what: format!("socket queue {queue}"), source };
    let bytes = reader.read_file(queue)?;
    let recs = records::decode(&bytes).ok_or_else(|| {
        err(io::Error::other("the saved queue is cut short or holds too many records"))
    })?;
    for msg in recs {
        // SAFETY: sends `msg`, which has the length passed.
        let n = unsafe {
            libc::send(sender.as_raw_fd(), msg.as_ptr() as *const _, msg.len(), libc::MSG_DONTWAIT)
        };
        if n < 0 || n as usize != msg.len() {
            return Err(err(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Puts back status flags (O_NONBLOCK, O_APPEND...) on an open file description.
fn set_status_flags(fd: &OwnedFd, flags: i32) -> Result<()> {
    let settable =
        libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_DIRECT | libc::O_NOATIME;
    // SAFETY: fcntl on our own descriptor.
    let cur = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if cur < 0 {
        return Ok(());
    }
    let want = (cur & !settable) | (flags & settable);
    // O_NOATIME needs ownership of the file; leave it when the kernel says no.
    // SAFETY: fcntl on our own descriptor.
    if want != cur && unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, want) } < 0 {
        tracing::debug!("cannot set flags {want:#o}: {}", io::Error::last_os_error());
    }
    Ok(())
}

/// SysV segments torpor made. Dropped before the restore is done (a failure), it removes
/// them; [`SysvSegments::finish`] keeps them and marks those that were marked for removal.
#[derive(Default)]
pub(crate) struct SysvSegments {
    made: Vec<i32>,
    removed: Vec<i32>,
}

impl SysvSegments {
    /// Marks the segments that were marked for removal, once every process has attached
    /// them and before any runs: a process must never see its segment unmarked. Should
    /// the restore still fail, the segments go with the last process detaching them.
    pub fn mark_removed(&self) {
        for &id in &self.removed {
            // SAFETY: shmctl takes integers; no buffer for IPC_RMID.
            unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        }
    }

    /// Keeps the segments: the restore succeeded.
    pub fn finish(mut self) {
        self.made.clear();
    }
}

impl Drop for SysvSegments {
    fn drop(&mut self) {
        for &id in &self.made {
            // SAFETY: as above.
            unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        }
    }
}

/// Makes every SysV segment the tree had attached, with its id (asked for through
/// `kernel.shm_next_id`), key, size, mode and owner, and fills it from the image.
fn make_sysv_segments(reader: &ImageReader, tree: &model::Tree) -> Result<SysvSegments> {
    let mut out = SysvSegments::default();
    let mut done = std::collections::HashSet::new();
    for p in &tree.processes {
        for v in &p.vmas {
            let VmaKind::SysvShm { shmid, key, size, mode, uid, gid, removed } = v.kind else {
                continue;
            };
            if done.insert(shmid) {
                let err = |source| RestoreError::Prepare {
                    what: format!("SysV shared memory segment {shmid} (key {key})"),
                    source,
                };
                // A segment outlives its processes: the one the dumped process left,
                // attached by nobody, gives way to the image's; one in use does not.
                // SAFETY: an all-zero shmid_ds is valid; IPC_STAT fills it.
                let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
                // SAFETY: shmctl writes one shmid_ds.
                if unsafe { libc::shmctl(shmid, libc::IPC_STAT, &mut ds) } == 0 {
                    if ds.shm_nattch > 0 {
                        return Err(err(io::Error::other(format!(
                            "a segment with this id exists and is attached by {} processes",
                            ds.shm_nattch
                        ))));
                    }
                    // SAFETY: shmctl takes integers; no buffer for IPC_RMID.
                    unsafe { libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut()) };
                }
                fs::write("/proc/sys/kernel/shm_next_id", shmid.to_string()).map_err(err)?;
                let k = if key == 0 { libc::IPC_PRIVATE } else { key };
                // SAFETY: shmget takes integers.
                let id = unsafe {
                    libc::shmget(
                        k,
                        size as usize,
                        libc::IPC_CREAT | libc::IPC_EXCL | (mode as i32 & 0o777),
                    )
                };
                let _ = fs::write("/proc/sys/kernel/shm_next_id", "-1");
                if id < 0 {
                    return Err(err(io::Error::last_os_error()));
                }
                out.made.push(id);
                if id != shmid {
                    return Err(RestoreError::Unsupported {
                        what: format!("SysV segment {shmid} (the kernel gave id {id})"),
                    });
                }
                // SAFETY: an all-zero shmid_ds is valid; IPC_STAT fills it, IPC_SET reads it.
                unsafe {
                    let mut ds: libc::shmid_ds = std::mem::zeroed();
                    if libc::shmctl(id, libc::IPC_STAT, &mut ds) == 0 {
                        ds.shm_perm.uid = uid;
                        ds.shm_perm.gid = gid;
                        ds.shm_perm.mode = mode as _;
                        libc::shmctl(id, libc::IPC_SET, &mut ds);
                    }
                }
                if removed {
                    out.removed.push(id);
                }
            }
            fill_sysv(reader, tree, p, v, shmid)?;
        }
    }
    Ok(out)
}

/// Copies a mapping's saved pages into its SysV segment, attached to torpor for the while.
fn fill_sysv(
    reader: &ImageReader,
    tree: &model::Tree,
    p: &model::Process,
    v: &model::Vma,
    shmid: i32,
) -> Result<()> {
    if v.pages.iter().all(|r| r.offset.is_none()) {
        return Ok(());
    }
    let err = |source| RestoreError::Prepare { what: format!("SysV segment {shmid}"), source };
    // SAFETY: shmat maps the segment anywhere free in torpor; detached below.
    let base = unsafe { libc::shmat(shmid, std::ptr::null(), 0) };
    if base as isize == -1 {
        return Err(err(io::Error::last_os_error()));
    }
    let offset = v.shmem.map_or(0, |s| s.offset);
    let result = (|| -> Result<()> {
        for run in &v.pages {
            let Some(off) = run.offset else { continue };
            let owner = run.from_pid.unwrap_or(p.pid);
            let q = tree.processes.iter().find(|q| q.pid == owner).expect("checked");
            let source = PageSource::open(reader, q)?;
            let len = (run.pages * torpor_sys::PAGE) as usize;
            let at = offset + (run.addr - v.start);
            // SAFETY: the segment is mapped at `base` for its whole size, which the
            // checked page runs stay within.
            let dst =
                unsafe { std::slice::from_raw_parts_mut((base as *mut u8).add(at as usize), len) };
            source.read_at(dst, off)?;
        }
        Ok(())
    })();
    // SAFETY: detaches what shmat attached above.
    unsafe { libc::shmdt(base) };
    result
}

/// Creates each shared anonymous memory object once, as large as its largest mapping
/// needs: an anonymous shared mapping made in torpor and reopened through
/// `/proc/self/map_files`, so it is the same kind of object the process had.
fn shmem_objects(tree: &model::Tree) -> Result<HashMap<u64, OwnedFd>> {
    let mut sizes: HashMap<u64, u64> = HashMap::new();
    for v in tree.processes.iter().flat_map(|p| &p.vmas) {
        if matches!(v.kind, VmaKind::SysvShm { .. }) {
            continue;
        }
        if let Some(shm) = v.shmem {
            let e = sizes.entry(shm.id).or_insert(0);
            *e = (*e).max(shm.offset + v.len());
        }
    }
    let mut out = HashMap::new();
    for (id, size) in sizes {
        let err = |source| RestoreError::Prepare { what: "shared memory".into(), source };
        // SAFETY: a new shared anonymous mapping, unmapped below once reopened.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(err(io::Error::last_os_error()));
        }
        let path = format!("/proc/self/map_files/{:x}-{:x}", addr as u64, addr as u64 + size);
        let f = OpenOptions::new().read(true).write(true).open(&path).map(OwnedFd::from);
        // SAFETY: unmaps exactly the mapping made above; the file keeps the object alive.
        unsafe { libc::munmap(addr, size as usize) };
        out.insert(id, f.map_err(err)?);
    }
    Ok(out)
}

/// A TCP or UDP socket bound where it was, listening or connected as it was, with its
/// options and (UDP) the datagrams it had queued.
fn make_inet_socket(
    reader: &ImageReader,
    tree: &model::Tree,
    kind: &OpenFileKind,
) -> Result<OwnedFd> {
    use torpor_sys::sock;
    let OpenFileKind::Inet {
        family,
        sock_type,
        protocol,
        local,
        peer,
        listen_backlog,
        options,
        tcp,
        buffers,
        ended,
        ..
    } = kind
    else {
        unreachable!()
    };
    let local = hex::decode(local).unwrap_or_default();
    let where_ = sock::describe_addr(&local);
    let err = |what: &str| {
        let what = format!("the socket on {where_} ({what} failed)");
        move |source| RestoreError::Prepare { what, source }
    };
    // SAFETY: socket takes integers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(*family, *sock_type | libc::SOCK_CLOEXEC, *protocol) };
    if fd < 0 {
        return Err(err("create")(io::Error::last_os_error()));
    }
    // SAFETY: just created, owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let early = |o: &&model::SockOpt| {
        matches!(
            (o.level, o.name),
            (libc::SOL_SOCKET, libc::SO_REUSEADDR | libc::SO_REUSEPORT)
                | (libc::IPPROTO_IP, libc::IP_FREEBIND | libc::IP_TRANSPARENT)
                | (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
        )
    };
    let set = |o: &model::SockOpt| set_option(&sock, o, &where_);
    let auto = tcp.is_some().then(|| listener_buffers(tree, *family, &local));
    set_buffers(&sock, buffers.as_ref(), auto, &where_)?;
    if let Some(state) = tcp {
        let peer = hex::decode(peer.as_deref().unwrap_or_default()).unwrap_or_default();
        repair_connection(reader, &sock, &local, &peer, state).map_err(|source| {
            RestoreError::Prepare {
                what: format!("the TCP connection {where_} -> {}", sock::describe_addr(&peer)),
                source,
            }
        })?;
        // Still in repair mode: see `end_repair`.
        return Ok(sock);
    }
    if *ended {
        for o in options {
            set(o)?;
        }
        // Shutting down a socket that never connected fails with ENOTCONN, but the
        // kernel marks it shut down first: it then reads end-of-file and sending fails
        // with EPIPE, as the ended connection did. Not bound: its port may belong to a
        // listener of the tree again.
        // SAFETY: shutdown takes a descriptor and a flag.
        let r = unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
        let e = io::Error::last_os_error();
        if r < 0 && e.raw_os_error() != Some(libc::ENOTCONN) {
            return Err(err("shutdown")(e));
        }
        return Ok(sock);
    }
    for o in options.iter().filter(early) {
        set(o)?;
    }
    // The dumped process's connections may linger in TIME_WAIT on this port: reuse the
    // address for the bind, then put the option back as the program had it.
    let reuse = sock::sockopt(&sock, libc::SO_REUSEADDR).unwrap_or(0);
    let _ = sock::set_sockopt(&sock, libc::SO_REUSEADDR, 1);
    let unbound = local.len() < 4 || local[2..4] == [0, 0];
    if !unbound {
        // SAFETY: `local` holds a socket address of the length passed.
        let r =
            unsafe { libc::bind(sock.as_raw_fd(), local.as_ptr() as *const _, local.len() as _) };
        if r < 0 {
            return Err(err("bind")(io::Error::last_os_error()));
        }
    }
    let _ = sock::set_sockopt(&sock, libc::SO_REUSEADDR, reuse);
    if let Some(peer) = peer {
        let peer = hex::decode(peer).unwrap_or_default();
        // SAFETY: `peer` holds a socket address of the length passed.
        let r =
            unsafe { libc::connect(sock.as_raw_fd(), peer.as_ptr() as *const _, peer.len() as _) };
        if r < 0 {
            return Err(err("connect")(io::Error::last_os_error()));
        }
    }
    if let Some(backlog) = listen_backlog {
        // SAFETY: listen takes integers.
        if unsafe { libc::listen(sock.as_raw_fd(), *backlog) } < 0 {
            return Err(err("listen")(io::Error::last_os_error()));
        }
    }
    for o in options.iter().filter(|o| !early(o)) {
        set(o)?;
    }
    Ok(sock)
}

/// Rebuilds an established TCP connection in repair mode: bound, with its sequence
/// numbers, connected without a handshake, with its options, window, bytes in flight and
/// timestamp; then out of repair mode, which sends the peer a window probe and nothing
/// it could object to.
fn repair_connection(
    reader: &ImageReader,
    s: &OwnedFd,
    local: &[u8],
    peer: &[u8],
    t: &model::TcpState,
) -> io::Result<()> {
    use torpor_sys::sock::{self, tcp_repair::*};
    let queue_bytes = |name: &Option<String>| -> io::Result<Vec<u8>> {
        match name {
            Some(n) => reader.read_file(n).map_err(io::Error::other),
            None => Ok(Vec::new()),
        }
    };
    let send = queue_bytes(&t.send_queue)?;
    let recv = queue_bytes(&t.recv_queue)?;

    // In repair mode the address may be reused freely (the listener has it too).
    sock::set_tcp_opt(s, TCP_REPAIR, 1)?;
    // SAFETY: `local` holds a socket address of the length passed.
    if unsafe { libc::bind(s.as_raw_fd(), local.as_ptr() as *const _, local.len() as _) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // The saved sequence numbers count the FINs; the socket starts established, before
    // them, and the FINs are played again below.
    let send_end = t.send_seq.wrapping_sub(u32::from(t.state.fin_sent()));
    let recv_end = t.recv_seq.wrapping_sub(u32::from(t.state.fin_received()));
    sock::set_tcp_opt(s, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
    sock::set_tcp_opt(s, TCP_QUEUE_SEQ, send_end.wrapping_sub(t.send_len) as i32)?;
    sock::set_tcp_opt(s, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
    sock::set_tcp_opt(s, TCP_QUEUE_SEQ, recv_end.wrapping_sub(t.recv_len) as i32)?;
    // SAFETY: `peer` holds a socket address of the length passed; in repair mode this
    // sends nothing and makes the socket established.
    if unsafe { libc::connect(s.as_raw_fd(), peer.as_ptr() as *const _, peer.len() as _) } < 0 {
        return Err(io::Error::last_os_error());
    }

    // struct tcp_repair_opt { code, value } for each negotiated option.
    let mut opts: Vec<u8> = Vec::new();
    let mut opt = |code: u32, val: u32| {
        opts.extend_from_slice(&code.to_ne_bytes());
        opts.extend_from_slice(&val.to_ne_bytes());
    };
    opt(TCPOPT_MSS, t.mss);
    if t.wscale {
        opt(TCPOPT_WINDOW, t.snd_wscale as u32 | (t.rcv_wscale as u32) << 16);
    }
    if t.timestamps {
        opt(TCPOPT_TIMESTAMP, 0);
    }
    if t.sack {
        opt(TCPOPT_SACK_PERM, 0);
    }
    sock::set_sockopt_raw(s, libc::IPPROTO_TCP, TCP_REPAIR_OPTIONS, &opts)?;

    // The bytes in flight: written in repair mode, each goes to the named queue.
    let fill = |q: i32, bytes: &[u8]| -> io::Result<()> {
        sock::set_tcp_opt(s, TCP_REPAIR_QUEUE, q)?;
        let mut at = 0;
        while at < bytes.len() {
            // SAFETY: sends the unsent tail of `bytes`.
            let n = unsafe {
                libc::send(s.as_raw_fd(), bytes[at..].as_ptr() as *const _, bytes.len() - at, 0)
            };
            if n <= 0 {
                return Err(io::Error::last_os_error());
            }
            at += n as usize;
        }
        Ok(())
    };
    fill(TCP_SEND_QUEUE, &send)?;
    fill(TCP_RECV_QUEUE, &recv)?;

    // The window's rcv_wup may count the peer's FIN, which the socket has not seen yet;
    // the kernel refuses one past what it has received.
    let mut window = t.window;
    if t.state.fin_received() && window[4] == t.recv_seq {
        window[4] = recv_end;
    }
    let window: Vec<u8> = window.iter().flat_map(|w| w.to_ne_bytes()).collect();
    sock::set_sockopt_raw(s, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, &window)?;
    if t.timestamps {
        sock::set_tcp_opt(s, TCP_TIMESTAMP, t.timestamp as i32)?;
    }
    if t.state != model::TcpConnState::Established {
        close_half(s, local, peer, t, send_end, recv_end)?;
    }
    // Shutting down reading only marks the socket: nothing goes to the peer.
    if t.read_shut {
        nix::sys::socket::shutdown(s.as_raw_fd(), nix::sys::socket::Shutdown::Read)?;
    }
    Ok(())
}

/// Brings a rebuilt connection, still in repair mode, from established to the closing
/// state it was saved in, by the same steps the kernel took the first time.
///
/// This end's FIN: a `shutdown` in repair mode queues it as sent without sending it, so
/// it takes its sequence number and writing fails from then on; once out of repair mode
/// the kernel retransmits it until acknowledged, which a peer that had it already simply
/// acknowledges again. The peer's FIN: repair mode offers no way to queue one, so it is
/// delivered as the peer would, a segment sent to the socket through a raw socket (which
/// the connection's lock lets through). The socket still takes in segments in repair
/// mode; the acknowledgement it answers with is one the peer has had already.
fn close_half(
    s: &OwnedFd,
    local: &[u8],
    peer: &[u8],
    t: &model::TcpState,
    send_end: u32,
    recv_end: u32,
) -> io::Result<()> {
    use model::TcpConnState as St;
    use torpor_sys::netlock::{self, TCP_ACK, TCP_FIN};
    use torpor_sys::sock::{self, tcp_repair::*};
    let (Some(local), Some(peer)) = (sock::to_socket_addr(local), sock::to_socket_addr(peer))
    else {
        return Err(io::Error::other("the saved addresses are not IP addresses"));
    };
    let conn = netlock::Conn { local, peer };
    // The window the peer advertised, as its segments carry it (scaled down).
    let window = (t.window[1] >> t.snd_wscale).min(u16::MAX as u32) as u16;
    // What the peer had acknowledged: everything but the unacknowledged data and FIN.
    let una = send_end.wrapping_sub(t.send_len);
    let shutdown = || -> io::Result<()> {
        // Only with the send queue selected does repair mode keep the FIN from the wire.
        sock::set_tcp_opt(s, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
        nix::sys::socket::shutdown(s.as_raw_fd(), nix::sys::socket::Shutdown::Write)?;
        Ok(())
    };
    let peer_fin = || netlock::send_as_peer(conn, recv_end, una, TCP_FIN | TCP_ACK, window);
    match t.state {
        St::Established => {}
        St::FinWait1 => shutdown()?,
        St::FinWait2 => {
            shutdown()?;
            // The peer had acknowledged the FIN: acknowledge it again.
            netlock::send_as_peer(conn, recv_end, t.send_seq, TCP_ACK, window)?;
        }
        St::CloseWait => peer_fin()?,
        // The peer's FIN came first, then this end's.
        St::LastAck => {
            peer_fin()?;
            shutdown()?;
        }
        // This end's FIN went first, the peer's crossed it.
        St::Closing => {
            shutdown()?;
            peer_fin()?;
        }
    }
    // The segments went through the loopback device; check they were taken.
    let want = t.state.kernel();
    let mut got = 0;
    for _ in 0..100 {
        got = sock::sockopt_raw(s, libc::IPPROTO_TCP, libc::TCP_INFO)
            .map_err(io::Error::other)?
            .first()
            .copied()
            .unwrap_or(0);
        if got == want {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Err(io::Error::other(format!(
        "the rebuilt connection is in TCP state {got}, not {want} ({:?})",
        t.state
    )))
}

/// The buffer sizes of a TCP listener of the tree on the port of `local` (a raw address),
/// which connections accepted from it inherited.
fn listener_buffers(tree: &model::Tree, family: i32, local: &[u8]) -> Option<model::SockBuffers> {
    let port = local.get(2..4)?;
    tree.processes.iter().flat_map(|p| &p.open_files).find_map(|o| match &o.kind {
        OpenFileKind::Inet { family: f, listen_backlog: Some(_), local: l, buffers, .. }
            if *f == family && hex::decode(l).ok()?.get(2..4) == Some(port) =>
        {
            *buffers
        }
        _ => None,
    })
}

/// Gives a socket its saved buffer sizes where they differ from a new socket's.
///
/// The saved sizes are what `getsockopt` reported, twice what was asked for; asking for
/// half gives them back. Beyond `net.core.rmem_max` / `wmem_max` only `SO_RCVBUFFORCE` /
/// `SO_SNDBUFFORCE` (`CAP_NET_ADMIN`) reach them; without it the socket gets the maximum,
/// with a warning.
///
/// A TCP connection's buffers grow by themselves as it carries data (unless the program
/// set them, which stops that), and no interface tells which. On a connection (`auto` is
/// `Some`, holding the sizes of the listener it may come from) a size is taken for the
/// program's only when automatic sizing cannot have made it: below a new socket's (it
/// only grows them), or equal to its listener's (accepted connections inherit those, and
/// listeners never size themselves). Other sizes are left for the kernel to grow again.
fn set_buffers(
    sock: &OwnedFd,
    saved: Option<&model::SockBuffers>,
    auto: Option<Option<model::SockBuffers>>,
    where_: &str,
) -> Result<()> {
    use torpor_sys::sock::{set_sockopt, sockopt};
    let Some(saved) = saved else { return Ok(()) };
    let listener = auto.flatten();
    for (opt, force, want, inherited, limit, what) in [
        (
            libc::SO_RCVBUF,
            libc::SO_RCVBUFFORCE,
            saved.rcvbuf,
            listener.map(|l| l.rcvbuf),
            "rmem_max",
            "receive",
        ),
        (
            libc::SO_SNDBUF,
            libc::SO_SNDBUFFORCE,
            saved.sndbuf,
            listener.map(|l| l.sndbuf),
            "wmem_max",
            "send",
        ),
    ] {
        let err = |source: torpor_sys::Error| RestoreError::Prepare {
            what: format!("the socket on {where_} (its {what} buffer size)"),
            source: io::Error::other(source),
        };
        let now = sockopt(sock, opt).map_err(err)? as u32;
        if want == now || (auto.is_some() && want > now && inherited != Some(want)) {
            continue;
        }
        let ask = (want / 2).min(i32::MAX as u32) as i32;
        let max = fs::read_to_string(format!("/proc/sys/net/core/{limit}"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .unwrap_or(i32::MAX);
        if ask > max && set_sockopt(sock, force, ask).is_ok() {
            continue;
        }
        set_sockopt(sock, opt, ask).map_err(err)?;
        let got = sockopt(sock, opt).map_err(err)? as u32;
        if got != want {
            tracing::warn!(
                "the socket on {where_} gets a {what} buffer of {got} bytes instead of {want}: \
                 net.core.{limit} is {max} and torpor may not exceed it (no CAP_NET_ADMIN)"
            );
        }
    }
    Ok(())
}

/// Sets a saved socket option where it differs from what the socket has: some options
/// can only be set in some states (TCP_FASTOPEN before connecting), and leaving a default
/// alone changes nothing.
fn set_option(sock: &OwnedFd, o: &model::SockOpt, where_: &str) -> Result<()> {
    let v = hex::decode(&o.value).unwrap_or_default();
    if torpor_sys::sock::sockopt_raw(sock, o.level, o.name).ok().as_deref() == Some(&v[..]) {
        return Ok(());
    }
    torpor_sys::sock::set_sockopt_raw(sock, o.level, o.name, &v).map_err(|source| {
        RestoreError::Prepare {
            what: format!("the socket on {where_} (setting option {}/{} failed)", o.level, o.name),
            source,
        }
    })
}

/// Takes the restored TCP connections out of repair mode, which sends each peer a window
/// probe, and sets the options repair mode overrides. Done once the whole tree is
/// rebuilt: until then a failed restore closes them without a word to the peer.
pub(crate) fn end_repair(tree: &model::Tree, prep: &Prepared) -> Result<()> {
    let mut done = std::collections::HashSet::new();
    for p in &tree.processes {
        for (i, o) in p.open_files.iter().enumerate() {
            let OpenFileKind::Inet { tcp: Some(_), options, local, .. } = &o.kind else {
                continue;
            };
            let obj = prep.fd_objects[&(p.pid, i)];
            if !done.insert(obj) {
                continue;
            }
            let s = &prep.objects[obj];
            let where_ = torpor_sys::sock::describe_addr(&hex::decode(local).unwrap_or_default());
            torpor_sys::sock::set_tcp_opt(s, torpor_sys::sock::tcp_repair::TCP_REPAIR, 0).map_err(
                |source| RestoreError::Prepare {
                    what: format!("the TCP connection on {where_} (leaving repair mode failed)"),
                    source,
                },
            )?;
            for o in options {
                set_option(s, o, &where_)?;
            }
        }
    }
    Ok(())
}

/// A unix socket address (`sockaddr_un`): a path, or `@name` for an abstract one.
fn unix_addr(name: &str) -> Vec<u8> {
    let mut a = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
    match name.strip_prefix('@') {
        Some(abs) => {
            a.push(0);
            a.extend_from_slice(abs.as_bytes());
        }
        None => {
            a.extend_from_slice(name.as_bytes());
            a.push(0);
        }
    }
    a
}

/// A unix socket bound where it was, listening if it was (its queued datagrams come
/// later, see `refill_unix_datagrams`).
///
/// The socket file a path leaves behind outlives its process. One nobody answers on is
/// stale and removed before binding; one a live process still answers on is refused.
fn make_unix_bound(kind: &OpenFileKind) -> Result<OwnedFd> {
    let OpenFileKind::UnixBound {
        sock_type,
        name,
        listen_backlog,
        file_mode,
        file_uid,
        file_gid,
        ..
    } = kind
    else {
        unreachable!()
    };
    let err = |what: &str| {
        let what = format!("the unix socket on {name:?} ({what} failed)");
        move |source| RestoreError::Prepare { what, source }
    };
    // SAFETY: socket takes integers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, *sock_type | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err("create")(io::Error::last_os_error()));
    }
    // SAFETY: just created, owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    if name.is_empty() {
        return Ok(sock);
    }
    let addr = unix_addr(name);
    if name.starts_with('/') && fs::symlink_metadata(name).is_ok() {
        // SAFETY: a probe socket, connected to the address of the length passed.
        let live = unsafe {
            let probe = libc::socket(libc::AF_UNIX, *sock_type | libc::SOCK_CLOEXEC, 0);
            let r = libc::connect(probe, addr.as_ptr() as *const _, addr.len() as _);
            libc::close(probe);
            r == 0
        };
        if live {
            return Err(err("bind")(io::Error::from_raw_os_error(libc::EADDRINUSE)));
        }
        fs::remove_file(name).map_err(err("remove the stale socket file for"))?;
    }
    // SAFETY: `addr` holds a sockaddr_un of the length passed.
    if unsafe { libc::bind(sock.as_raw_fd(), addr.as_ptr() as *const _, addr.len() as _) } < 0 {
        return Err(err("bind")(io::Error::last_os_error()));
    }
    if name.starts_with('/') {
        let c = std::ffi::CString::new(name.as_str())
            .map_err(|_| err("name")(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: chmod and lchown take a NUL-terminated path and integers.
        unsafe {
            libc::chmod(c.as_ptr(), *file_mode);
            libc::lchown(c.as_ptr(), *file_uid, *file_gid);
        }
    }
    if let Some(backlog) = listen_backlog {
        // SAFETY: listen takes integers.
        if unsafe { libc::listen(sock.as_raw_fd(), *backlog) } < 0 {
            return Err(err("listen")(io::Error::last_os_error()));
        }
    }
    Ok(sock)
}

/// Makes the unix sockets whose peer is outside the image (`dump --external`), one per
/// open file description, bound to their own names and connected to their peers'
/// addresses: keyed by the (pid, index into its `open_files`) of their first use.
///
/// It runs before anything else is made, so that a peer gone since the dump stops the
/// restore with nothing to undo but the socket files bound here, which are removed.
fn connect_externals(tree: &model::Tree) -> Result<HashMap<(i32, usize), OwnedFd>> {
    let mut made = HashMap::new();
    let mut ids = std::collections::HashSet::new();
    let mut bound: Vec<String> = Vec::new();
    let result = (|| {
        for p in &tree.processes {
            for (i, o) in p.open_files.iter().enumerate() {
                let OpenFileKind::UnixExternal {
                    sock_type,
                    name,
                    file_mode,
                    file_uid,
                    file_gid,
                    peer_name,
                    ..
                } = &o.kind
                else {
                    continue;
                };
                if o.id != 0 && !ids.insert(o.id) {
                    continue;
                }
                let fd = p.fds.iter().find(|f| f.open_file == i).map_or(-1, |f| f.fd);
                // Bound as it was, through the same checks as a socket of the tree.
                let sock = make_unix_bound(&OpenFileKind::UnixBound {
                    sock_type: *sock_type,
                    name: name.clone(),
                    listen_backlog: None,
                    file_mode: *file_mode,
                    file_uid: *file_uid,
                    file_gid: *file_gid,
                    queue: None,
                    options: Vec::new(),
                    buffers: None,
                    queue_senders: false,
                })?;
                if name.starts_with('/') {
                    bound.push(name.clone());
                }
                connect_unix(&sock, peer_name).map_err(|source| RestoreError::ExternalPeer {
                    pid: p.pid,
                    fd,
                    addr: peer_name.clone(),
                    source,
                })?;
                made.insert((p.pid, i), sock);
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        for path in bound {
            let _ = fs::remove_file(path);
        }
        return Err(e);
    }
    Ok(made)
}

/// Connects a unix socket to `name` (a path or `@name`), waiting a little while the
/// listener's backlog is full rather than blocking for good.
fn connect_unix(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let addr = unix_addr(name);
    // SAFETY: fcntl on our own descriptor.
    let flags = unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        // SAFETY: `addr` holds a sockaddr_un of the length passed.
        let r =
            unsafe { libc::connect(sock.as_raw_fd(), addr.as_ptr() as *const _, addr.len() as _) };
        if r == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) || std::time::Instant::now() > deadline {
            return Err(e);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_SETFL, flags) };
    Ok(())
}

/// A memfd with the saved name, content and seals.
fn make_memfd(reader: &ImageReader, m: &model::Memfd, saved: &str) -> Result<File> {
    let err = |source| RestoreError::Prepare { what: format!("memfd {:?}", m.name), source };
    let name = std::ffi::CString::new(m.name.as_str())
        .map_err(|_| err(io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: memfd_create takes a NUL-terminated name and flags.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: just created, owned by nobody else.
    let mut f = unsafe { File::from_raw_fd(fd) };
    reader.open_content(saved)?.copy_to(&mut f)?;
    let seals = m.seals as i32;
    // SAFETY: fcntl on our own descriptor.
    if seals != 0 && unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(f)
}

/// An inotify instance with its watches under their descriptors. The kernel numbers
/// watches in order; numbers in between, of watches removed before the dump, are used up
/// by throwaway watches on files of a scratch directory.
fn make_inotify(watches: &[model::InotifyWatch]) -> Result<OwnedFd> {
    let err = |what: String| move |source| RestoreError::Prepare { what, source };
    // SAFETY: inotify_init1 takes flags and returns a new descriptor or -1.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(err("an inotify instance".into())(io::Error::last_os_error()));
    }
    // SAFETY: just created, owned by nobody else.
    let ino = unsafe { OwnedFd::from_raw_fd(fd) };
    let add = |path: &str, mask: u32| -> io::Result<i32> {
        let c = std::ffi::CString::new(path)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a NUL-terminated path and integers.
        let wd = unsafe { libc::inotify_add_watch(ino.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(wd)
    };
    let scratch = std::env::temp_dir().join(format!("torpor-inotify-{}", std::process::id()));
    let mut next = 1;
    for w in watches {
        while next < w.wd {
            // A throwaway watch on a fresh file uses up one number.
            let _ = fs::create_dir_all(&scratch);
            let f = scratch.join(next.to_string());
            fs::write(&f, b"").map_err(err("a scratch file".into()))?;
            let wd = add(&f.to_string_lossy(), libc::IN_ATTRIB)
                .map_err(err("a scratch watch".into()))?;
            // SAFETY: integers.
            unsafe { libc::inotify_rm_watch(ino.as_raw_fd(), wd) };
            next = wd + 1;
        }
        let wd = add(&w.path, w.mask).map_err(err(format!("the inotify watch on {}", w.path)))?;
        if wd != w.wd {
            let _ = fs::remove_dir_all(&scratch);
            return Err(RestoreError::Unsupported {
                what: format!("inotify watch {} on {} (the kernel gave {wd})", w.wd, w.path),
            });
        }
        next = wd + 1;
    }
    let _ = fs::remove_dir_all(&scratch);
    // Removing the throwaway watches queued IN_IGNORED events the program never caused.
    // SAFETY: fcntl and read on our own descriptor, into a local buffer.
    unsafe {
        libc::fcntl(ino.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
        let mut buf = [0u8; 4096];
        while libc::read(ino.as_raw_fd(), buf.as_mut_ptr() as *mut _, buf.len()) > 0 {}
        libc::fcntl(ino.as_raw_fd(), libc::F_SETFL, 0);
    }
    Ok(ino)
}

/// An eventfd holding `count`. The initial value takes 32 bits only; a larger count is
/// written in.
fn make_eventfd(count: u64, semaphore: bool) -> Result<OwnedFd> {
    let err = |source| RestoreError::Prepare { what: "an eventfd".into(), source };
    let flags = libc::EFD_CLOEXEC | if semaphore { libc::EFD_SEMAPHORE } else { 0 };
    let init = u32::try_from(count).unwrap_or(0);
    // SAFETY: eventfd takes integers and returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(init, flags) };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: just created, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if u64::from(init) != count {
        let mut f = File::from(fd.try_clone().map_err(err)?);
        f.write_all(&count.to_ne_bytes()).map_err(err)?;
    }
    Ok(fd)
}

/// A timerfd armed for the time that was left, with the expirations not yet read.
fn make_timerfd(
    clock: i32,
    ticks: u64,
    flags: u32,
    value_ns: u64,
    interval_ns: u64,
) -> Result<OwnedFd> {
    let err = |source| RestoreError::Prepare { what: "a timerfd".into(), source };
    // TFD_IOC_SET_TICKS: _IOW('T', 0, u64), for checkpoint/restore.
    const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;
    // SAFETY: timerfd_create takes integers and returns a new descriptor or -1.
    let fd = unsafe { libc::timerfd_create(clock, libc::TFD_CLOEXEC) };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: just created, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // A periodic timer that just fired shows no time left: the next expiry is one
    // interval away.
    let value_ns = if value_ns == 0 { interval_ns } else { value_ns };
    if value_ns != 0 {
        let ts = |ns: u64| libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        };
        let mut new = libc::itimerspec { it_interval: ts(interval_ns), it_value: ts(value_ns) };
        let mut set_flags = 0;
        // An absolute timer (required for cancel-on-set) stays absolute: now plus the
        // time left.
        if flags & libc::TFD_TIMER_ABSTIME as u32 != 0 {
            let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: writes one timespec.
            unsafe { libc::clock_gettime(clock, &mut now) };
            let abs = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64 + value_ns;
            new.it_value = ts(abs);
            set_flags = flags as i32;
        }
        // SAFETY: reads one itimerspec; no old value asked for.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), set_flags, &new, std::ptr::null_mut()) }
            < 0
        {
            return Err(err(io::Error::last_os_error()));
        }
    }
    if ticks > 0 {
        // SAFETY: the ioctl reads one u64.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &ticks as *const u64) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
    }
    Ok(fd)
}

fn open_ro(path: &str) -> Result<OwnedFd> {
    File::open(path)
        .map(OwnedFd::from)
        .map_err(|source| RestoreError::Prepare { what: path.to_string(), source })
}

/// Flags that make sense only when a file is first opened.
const CREATE_FLAGS: i32 = libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY;

fn open_file(
    reader: &ImageReader,
    tree: &model::Tree,
    o: &model::OpenFile,
    ghosts: &mut Ghosts,
) -> Result<OwnedFd> {
    let fd = match &o.kind {
        OpenFileKind::Regular { file } => open_tree_file(reader, tree, *file, o.flags, ghosts)?,
        OpenFileKind::Directory { path } | OpenFileKind::CharDevice { path, .. } => {
            OpenOptions::new().open_flags(path, o.flags)?
        }
        // A stand-in until the processes exist: see `late_open`.
        OpenFileKind::ProcFile { .. } => open_ro("/dev/null")?,
        OpenFileKind::Inet { .. } => make_inet_socket(reader, tree, &o.kind)?,
        OpenFileKind::UnixBound { .. } => make_unix_bound(&o.kind)?,
        OpenFileKind::EventFd { count, semaphore } => make_eventfd(*count, *semaphore)?,
        OpenFileKind::Inotify { watches } => make_inotify(watches)?,
        OpenFileKind::SignalFd { mask } => {
            // SAFETY: signalfd4 reads an 8-byte mask from `mask` and returns a new
            // descriptor or -1.
            let fd = unsafe {
                libc::syscall(libc::SYS_signalfd4, -1, mask as *const u64, 8, libc::SFD_CLOEXEC)
            };
            if fd < 0 {
                return Err(RestoreError::Prepare {
                    what: "a signalfd".into(),
                    source: io::Error::last_os_error(),
                });
            }
            // SAFETY: just created, owned by nobody else.
            unsafe { OwnedFd::from_raw_fd(fd as i32) }
        }
        OpenFileKind::TimerFd { clock, ticks, settime_flags, value_ns, interval_ns } => {
            make_timerfd(*clock, *ticks, *settime_flags, *value_ns, *interval_ns)?
        }
        // Its registrations are made by the process itself once its descriptors are in
        // place: the kernel keys them by descriptor number in that process.
        OpenFileKind::Epoll { .. } => {
            // SAFETY: epoll_create1 takes flags and returns a new descriptor or -1.
            let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            if fd < 0 {
                return Err(RestoreError::Prepare {
                    what: "an epoll instance".into(),
                    source: io::Error::last_os_error(),
                });
            }
            // SAFETY: just created, owned by nobody else.
            unsafe { OwnedFd::from_raw_fd(fd) }
        }
        OpenFileKind::Pipe { .. }
        | OpenFileKind::UnixPair { .. }
        | OpenFileKind::UnixExternal { .. }
        | OpenFileKind::PtyMaster { .. }
        | OpenFileKind::PtySlave { .. }
        | OpenFileKind::Inherited { .. } => {
            unreachable!(
                "pipes, sockets and terminals are made in pairs, inherited ones duplicated, \
                 external ones connected first"
            )
        }
    };
    if matches!(o.kind, OpenFileKind::Regular { .. }) {
        let mut f = File::from(fd);
        f.seek(SeekFrom::Start(o.pos)).map_err(|source| RestoreError::Prepare {
            what: format!("offset {} in {}", o.pos, describe_kind(tree, &o.kind)),
            source,
        })?;
        return Ok(OwnedFd::from(f));
    }
    Ok(fd)
}

fn describe_kind(tree: &model::Tree, k: &OpenFileKind) -> String {
    match k {
        OpenFileKind::Regular { file } => tree.files[*file].path.clone(),
        OpenFileKind::Directory { path }
        | OpenFileKind::CharDevice { path, .. }
        | OpenFileKind::ProcFile { path } => path.clone(),
        OpenFileKind::Pipe { ino, .. } => format!("pipe:[{ino}]"),
        OpenFileKind::UnixPair { ino, .. } => format!("socket:[{ino}]"),
        OpenFileKind::Inherited { fd } => format!("descriptor {fd} of torpor restore"),
        OpenFileKind::PtyMaster { index } => format!("the master of /dev/pts/{index}"),
        OpenFileKind::PtySlave { index } => format!("/dev/pts/{index}"),
        OpenFileKind::EventFd { .. } => "an eventfd".into(),
        OpenFileKind::Inotify { .. } => "an inotify instance".into(),
        OpenFileKind::UnixBound { name, .. } => format!("a unix socket on {name:?}"),
        OpenFileKind::UnixExternal { peer_name, .. } => {
            format!("a unix socket connected to {peer_name:?}")
        }
        OpenFileKind::Inet { local, .. } => {
            let raw = hex::decode(local).unwrap_or_default();
            format!("a socket on {}", torpor_sys::sock::describe_addr(&raw))
        }
        OpenFileKind::SignalFd { .. } => "a signalfd".into(),
        OpenFileKind::TimerFd { .. } => "a timerfd".into(),
        OpenFileKind::Epoll { .. } => "an epoll instance".into(),
    }
}

trait OpenFlags {
    fn open_flags(&mut self, path: &str, flags: i32) -> Result<OwnedFd>;
}

impl OpenFlags for OpenOptions {
    fn open_flags(&mut self, path: &str, flags: i32) -> Result<OwnedFd> {
        // A file made by O_TMPFILE keeps that flag, whose bits include O_DIRECTORY: it
        // asked for a new file in a directory, and the file now exists (a database's
        // unnamed temporary files, restored as deleted files).
        let tmpfile_only = libc::O_TMPFILE & !libc::O_DIRECTORY;
        let flags = if flags & tmpfile_only != 0 { flags & !libc::O_TMPFILE } else { flags };
        let acc = flags & libc::O_ACCMODE;
        self.read(acc == libc::O_RDONLY || acc == libc::O_RDWR);
        self.write(acc == libc::O_WRONLY || acc == libc::O_RDWR);
        self.append(flags & libc::O_APPEND != 0);
        self.custom_flags(
            (flags & !CREATE_FLAGS & !libc::O_ACCMODE & !libc::O_APPEND) | libc::O_CLOEXEC,
        );
        self.open(path)
            .map(OwnedFd::from)
            .map_err(|source| RestoreError::Prepare { what: path.to_string(), source })
    }
}

/// Files that were deleted while open, recreated from the image: one unlinked inode per
/// saved file, shared by every descriptor and mapping of it.
#[derive(Default)]
struct Ghosts {
    made: HashMap<usize, File>,
}

/// Opens file `idx` of the tree with `flags`, recreating it if it was deleted.
fn open_tree_file(
    reader: &ImageReader,
    tree: &model::Tree,
    idx: usize,
    flags: i32,
    ghosts: &mut Ghosts,
) -> Result<OwnedFd> {
    let info = &tree.files[idx];
    let Some(saved) = &info.saved_content else {
        return OpenOptions::new().open_flags(&info.path, flags);
    };
    if let std::collections::hash_map::Entry::Vacant(e) = ghosts.made.entry(idx) {
        e.insert(make_ghost(reader, info, saved)?);
    }
    // Reopen the unlinked inode through /proc with the flags the process used.
    let fd = ghosts.made[&idx].as_raw_fd();
    OpenOptions::new().open_flags(&format!("/proc/self/fd/{fd}"), flags)
}

/// Creates an unlinked file holding a deleted file's saved content, next to where the
/// file was if that directory still exists.
fn make_ghost(reader: &ImageReader, info: &model::FileInfo, saved: &str) -> Result<File> {
    let err =
        |source| RestoreError::Prepare { what: format!("deleted file {}", info.path), source };
    if let Some(m) = &info.memfd {
        return make_memfd(reader, m, saved);
    }
    let dir = Path::new(&info.path).parent().filter(|d| d.is_dir()).unwrap_or(Path::new("/tmp"));
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .mode(0o600)
        .open(dir)
        .or_else(|_| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
                .mode(0o600)
                .open("/tmp")
        })
        .map_err(err)?;
    reader.open_content(saved)?.copy_to(&mut f)?;
    f.set_permissions(fs::Permissions::from_mode(info.mode & 0o7777)).map_err(err)?;
    Ok(f)
}
