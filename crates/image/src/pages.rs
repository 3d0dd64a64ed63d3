//! Page files: writing a process's page data, raw or compressed, and reading any byte
//! range of it back.
//!
//! The page data of a process is the contents of its stored pages, back to back in the
//! order the dumper wrote them; [`PageRun::offset`](crate::model::PageRun::offset) counts
//! in it. A page file holds it in one of two ways:
//!
//! ```text
//!   raw         | page data ........................................ |
//!               the file is the page data; restore maps it or preads it directly
//!
//!   compressed  | frame 0 | frame 1 |  ...  | frame n-1 |
//!               frame i = one zstd frame of page data bytes
//!               [i * frame_len, min((i + 1) * frame_len, data_len))
//!               sizes of the frames: Process::page_frames (model::PageFrames)
//! ```
//!
//! Frames are independent, so a reader finds the frame holding any offset from the index
//! alone, and several frames can be decompressed at once. The manifest's checksum covers
//! the file as stored; each frame also carries zstd's own checksum of its content, so a
//! reader that does not verify the whole file first still notices a damaged frame.
//!
//! In an encrypted image either form is sealed as any other file is ([`crate::crypt`]):
//! in independent segments, so a reader still reaches any frame (or, raw, any page)
//! without the rest, and every piece it reads is authenticated.
//!
//! The writer compresses on worker threads while its caller goes on producing data: the
//! caller only copies bytes into the current frame, and hands full frames to the workers
//! through a bounded queue.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::model::{PageFrames, Process, Tree};
use crate::{Content, ImageError, ImageFile, ImageReader, Result};

/// Page data per compressed frame. Small enough that reading one page costs little (a
/// lazy restore decompresses one frame per fault), large enough for zstd to find repeats.
pub const FRAME_LEN: u64 = 1 << 20;
/// Page data waiting for a compression worker, at most.
const QUEUE_BYTES: usize = 8 << 20;
/// Largest frame a reader accepts: what it decompresses into memory at once.
pub const MAX_FRAME_LEN: u64 = 64 << 20;
/// The compression level `--compress` uses when none is given; see BENCHMARKS.md.
pub const DEFAULT_LEVEL: i32 = 1;

const PAGE: u64 = 4096;

/// Compression levels a dump accepts (zstd's range, negative ones being the fastest).
pub fn levels() -> std::ops::RangeInclusive<i32> {
    zstd::compression_level_range()
}

/// Checks a frame index against the length of the file it describes; the reason when it
/// does not fit. Everything a reader computes from the index stays in bounds once this
/// passed.
pub fn check_frames(f: &PageFrames, file_len: u64) -> std::result::Result<(), String> {
    if f.frame_len == 0 || f.frame_len % PAGE != 0 || f.frame_len > MAX_FRAME_LEN {
        return Err(format!(
            "frame length {} is not a multiple of {PAGE} up to {MAX_FRAME_LEN}",
            f.frame_len
        ));
    }
    if f.data_len % PAGE != 0 {
        return Err(format!("page data length {} is not a multiple of {PAGE}", f.data_len));
    }
    let count = f.data_len.div_ceil(f.frame_len);
    if count != f.frames.len() as u64 {
        return Err(format!(
            "{} frames listed, {count} needed for {} bytes of page data",
            f.frames.len(),
            f.data_len
        ));
    }
    let bound = zstd::zstd_safe::compress_bound(f.frame_len as usize) as u64;
    let mut total = 0u64;
    for (i, &size) in f.frames.iter().enumerate() {
        if size == 0 || size as u64 > bound {
            return Err(format!("frame {i} has an impossible size of {size} bytes"));
        }
        total += size as u64;
    }
    if total != file_len {
        return Err(format!("frames add up to {total} bytes, the file has {file_len}"));
    }
    Ok(())
}

/// Writes a page file, raw or as zstd frames.
pub struct PageWriter {
    inner: Inner,
}

enum Inner {
    Raw(Box<ImageFile>),
    Zstd(Box<Pipeline>),
}

/// Frames being compressed by worker threads and written in order by a collector.
struct Pipeline {
    path: PathBuf,
    /// The frame being filled.
    current: Vec<u8>,
    /// Page data bytes written so far.
    len: u64,
    next_seq: usize,
    to_workers: Option<SyncSender<(usize, Vec<u8>)>>,
    workers: Vec<JoinHandle<()>>,
    collector: Option<JoinHandle<Result<Written>>>,
}

/// The compressed file and the sizes of its frames.
type Written = (ImageFile, Vec<u32>);

/// A frame compressed by a worker, or why it could not be.
type Compressed = (usize, io::Result<Vec<u8>>);

impl PageWriter {
    /// Writes the page data into `file` as it is.
    pub fn raw(file: ImageFile) -> Self {
        Self { inner: Inner::Raw(Box::new(file)) }
    }

    /// Writes the page data into `file` as zstd frames of [`FRAME_LEN`] bytes at `level`,
    /// compressed by one worker thread per core.
    pub fn zstd(file: ImageFile, level: i32) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let path = file.path.clone();
        // Room for a whole read batch of the dumper (8 MiB) besides the frames being
        // compressed, so that it reads the next batch while the workers compress this one.
        let depth = (QUEUE_BYTES / FRAME_LEN as usize).max(threads * 2);
        let (to_workers, jobs) = mpsc::sync_channel::<(usize, Vec<u8>)>(depth);
        let jobs = Arc::new(Mutex::new(jobs));
        let (done_tx, done_rx) = mpsc::sync_channel::<Compressed>(threads * 2);
        let workers = (0..threads)
            .map(|_| {
                let jobs = Arc::clone(&jobs);
                let done = done_tx.clone();
                std::thread::spawn(move || compress_frames(&jobs, &done, level))
            })
            .collect();
        drop(done_tx);
        let collector = std::thread::spawn(move || collect_frames(file, &done_rx));
        Self {
            inner: Inner::Zstd(Box::new(Pipeline {
                path,
                current: Vec::with_capacity(FRAME_LEN as usize),
                len: 0,
                next_seq: 0,
                to_workers: Some(to_workers),
                workers,
                collector: Some(collector),
            })),
        }
    }

    /// Page data bytes written so far: the offset the next byte will have.
    pub fn len(&self) -> u64 {
        match &self.inner {
            Inner::Raw(f) => f.len(),
            Inner::Zstd(p) => p.len,
        }
    }

    /// Whether nothing has been written yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends page data.
    pub fn write_all(&mut self, mut buf: &[u8]) -> Result<()> {
        let p = match &mut self.inner {
            Inner::Raw(f) => return f.write_all(buf),
            Inner::Zstd(p) => p,
        };
        while !buf.is_empty() {
            let room = FRAME_LEN as usize - p.current.len();
            let n = room.min(buf.len());
            p.current.extend_from_slice(&buf[..n]);
            p.len += n as u64;
            buf = &buf[n..];
            if p.current.len() == FRAME_LEN as usize {
                p.send()?;
            }
        }
        Ok(())
    }

    /// Writes what is left and returns the file, to be finished by the image writer, with
    /// the frame index of a compressed one.
    pub fn finish(self) -> Result<(ImageFile, Option<PageFrames>)> {
        let mut p = match self.inner {
            Inner::Raw(f) => return Ok((*f, None)),
            Inner::Zstd(p) => p,
        };
        if !p.current.is_empty() {
            p.send()?;
        }
        let (file, frames) = p.join()?;
        let frames = PageFrames { frame_len: FRAME_LEN, data_len: p.len, frames };
        Ok((file, Some(frames)))
    }
}

impl Pipeline {
    /// Hands the current frame to the workers.
    fn send(&mut self) -> Result<()> {
        let frame = std::mem::replace(&mut self.current, Vec::with_capacity(FRAME_LEN as usize));
        let seq = self.next_seq;
        self.next_seq += 1;
        let sent = self.to_workers.as_ref().is_some_and(|tx| tx.send((seq, frame)).is_ok());
        if sent {
            return Ok(());
        }
        // The collector stopped on an error, and the workers with it: report that error.
        match self.join() {
            Err(e) => Err(e),
            Ok(_) => Err(ImageError::Write {
                path: self.path.clone(),
                source: io::Error::other("the compression threads stopped"),
            }),
        }
    }

    /// Closes the queue and waits for every frame to be written.
    fn join(&mut self) -> Result<Written> {
        self.to_workers = None;
        for w in self.workers.drain(..) {
            // A worker that panicked shows up as a missing frame below.
            let _ = w.join();
        }
        let stopped = || ImageError::Write {
            path: self.path.clone(),
            source: io::Error::other("a compression thread failed"),
        };
        let (file, frames) =
            self.collector.take().ok_or_else(stopped)?.join().map_err(|_| stopped())??;
        if frames.len() != self.next_seq {
            return Err(stopped());
        }
        Ok((file, frames))
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // An abandoned writer (a failed dump) still stops its threads.
        if self.collector.is_some() {
            let _ = self.join();
        }
    }
}

/// A worker: compresses frames until the queue closes.
fn compress_frames(
    jobs: &Mutex<Receiver<(usize, Vec<u8>)>>,
    done: &SyncSender<Compressed>,
    level: i32,
) {
    let mut ctx = zstd::bulk::Compressor::new(level);
    if let Ok(c) = &mut ctx {
        // zstd's own checksum lets a reader that skips the manifest's notice a bad frame.
        let _ = c.include_checksum(true);
    }
    loop {
        let job = jobs.lock().map(|rx| rx.recv());
        let Ok(Ok((seq, data))) = job else { return };
        let out = match &mut ctx {
            Ok(c) => c.compress(&data),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        };
        if done.send((seq, out)).is_err() {
            return;
        }
    }
}

/// The collector: writes compressed frames to the file in order.
fn collect_frames(mut file: ImageFile, done: &Receiver<Compressed>) -> Result<Written> {
    let mut waiting: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
    let mut sizes: Vec<u32> = Vec::new();
    for (seq, out) in done {
        let out = out.map_err(|source| ImageError::Write { path: file.path.clone(), source })?;
        waiting.insert(seq, out);
        while let Some(frame) = waiting.remove(&sizes.len()) {
            file.write_all(&frame)?;
            sizes.push(frame.len() as u32);
        }
    }
    Ok((file, sizes))
}

/// The page data of one process, whatever way its page file stores it.
pub struct PageSource {
    path: PathBuf,
    content: Content,
    layout: Layout,
}

enum Layout {
    Raw { len: u64 },
    Zstd { frame_len: u64, data_len: u64, starts: Vec<u64> },
}

/// Frame length a raw page file is read in by [`PageSource::read_frame`].
const RAW_FRAME_LEN: u64 = FRAME_LEN;

impl PageSource {
    /// Opens the page file of `p`, checking its frame index if it has one.
    pub fn open(reader: &ImageReader, p: &Process) -> Result<Self> {
        let path = reader.path(&p.pages_file)?;
        let content = reader.open_content(&p.pages_file)?;
        Self::with_content(&path, content, p.page_frames.as_ref())
    }

    /// Opens a plain page file of `file_len` bytes (as listed) at `path`.
    pub fn open_path(path: &Path, file_len: u64, frames: Option<&PageFrames>) -> Result<Self> {
        let file = crate::open_regular(path)?;
        let content = Content::Plain { file, path: path.to_path_buf(), len: file_len };
        Self::with_content(path, content, frames)
    }

    fn with_content(path: &Path, content: Content, frames: Option<&PageFrames>) -> Result<Self> {
        let corrupt = |why: String| ImageError::Corrupt { path: path.to_path_buf(), why };
        let file_len = content.len();
        let layout = match frames {
            None => Layout::Raw { len: file_len },
            Some(f) => {
                check_frames(f, file_len).map_err(corrupt)?;
                let mut starts = Vec::with_capacity(f.frames.len() + 1);
                let mut at = 0u64;
                starts.push(0);
                for &s in &f.frames {
                    at += s as u64;
                    starts.push(at);
                }
                Layout::Zstd { frame_len: f.frame_len, data_len: f.data_len, starts }
            }
        };
        Ok(Self { path: path.to_path_buf(), content, layout })
    }

    /// The page file's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the page file is compressed.
    pub fn is_compressed(&self) -> bool {
        matches!(self.layout, Layout::Zstd { .. })
    }

    /// Whether the restored process can read its pages from the file itself: neither
    /// compressed nor encrypted.
    pub fn is_raw(&self) -> bool {
        !self.is_compressed() && !self.content.is_sealed()
    }

    /// Bytes of page data.
    pub fn data_len(&self) -> u64 {
        match &self.layout {
            Layout::Raw { len } => *len,
            Layout::Zstd { data_len, .. } => *data_len,
        }
    }

    /// Page data bytes per frame: the unit [`PageSource::read_frame`] reads. A raw file
    /// is read in pieces of this size too.
    pub fn frame_len(&self) -> u64 {
        match &self.layout {
            Layout::Raw { .. } => RAW_FRAME_LEN,
            Layout::Zstd { frame_len, .. } => *frame_len,
        }
    }

    /// Page data range of frame `i`.
    pub fn frame_range(&self, i: u64) -> std::ops::Range<u64> {
        let start = i.saturating_mul(self.frame_len()).min(self.data_len());
        start..start.saturating_add(self.frame_len()).min(self.data_len())
    }

    /// Reads frame `i` (decompressed) into `out`, replacing its content.
    pub fn read_frame(&self, i: u64, out: &mut Vec<u8>) -> Result<()> {
        let range = self.frame_range(i);
        if range.is_empty() {
            return Err(self.corrupt(format!("frame {i} is past the end of the page data")));
        }
        out.clear();
        out.resize((range.end - range.start) as usize, 0);
        match &self.layout {
            Layout::Raw { .. } => self.pread(out, range.start),
            Layout::Zstd { starts, .. } => {
                let (a, b) = (starts[i as usize], starts[i as usize + 1]);
                let mut packed = vec![0u8; (b - a) as usize];
                self.pread(&mut packed, a)?;
                let n =
                    zstd::bulk::decompress_to_buffer(&packed, out.as_mut_slice()).map_err(|e| {
                        self.corrupt(format!("frame {i} (bytes {a}-{b}) does not decompress: {e}"))
                    })?;
                if n != out.len() {
                    return Err(self.corrupt(format!(
                        "frame {i} (bytes {a}-{b}) holds {n} bytes of page data, not {}",
                        out.len()
                    )));
                }
                Ok(())
            }
        }
    }

    /// Fills `buf` with the page data from offset `off`.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let end = off.checked_add(buf.len() as u64).filter(|&e| e <= self.data_len());
        if end.is_none() {
            return Err(self.corrupt(format!(
                "{} bytes at offset {off} are past the end of the page data ({} bytes)",
                buf.len(),
                self.data_len()
            )));
        }
        if !self.is_compressed() {
            return self.content.read_at(buf, off);
        }
        let mut frame = Vec::new();
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            let i = at / self.frame_len();
            self.read_frame(i, &mut frame)?;
            let from = (at - self.frame_range(i).start) as usize;
            let n = (frame.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&frame[from..from + n]);
            done += n;
        }
        Ok(())
    }

    fn pread(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.content.read_at(buf, off)
    }

    fn corrupt(&self, why: String) -> ImageError {
        ImageError::Corrupt { path: self.path.clone(), why }
    }
}

/// xxh3-64 of one page, as page hash files record it.
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// The bytes of a page hash file.
pub fn encode_hashes(hashes: &[u64]) -> Vec<u8> {
    hashes.iter().flat_map(|h| h.to_le_bytes()).collect()
}

/// Number of pages with data in the runs of `p` (what its page hash file covers).
fn data_pages(p: &Process) -> u64 {
    p.vmas
        .iter()
        .flat_map(|v| &v.pages)
        .filter(|r| r.offset.is_some())
        .fold(0u64, |n, r| n.saturating_add(r.pages))
}

/// Reads the page hash file of `p`: one hash per page of its runs with data, in address
/// order. `None` when the image has none.
pub fn read_hashes(reader: &ImageReader, p: &Process) -> Result<Option<Vec<u64>>> {
    let Some(name) = &p.page_hashes else { return Ok(None) };
    let bytes = reader.read_file(name)?;
    let want = data_pages(p);
    if bytes.len() % 8 != 0 || (bytes.len() / 8) as u64 != want {
        return Err(ImageError::Corrupt {
            path: reader.dir().join(name),
            why: format!("{} bytes, not 8 for each of the {want} pages with data", bytes.len()),
        });
    }
    let hashes = bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap()));
    Ok(Some(hashes.collect()))
}

/// Where the data of a page is in a chain of images: as a page run records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef {
    /// Image of the chain, counted from the one this refers from (0).
    pub image: u32,
    /// The process whose page data holds it, if not the one at the same pid.
    pub from_pid: Option<i32>,
    /// Offset in that page data.
    pub offset: u64,
}

/// A run of pages with data in the parent image, and where its hashes start.
struct ParentRun {
    addr: u64,
    pages: u64,
    at: PageRef,
    first_hash: usize,
}

/// The pages of an image that an incremental dump may refer to instead of storing them.
pub struct ParentPages {
    /// The parent's directory.
    pub dir: PathBuf,
    /// Its manifest's checksum, to record.
    pub manifest_xxh3: String,
    /// Whether it is encrypted.
    pub encrypted: bool,
    processes: std::collections::HashMap<i32, (Vec<ParentRun>, Vec<u64>)>,
}

impl ParentPages {
    /// Reads the image in `dir` (checking it whole; opened with `key` if encrypted) and
    /// indexes its pages by process and address.
    pub fn load(dir: &Path, key: Option<&crate::crypt::Key>) -> Result<Self> {
        let reader = ImageReader::open_keyed(dir, key)?;
        reader.verify_all(|_| {})?;
        let tree = reader.read_tree()?;
        let mut processes = std::collections::HashMap::new();
        for p in &tree.processes {
            let Some(hashes) = read_hashes(&reader, p)? else {
                return Err(ImageError::Corrupt {
                    path: reader.dir().join(crate::TREE),
                    why: format!(
                        "process {} has no page hashes (an image made with --pre-copy, or by \
                         an older torpor, cannot be a parent)",
                        p.pid
                    ),
                });
            };
            let mut runs = Vec::new();
            let mut first_hash = 0usize;
            for r in p.vmas.iter().flat_map(|v| &v.pages) {
                let Some(offset) = r.offset else { continue };
                let at = PageRef { image: r.image, from_pid: r.from_pid, offset };
                runs.push(ParentRun { addr: r.addr, pages: r.pages, at, first_hash });
                first_hash += r.pages as usize;
            }
            processes.insert(p.pid, (runs, hashes));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest_xxh3: reader.manifest_xxh3().to_string(),
            encrypted: reader.is_encrypted(),
            processes,
        })
    }

    /// Where the parent holds the page at `addr` of process `pid`, as seen from an image
    /// made over it, with the page's hash.
    pub fn lookup(&self, pid: i32, addr: u64) -> Option<(PageRef, u64)> {
        let (runs, hashes) = self.processes.get(&pid)?;
        // Runs are in increasing address order (checked with the tree).
        let i = runs.partition_point(|r| r.addr + r.pages * PAGE <= addr);
        let r = runs.get(i).filter(|r| r.addr <= addr)?;
        let page = (addr - r.addr) / PAGE;
        let at = PageRef {
            image: r.at.image + 1,
            from_pid: r.at.from_pid,
            offset: r.at.offset + page * PAGE,
        };
        Some((at, hashes[r.first_hash + page as usize]))
    }
}

/// Most images in a chain, parents included: a bound on following parent references.
pub const MAX_CHAIN: usize = 64;

/// Opens the parents of the image `reader` reads, nearest first, checking that each is
/// the image its child was made over; `verify` also checks every file of each. The
/// parents of an encrypted image are opened with its key.
pub fn open_parents(reader: &ImageReader, verify: bool) -> Result<Vec<(ImageReader, Tree)>> {
    let mut chain: Vec<(ImageReader, Tree)> = Vec::new();
    let mut child = (reader.dir().to_path_buf(), reader.manifest().parent.clone());
    while let (dir, Some(parent)) = child {
        if chain.len() + 1 >= MAX_CHAIN {
            return Err(ImageError::Corrupt {
                path: dir.join(crate::MANIFEST),
                why: format!("its chain of parent images is longer than {MAX_CHAIN}"),
            });
        }
        let path = dir.join(&parent.path);
        let wrap =
            |e| ImageError::Parent { dir: dir.clone(), parent: path.clone(), source: Box::new(e) };
        let r = ImageReader::open_keyed(&path, reader.key()).map_err(wrap)?;
        if r.manifest_xxh3() != parent.manifest_xxh3 {
            return Err(ImageError::ParentChanged {
                dir,
                parent: path,
                expected: parent.manifest_xxh3,
                actual: r.manifest_xxh3().to_string(),
            });
        }
        if verify {
            r.verify_all(|_| {}).map_err(wrap)?;
        }
        let tree = r.read_tree().map_err(wrap)?;
        child = (path.clone(), r.manifest().parent.clone());
        chain.push((r, tree));
    }
    Ok(chain)
}

/// The path of `parent` as seen from the directory `child`: relative when both are
/// under one directory, else absolute. Both must exist.
pub fn parent_path(child: &Path, parent: &Path) -> io::Result<String> {
    let child = std::fs::canonicalize(child)?;
    let parent = std::fs::canonicalize(parent)?;
    let common = child.components().zip(parent.components()).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    // Relative only below a common directory other than the root.
    if common > 1 {
        for _ in child.components().skip(common) {
            rel.push("..");
        }
        rel.extend(parent.components().skip(common));
        if rel.as_os_str().is_empty() {
            rel.push(".");
        }
    } else {
        rel = parent;
    }
    rel.into_os_string().into_string().map_err(|_| io::Error::other("a path that is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImageWriter;

    /// Page data whose bytes tell where they are, some compressible, some not.
    fn data(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|i| {
                if (i / 4096) % 3 == 0 {
                    (i / 4096) as u8
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    fn write(dir: &Path, bytes: &[u8], level: Option<i32>) -> (u64, Option<PageFrames>) {
        let mut w = ImageWriter::create(dir).unwrap();
        let f = w.create_file("pages-1.img").unwrap();
        let mut pw = match level {
            Some(l) => PageWriter::zstd(f, l),
            None => PageWriter::raw(f),
        };
        // Uneven pieces, to cross frame boundaries inside one write.
        for piece in bytes.chunks(300_000) {
            pw.write_all(piece).unwrap();
        }
        assert_eq!(pw.len(), bytes.len() as u64);
        let (f, frames) = pw.finish().unwrap();
        let len = f.len();
        w.finish_file(f).unwrap();
        (len, frames)
    }

    #[test]
    fn any_range_reads_back_raw_or_compressed() {
        let bytes = data(3 * FRAME_LEN as usize + 5 * 4096);
        for level in [None, Some(-5), Some(1), Some(3)] {
            let tmp = tempfile::tempdir().unwrap();
            let (len, frames) = write(tmp.path(), &bytes, level);
            assert_eq!(frames.is_some(), level.is_some());
            if let Some(f) = &frames {
                assert_eq!(f.frames.len(), 4);
                assert!(len < bytes.len() as u64, "{level:?}: {len}");
            }
            let src = PageSource::open_path(&tmp.path().join("pages-1.img"), len, frames.as_ref())
                .unwrap();
            assert_eq!(src.data_len(), bytes.len() as u64);
            for (off, n) in [(0, 4096), (FRAME_LEN - 4096, 3 * 4096), (5, 2 * FRAME_LEN as usize)] {
                let mut buf = vec![0u8; n];
                src.read_at(&mut buf, off).unwrap();
                assert_eq!(buf, bytes[off as usize..off as usize + n]);
            }
            let mut buf = vec![0u8; 4096];
            assert!(src.read_at(&mut buf, bytes.len() as u64 - 4095).is_err());
        }
    }

    #[test]
    fn bad_frame_indexes_are_refused() {
        let f = PageFrames { frame_len: FRAME_LEN, data_len: 2 * FRAME_LEN, frames: vec![10, 20] };
        check_frames(&f, 30).unwrap();
        type Case = (fn(&mut PageFrames), u64, &'static str);
        let cases: &[Case] = &[
            (|f| f.frame_len = 0, 30, "frame length"),
            (|f| f.frame_len = 4095, 30, "frame length"),
            (|f| f.frame_len = u64::MAX - 4095, 30, "frame length"),
            (|f| f.data_len = 3, 30, "not a multiple"),
            (|f| f.data_len = u64::MAX - 4095, 30, "frames listed"),
            (|f| f.frames.push(1), 31, "frames listed"),
            (|f| f.frames[0] = 0, 20, "impossible size"),
            (|f| f.frames[0] = u32::MAX, u32::MAX as u64 + 20, "impossible size"),
            (|_| {}, 31, "add up to"),
        ];
        for (edit, len, want) in cases {
            let mut g = f.clone();
            edit(&mut g);
            let e = check_frames(&g, *len).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn parent_paths_are_relative_under_one_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("x/b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        assert_eq!(parent_path(&b, &a).unwrap(), "../../a");
        assert_eq!(parent_path(&a, &b).unwrap(), "../x/b");
        assert_eq!(
            Path::new(&b).join(parent_path(&b, &a).unwrap()).canonicalize().unwrap(),
            a.canonicalize().unwrap()
        );
        assert!(parent_path(&a, &tmp.path().join("missing")).is_err());
    }

    #[test]
    fn damaged_frame_is_refused_naming_the_file() {
        let bytes = data(2 * FRAME_LEN as usize);
        let tmp = tempfile::tempdir().unwrap();
        let (len, frames) = write(tmp.path(), &bytes, Some(1));
        let path = tmp.path().join("pages-1.img");
        let mut raw = std::fs::read(&path).unwrap();
        let second = frames.as_ref().unwrap().frames[0] as usize;
        raw[second + 100] ^= 0x55;
        std::fs::write(&path, &raw).unwrap();
        let src = PageSource::open_path(&path, len, frames.as_ref()).unwrap();
        let mut out = Vec::new();
        src.read_frame(0, &mut out).unwrap();
        let e = src.read_frame(1, &mut out).unwrap_err().to_string();
        assert!(e.contains("pages-1.img") && e.contains("frame 1"), "{e}");
    }
}
