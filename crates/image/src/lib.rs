//! torpor's on-disk image format.
//!
//! An image is a directory:
//!
//! ```text
//!   DIR/                      mode 0700 when torpor creates it
//!   ├── tree.json             the records (model::Tree): processes, threads, memory map,
//!   │                         descriptors, signals, timers; JSON, unknown fields skipped
//!   ├── pages-<pid>.img       page data of one process: the page runs of each mapping,
//!   │                         in address order, 4 KiB pages back to back
//!   ├── vdso-<pid>.img        the bytes of the vDSO the process was using
//!   ├── file-<n>.img          content of a file that was deleted while open or mapped
//!   └── manifest.json         written last: what the image is and every other file with
//!                             its length and xxh3-128 checksum, then one trailer line
//!                             "xxh3 <32 hex digits>" covering the bytes before it
//! ```
//!
//! Every file is created with mode 0600: an image holds the process's memory.
//!
//! The manifest is a JSON object whose first two fields are `"magic": "torpor-image"` and
//! `"format_version"`. A reader checks the trailer first, then the magic and the version,
//! and only then decodes the rest, so that an image of another version is reported as such
//! whatever else changed. The trailer line, the magic and `format_version` keep their form
//! in every version.
//!
//! Versioning: `format_version` changes only when an older torpor could misread the image
//! (a field changes meaning, a required field is added, a new kind of mapping or file
//! appears). Within one version, records only gain optional fields, and decoders skip
//! fields they do not know. A reader refuses any version other than its own with a message
//! naming both.
//!
//! An image without `manifest.json` is incomplete; a file whose length or checksum differs
//! from the manifest is corrupt, and restore refuses either before creating anything.
//! `docs/image-format.md` describes every record and the limits a reader enforces.
//!
//! An encrypted image ([`crypt`], format version 5) has the same files, each but the
//! manifest sealed in authenticated segments; its manifest stays readable, records what
//! opening it takes besides the key, and is authenticated by a MAC.
//!
//! The same files can also travel as one stream, a single-file image: see [`single`].

#![warn(missing_docs)]

mod check;
pub mod crypt;
pub mod model;
pub mod pages;
mod partial;
pub mod single;
pub mod store;

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

pub use check::check_tree;
pub use partial::{read_partial, read_partial_keyed, PartialImage};
pub use store::{Fetch, Sink, Store};

/// The first field of every manifest.
pub const MAGIC: &str = "torpor-image";
/// The newest format this torpor writes and reads: version 2 adds compressed page files
/// ([`model::PageFrames`]), version 3 unix sockets connected outside the tree
/// ([`model::OpenFileKind::UnixExternal`]), version 4 TCP sockets whose connection has
/// ended and file locks, version 5 encryption ([`crypt`]), version 6 process and thread
/// attributes ([`model::ProcessAttrs`], CPU affinity, I/O priority, timer slack).
pub const FORMAT_VERSION: u32 = 6;
/// The version an encrypted image needs.
pub const ENCRYPTED_VERSION: u32 = 5;
/// The oldest format this torpor reads. It writes this version unless the image uses
/// something newer ([`ImageWriter::needs_version`]), so older torpors read plain images.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// Name of the manifest inside the image directory.
pub const MANIFEST: &str = "manifest.json";
/// Name of the record file holding the [`model::Tree`].
pub const TREE: &str = "tree.json";
/// Largest record file a reader accepts; page and content files have no such limit
/// because they are streamed, never loaded whole.
pub const MAX_RECORD_BYTES: u64 = 256 << 20;
/// Largest number of files a manifest may list.
pub const MAX_FILES: usize = 1 << 20;

/// The name the manifest is written under before it is renamed into place.
const MANIFEST_TMP: &str = ".manifest.json.tmp";

/// `O_NONBLOCK` on x86_64 Linux, spelled out to keep this crate free of libc. Opening a
/// FIFO for reading waits for a writer unless this flag is given; on a regular file the
/// flag changes nothing.
const O_NONBLOCK: i32 = 0o4000;

/// Everything that can go wrong writing or reading an image. Each variant names the file
/// it is about.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image directory could not be created.
    #[error("cannot create image directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why `mkdir` failed.
        source: io::Error,
    },
    /// The path given as the image directory is something else.
    #[error("{path} exists and is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Creating, writing or syncing a file of the image failed.
    #[error("cannot write image file {path}")]
    Write {
        /// The file (or the directory, when syncing it failed).
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Opening or reading a file of the image failed.
    #[error("cannot read image file {path}")]
    Read {
        /// The file (or the directory).
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The directory has no manifest: the dump never finished, or it is not an image.
    #[error(
        "{dir} holds no image or an incomplete one: {MANIFEST} is missing \
         (was the dump interrupted?)"
    )]
    NoManifest {
        /// The image directory.
        dir: PathBuf,
    },
    /// A file's content does not make sense.
    #[error("{path} is corrupt: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the offending values.
        why: String,
    },
    /// A file's length differs from the one the manifest records.
    #[error("{path} is truncated or has grown: {actual} bytes, the manifest says {expected}")]
    Length {
        /// The file.
        path: PathBuf,
        /// Length in bytes recorded in the manifest.
        expected: u64,
        /// Length in bytes found.
        actual: u64,
    },
    /// A file's xxh3-128 differs from the one the manifest (or its trailer) records.
    #[error("{path} is corrupt: its checksum is {actual}, the manifest says {expected}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Checksum recorded, in hex.
        expected: String,
        /// Checksum of the bytes found, in hex.
        actual: String,
    },
    /// The manifest is of another format version.
    #[error(
        "{path} has format version {found}; this torpor reads versions \
         {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}"
    )]
    Version {
        /// The manifest.
        path: PathBuf,
        /// The version it records.
        found: u32,
    },
    /// The parent of an incremental image cannot be read.
    #[error("{dir} was dumped over the image {parent}, which cannot be read")]
    Parent {
        /// The incremental image.
        dir: PathBuf,
        /// Where its parent should be.
        parent: PathBuf,
        /// What went wrong reading it.
        source: Box<ImageError>,
    },
    /// The parent of an incremental image is not the image it was dumped over.
    #[error(
        "{dir} was dumped over the image {parent}, which has changed since (its manifest's \
         checksum is {actual}, {dir} recorded {expected})"
    )]
    ParentChanged {
        /// The incremental image.
        dir: PathBuf,
        /// Its parent.
        parent: PathBuf,
        /// Checksum recorded in the incremental image.
        expected: String,
        /// Checksum of the parent's manifest now.
        actual: String,
    },
    /// A file the manifest lists is not in the directory.
    #[error("{path} is listed in the manifest but missing")]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// A file name that is not one plain name, or one the image reserves.
    #[error("image file name {name:?} is not allowed (only plain names inside the image)")]
    BadName {
        /// The name.
        name: String,
    },
    /// An image that a single-file image cannot hold.
    #[error("{dir} cannot be packed into one file: {why}")]
    NotPackable {
        /// The image directory.
        dir: PathBuf,
        /// Why not.
        why: String,
    },
    /// A file was asked for by name but the manifest does not list it.
    #[error("{name} is not listed in the image's manifest")]
    NotListed {
        /// The name.
        name: String,
    },
    /// The image is encrypted and no key was given.
    #[error("{dir} is encrypted: give the key it was made with (--encrypt-key FILE)")]
    Encrypted {
        /// The image directory.
        dir: PathBuf,
    },
    /// The key given is not the one the image was made with.
    #[error("the key does not match the one {path} was encrypted with")]
    WrongKey {
        /// The manifest.
        path: PathBuf,
    },
    /// A part of an encrypted file fails authentication: changed, damaged, moved or cut.
    #[error(
        "{path} was changed or damaged: its segment {segment} (bytes {from}-{to} of the file) \
         does not authenticate with the key"
    )]
    Tampered {
        /// The file.
        path: PathBuf,
        /// The segment's number.
        segment: u64,
        /// Where the segment starts in the file.
        from: u64,
        /// Where it ends.
        to: u64,
    },
    /// The manifest of an encrypted image is not the one written with the key.
    #[error("{path} was changed since the dump: its MAC does not match the key's")]
    ManifestTampered {
        /// The manifest.
        path: PathBuf,
    },
    /// A file could not be sealed (the system's random source failed).
    #[error("cannot encrypt the image")]
    Key(#[from] crypt::KeyError),
}

/// Result of the image functions.
pub type Result<T> = std::result::Result<T, ImageError>;

/// What the image is, and every file in it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// Always [`MAGIC`].
    pub magic: String,
    /// [`FORMAT_VERSION`] of the torpor that wrote the image.
    pub format_version: u32,
    /// Version of the torpor that wrote the image, for messages.
    pub torpor_version: String,
    /// When the dump finished, in seconds since the Unix epoch.
    pub created_unix: u64,
    /// `uname -r` of the machine that wrote the image.
    pub kernel_release: String,
    /// `uname -m` of the machine that wrote the image (`x86_64`).
    pub arch: String,
    /// What the saved registers need from the CPU.
    pub cpu: CpuState,
    /// The pid given to `torpor dump`.
    pub root_pid: i32,
    /// Every file of the image except the manifest, in the order they were written.
    pub files: Vec<FileEntry>,
    /// For an incremental image: the image it refers to for pages that did not change.
    #[serde(default)]
    pub parent: Option<ParentImage>,
    /// For an encrypted image: what opening it takes besides the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crypt::Encryption>,
}

/// The image an incremental image was dumped over.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParentImage {
    /// Its directory: relative to this image's directory, or absolute.
    pub path: String,
    /// xxh3-128 of its `manifest.json` when this image was written, in hex; a parent
    /// whose manifest differs is not the one this image was made over.
    pub manifest_xxh3: String,
}

/// CPU state the image's register contents need.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuState {
    /// Union of the XSAVE feature bits (XSTATE_BV) in use by the image's threads.
    pub xfeatures_used: u64,
    /// XCR0 of the machine that wrote the image.
    pub xcr0: u64,
    /// Size of one thread's XSAVE area.
    pub xsave_size: u32,
}

/// One file of the image as the manifest records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// Plain file name inside the image directory.
    pub name: String,
    /// Length in bytes.
    pub len: u64,
    /// xxh3-128 of the whole content: 32 lowercase hex digits.
    pub xxh3: String,
}

/// Hex form of an xxh3-128 digest, as the manifest stores it.
pub fn digest_hex(h: &Xxh3) -> String {
    format!("{:032x}", h.digest128())
}

/// xxh3-128 of a byte slice, in hex.
pub fn hash_bytes(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

/// Whether `s` has the form [`digest_hex`] gives: 32 lowercase hex digits.
fn is_digest(s: &[u8]) -> bool {
    s.len() == 32 && s.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// xxh3-128 of a file's content, in hex, read in 1 MiB pieces.
pub fn hash_file(path: impl AsRef<Path>) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(digest_hex(&h));
        }
        h.update(&buf[..n]);
    }
}

/// The record files of socket queues: each record a 4-byte little-endian length, then
/// that many bytes.
pub mod records {
    /// Encodes records back to back.
    pub fn encode<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
        let mut out = Vec::new();
        for item in items {
            out.extend_from_slice(&(item.len() as u32).to_le_bytes());
            out.extend_from_slice(item);
        }
        out
    }

    /// Most records a file may hold: far more than any socket queue holds (the kernel
    /// bounds them by buffer sizes and, for datagrams, `max_dgram_qlen`), few enough that
    /// a file of empty records cannot make restore index hundreds of millions of them.
    pub const MAX_RECORDS: usize = 1 << 22;

    /// Decodes records; `None` when the bytes end inside one or hold more than
    /// [`MAX_RECORDS`].
    pub fn decode(bytes: &[u8]) -> Option<Vec<&[u8]>> {
        let mut out = Vec::new();
        let mut at = 0usize;
        while at < bytes.len() {
            if out.len() == MAX_RECORDS {
                return None;
            }
            let len = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
            out.push(bytes.get(at + 4..(at + 4).checked_add(len)?)?);
            at += 4 + len;
        }
        Some(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trip_and_cut_short() {
            let items: [&[u8]; 3] = [b"one", b"", b"three"];
            let bytes = encode(items);
            assert_eq!(decode(&bytes).unwrap(), items.to_vec());
            for cut in 1..bytes.len() {
                let d = decode(&bytes[..cut]);
                assert!(d.is_none() || d.unwrap().len() < 3, "cut at {cut}");
            }
            assert_eq!(decode(&[0xff, 0xff, 0xff, 0xff, 1]), None);
            let empties = vec![0u8; 4 * MAX_RECORDS];
            assert_eq!(decode(&empties).map(|r| r.len()), Some(MAX_RECORDS));
            assert_eq!(decode(&[empties, vec![0; 4]].concat()), None);
        }
    }
}

/// A file name inside an image: one plain path component.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && name.len() <= 255;
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadName { name: name.to_string() })
    }
}

/// Whether the writer keeps `name` for itself.
fn is_reserved(name: &str) -> bool {
    name == MANIFEST || name == MANIFEST_TMP
}

/// Removes `path` if it exists.
fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Creates `path` as a new file of mode 0600, replacing whatever had that name.
///
/// Removing first, rather than truncating, matters when the directory holds an older
/// image: an old file keeps its old mode when truncated, a symbolic link would be
/// followed, and a hard link would overwrite the file it shares with.
fn create_private(path: &Path) -> io::Result<File> {
    remove_if_exists(path)?;
    OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

/// Flushes a directory's entries to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| ImageError::Write { path: dir.to_path_buf(), source })
}

/// A file of the image being written; checksums what goes through it.
///
/// Big writes go to a writer thread, so that whoever produces the data (reading a
/// process's memory) works while the previous piece goes to the file. When the file must
/// reach the disk, the thread writes whole pages at page offsets with `O_DIRECT`: straight
/// from its buffer to the disk, without a second copy into the page cache and a writeback
/// that the final sync would wait for (on the development machine's virtual disk a
/// gigabyte written that way took 0.4 s, written and synced through the cache 1.1 to
/// 2.3 s). Other pieces, and every piece of a filesystem without `O_DIRECT`, go through
/// the page cache; the thread starts their writeback as each lands and waits for pieces
/// written a while ago, so the final sync finds little left to do and the page cache
/// never fills with an image's dirty pages.
///
/// In an encrypted image the file seals what is written ([`crypt::Sealer`]); its length
/// is that of the content, the manifest's that of the sealed bytes.
pub struct ImageFile {
    name: String,
    path: PathBuf,
    hash: Xxh3,
    /// Content bytes written so far.
    len: u64,
    /// Bytes stored so far: `len` for a plain file, more for a sealed one.
    stored: u64,
    out: Out,
    /// For an encrypted image: the sealer, until the last segment is sealed.
    sealer: Option<Box<crypt::Sealer>>,
    /// Sealed bytes on their way to `out`.
    sealed: Vec<u8>,
}

/// Where the bytes of an [`ImageFile`] go.
enum Out {
    /// A file in a local directory.
    Local {
        file: File,
        /// The writer thread, started by the first big write.
        pipe: Option<Pipe>,
        /// Whether the file goes to disk before it counts as written.
        durable: bool,
    },
    /// A [`Store`]'s sink; `None` once finished.
    Store(Option<Box<dyn Sink>>),
}

/// Writes at least this big start the writer thread.
const PIPE_MIN_WRITE: usize = 1 << 20;
/// Buffers handed to the writer thread at most: one it writes while the next waits.
const PIPE_BUFFERS: usize = 2;
/// Pieces whose writeback may still be running; the writer waits for older ones.
const WRITEBACK_WINDOW: usize = 4;

/// `O_DIRECT` transfers: memory, file offset and length must be multiples of this.
const DIRECT_ALIGN: usize = 4096;

/// A buffer of the writer thread: `len` bytes at `start` in `buf`, where `start` is
/// aligned for `O_DIRECT` (a `Vec` guarantees no alignment, so it has room to spare).
#[derive(Default)]
struct Chunk {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Chunk {
    fn fill(&mut self, data: &[u8]) {
        let need = data.len() + DIRECT_ALIGN;
        if self.buf.len() < need {
            self.buf = vec![0; need];
        }
        self.start = self.buf.as_ptr().align_offset(DIRECT_ALIGN);
        self.len = data.len();
        self.buf[self.start..self.start + self.len].copy_from_slice(data);
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// A writer thread and the channels to it: full buffers go, empty ones come back.
struct Pipe {
    full: std::sync::mpsc::SyncSender<Chunk>,
    empty: std::sync::mpsc::Receiver<Chunk>,
    /// Buffers made so far; never more than [`PIPE_BUFFERS`], which bounds the memory.
    made: usize,
    thread: std::thread::JoinHandle<io::Result<()>>,
}

impl Pipe {
    fn start(file: &File, path: &Path, at: u64, durable: bool) -> io::Result<Self> {
        use std::os::unix::fs::FileExt;
        let file = file.try_clone()?;
        // A filesystem without O_DIRECT (tmpfs, some FUSE) refuses the open: the page
        // cache it is.
        let mut direct = match durable {
            true => OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok(),
            false => None,
        };
        let (full, rx) = std::sync::mpsc::sync_channel::<Chunk>(PIPE_BUFFERS);
        let (tx, empty) = std::sync::mpsc::sync_channel(PIPE_BUFFERS);
        let thread = std::thread::Builder::new().name("image-writer".into()).spawn(move || {
            let mut at = at;
            let mut window = std::collections::VecDeque::new();
            for chunk in rx {
                let data = chunk.data();
                let len = data.len() as u64;
                let aligned = at % DIRECT_ALIGN as u64 == 0 && data.len() % DIRECT_ALIGN == 0;
                let mut written = false;
                if let Some(d) = direct.as_ref().filter(|_| aligned) {
                    match d.write_all_at(data, at) {
                        Ok(()) => written = true,
                        // Refused after all (EINVAL): the rest goes through the cache.
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => direct = None,
                        Err(e) => return Err(e),
                    }
                }
                if !written {
                    // Positional, like the direct writes: the two descriptors share no
                    // offset.
                    file.write_all_at(data, at)?;
                    if durable {
                        start_writeback(&file, at, len, false);
                        window.push_back((at, len));
                    }
                }
                if window.len() > WRITEBACK_WINDOW {
                    let (o, l) = window.pop_front().unwrap();
                    start_writeback(&file, o, l, true);
                }
                at += len;
                // The producer may have gone already; the buffer is then simply dropped.
                let _ = tx.try_send(chunk);
            }
            Ok(())
        })?;
        Ok(Self { full, empty, made: 0, thread })
    }

    /// Hands a copy of `data` to the thread, waiting for a buffer it is done with once
    /// all are made; false when the thread has stopped (its error comes from
    /// [`Pipe::finish`]).
    fn send(&mut self, data: &[u8]) -> bool {
        let mut chunk = match self.empty.try_recv() {
            Ok(c) => c,
            Err(_) if self.made < PIPE_BUFFERS => {
                self.made += 1;
                Chunk::default()
            }
            Err(_) => match self.empty.recv() {
                Ok(c) => c,
                Err(_) => return false,
            },
        };
        chunk.fill(data);
        self.full.send(chunk).is_ok()
    }

    /// Waits until everything sent is written.
    fn finish(self) -> io::Result<()> {
        drop(self.full);
        self.thread.join().unwrap_or_else(|_| Err(io::Error::other("the writer thread panicked")))
    }
}

/// Starts writing a range of `file` back to disk, or with `wait` waits until it is.
///
/// Only an optimisation of the final sync, so a filesystem that refuses (or has no disk
/// behind it) changes nothing. Neither nix nor rustix wraps `sync_file_range(2)`, hence
/// libc here, the one system call of this crate beyond plain file I/O.
#[allow(unsafe_code)]
fn start_writeback(file: &File, at: u64, len: u64, wait: bool) {
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    // SAFETY: sync_file_range only reads its integer arguments; `fd` is open for as long
    // as `file` is borrowed, and a bad range is refused with EINVAL, which is ignored.
    let _ = unsafe { libc::sync_file_range(fd, at as i64, len as i64, flags) };
}

impl ImageFile {
    /// The file's name inside the image.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Content bytes written so far (before sealing, in an encrypted image).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing has been written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes all of `buf` at the end of the file.
    pub fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        self.put(buf).map_err(|source| ImageError::Write { path: self.path.clone(), source })
    }

    fn put(&mut self, buf: &[u8]) -> io::Result<()> {
        let Some(sealer) = &mut self.sealer else {
            self.put_stored(buf)?;
            self.len += buf.len() as u64;
            return Ok(());
        };
        let mut sealed = std::mem::take(&mut self.sealed);
        sealer.seal(buf, &mut sealed)?;
        // Sealed bytes go out in whole pages, the rest waiting for the next write: the
        // file's offsets then stay page-aligned, as the writer thread's O_DIRECT writes
        // need (segments and header are not multiples of a page).
        let whole = sealed.len() - sealed.len() % DIRECT_ALIGN;
        let r = match whole {
            0 => Ok(()),
            _ => self.put_stored(&sealed[..whole]),
        };
        sealed.copy_within(whole.., 0);
        sealed.truncate(sealed.len() - whole);
        self.sealed = sealed;
        r?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Seals the last segment, in an encrypted image, and writes what waited.
    fn finish_sealing(&mut self) -> io::Result<()> {
        let Some(mut sealer) = self.sealer.take() else { return Ok(()) };
        let mut sealed = std::mem::take(&mut self.sealed);
        sealer.finish(&mut sealed)?;
        self.put_stored(&sealed)
    }

    /// Writes bytes as they are to be stored.
    fn put_stored(&mut self, buf: &[u8]) -> io::Result<()> {
        match &mut self.out {
            Out::Local { file, pipe, durable } => {
                if pipe.is_none() && buf.len() >= PIPE_MIN_WRITE {
                    *pipe = Some(Pipe::start(file, &self.path, self.stored, *durable)?);
                }
                match pipe {
                    Some(p) => {
                        if !p.send(buf) {
                            // The thread stopped on an error, which finishing it returns.
                            let err = self.finish_pipe().err();
                            return Err(
                                err.unwrap_or_else(|| io::Error::other("the writer stopped"))
                            );
                        }
                    }
                    None => file.write_all(buf)?,
                }
            }
            Out::Store(Some(sink)) => sink.append(buf)?,
            Out::Store(None) => return Err(io::Error::other("written after it was finished")),
        }
        self.hash.update(buf);
        self.stored += buf.len() as u64;
        Ok(())
    }

    /// Waits for the writer thread, if any. It wrote at explicit offsets, so the file's
    /// own offset is moved to the end for writes after it.
    fn finish_pipe(&mut self) -> io::Result<()> {
        use std::io::Seek;
        let Out::Local { file, pipe, .. } = &mut self.out else { return Ok(()) };
        let Some(p) = pipe.take() else { return Ok(()) };
        p.finish()?;
        file.seek(io::SeekFrom::Start(self.stored))?;
        Ok(())
    }

    /// Makes what was written so far durable while more may follow: synced to disk for a
    /// local file (pre-copy rounds do this while the process runs, so that the final sync
    /// has little left); a store's sink decides for itself ([`Sink::checkpoint`]).
    pub fn sync_data(&mut self) -> io::Result<()> {
        match &mut self.out {
            Out::Local { file, .. } => file.sync_data(),
            Out::Store(Some(sink)) => sink.checkpoint(),
            Out::Store(None) => Ok(()),
        }
    }

    /// Waits until everything written is where it goes. A local file is not synced
    /// here: that is [`ImageWriter::commit`]'s, for every file at once.
    fn sync(&mut self) -> io::Result<()> {
        self.finish_sealing()?;
        match &mut self.out {
            Out::Local { .. } => self.finish_pipe(),
            Out::Store(sink) => sink.take().map_or(Ok(()), |s| s.finish()),
        }
    }
}

impl Write for ImageFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.put(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.finish_pipe()?;
        match &mut self.out {
            Out::Local { file, .. } => file.flush(),
            Out::Store(_) => Ok(()),
        }
    }
}

/// Writes an image directory. Nothing is an image until [`ImageWriter::commit`] has
/// written the manifest; [`ImageWriter::abandon`] removes what a failed dump wrote.
pub struct ImageWriter {
    dir: PathBuf,
    /// Where the files go when not to the local directory `dir` (which then only names
    /// the image in messages).
    store: Option<Arc<dyn Store>>,
    entries: Vec<FileEntry>,
    created: Vec<PathBuf>,
    /// Whether [`ImageWriter::create`] made the directory (so abandoning removes it).
    made_dir: bool,
    /// Whether files, directory entries and the manifest are synced to disk.
    durable: bool,
    /// The format version the manifest will record.
    version: u32,
    /// For an encrypted image: its keys.
    sealing: Option<crypt::Sealing>,
}

impl ImageWriter {
    /// Prepares `dir` (created with mode 0700 if missing). A manifest already there is
    /// removed first, so that an interrupted dump never leaves an old manifest describing
    /// new files.
    pub fn create(dir: &Path) -> Result<Self> {
        let made_dir =
            match fs::metadata(dir) {
                Ok(m) if !m.is_dir() => {
                    return Err(ImageError::NotADirectory { path: dir.to_path_buf() })
                }
                Ok(_) => false,
                Err(_) => {
                    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(
                        |source| ImageError::CreateDir { path: dir.to_path_buf(), source },
                    )?;
                    true
                }
            };
        let manifest = dir.join(MANIFEST);
        remove_if_exists(&manifest)
            .map_err(|source| ImageError::Write { path: manifest, source })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            store: None,
            entries: Vec::new(),
            created: Vec::new(),
            made_dir,
            durable: true,
            version: OLDEST_FORMAT_VERSION,
            sealing: None,
        })
    }

    /// Prepares an image whose files go to `store` instead of a local directory;
    /// `name` names it in messages (a URL, say). As for a directory, nothing is an image
    /// until [`ImageWriter::commit`] has stored the manifest: the store's
    /// [`Store::begin`] removes a manifest already there.
    pub fn with_store(store: Arc<dyn Store>, name: &Path) -> Result<Self> {
        store.begin().map_err(|source| ImageError::Write { path: name.join(MANIFEST), source })?;
        Ok(Self {
            dir: name.to_path_buf(),
            store: Some(store),
            entries: Vec::new(),
            created: Vec::new(),
            made_dir: false,
            durable: true,
            version: OLDEST_FORMAT_VERSION,
            sealing: None,
        })
    }

    /// Chooses whether the image goes to disk before [`ImageWriter::commit`] returns (the
    /// default) or is left to the kernel's writeback. Not durable, a dump is faster, but
    /// a crash soon after it may lose the image, and with it a process the dump ended.
    pub fn set_durable(&mut self, durable: bool) {
        self.durable = durable;
    }

    /// Encrypts the image with `key`: every file created from here on is sealed, and
    /// the manifest authenticated. Call it before creating any file.
    pub fn set_key(&mut self, key: &crypt::Key) -> Result<()> {
        self.sealing = Some(crypt::Sealing::create(key)?);
        self.needs_version(ENCRYPTED_VERSION);
        Ok(())
    }

    /// Whether the image is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.sealing.is_some()
    }

    /// Whether the image goes to disk before [`ImageWriter::commit`] returns.
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// The image directory (or, for an image going to a store, its name).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the files go to a [`Store`] rather than a local directory.
    pub fn is_stored(&self) -> bool {
        self.store.is_some()
    }

    /// Creates a file of the image, mode 0600, replacing any file of that name. The name
    /// must be one plain path component and not the manifest's.
    pub fn create_file(&mut self, name: &str) -> Result<ImageFile> {
        check_name(name)?;
        if is_reserved(name) {
            return Err(ImageError::BadName { name: name.to_string() });
        }
        let path = self.dir.join(name);
        let out = match &self.store {
            Some(store) => Out::Store(Some(
                store
                    .create(name)
                    .map_err(|source| ImageError::Write { path: path.clone(), source })?,
            )),
            None => Out::Local {
                file: create_private(&path)
                    .map_err(|source| ImageError::Write { path: path.clone(), source })?,
                pipe: None,
                durable: self.durable,
            },
        };
        let sealer = match &self.sealing {
            Some(s) => Some(Box::new(s.sealer(name)?)),
            None => None,
        };
        self.created.push(path.clone());
        Ok(ImageFile {
            name: name.to_string(),
            path,
            hash: Xxh3::new(),
            len: 0,
            stored: 0,
            out,
            sealer,
            sealed: Vec::new(),
        })
    }

    /// Drops a file written so far (a process that left the tree during pre-copy):
    /// removed, and no longer listed in the manifest.
    pub fn remove_file(&mut self, f: ImageFile) {
        self.entries.retain(|e| e.name != f.name);
        self.created.retain(|p| *p != f.path);
        let name = f.name.clone();
        drop(f);
        // Best effort: a file left over is not listed, so no reader looks at it.
        let _ = match &self.store {
            Some(store) => store.remove(&name),
            None => fs::remove_file(self.dir.join(&name)),
        };
    }

    /// Records that the image uses something format `version` introduced: the manifest
    /// will say at least that version.
    pub fn needs_version(&mut self, version: u32) {
        self.version = self.version.max(version.min(FORMAT_VERSION));
    }

    /// Flushes a file to disk and records it for the manifest. A file written again under
    /// the same name replaces the earlier record.
    pub fn finish_file(&mut self, mut f: ImageFile) -> Result<()> {
        f.sync().map_err(|source| ImageError::Write { path: f.path.clone(), source })?;
        let entry = FileEntry { name: f.name, len: f.stored, xxh3: digest_hex(&f.hash) };
        match self.entries.iter_mut().find(|e| e.name == entry.name) {
            Some(old) => *old = entry,
            None => self.entries.push(entry),
        }
        Ok(())
    }

    /// Writes a whole file in one go.
    pub fn write_file(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let mut f = self.create_file(name)?;
        f.write_all(bytes)?;
        self.finish_file(f)
    }

    /// Writes a record file as JSON.
    pub fn write_json<T: Serialize>(&mut self, name: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| ImageError::Write {
            path: self.dir.join(name),
            source: io::Error::other(e),
        })?;
        self.write_file(name, &bytes)
    }

    /// Writes the manifest last (to a temporary name, synced, then renamed) and syncs the
    /// directory: from here on the image is complete.
    ///
    /// `magic`, `format_version` and `files` of `manifest` are filled in here; the caller
    /// supplies the rest. If this fails, the files written so far are removed as by
    /// [`ImageWriter::abandon`], since the writer is gone and no caller could.
    pub fn commit(mut self, mut manifest: Manifest) -> Result<()> {
        manifest.magic = MAGIC.to_string();
        manifest.format_version = self.version;
        manifest.files = std::mem::take(&mut self.entries);
        manifest.encryption = None;
        if let Some(s) = &self.sealing {
            let mut e = s.encryption();
            manifest.encryption = Some(e.clone());
            e.mac = s.manifest_mac(&mac_body(&manifest));
            manifest.encryption = Some(e);
        }
        match self.write_manifest(&manifest) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.abandon();
                Err(e)
            }
        }
    }

    fn write_manifest(&self, manifest: &Manifest) -> Result<()> {
        let bytes = encode_manifest(manifest);
        if let Some(store) = &self.store {
            return store
                .commit(&bytes)
                .map_err(|source| ImageError::Write { path: self.dir.join(MANIFEST), source });
        }
        let tmp = self.dir.join(MANIFEST_TMP);
        let final_path = self.dir.join(MANIFEST);
        create_private(&tmp)
            .and_then(|mut f| f.write_all(&bytes))
            .map_err(|source| ImageError::Write { path: tmp.clone(), source })?;

        // The files, the manifest under its temporary name and the directory entries of
        // all of them must be on disk before the manifest's own name can be.
        if self.durable {
            let mut all = manifest.files.clone();
            all.push(FileEntry { name: MANIFEST_TMP.into(), len: 0, xxh3: String::new() });
            self.sync_files(&all)?;
            sync_dir(&self.dir)?;
        }
        fs::rename(&tmp, &final_path)
            .map_err(|source| ImageError::Write { path: final_path.clone(), source })?;
        if !self.durable {
            return Ok(());
        }
        sync_dir(&self.dir)?;

        // A directory made by `create` is itself an entry of its parent.
        if self.made_dir {
            if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        Ok(())
    }

    /// Syncs the files of the image, all at once: a filesystem with a journal commits
    /// syncs that arrive together in one transaction, where syncing file after file waits
    /// for one commit each (the few milliseconds each that a dump's frozen time is made of
    /// once its pages are written).
    fn sync_files(&self, files: &[FileEntry]) -> Result<()> {
        const THREADS: usize = 16;
        let paths: Vec<PathBuf> = files.iter().map(|f| self.dir.join(&f.name)).collect();
        let per = paths.len().div_ceil(THREADS).max(1);
        std::thread::scope(|s| {
            let jobs: Vec<_> = paths
                .chunks(per)
                .map(|chunk| {
                    s.spawn(move || {
                        for path in chunk {
                            File::open(path).and_then(|f| f.sync_all()).map_err(|source| {
                                ImageError::Write { path: path.clone(), source }
                            })?;
                        }
                        Ok(())
                    })
                })
                .collect();
            jobs.into_iter().try_for_each(|j| {
                j.join().unwrap_or_else(|_| {
                    let source = io::Error::other("a thread syncing the image panicked");
                    Err(ImageError::Write { path: self.dir.clone(), source })
                })
            })
        })
    }

    /// Removes the files written so far (after a failed dump), and the directory if
    /// [`ImageWriter::create`] made it and nothing else is in it.
    pub fn abandon(mut self) {
        // Removal is best effort: this runs after another error, which is the one to report.
        if let Some(store) = self.store.take() {
            store.abandon(&self.entry_names());
            return;
        }
        for p in self.created.drain(..) {
            let _ = fs::remove_file(p);
        }
        let _ = fs::remove_file(self.dir.join(MANIFEST_TMP));
        let _ = fs::remove_file(self.dir.join(MANIFEST));
        if self.made_dir {
            let _ = fs::remove_dir(&self.dir);
        }
    }
}

impl ImageWriter {
    /// The names of the files created so far.
    fn entry_names(&self) -> Vec<String> {
        let names = self.created.iter().filter_map(|p| p.file_name()?.to_str());
        names.map(str::to_string).collect()
    }
}

/// What the MAC of an encrypted image's manifest covers: the manifest as this torpor
/// encodes it, with an empty MAC. Encoding what was decoded, rather than taking the bytes
/// read, makes the MAC cover every value a reader uses and nothing it ignores.
fn mac_body(m: &Manifest) -> Vec<u8> {
    let mut m = m.clone();
    if let Some(e) = &mut m.encryption {
        e.mac.clear();
    }
    serde_json::to_vec(&m).expect("a manifest always serializes")
}

/// The manifest's bytes: the JSON body, a newline, and a trailer line with its checksum.
pub fn encode_manifest(m: &Manifest) -> Vec<u8> {
    let mut body = serde_json::to_vec_pretty(m).expect("a manifest always serializes");
    body.push(b'\n');
    let trailer = format!("xxh3 {}\n", hash_bytes(&body));
    body.extend_from_slice(trailer.as_bytes());
    body
}

/// Splits a manifest into the bytes its trailer covers and the checksum the trailer
/// records, or says what is wrong with the trailer.
fn split_trailer(bytes: &[u8]) -> std::result::Result<(&[u8], &str), &'static str> {
    let trimmed = bytes.strip_suffix(b"\n").ok_or("it does not end with a newline")?;
    let split = trimmed.iter().rposition(|&b| b == b'\n').ok_or("it has no trailer line")?;
    let (body, trailer) = (&bytes[..split + 1], &trimmed[split + 1..]);
    let digest =
        trailer.strip_prefix(b"xxh3 ").ok_or("its last line does not start with \"xxh3 \"")?;
    if !is_digest(digest) {
        return Err("its trailer does not hold 32 lowercase hex digits");
    }
    let digest = std::str::from_utf8(digest).expect("hex digits are ASCII");
    Ok((body, digest))
}

/// Parses and checks a manifest's bytes. `path` is only used in messages.
pub fn decode_manifest(bytes: &[u8], path: &Path) -> Result<Manifest> {
    let corrupt = |why: String| ImageError::Corrupt { path: path.to_path_buf(), why };
    let (body, expected) = split_trailer(bytes).map_err(|why| corrupt(why.to_string()))?;
    let actual = hash_bytes(body);
    if actual != expected {
        return Err(ImageError::Checksum {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }

    // Check the magic and version before the rest, so that a newer format with other
    // fields is reported as a version mismatch rather than as garbage.
    #[derive(Deserialize)]
    struct Head {
        magic: String,
        format_version: u32,
    }
    let head: Head =
        serde_json::from_slice(body).map_err(|e| corrupt(format!("not a manifest: {e}")))?;
    if head.magic != MAGIC {
        return Err(corrupt(format!("magic is {:?}, not {MAGIC:?}", head.magic)));
    }
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&head.format_version) {
        return Err(ImageError::Version { path: path.to_path_buf(), found: head.format_version });
    }

    let m: Manifest =
        serde_json::from_slice(body).map_err(|e| corrupt(format!("not a manifest: {e}")))?;
    if m.files.len() > MAX_FILES {
        return Err(corrupt(format!("lists {} files, more than {MAX_FILES}", m.files.len())));
    }
    let mut seen = HashSet::with_capacity(m.files.len());
    for f in &m.files {
        check_name(&f.name)?;
        if is_reserved(&f.name) {
            return Err(corrupt(format!("lists {:?}, a name the image reserves", f.name)));
        }
        if !seen.insert(f.name.as_str()) {
            return Err(corrupt(format!("lists {:?} twice", f.name)));
        }
        if !is_digest(f.xxh3.as_bytes()) {
            return Err(corrupt(format!(
                "the checksum of {:?} is {:?}, not 32 lowercase hex digits",
                f.name, f.xxh3
            )));
        }
    }
    Ok(m)
}

/// A complete image, opened for reading.
#[derive(Debug, Clone)]
pub struct ImageReader {
    dir: PathBuf,
    manifest: Manifest,
    /// xxh3-128 of the manifest file, in hex: what an incremental image records of it.
    manifest_xxh3: String,
    /// For an encrypted image: the key (its parents are opened with it) and the keys
    /// derived from it.
    sealing: Option<(crypt::Key, Arc<crypt::Sealing>)>,
}

/// The content of a file of an image, whether stored as it is or sealed.
pub enum Content {
    /// A plain file.
    Plain {
        /// The file.
        file: File,
        /// Its path, for messages.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// A file of an encrypted image.
    Sealed(crypt::SealedFile),
}

impl Content {
    /// Bytes of content.
    pub fn len(&self) -> u64 {
        match self {
            Content::Plain { len, .. } => *len,
            Content::Sealed(s) => s.len(),
        }
    }

    /// Whether there is no content.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the stored bytes are not the content (so no other process can read it).
    pub fn is_sealed(&self) -> bool {
        matches!(self, Content::Sealed(_))
    }

    /// Fills `buf` with the content from offset `off`.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        match self {
            Content::Plain { file, path, .. } => file
                .read_exact_at(buf, off)
                .map_err(|source| ImageError::Read { path: path.clone(), source }),
            Content::Sealed(s) => s.read_at(buf, off),
        }
    }

    /// Writes the whole content into `out`.
    pub fn copy_to(&self, out: &mut dyn Write) -> Result<()> {
        match self {
            Content::Plain { file, path, .. } => {
                let mut buf = vec![0u8; 1 << 20];
                let mut f = file;
                loop {
                    let n = match f.read(&mut buf) {
                        Ok(0) => return Ok(()),
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(source) => return Err(ImageError::Read { path: path.clone(), source }),
                    };
                    out.write_all(&buf[..n]).map_err(|source| ImageError::Write {
                        path: PathBuf::from(format!("the copy of {}", path.display())),
                        source,
                    })?;
                }
            }
            Content::Sealed(s) => s.copy_to(out),
        }
    }
}

impl ImageReader {
    /// Opens an image that is not encrypted: see [`ImageReader::open_keyed`].
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_keyed(dir, None)
    }

    /// Opens an image: reads and checks the manifest, and that every file it lists exists
    /// as a regular file with the recorded length. Contents are checked by
    /// [`ImageReader::verify_all`], or file by file as they are read.
    ///
    /// An encrypted image needs its `key`, which must match, and a manifest that the key
    /// authenticates; a key given for an image that is not encrypted is not used.
    pub fn open_keyed(dir: &Path, key: Option<&crypt::Key>) -> Result<Self> {
        Self::open_inner(dir, key, false)
    }

    /// Opens an image to copy its files as they are stored (packing it into one file):
    /// an encrypted one needs no key then, and its files read back sealed.
    pub(crate) fn open_as_stored(dir: &Path) -> Result<Self> {
        Self::open_inner(dir, None, true)
    }

    fn open_inner(dir: &Path, key: Option<&crypt::Key>, as_stored: bool) -> Result<Self> {
        let meta = fs::metadata(dir)
            .map_err(|source| ImageError::Read { path: dir.to_path_buf(), source })?;
        if !meta.is_dir() {
            return Err(ImageError::NotADirectory { path: dir.to_path_buf() });
        }

        let path = dir.join(MANIFEST);
        let bytes = match read_limited(&path, MAX_RECORD_BYTES) {
            Ok(b) => b,
            Err(ImageError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::NoManifest { dir: dir.to_path_buf() })
            }
            Err(e) => return Err(e),
        };
        let manifest = decode_manifest(&bytes, &path)?;
        let manifest_xxh3 = hash_bytes(&bytes);
        let sealing = match (&manifest.encryption, key) {
            _ if as_stored => None,
            (None, _) => None,
            (Some(_), None) => return Err(ImageError::Encrypted { dir: dir.to_path_buf() }),
            (Some(e), Some(key)) => {
                let s = crypt::Sealing::open(key, e, &path).map_err(|e| match e {
                    ImageError::WrongKey { .. } => ImageError::WrongKey { path: dir.to_path_buf() },
                    e => e,
                })?;
                if !s.check_manifest_mac(&mac_body(&manifest), &e.mac) {
                    return Err(ImageError::ManifestTampered { path });
                }
                Some((key.clone(), Arc::new(s)))
            }
        };

        for f in &manifest.files {
            let p = dir.join(&f.name);
            let meta = match fs::metadata(&p) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(ImageError::Missing { path: p })
                }
                Err(source) => return Err(ImageError::Read { path: p, source }),
            };
            if !meta.is_file() {
                return Err(not_regular(&p));
            }
            if meta.len() != f.len {
                return Err(ImageError::Length { path: p, expected: f.len, actual: meta.len() });
            }
        }
        Ok(Self { dir: dir.to_path_buf(), manifest, manifest_xxh3, sealing })
    }

    /// Whether the image is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.sealing.is_some()
    }

    /// The key the image was opened with, if it is encrypted.
    pub fn key(&self) -> Option<&crypt::Key> {
        self.sealing.as_ref().map(|(k, _)| k)
    }

    /// Opens a file of the image for reading its content at any offset. Its checksum is
    /// not checked here; in an encrypted image every piece read is authenticated.
    pub fn open_content(&self, name: &str) -> Result<Content> {
        let entry = self.entry(name)?;
        let path = self.dir.join(name);
        let file = open_regular(&path)?;
        match &self.sealing {
            None => Ok(Content::Plain { file, path, len: entry.len }),
            Some((_, s)) => Ok(Content::Sealed(s.open_file(file, name, entry.len, &path)?)),
        }
    }

    /// The image's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// xxh3-128 of the manifest file, in hex.
    pub fn manifest_xxh3(&self) -> &str {
        &self.manifest_xxh3
    }

    /// The image directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a file listed in the manifest.
    pub fn path(&self, name: &str) -> Result<PathBuf> {
        self.entry(name).map(|_| self.dir.join(name))
    }

    fn entry(&self, name: &str) -> Result<&FileEntry> {
        self.manifest
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| ImageError::NotListed { name: name.to_string() })
    }

    /// Reads every file of the image and compares its checksum and length with the
    /// manifest. `progress` is called with the bytes read so far.
    pub fn verify_all(&self, progress: impl FnMut(u64)) -> Result<()> {
        self.verify_files(|_| true, progress)
    }

    /// Like [`ImageReader::verify_all`], for the files `select` picks.
    pub fn verify_files(
        &self,
        select: impl Fn(&FileEntry) -> bool,
        mut progress: impl FnMut(u64),
    ) -> Result<()> {
        let mut buf = vec![0u8; 4 << 20];
        let mut total = 0u64;
        for f in self.manifest.files.iter().filter(|f| select(f)) {
            let path = self.dir.join(&f.name);
            let mut file = open_regular(&path)?;
            let mut h = Xxh3::new();
            let mut len = 0u64;
            loop {
                let n = match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(source) => return Err(ImageError::Read { path, source }),
                };
                h.update(&buf[..n]);
                len += n as u64;
                total += n as u64;
                progress(total);
            }
            let checked = check_digest(&path, f, len, &digest_hex(&h));
            if let (Err(ImageError::Checksum { .. }), Some((_, s))) = (&checked, &self.sealing) {
                // The segment that fails tells where the change is.
                s.open_file(open_regular(&path)?, &f.name, f.len, &path)?.verify()?;
            }
            checked?;
        }
        Ok(())
    }

    /// Reads a whole file of the image, checking it against the manifest.
    pub fn read_file(&self, name: &str) -> Result<Vec<u8>> {
        let entry = self.entry(name)?;
        let path = self.dir.join(name);
        if entry.len > MAX_RECORD_BYTES {
            return Err(ImageError::Corrupt {
                path,
                why: format!(
                    "{} bytes is more than a record may hold ({MAX_RECORD_BYTES})",
                    entry.len
                ),
            });
        }
        let file = open_regular(&path)?;
        let actual = file
            .metadata()
            .map_err(|source| ImageError::Read { path: path.clone(), source })?
            .len();
        if actual != entry.len {
            return Err(ImageError::Length { path, expected: entry.len, actual });
        }

        // One byte more than the manifest says, so that a file still growing is caught.
        let mut bytes = Vec::with_capacity(entry.len as usize);
        file.take(entry.len + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| ImageError::Read { path: path.clone(), source })?;
        let Some((_, s)) = &self.sealing else {
            check_digest(&path, entry, bytes.len() as u64, &hash_bytes(&bytes))?;
            return Ok(bytes);
        };
        // Opened before the checksum is compared, so that a change is reported with the
        // segment it is in.
        let digest = hash_bytes(&bytes);
        let len = bytes.len() as u64;
        if len != entry.len {
            return Err(ImageError::Length { path, expected: entry.len, actual: len });
        }
        let content = s.open_bytes(bytes, name, &path)?.read_all()?;
        check_digest(&path, entry, len, &digest)?;
        Ok(content)
    }

    /// Reads and decodes a JSON record file, checking it against the manifest.
    pub fn read_json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<T> {
        let bytes = self.read_file(name)?;
        serde_json::from_slice(&bytes).map_err(|e| ImageError::Corrupt {
            path: self.dir.join(name),
            why: format!("cannot decode: {e}"),
        })
    }

    /// Reads `tree.json`, checks it against the manifest and checks that its records are
    /// consistent with each other (see [`check_tree`]).
    pub fn read_tree(&self) -> Result<model::Tree> {
        let tree: model::Tree = self.read_json(TREE)?;
        check_tree(&tree, &self.manifest, &self.dir.join(TREE))?;
        Ok(tree)
    }
}

fn not_regular(path: &Path) -> ImageError {
    ImageError::Corrupt { path: path.to_path_buf(), why: "not a regular file".to_string() }
}

fn check_digest(path: &Path, entry: &FileEntry, len: u64, actual: &str) -> Result<()> {
    if len != entry.len {
        return Err(ImageError::Length {
            path: path.to_path_buf(),
            expected: entry.len,
            actual: len,
        });
    }
    if actual != entry.xxh3 {
        return Err(ImageError::Checksum {
            path: path.to_path_buf(),
            expected: entry.xxh3.clone(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// Opens a file of the image for reading, refusing anything but a regular file (a FIFO
/// or device put in its place must not make the reader wait or read forever).
fn open_regular(path: &Path) -> Result<File> {
    let read_err = |source| ImageError::Read { path: path.to_path_buf(), source };
    let file =
        OpenOptions::new().read(true).custom_flags(O_NONBLOCK).open(path).map_err(read_err)?;
    if !file.metadata().map_err(read_err)?.is_file() {
        return Err(not_regular(path));
    }
    Ok(file)
}

/// Reads a whole regular file, refusing one longer than `limit` bytes.
fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let f = open_regular(path)?;
    let mut bytes = Vec::new();
    f.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|source| ImageError::Read { path: path.to_path_buf(), source })?;
    if bytes.len() as u64 > limit {
        return Err(ImageError::Corrupt {
            path: path.to_path_buf(),
            why: format!("larger than {limit} bytes"),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::process::Command;

    use tempfile::TempDir;

    use super::*;
    use crate::model::*;

    pub(crate) const PID: i32 = 4242;
    pub(crate) const PAGES: &str = "pages-4242.img";
    pub(crate) const VDSO: &str = "vdso-4242.img";
    pub(crate) const SAVED: &str = "file-0.img";
    const PAGE: u64 = 4096;
    const SIGUSR1: i32 = 10;

    /// Content of the `i`th page of the sample's page file: different in every page.
    fn page(i: u64) -> Vec<u8> {
        (0..PAGE).map(|j| (i * 31 + j * 7 + j / 251) as u8).collect()
    }

    fn vdso_bytes() -> Vec<u8> {
        (0..2 * PAGE).map(|j| (j % 253) as u8).collect()
    }

    fn siginfo(signo: i32) -> SigInfo {
        let mut raw = vec![0u8; 128];
        raw[0] = signo as u8;
        SigInfo { signo, raw: hex::encode(raw) }
    }

    fn vma(start: u64, pages: u64, prot: u32, kind: VmaKind) -> Vma {
        Vma {
            start,
            end: start + pages * PAGE,
            prot,
            shared: false,
            kind,
            advice: Vec::new(),
            pages: Vec::new(),
            shmem: None,
        }
    }

    fn thread(tid: i32) -> Thread {
        Thread {
            tid,
            comm: "sleeper".to_string(),
            regs: Regs { rip: 0x5555_5555_4a10, rsp: 0x7ffc_d001_ff00, ..Regs::default() },
            xsave: "00".repeat(1088),
            blocked: 1 << (SIGUSR1 - 1),
            pending: Vec::new(),
            altstack: AltStack { sp: 0, flags: 2, size: 0 },
            rseq: Some(Rseq { addr: 0x7f00_0000_1fe0, len: 32, signature: 0x5305_3053 }),
            robust_list: 0x7f00_0000_1a20,
            robust_list_len: 24,
            clear_child_tid: 0x7f00_0000_1910,
            nice: 5,
            sched_policy: 0,
            sched_priority: 0,
            affinity: Some(vec![0b10]),
            ioprio: Some(2 << 13 | 4),
            timer_slack_ns: Some(1_000_000),
        }
    }

    /// A small process as a dump would record it: a binary with a data page and a zero
    /// page, a heap with two runs of data, a stack, the vDSO, two threads, a few
    /// descriptors and a deleted file. Its data pages are numbered in page file order.
    pub(crate) fn sample_tree() -> Tree {
        let exe = 0x5555_5555_4000;
        let mut text = vma(exe, 2, prot::READ | prot::EXEC, VmaKind::File { file: 0, offset: 0 });
        text.advice = vec!["dd".to_string()];
        let mut data = vma(
            exe + 3 * PAGE,
            2,
            prot::READ | prot::WRITE,
            VmaKind::File { file: 0, offset: 3 * PAGE },
        );
        data.pages = vec![
            PageRun { addr: data.start, pages: 1, offset: Some(0), from_pid: None, image: 0 },
            PageRun { addr: data.start + PAGE, pages: 1, offset: None, from_pid: None, image: 0 },
        ];
        let mut heap =
            vma(exe + 5 * PAGE, 64, prot::READ | prot::WRITE, VmaKind::Anon { heap: true });
        heap.pages = vec![
            PageRun { addr: heap.start, pages: 30, offset: Some(PAGE), from_pid: None, image: 0 },
            PageRun {
                addr: heap.start + 33 * PAGE,
                pages: 31,
                offset: Some(31 * PAGE),
                from_pid: None,
                image: 0,
            },
        ];
        let mut stack = vma(0x7ffc_d000_0000, 32, prot::READ | prot::WRITE, VmaKind::Stack);
        stack.pages = vec![PageRun {
            addr: stack.start + 24 * PAGE,
            pages: 8,
            offset: Some(62 * PAGE),
            from_pid: None,
            image: 0,
        }];
        let vvar = vma(0x7ffc_d010_0000, 4, prot::READ, VmaKind::Vvar { name: "[vvar]".into() });
        let vdso = vma(
            0x7ffc_d010_4000,
            2,
            prot::READ | prot::EXEC,
            VmaKind::Vdso { content_xxh3: hash_bytes(&vdso_bytes()), content_file: VDSO.into() },
        );
        let vsyscall = vma(0xffff_ffff_ff60_0000, 1, prot::EXEC, VmaKind::Vsyscall);

        let mut sigactions = vec![SigAction { handler: 0, flags: 0, restorer: 0, mask: 0 }; 64];
        sigactions[1] = SigAction {
            handler: 0x5555_5555_4c00,
            flags: 0x0400_0004,
            restorer: 0x7f00_0004_2520,
            mask: 0,
        };

        let mut second = thread(PID + 1);
        second.pending = vec![siginfo(SIGUSR1)];

        Tree {
            root_pid: PID,
            processes: vec![Process {
                pid: PID,
                ppid: 1,
                pgid: PID,
                sid: 4000,
                cmdline: vec!["sleeper".into(), "--interval".into(), "5".into()],
                creds: Creds {
                    uids: [1000; 4],
                    gids: [1000; 4],
                    groups: vec![27, 1000],
                    cap_inheritable: 0,
                    cap_permitted: 0,
                    cap_effective: 0,
                    cap_bounding: (1 << 41) - 1,
                    cap_ambient: 0,
                    no_new_privs: false,
                },
                rlimits: vec![
                    Rlimit { resource: 3, soft: 8 << 20, hard: u64::MAX },
                    Rlimit { resource: 7, soft: 1024, hard: 524_288 },
                ],
                umask: 0o022,
                cwd: "/home/user".into(),
                root: "/".into(),
                personality: 0,
                pdeath_signal: 0,
                dumpable: 1,
                mm: MmFields {
                    start_code: exe,
                    end_code: exe + 2 * PAGE,
                    start_data: exe + 3 * PAGE,
                    end_data: exe + 4 * PAGE,
                    start_brk: exe + 5 * PAGE,
                    brk: exe + 69 * PAGE,
                    start_stack: 0x7ffc_d001_ff80,
                    arg_start: 0x7ffc_d001_ffa0,
                    arg_end: 0x7ffc_d001_ffc0,
                    env_start: 0x7ffc_d001_ffc0,
                    env_end: 0x7ffc_d001_fff0,
                    auxv: vec![6, 4096, 25, 0x7ffc_d001_ff90, 0, 0],
                    exe_file: 0,
                },
                vmas: vec![text, data, heap, stack, vvar, vdso, vsyscall],
                pages_file: PAGES.into(),
                page_frames: None,
                page_hashes: None,
                sigactions,
                shared_pending: vec![siginfo(15)],
                itimers: ITimers {
                    real: ITimer { value_us: 250_000, interval_us: 500_000 },
                    ..ITimers::default()
                },
                posix_timers: vec![PosixTimer {
                    id: 0,
                    clock: 1,
                    notify: 0,
                    signo: 14,
                    sigval: 0,
                    notify_tid: PID,
                    value_ns: 750_000_000,
                    interval_ns: 0,
                    overrun: 0,
                }],
                open_files: vec![
                    OpenFile {
                        flags: 2,
                        pos: 0,
                        kind: OpenFileKind::CharDevice { path: "/dev/null".into(), rdev: 0x103 },
                        id: 0,
                    },
                    OpenFile {
                        flags: 0o2101,
                        pos: 100,
                        kind: OpenFileKind::Regular { file: 1 },
                        id: 0,
                    },
                    OpenFile {
                        flags: 0o200000,
                        pos: 0,
                        kind: OpenFileKind::Directory { path: "/home/user".into() },
                        id: 0,
                    },
                ],
                fds: vec![
                    Fd { fd: 0, cloexec: false, open_file: 0 },
                    Fd { fd: 1, cloexec: false, open_file: 0 },
                    Fd { fd: 2, cloexec: false, open_file: 0 },
                    Fd { fd: 3, cloexec: true, open_file: 1 },
                    Fd { fd: 4, cloexec: true, open_file: 2 },
                ],
                file_locks: Vec::new(),
                seccomp: Vec::new(),
                threads: vec![thread(PID), second],
                termios: None,
                cgroups: Vec::new(),
                attrs: ProcessAttrs {
                    child_subreaper: true,
                    thp_disabled: true,
                    oom_score_adj: 300,
                },
            }],
            files: vec![
                FileInfo {
                    path: "/usr/local/bin/sleeper".into(),
                    dev: 0x803,
                    ino: 131_075,
                    size: 18_432,
                    mtime_ns: 1_700_000_000_123_456_789,
                    mode: 0o100755,
                    content_xxh3: Some(hash_bytes(b"sleeper")),
                    saved_content: None,
                    memfd: None,
                },
                FileInfo {
                    path: "/tmp/scratch".into(),
                    dev: 0x2a,
                    ino: 77,
                    size: 100,
                    mtime_ns: -1,
                    mode: 0o100600,
                    content_xxh3: None,
                    saved_content: Some(SAVED.into()),
                    memfd: None,
                },
            ],
            zombies: Vec::new(),
            pid_ns: false,
            net_lock: None,
            ptys: vec![Pty {
                index: 7,
                termios: Termios {
                    iflag: 0o2400,
                    oflag: 0o5,
                    cflag: 0o277,
                    lflag: 0o105073,
                    line: 0,
                    cc: "03 1c 7f 15 04 00 01 00 11 13 1a 00 12 0f 17 16 00 00 00".replace(' ', ""),
                    ispeed: 38400,
                    ospeed: 38400,
                },
                winsize: Winsize { rows: 40, cols: 120, xpixel: 0, ypixel: 0 },
                locked: false,
                packet: false,
                exclusive: false,
                session: None,
                foreground: None,
                output: None,
                input: None,
            }],
        }
    }

    /// Number of data pages in the sample's page file.
    pub(crate) const DATA_PAGES: u64 = 70;

    pub(crate) fn sample_manifest() -> Manifest {
        Manifest {
            magic: MAGIC.into(),
            format_version: FORMAT_VERSION,
            torpor_version: "0.1.0".into(),
            created_unix: 1_700_000_100,
            kernel_release: "6.8.0-45-generic".into(),
            arch: "x86_64".into(),
            cpu: CpuState { xfeatures_used: 0x7, xcr0: 0x2e7, xsave_size: 2696 },
            root_pid: PID,
            files: Vec::new(),
            parent: None,
            encryption: None,
        }
    }

    /// Writes the sample image into a new directory `img` under a temporary directory.
    pub(crate) fn write_sample() -> (TempDir, PathBuf) {
        write_sample_keyed(None)
    }

    /// [`write_sample`], encrypted with `key` if one is given.
    pub(crate) fn write_sample_keyed(key: Option<&crypt::Key>) -> (TempDir, PathBuf) {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path().join("img");
        let mut w = ImageWriter::create(&dir).unwrap();
        if let Some(k) = key {
            w.set_key(k).unwrap();
        }
        w.write_json(TREE, &sample_tree()).unwrap();

        let mut f = w.create_file(PAGES).unwrap();
        for i in 0..DATA_PAGES {
            f.write_all(&page(i)).unwrap();
        }
        assert_eq!(f.len(), DATA_PAGES * PAGE);
        w.finish_file(f).unwrap();

        w.write_file(VDSO, &vdso_bytes()).unwrap();
        let mut f = w.create_file(SAVED).unwrap();
        f.write_all(&[b'x'; 100]).unwrap();
        w.finish_file(f).unwrap();
        w.commit(sample_manifest()).unwrap();
        (tmp, dir)
    }

    /// Everything restore does before trusting an image.
    fn load(dir: &Path) -> Result<Tree> {
        let r = ImageReader::open(dir)?;
        r.verify_all(|_| {})?;
        r.read_tree()
    }

    fn variant(e: &ImageError) -> &'static str {
        match e {
            ImageError::CreateDir { .. } => "CreateDir",
            ImageError::NotADirectory { .. } => "NotADirectory",
            ImageError::Write { .. } => "Write",
            ImageError::Read { .. } => "Read",
            ImageError::NoManifest { .. } => "NoManifest",
            ImageError::Corrupt { .. } => "Corrupt",
            ImageError::Length { .. } => "Length",
            ImageError::Checksum { .. } => "Checksum",
            ImageError::Version { .. } => "Version",
            ImageError::Missing { .. } => "Missing",
            ImageError::BadName { .. } => "BadName",
            ImageError::NotListed { .. } => "NotListed",
            ImageError::Parent { .. } => "Parent",
            ImageError::ParentChanged { .. } => "ParentChanged",
            ImageError::NotPackable { .. } => "NotPackable",
            ImageError::Encrypted { .. } => "Encrypted",
            ImageError::WrongKey { .. } => "WrongKey",
            ImageError::Tampered { .. } => "Tampered",
            ImageError::ManifestTampered { .. } => "ManifestTampered",
            ImageError::Key(_) => "Key",
        }
    }

    /// Asserts that `r` failed with `want` and that the message names `what`.
    #[track_caller]
    fn refused<T>(r: Result<T>, want: &str, what: &str) -> ImageError {
        let Err(e) = r else { panic!("expected {want} naming {what}, but it succeeded") };
        assert_eq!(variant(&e), want, "{e}");
        assert!(e.to_string().contains(what), "{e:?} does not name {what}");
        e
    }

    /// The manifest's JSON body, as a value to edit.
    fn manifest_value(dir: &Path) -> serde_json::Value {
        let bytes = fs::read(dir.join(MANIFEST)).unwrap();
        let (body, _) = split_trailer(&bytes).unwrap();
        serde_json::from_slice(body).unwrap()
    }

    /// `body` followed by a correct trailer line.
    fn signed(mut body: Vec<u8>) -> Vec<u8> {
        body.push(b'\n');
        let trailer = format!("xxh3 {}\n", hash_bytes(&body));
        body.extend_from_slice(trailer.as_bytes());
        body
    }

    /// Replaces the manifest with an edited and correctly signed one.
    fn rewrite_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
        let mut v = manifest_value(dir);
        edit(&mut v);
        fs::write(dir.join(MANIFEST), signed(serde_json::to_vec_pretty(&v).unwrap())).unwrap();
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// The writer thread's direct writes (whole pages at page offsets) and cached ones
    /// (anything else) land where they belong, in any order of the two.
    #[test]
    fn direct_and_cached_pieces_make_the_file_written() {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path().join("img");
        let mut w = ImageWriter::create(&dir).unwrap();
        let mut f = w.create_file(PAGES).unwrap();
        let mut want = Vec::new();
        let pieces: [usize; 6] = [1 << 20, 2 << 20, 5, 1 << 20, (1 << 20) + 4096, 3 << 20];
        for (i, &len) in pieces.iter().enumerate() {
            let piece: Vec<u8> = (0..len).map(|b| (b as u32 * 31 + i as u32 * 7) as u8).collect();
            f.write_all(&piece).unwrap();
            want.extend_from_slice(&piece);
        }
        f.write_all(b"tail").unwrap();
        want.extend_from_slice(b"tail");
        w.finish_file(f).unwrap();
        w.write_json(TREE, &sample_tree()).unwrap();
        w.commit(sample_manifest()).unwrap();
        assert_eq!(fs::read(dir.join(PAGES)).unwrap(), want);
        let r = ImageReader::open(&dir).unwrap();
        r.verify_files(|f| f.name == PAGES, |_| {}).unwrap();
    }

    /// Files synced together by the commit make the image, and a file that went missing
    /// before the commit fails it, removing the image.
    #[test]
    fn a_file_gone_before_the_commit_fails_it_whole() {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path().join("img");
        let mut w = ImageWriter::create(&dir).unwrap();
        w.write_json(TREE, &sample_tree()).unwrap();
        let mut f = w.create_file(PAGES).unwrap();
        for i in 0..DATA_PAGES {
            f.write_all(&page(i)).unwrap();
        }
        w.finish_file(f).unwrap();
        w.write_file(VDSO, &vdso_bytes()).unwrap();
        w.write_file(SAVED, &[b'x'; 100]).unwrap();
        w.commit(sample_manifest()).unwrap();
        load(&dir).unwrap();

        let dir = tmp.path().join("img2");
        let mut w = ImageWriter::create(&dir).unwrap();
        w.write_json(TREE, &sample_tree()).unwrap();
        fs::remove_file(dir.join(TREE)).unwrap();
        let e = w.commit(sample_manifest()).unwrap_err();
        assert!(e.to_string().contains(TREE), "{e}");
        assert!(!dir.exists(), "a failed commit left {}", dir.display());
    }

    #[test]
    fn written_image_reads_back() {
        let (_tmp, dir) = write_sample();
        let r = ImageReader::open(&dir).unwrap();

        let names: Vec<_> = r.manifest().files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, [TREE, PAGES, VDSO, SAVED]);
        assert_eq!(r.manifest().magic, MAGIC);
        assert_eq!(r.manifest().format_version, OLDEST_FORMAT_VERSION);
        assert_eq!(r.manifest().cpu, sample_manifest().cpu);

        let total: u64 = r.manifest().files.iter().map(|f| f.len).sum();
        let mut seen = Vec::new();
        r.verify_all(|n| seen.push(n)).unwrap();
        assert_eq!(seen.last(), Some(&total));
        assert!(seen.windows(2).all(|w| w[0] < w[1]));

        assert_eq!(r.read_json::<Tree>(TREE).unwrap(), sample_tree());
        assert_eq!(r.read_tree().unwrap(), sample_tree());
        assert_eq!(r.read_file(VDSO).unwrap(), vdso_bytes());

        // The page file holds the data pages back to back, each run at its offset.
        let pages = fs::read(r.path(PAGES).unwrap()).unwrap();
        assert_eq!(pages.len() as u64, DATA_PAGES * PAGE);
        for run in sample_tree().processes[0].vmas.iter().flat_map(|v| &v.pages) {
            let Some(offset) = run.offset else { continue };
            for i in 0..run.pages {
                let at = (offset + i * PAGE) as usize;
                assert_eq!(pages[at..at + PAGE as usize], page(offset / PAGE + i)[..]);
            }
        }

        refused(r.path("pages-1.img"), "NotListed", "pages-1.img");
        refused(r.read_file("nothing.img"), "NotListed", "nothing.img");
    }

    #[derive(Debug, Clone, Copy)]
    enum Damage {
        FlipFirst,
        FlipMiddle,
        FlipLast,
        DropLastByte,
        Empty,
        AppendByte,
        Delete,
    }

    const DAMAGES: [Damage; 7] = [
        Damage::FlipFirst,
        Damage::FlipMiddle,
        Damage::FlipLast,
        Damage::DropLastByte,
        Damage::Empty,
        Damage::AppendByte,
        Damage::Delete,
    ];

    fn damage(path: &Path, d: Damage) {
        let mut bytes = fs::read(path).unwrap();
        let last = bytes.len() - 1;
        match d {
            Damage::FlipFirst => bytes[0] ^= 1,
            Damage::FlipMiddle => bytes[last / 2] ^= 1,
            Damage::FlipLast => bytes[last] ^= 1,
            Damage::DropLastByte => bytes.truncate(last),
            Damage::Empty => bytes.clear(),
            Damage::AppendByte => bytes.push(b'x'),
            Damage::Delete => return fs::remove_file(path).unwrap(),
        }
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn every_damage_to_every_file_is_refused() {
        for name in [TREE, PAGES, VDSO, SAVED, MANIFEST] {
            for d in DAMAGES {
                let (_tmp, dir) = write_sample();
                damage(&dir.join(name), d);
                let want = match (name, d) {
                    (MANIFEST, Damage::FlipFirst | Damage::FlipMiddle) => "Checksum",
                    (MANIFEST, Damage::Delete) => "NoManifest",
                    (MANIFEST, _) => "Corrupt",
                    (_, Damage::FlipFirst | Damage::FlipMiddle | Damage::FlipLast) => "Checksum",
                    (_, Damage::Delete) => "Missing",
                    _ => "Length",
                };
                let e = load(&dir).expect_err(&format!("{d:?} of {name} went unnoticed"));
                assert_eq!(variant(&e), want, "{d:?} of {name}: {e}");
                assert!(e.to_string().contains(name), "{d:?} of {name}: {e}");
            }
        }
    }

    #[test]
    fn damaged_record_is_refused_without_verify_all() {
        for d in [Damage::FlipFirst, Damage::FlipMiddle, Damage::FlipLast] {
            let (_tmp, dir) = write_sample();
            damage(&dir.join(TREE), d);
            let r = ImageReader::open(&dir).unwrap();
            refused(r.read_json::<Tree>(TREE), "Checksum", TREE);
            refused(r.read_tree(), "Checksum", TREE);
        }

        // A record that grows after the image was opened.
        let (_tmp, dir) = write_sample();
        let r = ImageReader::open(&dir).unwrap();
        damage(&dir.join(TREE), Damage::AppendByte);
        refused(r.read_file(TREE), "Length", TREE);
        refused(r.verify_all(|_| {}), "Length", TREE);
    }

    #[test]
    fn other_magic_is_refused() {
        let (_tmp, dir) = write_sample();
        rewrite_manifest(&dir, |m| m["magic"] = "other-image".into());
        let e = refused(load(&dir), "Corrupt", MANIFEST);
        assert!(e.to_string().contains("other-image"), "{e}");

        rewrite_manifest(&dir, |m| {
            m.as_object_mut().unwrap().remove("magic");
        });
        refused(load(&dir), "Corrupt", MANIFEST);

        // Edited without updating the trailer: the checksum catches it first.
        let (_tmp, dir) = write_sample();
        let path = dir.join(MANIFEST);
        let text = fs::read_to_string(&path).unwrap().replace(MAGIC, "torpor-imagf");
        fs::write(&path, text).unwrap();
        refused(load(&dir), "Checksum", MANIFEST);
    }

    #[test]
    fn other_format_version_is_a_version_error() {
        for found in [OLDEST_FORMAT_VERSION - 1, FORMAT_VERSION + 1, u32::MAX] {
            let (_tmp, dir) = write_sample();
            rewrite_manifest(&dir, |m| m["format_version"] = found.into());
            let e = refused(load(&dir), "Version", MANIFEST);
            assert!(matches!(e, ImageError::Version { found: f, .. } if f == found));
            assert!(e.to_string().contains(&format!("version {found}")), "{e}");
            let reads = format!("versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}");
            assert!(e.to_string().contains(&reads), "{e}");
        }

        // A newer format may reshape everything but the magic and the version.
        let (_tmp, dir) = write_sample();
        rewrite_manifest(&dir, |m| {
            *m = serde_json::json!({
                "magic": MAGIC,
                "format_version": FORMAT_VERSION + 1,
                "files": {"tree": 7},
            })
        });
        refused(load(&dir), "Version", MANIFEST);

        let (_tmp, dir) = write_sample();
        rewrite_manifest(&dir, |m| m["format_version"] = "1".into());
        refused(load(&dir), "Corrupt", MANIFEST);
    }

    #[test]
    fn bad_trailer_is_refused() {
        let (_tmp, dir) = write_sample();
        let path = dir.join(MANIFEST);
        let good = fs::read(&path).unwrap();
        let (body, digest) = split_trailer(&good).unwrap();
        let body = body.to_vec();
        let with_trailer = |line: &str| [&body[..], line.as_bytes()].concat();

        let wrong_digest = format!("xxh3 {}\n", "0".repeat(32));
        let cases = [
            (with_trailer(&wrong_digest), "Checksum"),
            (with_trailer(&format!("xxh3 {}\n", digest.to_uppercase())), "Corrupt"),
            (with_trailer(&format!("xxh64 {digest}\n")), "Corrupt"),
            (with_trailer(&format!("xxh3  {digest}\n")), "Corrupt"),
            (with_trailer(&format!("xxh3 {}\n", &digest[1..])), "Corrupt"),
            (with_trailer(&format!("xxh3 {digest}0\n")), "Corrupt"),
            (with_trailer(&format!("xxh3 {digest}\r\n")), "Corrupt"),
            (with_trailer(&format!("xxh3 {digest}\n\n")), "Corrupt"),
            (with_trailer(&format!("xxh3 {digest}")), "Corrupt"),
            (with_trailer(""), "Corrupt"),
            (body.clone(), "Corrupt"),
            (format!("xxh3 {digest}\n").into_bytes(), "Corrupt"),
            (b"\n".to_vec(), "Corrupt"),
        ];
        for (bytes, want) in cases {
            fs::write(&path, &bytes).unwrap();
            refused(load(&dir), want, MANIFEST);
        }

        fs::write(&path, &good).unwrap();
        load(&dir).unwrap();
    }

    #[test]
    fn manifest_with_bad_file_names_is_refused() {
        for name in ["../tree.json", "a/b", "/etc/passwd", "..", ".", "", "a\0b", &"n".repeat(256)]
        {
            let (_tmp, dir) = write_sample();
            rewrite_manifest(&dir, |m| m["files"][1]["name"] = name.into());
            let e = load(&dir).unwrap_err();
            assert!(matches!(&e, ImageError::BadName { name: n } if n == name), "{e}");
        }

        let (_tmp, dir) = write_sample();
        rewrite_manifest(&dir, |m| m["files"][1]["name"] = MANIFEST.into());
        refused(load(&dir), "Corrupt", "reserves");

        let (_tmp, dir) = write_sample();
        rewrite_manifest(&dir, |m| m["files"][1] = m["files"][0].clone());
        refused(load(&dir), "Corrupt", "twice");

        let (_tmp, dir) = write_sample();
        rewrite_manifest(&dir, |m| m["files"][2]["xxh3"] = "not hex".into());
        refused(load(&dir), "Corrupt", "not hex");
    }

    #[test]
    fn manifest_listing_a_file_not_there_is_refused() {
        let (_tmp, dir) = write_sample();
        rewrite_manifest(&dir, |m| {
            let files = m["files"].as_array_mut().unwrap();
            files.push(serde_json::json!({"name": "pages-7.img", "len": 0, "xxh3": "0".repeat(32)}))
        });
        refused(load(&dir), "Missing", "pages-7.img");
    }

    #[test]
    fn missing_manifest_means_incomplete() {
        let (_tmp, dir) = write_sample();
        fs::remove_file(dir.join(MANIFEST)).unwrap();
        let e = refused(load(&dir), "NoManifest", MANIFEST);
        assert!(e.to_string().contains("incomplete"), "{e}");
        assert!(e.to_string().contains(dir.to_str().unwrap()), "{e}");

        // A dump that stopped before its commit.
        let tmp = TempDir::new().unwrap();
        let mut w = ImageWriter::create(tmp.path()).unwrap();
        w.write_json(TREE, &sample_tree()).unwrap();
        drop(w);
        refused(load(tmp.path()), "NoManifest", "incomplete");

        // A second dump into the directory of a complete image: until it commits, the old
        // manifest must not describe the new files.
        let (_tmp, dir) = write_sample();
        let mut w = ImageWriter::create(&dir).unwrap();
        w.write_file(TREE, b"{}").unwrap();
        refused(load(&dir), "NoManifest", MANIFEST);
        w.abandon();
    }

    #[test]
    fn path_that_is_a_file_is_not_a_directory() {
        let tmp = TempDir::new().unwrap();
        let file = tmp.path().join("plain");
        fs::write(&file, b"not an image").unwrap();
        refused(ImageReader::open(&file), "NotADirectory", "plain");
        refused(ImageWriter::create(&file), "NotADirectory", "plain");

        refused(ImageReader::open(&tmp.path().join("absent")), "Read", "absent");
    }

    #[test]
    fn files_are_private() {
        let (_tmp, dir) = write_sample();
        assert_eq!(mode(&dir), 0o700);
        for name in [TREE, PAGES, VDSO, SAVED, MANIFEST] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        assert!(!dir.join(MANIFEST_TMP).exists());
    }

    #[test]
    fn writing_over_an_old_image_replaces_its_files() {
        let (_tmp, dir) = write_sample();

        // A file left readable by others, and a link that points outside the image.
        let outside = dir.parent().unwrap().join("outside");
        fs::write(&outside, b"keep me").unwrap();
        fs::set_permissions(dir.join(PAGES), fs::Permissions::from_mode(0o644)).unwrap();
        fs::remove_file(dir.join(VDSO)).unwrap();
        symlink(&outside, dir.join(VDSO)).unwrap();
        fs::remove_file(dir.join(SAVED)).unwrap();
        fs::hard_link(&outside, dir.join(SAVED)).unwrap();

        let mut w = ImageWriter::create(&dir).unwrap();
        for name in [PAGES, VDSO, SAVED] {
            w.write_file(name, b"new").unwrap();
        }
        w.commit(sample_manifest()).unwrap();

        assert_eq!(fs::read(&outside).unwrap(), b"keep me");
        for name in [PAGES, VDSO, SAVED] {
            let path = dir.join(name);
            assert!(fs::symlink_metadata(&path).unwrap().is_file(), "{name}");
            assert_eq!(mode(&path), 0o600, "{name}");
            assert_eq!(fs::read(&path).unwrap(), b"new");
        }
        let r = ImageReader::open(&dir).unwrap();
        assert_eq!(r.manifest().files.len(), 3);
        r.verify_all(|_| {}).unwrap();
    }

    #[test]
    fn abandon_removes_what_was_written() {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path().join("a").join("img");
        let mut w = ImageWriter::create(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        w.write_json(TREE, &sample_tree()).unwrap();
        let mut f = w.create_file(PAGES).unwrap();
        f.write_all(&page(0)).unwrap();
        // Left unfinished, as a dump that fails in the middle of a file would.
        drop(f);
        w.abandon();
        assert!(!dir.exists());

        // In a directory that was there before, only the image's files go.
        let dir = tmp.path().join("a");
        fs::write(dir.join("notes.txt"), b"mine").unwrap();
        let mut w = ImageWriter::create(&dir).unwrap();
        w.write_file(PAGES, &page(1)).unwrap();
        w.abandon();
        let left: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["notes.txt"]);
    }

    #[test]
    fn rewritten_file_is_listed_once() {
        let tmp = TempDir::new().unwrap();
        let mut w = ImageWriter::create(tmp.path()).unwrap();
        w.write_file(VDSO, b"first").unwrap();
        w.write_file(PAGES, &page(0)).unwrap();
        w.write_file(VDSO, b"second").unwrap();
        let mut m = sample_manifest();
        m.magic = "ignored".into();
        m.format_version = 99;
        w.commit(m).unwrap();

        let r = ImageReader::open(tmp.path()).unwrap();
        let names: Vec<_> = r.manifest().files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, [VDSO, PAGES]);
        assert_eq!(r.read_file(VDSO).unwrap(), b"second");
        assert_eq!((r.manifest().magic.as_str(), r.manifest().format_version), (MAGIC, 1));
    }

    #[test]
    fn writer_refuses_names_outside_the_image() {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path().join("img");
        let mut w = ImageWriter::create(&dir).unwrap();
        for name in ["../escape", "a/b", "..", ".", "", MANIFEST, MANIFEST_TMP] {
            refused(w.create_file(name), "BadName", &format!("{name:?}"));
        }
        assert!(!tmp.path().join("escape").exists());
        w.abandon();
    }

    #[test]
    fn listed_file_that_is_not_regular_is_refused() {
        let (_tmp, dir) = write_sample();
        fs::remove_file(dir.join(SAVED)).unwrap();
        fs::create_dir(dir.join(SAVED)).unwrap();
        refused(load(&dir), "Corrupt", SAVED);

        // A FIFO must not make the reader wait for a writer.
        let (_tmp, dir) = write_sample();
        fs::remove_file(dir.join(MANIFEST)).unwrap();
        let status = Command::new("mkfifo").arg(dir.join(MANIFEST)).status().unwrap();
        assert!(status.success());
        refused(load(&dir), "Corrupt", "not a regular file");
    }

    #[test]
    fn oversized_records_are_refused() {
        let (_tmp, dir) = write_sample();
        refused(read_limited(&dir.join(PAGES), PAGE), "Corrupt", PAGES);
        assert_eq!(read_limited(&dir.join(VDSO), 2 * PAGE).unwrap(), vdso_bytes());

        // A listed file too large to load whole (sparse, so the test stays cheap).
        let big = MAX_RECORD_BYTES + 1;
        File::create(dir.join("big.img")).unwrap().set_len(big).unwrap();
        rewrite_manifest(&dir, |m| {
            let entry = serde_json::json!({"name": "big.img", "len": big, "xxh3": "0".repeat(32)});
            m["files"].as_array_mut().unwrap().push(entry)
        });
        let r = ImageReader::open(&dir).unwrap();
        refused(r.read_file("big.img"), "Corrupt", "more than a record may hold");
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let (_tmp, dir) = write_sample();
        rewrite_manifest(&dir, |m| {
            m["compression"] = "none".into();
            m["cpu"]["pkru"] = 0x5555_5554.into();
            m["files"][0]["mode"] = 0o600.into();
        });
        let r = ImageReader::open(&dir).unwrap();
        assert_eq!(r.manifest().root_pid, PID);
        r.verify_all(|_| {}).unwrap();

        let mut v = serde_json::to_value(sample_tree()).unwrap();
        v["namespaces"] = serde_json::json!({"pid": 4026531836u64});
        let p = &mut v["processes"][0];
        p["oom_score_adj"] = 0.into();
        p["creds"]["securebits"] = 0.into();
        p["vmas"][1]["pages"][0]["huge"] = false.into();
        p["vmas"][2]["kind"]["numa_policy"] = "default".into();
        p["vmas"][5]["kind"]["build_id"] = "abc".into();
        p["open_files"][0]["kind"]["tty_index"] = 3.into();
        p["threads"][0]["regs"]["fs_index"] = 0.into();
        p["threads"][1]["sched_policy"] = 0.into();
        let bytes = serde_json::to_vec(&v).unwrap();
        assert_eq!(serde_json::from_slice::<Tree>(&bytes).unwrap(), sample_tree());

        // Fields added after the first version may be absent.
        let mut v = serde_json::to_value(sample_tree()).unwrap();
        let p = v["processes"][0].as_object_mut().unwrap();
        p.remove("cmdline");
        p["vmas"][0].as_object_mut().unwrap().remove("advice");
        let tree: Tree = serde_json::from_value(v).unwrap();
        assert!(tree.processes[0].cmdline.is_empty());
    }

    /// An encrypted sample: everything reads back with the key, nothing without it or
    /// with another, and any change to the manifest or a file is refused by name.
    #[test]
    fn encrypted_image_reads_back_only_with_its_key() {
        let key = crypt::Key::generate().unwrap();
        let (_tmp, dir) = write_sample_keyed(Some(&key));
        let r = ImageReader::open_keyed(&dir, Some(&key)).unwrap();
        assert!(r.is_encrypted());
        assert_eq!(r.manifest().format_version, ENCRYPTED_VERSION);
        r.verify_all(|_| {}).unwrap();
        assert_eq!(r.read_tree().unwrap(), sample_tree());
        assert_eq!(r.read_file(VDSO).unwrap(), vdso_bytes());
        let mut saved = Vec::new();
        r.open_content(SAVED).unwrap().copy_to(&mut saved).unwrap();
        assert_eq!(saved, vec![b'x'; 100]);
        let pages = r.open_content(PAGES).unwrap();
        assert_eq!(pages.len(), DATA_PAGES * PAGE);
        let mut buf = vec![0u8; 3 * PAGE as usize];
        pages.read_at(&mut buf, 20 * PAGE).unwrap();
        assert_eq!(buf, [page(20), page(21), page(22)].concat());
        // What is stored is not what was written.
        let stored = fs::read(dir.join(PAGES)).unwrap();
        assert!(!stored.windows(PAGE as usize).any(|w| w == page(20)));

        refused(ImageReader::open(&dir), "Encrypted", "--encrypt-key");
        let other = crypt::Key::generate().unwrap();
        refused(ImageReader::open_keyed(&dir, Some(&other)), "WrongKey", "img");
        // A plain image opens with a key too: there is nothing to use it for.
        let (_plain_tmp, plain) = write_sample();
        assert!(!ImageReader::open_keyed(&plain, Some(&key)).unwrap().is_encrypted());

        // A manifest changed and given a matching trailer fails its MAC.
        let path = dir.join(MANIFEST);
        let original = fs::read(&path).unwrap();
        let mut m = decode_manifest(&original, &path).unwrap();
        m.files[0].len += 1;
        fs::write(&path, encode_manifest(&m)).unwrap();
        refused(ImageReader::open_keyed(&dir, Some(&key)), "ManifestTampered", MANIFEST);
        fs::write(&path, &original).unwrap();

        // A changed byte is reported with the segment it lies in, whether the file is
        // checked whole, read as a record, or read in pieces without its checksum.
        let pages_path = dir.join(PAGES);
        let mut bytes = fs::read(&pages_path).unwrap();
        bytes[crypt::HEADER + crypt::SEGMENT + 100] ^= 1;
        fs::write(&pages_path, &bytes).unwrap();
        let r = ImageReader::open_keyed(&dir, Some(&key)).unwrap();
        let e = refused(r.verify_all(|_| {}), "Tampered", PAGES);
        assert!(e.to_string().contains("segment 1"), "{e}");
        let content = r.open_content(PAGES).unwrap();
        content.read_at(&mut buf, 0).unwrap();
        let e = refused(content.read_at(&mut buf, crypt::SEGMENT as u64), "Tampered", PAGES);
        assert!(e.to_string().contains("segment 1"), "{e}");
        let tree_path = dir.join(TREE);
        let mut bytes = fs::read(&tree_path).unwrap();
        bytes[crypt::HEADER + 5] ^= 1;
        fs::write(&tree_path, &bytes).unwrap();
        let e = refused(r.read_tree(), "Tampered", TREE);
        assert!(e.to_string().contains("segment 0"), "{e}");
    }
}
