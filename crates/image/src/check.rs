//! Consistency checks of a decoded [`Tree`]: what the JSON decoder cannot see.
//!
//! A tree that passes can be walked without bounds checks failing: every index points at
//! a record, every page run lies inside its mapping and inside its page file, and every
//! image file a record names is listed in the manifest (so it has been checked, or will
//! be, against its checksum).

use std::collections::HashSet;
use std::path::Path;

use crate::model::{OpenFileKind, Process, SigInfo, Tree, Vma, VmaKind};
use crate::{ImageError, Manifest, Result};

/// Size of the pages page runs count in.
const PAGE_SIZE: u64 = 4096;

/// Highest signal number on Linux.
const MAX_SIGNAL: usize = 64;

/// Bytes of a raw `siginfo_t`.
const SIGINFO_BYTES: usize = 128;

/// Checks that the records of `tree` are consistent with each other and with `manifest`.
/// `path` is only used in messages.
///
/// What is checked: the root process comes first and matches the manifest; pids, tids and
/// descriptor numbers are positive and unique; every index into `files` or `open_files`
/// is in range; mappings are page-aligned, non-empty and in increasing address order;
/// page runs are non-empty, page-aligned, in increasing order inside their mapping, and
/// those with data lie inside their page file; page, vDSO and saved-content files are
/// listed in the manifest; a process has at most 64 signal actions and at least one
/// thread, led by the thread whose tid is the pid; register and signal blobs are hex of
/// the right length.
pub fn check_tree(tree: &Tree, manifest: &Manifest, path: &Path) -> Result<()> {
    check(tree, manifest).map_err(|why| ImageError::Corrupt { path: path.to_path_buf(), why })
}

/// Length of the content of a file the manifest lists: in an encrypted image, what its
/// sealed bytes hold (0 for a length no sealed file can have, which its reader refuses).
fn listed_len(manifest: &Manifest, name: &str) -> Option<u64> {
    let f = manifest.files.iter().find(|f| f.name == name)?;
    match manifest.encryption {
        Some(_) => Some(crate::crypt::plain_len(f.len).unwrap_or(0)),
        None => Some(f.len),
    }
}

/// Checks that `index` is within a list of `len` records called `what`.
fn in_range(index: usize, len: usize, what: &str) -> std::result::Result<(), String> {
    if index < len {
        Ok(())
    } else {
        Err(format!("{what} index {index} is out of range ({len} {what} records)"))
    }
}

fn is_hex(s: &str) -> bool {
    s.len() % 2 == 0 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn check(tree: &Tree, manifest: &Manifest) -> std::result::Result<(), String> {
    if tree.root_pid != manifest.root_pid {
        return Err(format!(
            "root pid is {}, the manifest says {}",
            tree.root_pid, manifest.root_pid
        ));
    }
    match tree.processes.first() {
        None => return Err("holds no process".to_string()),
        Some(p) if p.pid != tree.root_pid => {
            return Err(format!("first process is {}, not the root {}", p.pid, tree.root_pid))
        }
        Some(_) => {}
    }

    for (i, f) in tree.files.iter().enumerate() {
        if let Some(name) = &f.saved_content {
            if listed_len(manifest, name).is_none() {
                return Err(format!(
                    "file {i} ({:?}): its saved content {name:?} is not in the manifest",
                    f.path
                ));
            }
        }
    }

    let mut pids = HashSet::new();
    for p in &tree.processes {
        if p.pid <= 0 || !pids.insert(p.pid) {
            return Err(format!("pid {} is not positive or appears twice", p.pid));
        }
        check_process(p, tree, manifest).map_err(|why| format!("process {}: {why}", p.pid))?;
    }
    check_ptys(tree, manifest)
}

/// Bytes of `c_cc` in the kernel's `struct termios2`.
const NCCS: usize = 19;

/// Pseudo-terminal pairs: one record per slave number, their data files listed, every
/// master or slave descriptor naming a pair that has a record, and the sessions they
/// control led by a process of the tree.
fn check_ptys(tree: &Tree, manifest: &Manifest) -> std::result::Result<(), String> {
    let mut indices = HashSet::new();
    for t in &tree.ptys {
        let what = format!("pseudo-terminal /dev/pts/{}", t.index);
        if !indices.insert(t.index) {
            return Err(format!("{what} appears twice"));
        }
        if t.termios.cc.len() != NCCS * 2 || !is_hex(&t.termios.cc) {
            return Err(format!("{what}: its control characters are not {NCCS} bytes of hex"));
        }
        for name in t.output.iter().chain(&t.input) {
            if listed_len(manifest, name).is_none() {
                return Err(format!("{what}: its queued data {name:?} is not in the manifest"));
            }
        }
        if let Some(sid) = t.session {
            if !tree.processes.iter().any(|p| p.pid == sid && p.sid == sid) {
                return Err(format!("{what} controls session {sid}, whose leader is not here"));
            }
        }
    }
    for p in &tree.processes {
        for (i, of) in p.open_files.iter().enumerate() {
            if let OpenFileKind::PtyMaster { index } | OpenFileKind::PtySlave { index } = of.kind {
                if !indices.contains(&index) {
                    return Err(format!(
                        "process {}: open file {i} is a pseudo-terminal /dev/pts/{index} \
                         without a record",
                        p.pid
                    ));
                }
            }
        }
    }
    Ok(())
}

fn check_process(p: &Process, tree: &Tree, manifest: &Manifest) -> std::result::Result<(), String> {
    in_range(p.mm.exe_file, tree.files.len(), "file")?;
    if let Some(name) = &p.page_hashes {
        if listed_len(manifest, name).is_none() {
            return Err(format!("page hash file {name:?} is not in the manifest"));
        }
    }
    if let Some(frames) = &p.page_frames {
        let file_len = listed_len(manifest, &p.pages_file)
            .ok_or_else(|| format!("page file {:?} is not in the manifest", p.pages_file))?;
        crate::pages::check_frames(frames, file_len)
            .map_err(|why| format!("page file {:?}: {why}", p.pages_file))?;
    }

    let mut prev_end = 0u64;
    for vma in &p.vmas {
        if vma.start % PAGE_SIZE != 0 || vma.end % PAGE_SIZE != 0 || vma.start >= vma.end {
            return Err(format!(
                "mapping {:#x}-{:#x} is empty or not page-aligned",
                vma.start, vma.end
            ));
        }
        if vma.start < prev_end {
            return Err(format!(
                "mapping {:#x}-{:#x} starts below the end of the one before ({prev_end:#x})",
                vma.start, vma.end
            ));
        }
        prev_end = vma.end;
        check_vma(vma, p, tree, manifest)
            .map_err(|why| format!("mapping {:#x}-{:#x}: {why}", vma.start, vma.end))?;
    }

    if p.sigactions.len() > MAX_SIGNAL {
        return Err(format!("{} signal actions, more than {MAX_SIGNAL}", p.sigactions.len()));
    }
    for s in &p.shared_pending {
        check_siginfo(s)?;
    }

    for (i, of) in p.open_files.iter().enumerate() {
        match &of.kind {
            OpenFileKind::Regular { file } => in_range(*file, tree.files.len(), "file")
                .map_err(|why| format!("open file {i}: {why}"))?,
            OpenFileKind::UnixBound { name, .. } | OpenFileKind::UnixPair { name, .. } => {
                check_unix_name(name).map_err(|why| format!("open file {i}: {why}"))?
            }
            OpenFileKind::UnixExternal { name, peer_name, .. } => {
                check_unix_name(name).map_err(|why| format!("open file {i}: {why}"))?;
                if peer_name.is_empty() {
                    return Err(format!("open file {i}: an external unix socket without peer"));
                }
                check_unix_name(peer_name).map_err(|why| format!("open file {i}: peer {why}"))?
            }
            _ => {}
        }
    }
    let mut fds = HashSet::new();
    for fd in &p.fds {
        if fd.fd < 0 || !fds.insert(fd.fd) {
            return Err(format!("descriptor {} is negative or appears twice", fd.fd));
        }
        in_range(fd.open_file, p.open_files.len(), "open file")
            .map_err(|why| format!("descriptor {}: {why}", fd.fd))?;
    }

    match p.threads.first() {
        None => return Err("has no thread".to_string()),
        Some(t) if t.tid != p.pid => {
            return Err(format!("first thread is {}, not the leader {}", t.tid, p.pid))
        }
        Some(_) => {}
    }
    let mut tids = HashSet::new();
    for t in &p.threads {
        if t.tid <= 0 || !tids.insert(t.tid) {
            return Err(format!("tid {} is not positive or appears twice", t.tid));
        }
        if !is_hex(&t.xsave) {
            return Err(format!("thread {}: its XSAVE area is not hex", t.tid));
        }
        for s in &t.pending {
            check_siginfo(s).map_err(|why| format!("thread {}: {why}", t.tid))?;
        }
    }
    Ok(())
}

fn check_vma(
    vma: &Vma,
    p: &Process,
    tree: &Tree,
    manifest: &Manifest,
) -> std::result::Result<(), String> {
    match &vma.kind {
        VmaKind::File { file, .. } => in_range(*file, tree.files.len(), "file")?,
        VmaKind::Vdso { content_file, .. } => {
            if listed_len(manifest, content_file).is_none() {
                return Err(format!("vDSO file {content_file:?} is not in the manifest"));
            }
        }
        VmaKind::Anon { .. }
        | VmaKind::Stack
        | VmaKind::Vvar { .. }
        | VmaKind::Vsyscall
        | VmaKind::SysvShm { .. } => {}
    }

    let mut prev_end = vma.start;
    for run in &vma.pages {
        let end = run
            .pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| run.addr.checked_add(len))
            .filter(|_| run.pages > 0 && run.addr % PAGE_SIZE == 0)
            .ok_or_else(|| {
                format!("page run at {:#x} of {} pages is empty or misaligned", run.addr, run.pages)
            })?;
        if run.addr < prev_end || end > vma.end {
            return Err(format!(
                "page run {:#x}-{end:#x} is outside the mapping or below the run before",
                run.addr
            ));
        }
        prev_end = end;

        let Some(offset) = run.offset else { continue };
        // Data in a parent image is checked against it when the chain is opened.
        if run.image > 0 {
            if manifest.parent.is_none() {
                return Err(format!(
                    "page run at {:#x} refers to parent image {}, but there is none",
                    run.addr, run.image
                ));
            }
            continue;
        }
        // Pages shared copy-on-write with another process are stored in its page file.
        let pages_file = match run.from_pid {
            None => &p.pages_file,
            Some(owner) => {
                &tree
                    .processes
                    .iter()
                    .find(|q| q.pid == owner)
                    .ok_or_else(|| {
                        format!(
                            "page run at {:#x} refers to pid {owner}, not in the image",
                            run.addr
                        )
                    })?
                    .pages_file
            }
        };
        let file_len = listed_len(manifest, pages_file)
            .ok_or_else(|| format!("page file {pages_file:?} is not in the manifest"))?;
        // A compressed file's runs count in its data before compression.
        let owner = run.from_pid.and_then(|o| tree.processes.iter().find(|q| q.pid == o));
        let data_len = match &owner.unwrap_or(p).page_frames {
            Some(f) => f.data_len,
            None => file_len,
        };
        let data_end = offset.checked_add(end - run.addr);
        if offset % PAGE_SIZE != 0 || data_end.map_or(true, |e| e > data_len) {
            return Err(format!(
                "page run at {:#x} has its {} pages at offset {offset:#x}, which is misaligned \
                 or past the end of {pages_file:?} ({data_len} bytes)",
                run.addr, run.pages
            ));
        }
    }
    Ok(())
}

/// Bytes of `sun_path` in `struct sockaddr_un`.
const UNIX_PATH_MAX: usize = 108;

/// A unix socket address as the image records it: empty, an absolute path, or `@name`
/// for an abstract one, fitting in a `sockaddr_un` (a path with its terminating NUL).
fn check_unix_name(name: &str) -> std::result::Result<(), String> {
    let fits = match name.strip_prefix('@') {
        Some(abs) => abs.len() < UNIX_PATH_MAX,
        None => name.is_empty() || (name.starts_with('/') && name.len() < UNIX_PATH_MAX),
    };
    if !fits || (name.contains('\0') && !name.starts_with('@')) {
        return Err(format!(
            "unix socket address {name:?} is not a path or @name of under {UNIX_PATH_MAX} bytes"
        ));
    }
    Ok(())
}

fn check_siginfo(s: &SigInfo) -> std::result::Result<(), String> {
    if s.signo < 1 || s.signo as usize > MAX_SIGNAL {
        return Err(format!("queued signal number {} is not 1..={MAX_SIGNAL}", s.signo));
    }
    if s.raw.len() != SIGINFO_BYTES * 2 || !is_hex(&s.raw) {
        return Err(format!(
            "queued signal {}: its siginfo is not {SIGINFO_BYTES} bytes of hex",
            s.signo
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Fd, PageRun, Tree};
    use crate::tests::{sample_tree, write_sample, DATA_PAGES, PAGES};
    use crate::{ImageReader, TREE};

    /// The sample tree and the manifest of the sample image, which it passes.
    fn sample() -> (Tree, Manifest) {
        let (_tmp, dir) = write_sample();
        let manifest = ImageReader::open(&dir).unwrap().manifest().clone();
        let tree = sample_tree();
        check_tree(&tree, &manifest, Path::new(TREE)).unwrap();
        (tree, manifest)
    }

    #[test]
    fn inconsistent_trees_are_refused() {
        type Edit = fn(&mut Tree, &mut Manifest);
        // Index of the heap among the sample's mappings.
        const HEAP: usize = 2;
        let cases: Vec<(&str, Edit)> = vec![
            ("root pid is 1", |t, _| t.root_pid = 1),
            ("holds no process", |t, _| t.processes.clear()),
            ("first process is 4243", |t, m| {
                t.processes[0].pid = 4243;
                t.processes.push(sample_tree().processes[0].clone());
                m.root_pid = 4242;
            }),
            ("pid 4242 is not positive or appears twice", |t, _| {
                t.processes.push(t.processes[0].clone())
            }),
            ("saved content \"file-0.img\"", |_, m| m.files.retain(|f| f.name != "file-0.img")),
            ("file index 2 is out of range", |t, _| t.processes[0].mm.exe_file = 2),
            ("mapping 0x555555554000-0x555555556001 is empty", |t, _| {
                t.processes[0].vmas[0].end += 1
            }),
            ("mapping 0x555555554000-0x555555554000 is empty", |t, _| {
                t.processes[0].vmas[0].end = t.processes[0].vmas[0].start
            }),
            ("starts below the end of the one before", |t, _| {
                t.processes[0].vmas[1].start -= 0x2000
            }),
            ("file index 9 is out of range", |t, _| {
                t.processes[0].vmas[0].kind = VmaKind::File { file: 9, offset: 0 }
            }),
            ("vDSO file \"vdso-9.img\" is not in the manifest", |t, _| {
                t.processes[0].vmas[5].kind =
                    VmaKind::Vdso { content_xxh3: String::new(), content_file: "vdso-9.img".into() }
            }),
            ("of 0 pages is empty", |t, _| t.processes[0].vmas[HEAP].pages[0].pages = 0),
            ("is empty or misaligned", |t, _| t.processes[0].vmas[HEAP].pages[0].addr += 1),
            ("is empty or misaligned", |t, _| {
                t.processes[0].vmas[HEAP].pages[0].pages = u64::MAX / 4096 + 1
            }),
            ("is outside the mapping", |t, _| t.processes[0].vmas[HEAP].pages[1].pages += 1),
            ("below the run before", |t, _| {
                let runs = &mut t.processes[0].vmas[HEAP].pages;
                runs.swap(0, 1)
            }),
            ("is outside the mapping", |t, _| t.processes[0].vmas[HEAP].pages[0].addr -= 4096),
            ("past the end of \"pages-4242.img\"", |t, _| {
                t.processes[0].vmas[HEAP].pages[1].offset = Some((DATA_PAGES - 30) * 4096)
            }),
            ("misaligned or past the end", |t, _| {
                t.processes[0].vmas[HEAP].pages[1].offset = Some(100)
            }),
            ("misaligned or past the end", |t, _| {
                t.processes[0].vmas[HEAP].pages[1].offset = Some(u64::MAX - 4095)
            }),
            ("refers to parent image 1, but there is none", |t, _| {
                t.processes[0].vmas[HEAP].pages[1].image = 1
            }),
            ("page file \"pages-4242.img\" is not in the manifest", |_, m| {
                m.files.retain(|f| f.name != PAGES)
            }),
            ("65 signal actions", |t, _| {
                let p = &mut t.processes[0];
                p.sigactions.push(p.sigactions[0])
            }),
            ("queued signal number 65", |t, _| t.processes[0].shared_pending[0].signo = 65),
            ("siginfo is not 128 bytes of hex", |t, _| {
                t.processes[0].shared_pending[0].raw.pop();
            }),
            ("thread 4243: queued signal 10", |t, _| {
                t.processes[0].threads[1].pending[0].raw.replace_range(0..1, "g")
            }),
            ("open file 1: file index 5", |t, _| {
                t.processes[0].open_files[1].kind = OpenFileKind::Regular { file: 5 }
            }),
            ("descriptor 4: open file index 3", |t, _| t.processes[0].fds[4].open_file = 3),
            ("descriptor 2 is negative or appears twice", |t, _| {
                t.processes[0].fds.push(Fd { fd: 2, cloexec: false, open_file: 0 })
            }),
            ("descriptor -1", |t, _| t.processes[0].fds[0].fd = -1),
            ("has no thread", |t, _| t.processes[0].threads.clear()),
            ("first thread is 4243, not the leader 4242", |t, _| t.processes[0].threads.swap(0, 1)),
            ("tid 4243 is not positive or appears twice", |t, _| {
                let th = t.processes[0].threads[1].clone();
                t.processes[0].threads.push(th)
            }),
            ("thread 4242: its XSAVE area is not hex", |t, _| {
                t.processes[0].threads[0].xsave.push('0')
            }),
            ("/dev/pts/7 appears twice", |t, _| t.ptys.push(t.ptys[0].clone())),
            ("control characters are not 19 bytes of hex", |t, _| t.ptys[0].termios.cc.push('0')),
            ("control characters are not 19 bytes of hex", |t, _| {
                t.ptys[0].termios.cc.replace_range(0..2, "zz")
            }),
            ("queued data \"pty-7-out.img\" is not in the manifest", |t, _| {
                t.ptys[0].output = Some("pty-7-out.img".into())
            }),
            ("controls session 99, whose leader is not here", |t, _| t.ptys[0].session = Some(99)),
            ("open file 1: peer unix socket address \"/xxxxxxxx", |t, _| {
                let peer = format!("/{}", "x".repeat(200));
                let json =
                    serde_json::json!({"type": "unix_external", "sock_type": 1, "peer_name": peer});
                t.processes[0].open_files[1].kind = serde_json::from_value(json).unwrap()
            }),
            ("open file 1: unix socket address \"relative\"", |t, _| {
                let json = serde_json::json!({"type": "unix_external", "sock_type": 1, "name": "relative", "peer_name": "@ok"});
                t.processes[0].open_files[1].kind = serde_json::from_value(json).unwrap()
            }),
            ("open file 1: an external unix socket without peer", |t, _| {
                let json =
                    serde_json::json!({"type": "unix_external", "sock_type": 2, "peer_name": ""});
                t.processes[0].open_files[1].kind = serde_json::from_value(json).unwrap()
            }),
            ("open file 1 is a pseudo-terminal /dev/pts/8 without a record", |t, _| {
                t.processes[0].open_files[1].kind = OpenFileKind::PtySlave { index: 8 }
            }),
        ];

        for (want, edit) in cases {
            let (mut tree, mut manifest) = sample();
            edit(&mut tree, &mut manifest);
            let e = check_tree(&tree, &manifest, Path::new(TREE)).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, ImageError::Corrupt { .. }), "{msg}");
            assert!(msg.starts_with("tree.json is corrupt: "), "{msg}");
            assert!(msg.contains(want), "{msg:?} does not say {want:?}");
        }
    }

    #[test]
    fn zero_runs_need_no_page_file() {
        let (mut tree, mut manifest) = sample();
        manifest.files.retain(|f| f.name != PAGES);
        for vma in &mut tree.processes[0].vmas {
            for run in &mut vma.pages {
                run.offset = None;
            }
        }
        check_tree(&tree, &manifest, Path::new(TREE)).unwrap();

        // Runs may share the end of one and the start of the next.
        let (mut tree, manifest) = sample();
        let heap = &mut tree.processes[0].vmas[2];
        heap.pages[1] = PageRun {
            addr: heap.start + 30 * 4096,
            pages: 31,
            offset: None,
            from_pid: None,
            image: 0,
        };
        check_tree(&tree, &manifest, Path::new(TREE)).unwrap();
    }
}
