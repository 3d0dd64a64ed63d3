//! Files a process has open or mapped, and its descriptor table.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use torpor_image::model::{Fd, FileInfo, OpenFile, OpenFileKind};
use torpor_image::ImageWriter;
use torpor_sys::proc;
use xxhash_rust::xxh3::Xxh3;

use crate::collect::UnsupportedReason;
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
            Some(hash_file(open_path)?)
        } else {
            None
        };
        let saved_content = if still_there {
            None
        } else {
            self.deleted.push((idx, open_path.to_string()));
            Some(format!("file-{idx}.img"))
        };
        self.infos.push(FileInfo {
            path,
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            mode: meta.mode(),
            content_xxh3,
            saved_content,
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

/// Reads the descriptor table: each descriptor, and the open file descriptions they share.
pub(crate) fn collect_fds(pid: i32, files: &mut FileTable) -> Result<(Vec<OpenFile>, Vec<Fd>)> {
    let err = |what: String| move |source| DumpError::Collect { pid, what, source };
    let mut open_files: Vec<OpenFile> = Vec::new();
    let mut fds: Vec<Fd> = Vec::new();
    // Descriptors by inode, to find the ones sharing an open file description.
    let mut by_inode: HashMap<(u64, u64), Vec<(i32, usize)>> = HashMap::new();

    for fd in proc::fds(pid).map_err(err("its descriptors".into()))? {
        let link_path = format!("/proc/{pid}/fd/{fd}");
        let link = proc::readlink(&link_path).map_err(err(format!("fd {fd}")))?;
        let info = proc::fdinfo(pid, fd).map_err(err(format!("fd {fd}")))?;
        let meta = fs::metadata(&link_path).ok();
        let unsupported = |kind: String| DumpError::Unsupported {
            pid,
            reason: UnsupportedReason::Fd { fd, kind },
        };
        let Some(meta) = meta else {
            return Err(unsupported(describe(&link, None)));
        };
        let ft = meta.file_type();
        if link.starts_with("anon_inode:") || link.starts_with("/memfd:") {
            return Err(unsupported(describe(&link, Some(ft))));
        }

        let key = (meta.dev(), meta.ino());
        let mut shared_with = None;
        for &(other_fd, idx) in by_inode.get(&key).into_iter().flatten() {
            if torpor_sys::same_file_description(pid, fd, pid, other_fd)
                .map_err(err(format!("fd {fd}")))?
            {
                shared_with = Some(idx);
                break;
            }
        }
        let idx = match shared_with {
            Some(idx) => idx,
            None => {
                let kind = if ft.is_file() {
                    let file = files.add_path(pid, &link_path, &link).map_err(|source| {
                        DumpError::SaveFile { pid, what: format!("fd {fd} ({link})"), source }
                    })?;
                    OpenFileKind::Regular { file }
                } else if ft.is_dir() {
                    if link.ends_with(" (deleted)") {
                        return Err(unsupported(format!("a deleted directory ({link})")));
                    }
                    OpenFileKind::Directory { path: link.clone() }
                } else if ft.is_char_device() {
                    OpenFileKind::CharDevice { path: link.clone(), rdev: meta.rdev() }
                } else {
                    return Err(unsupported(describe(&link, Some(ft))));
                };
                open_files.push(OpenFile {
                    flags: info.flags & !libc::O_CLOEXEC,
                    pos: info.pos,
                    kind,
                });
                open_files.len() - 1
            }
        };
        by_inode.entry(key).or_default().push((fd, idx));
        fds.push(Fd { fd, cloexec: info.flags & libc::O_CLOEXEC != 0, open_file: idx });
    }
    Ok((open_files, fds))
}
