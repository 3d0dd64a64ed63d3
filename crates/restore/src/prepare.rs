//! Checks made before anything is created, and the files opened for the new process.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use torpor_image::model::{self, OpenFileKind, VmaKind};
use torpor_image::ImageReader;
use xxhash_rust::xxh3::Xxh3;

use crate::child::{Plan, Target};
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
    let unsupported = |what: String| Err(RestoreError::Unsupported { what });
    if tree.processes.len() != 1 {
        return unsupported(format!("{} processes", tree.processes.len()));
    }
    let p = &tree.processes[0];
    if p.threads.is_empty() || p.threads.len() > 65536 {
        return unsupported(format!("{} threads in pid {}", p.threads.len(), p.pid));
    }
    if p.pid <= 0 || p.threads[0].tid != p.pid || p.threads.iter().any(|t| t.tid <= 0) {
        return unsupported(format!("pid {} with thread {}", p.pid, p.threads[0].tid));
    }
    // Every index in the records must point at something.
    let nfiles = tree.files.len();
    let bad = |what: String| Err(RestoreError::Unsupported { what });
    if p.mm.exe_file >= nfiles {
        return bad("an executable that is not in its file table".into());
    }
    for v in &p.vmas {
        if v.start >= v.end || v.start % torpor_sys::PAGE != 0 || v.end % torpor_sys::PAGE != 0 {
            return bad(format!("a malformed mapping {:#x}-{:#x}", v.start, v.end));
        }
        if let VmaKind::File { file, .. } = v.kind {
            if file >= nfiles {
                return bad(format!("mapping {:#x} of an unknown file", v.start));
            }
        }
        for r in &v.pages {
            let end = r.addr.checked_add(r.pages.saturating_mul(torpor_sys::PAGE));
            if r.addr < v.start || end.is_none_or(|e| e > v.end) {
                return bad(format!("page run {:#x} outside mapping {:#x}", r.addr, v.start));
            }
        }
    }
    for f in &p.fds {
        if f.open_file >= p.open_files.len() || f.fd < 0 {
            return bad(format!("fd {} pointing at nothing", f.fd));
        }
    }
    for o in &p.open_files {
        if let OpenFileKind::Regular { file } = o.kind {
            if file >= nfiles {
                return bad("a descriptor of an unknown file".into());
            }
        }
    }
    if p.sigactions.len() != 64 {
        return bad(format!("{} signal actions", p.sigactions.len()));
    }
    Ok(())
}

pub(crate) fn check_pid_free(pid: i32) -> Result<()> {
    if Path::new(&format!("/proc/{pid}")).exists() {
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
            Some(h) if meta.size() == f.size && hash_file(&f.path).as_deref().ok() == Some(h) => {}
            _ => return Err(changed(why)),
        }
    }
    Ok(())
}

fn hash_file(path: &str) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(torpor_image::digest_hex(&h));
        }
        h.update(&buf[..n]);
    }
}

/// The plan for the new process and where torpor's own files end up in it.
pub(crate) struct Prepared {
    pub plan: Plan,
    /// Auxiliary descriptor numbers inside the child.
    pub pages_fd: i32,
    pub zero_fd: i32,
    pub exe_fd: i32,
    /// Mapped file (index into the tree's files) to its descriptor in the child.
    pub map_fds: HashMap<usize, i32>,
}

/// Opens everything the new process needs.
pub(crate) fn prepare(
    reader: &ImageReader,
    tree: &model::Tree,
    p: &model::Process,
) -> Result<Prepared> {
    let mut ghosts = Ghosts::default();

    let mut sources: Vec<OwnedFd> = Vec::new();
    for o in &p.open_files {
        sources.push(open_file(reader, tree, o, &mut ghosts)?);
    }
    let n_fd_sources = sources.len();
    let targets = p
        .fds
        .iter()
        .map(|f| Target { source: f.open_file, fd: f.fd, cloexec: f.cloexec })
        .collect::<Vec<_>>();

    let mut aux: Vec<OwnedFd> = Vec::new();
    let mut add_aux = |f: OwnedFd| {
        aux.push(f);
        aux.len() - 1
    };
    let pages = open_ro(&reader.path(&p.pages_file)?.to_string_lossy())?;
    let pages_i = add_aux(pages);
    let zero_i = add_aux(open_ro("/dev/zero")?);
    let exe_i = add_aux(open_tree_file(reader, tree, p.mm.exe_file, libc::O_RDONLY, &mut ghosts)?);
    let mut map_idx = HashMap::new();
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

    let report = crate::child::pipe()?;
    // Every number the child inherits or installs lies below `base`.
    let max_target = p.fds.iter().map(|f| f.fd).max().unwrap_or(0);
    let max_own = fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()).max().unwrap_or(0)
        })
        .unwrap_or(1024);
    let base = max_target.max(max_own) + 1;
    sources.extend(aux);
    let cwd = CString::new(p.cwd.clone()).map_err(|_| RestoreError::Prepare {
        what: format!("working directory {:?}", p.cwd),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    let own_root = fs::read_link("/proc/self/root").map(|p| p.to_string_lossy().into_owned());
    let root = if own_root.as_deref().ok() == Some(p.root.as_str()) {
        None
    } else {
        Some(CString::new(p.root.clone()).map_err(|_| RestoreError::Prepare {
            what: format!("root directory {:?}", p.root),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?)
    };
    let plan = Plan {
        pid: p.pid,
        setsid: p.sid == p.pid,
        setpgid: p.pgid == p.pid,
        sources,
        n_fd_sources,
        targets,
        cwd,
        root,
        umask: p.umask,
        personality: p.personality,
        base,
        report: Some(report),
    };
    let map_fds = map_idx.into_iter().map(|(k, i)| (k, plan.aux_fd(i))).collect();
    Ok(Prepared {
        pages_fd: plan.aux_fd(pages_i),
        zero_fd: plan.aux_fd(zero_i),
        exe_fd: plan.aux_fd(exe_i),
        map_fds,
        plan,
    })
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
            open_with_flags(path, o.flags)?
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
        OpenFileKind::Directory { path } | OpenFileKind::CharDevice { path, .. } => path.clone(),
    }
}

fn open_with_flags(path: &str, flags: i32) -> Result<OwnedFd> {
    OpenOptions::new()
        .read(true)
        .custom_flags((flags & !CREATE_FLAGS & !libc::O_ACCMODE) | libc::O_CLOEXEC)
        .write(false)
        .open_flags(path, flags)
}

trait OpenFlags {
    fn open_flags(&mut self, path: &str, flags: i32) -> Result<OwnedFd>;
}

impl OpenFlags for OpenOptions {
    fn open_flags(&mut self, path: &str, flags: i32) -> Result<OwnedFd> {
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
    let mut src = File::open(reader.path(saved)?).map_err(err)?;
    io::copy(&mut src, &mut f).map_err(err)?;
    f.set_permissions(fs::Permissions::from_mode(info.mode & 0o7777)).map_err(err)?;
    Ok(f)
}
