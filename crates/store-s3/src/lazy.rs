//! An image copied from S3 with its big page files deferred, for a lazy restore.
//!
//! Every file but the deferred ones is copied at once, as by [`S3Store::download`]. A
//! deferred file is created at its full length, empty, and filled in [`CHUNK`]s: a
//! background thread copies them front to back, and a reader that needs a range first
//! ([`Fetch::fetch`]) gets its chunks with ranged GETs of its own, ahead of that copy.
//! Each chunk is missing, coming (one thread fetches it; others wait for it) or here.
//!
//! ```text
//!   chunk:   0     1     2     3     4     5 ...
//!   state:  here  here coming missing here missing
//!                        ▲ background copy    ▲ fetched early for a fault
//! ```

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::StreamExt;
use torpor_image::{Fetch, Manifest, MANIFEST, TREE};

use crate::download::PARALLEL;
use crate::{request_error, to_io, S3Error, S3Store, Shared};

/// Bytes fetched at a time from a deferred file: a fault's few pages cost one such GET.
const CHUNK: u64 = 1 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Chunk {
    Missing,
    Coming,
    Here,
}

/// A deferred file: its local copy and which of its chunks are in it.
struct Deferred {
    file: File,
    len: u64,
    chunks: Mutex<Vec<Chunk>>,
    changed: Condvar,
}

impl Deferred {
    fn lock(&self) -> MutexGuard<'_, Vec<Chunk>> {
        // A thread that panicked holding the lock left states that are still true.
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `chunks` (claimed by this thread) as `to`, and wakes the waiters.
    fn set(&self, chunks: &[usize], to: Chunk) {
        let mut states = self.lock();
        for &c in chunks {
            states[c] = to;
        }
        self.changed.notify_all();
    }
}

/// The state the background thread and the readers share.
struct Copying {
    shared: Arc<Shared>,
    files: HashMap<String, Deferred>,
    /// The deferred files in the order the background copy takes them.
    order: Vec<String>,
    stop: AtomicBool,
    /// Bytes fetched by readers ahead of the background copy, and by the copy itself.
    early: AtomicU64,
    background: AtomicU64,
}

impl Copying {
    /// Fetches chunks `which` of file `name`, which this thread has claimed, all at once;
    /// `counter` counts their bytes.
    fn get(
        &self,
        name: &str,
        d: &Deferred,
        which: &[usize],
        counter: &AtomicU64,
    ) -> io::Result<()> {
        let s = &self.shared;
        let key = s.key(name);
        let url = s.url_of(name);
        let r = s.block_on(async {
            let mut chunks = futures::stream::iter(which.iter().copied())
                .map(|c| {
                    let range = c as u64 * CHUNK..((c as u64 + 1) * CHUNK).min(d.len);
                    let key = &key;
                    async move { (c, range.clone(), s.store.get_range(key, range).await) }
                })
                .buffer_unordered(PARALLEL);
            while let Some((c, range, got)) = chunks.next().await {
                let source = |source| request_error("download", url.clone(), source);
                let data = got.map_err(source).map_err(to_io)?;
                if data.len() as u64 != range.end - range.start {
                    return Err(to_io(S3Error::Short {
                        url: s.url.to_string(),
                        name: name.to_string(),
                        offset: range.start,
                        want: range.end - range.start,
                        got: data.len() as u64,
                    }));
                }
                d.file.write_all_at(&data, range.start)?;
                d.set(&[c], Chunk::Here);
                counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            Ok(())
        });
        if r.is_err() {
            // What this thread claimed and did not bring is free for another to try.
            let mut states = d.lock();
            for &c in which {
                if states[c] == Chunk::Coming {
                    states[c] = Chunk::Missing;
                }
            }
            d.changed.notify_all();
        }
        r
    }

    /// Returns once chunks `first..end` of `name` are here, fetching those nobody is.
    fn ensure(&self, name: &str, d: &Deferred, first: usize, end: usize) -> io::Result<()> {
        loop {
            let mut states = d.lock();
            let mut mine = Vec::new();
            let mut waiting = false;
            for (c, state) in states.iter_mut().enumerate().take(end).skip(first) {
                match *state {
                    Chunk::Here => {}
                    Chunk::Coming => waiting = true,
                    Chunk::Missing => {
                        *state = Chunk::Coming;
                        mine.push(c);
                    }
                }
            }
            if !mine.is_empty() {
                drop(states);
                self.get(name, d, &mine, &self.early)?;
                continue;
            }
            if !waiting {
                return Ok(());
            }
            drop(d.changed.wait(states).unwrap_or_else(|e| e.into_inner()));
        }
    }

    /// The background copy: after `delay`, the missing chunks of each file in turn,
    /// [`PARALLEL`] at a time, until all are here or the copy is stopped.
    fn copy_all(&self, delay: Duration) {
        let start = Instant::now();
        while start.elapsed() < delay {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep((delay - start.elapsed()).min(Duration::from_millis(50)));
        }
        for name in &self.order {
            let d = &self.files[name];
            loop {
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
                let mine: Vec<usize> = {
                    let mut states = d.lock();
                    let missing = states.iter().enumerate().filter(|(_, s)| **s == Chunk::Missing);
                    let mine: Vec<usize> = missing.map(|(c, _)| c).take(PARALLEL).collect();
                    mine.iter().for_each(|&c| states[c] = Chunk::Coming);
                    mine
                };
                if mine.is_empty() {
                    break;
                }
                if let Err(e) = self.get(name, d, &mine, &self.background) {
                    // Readers fetch what they need themselves, and the check of each file
                    // fetches what is left of it, reporting the error if it lasts.
                    tracing::debug!("the background copy of {} stops: {e}", self.shared.url);
                    return;
                }
            }
        }
        tracing::debug!("every deferred file of {} is copied", self.shared.url);
    }
}

impl Fetch for Copying {
    fn fetch(&self, name: &str, ranges: &[(u64, u64)]) -> io::Result<()> {
        let Some(d) = self.files.get(name) else { return Ok(()) };
        for &(offset, len) in ranges.iter().filter(|r| r.1 > 0) {
            let end = offset.saturating_add(len).min(d.len);
            if offset >= end {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{name} ends at {} before offset {offset}", d.len),
                ));
            }
            self.ensure(name, d, (offset / CHUNK) as usize, end.div_ceil(CHUNK) as usize)?;
        }
        Ok(())
    }

    fn whole(&self, name: &str) -> io::Result<()> {
        let Some(d) = self.files.get(name) else { return Ok(()) };
        self.ensure(name, d, 0, d.len.div_ceil(CHUNK) as usize)
    }
}

/// A local copy of an image whose deferred files are still coming; stops the background
/// copy when dropped.
pub struct LazyCopy {
    copying: Arc<Copying>,
    thread: Option<JoinHandle<()>>,
}

impl LazyCopy {
    /// What a reader of the copy calls before it reads a deferred file.
    pub fn fetcher(&self) -> Arc<dyn Fetch> {
        Arc::clone(&self.copying) as Arc<dyn Fetch>
    }
}

impl Drop for LazyCopy {
    fn drop(&mut self) {
        self.copying.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let c = &self.copying;
        tracing::info!(
            "{}: {} bytes fetched when first read, {} by the background copy",
            c.shared.url,
            c.early.load(Ordering::Relaxed),
            c.background.load(Ordering::Relaxed)
        );
    }
}

impl S3Store {
    /// Copies the image into `dir` as [`S3Store::download`] does, except for the files
    /// `defer` names, given the manifest and the bytes of the process tree: those are
    /// copied in the background, starting after `delay`, and read through
    /// [`LazyCopy::fetcher`].
    pub fn download_lazily(
        &self,
        dir: &Path,
        delay: Duration,
        defer: impl FnOnce(&Manifest, &[u8]) -> Vec<String>,
    ) -> Result<LazyCopy, S3Error> {
        let (bytes, manifest) = self.manifest()?;
        self.copy_files(dir, &manifest, |f| f.name == TREE)?;
        let tree_path = dir.join(TREE);
        let tree = std::fs::read(&tree_path)
            .map_err(|source| S3Error::Local { path: tree_path, source })?;
        let deferred = defer(&manifest, &tree);
        self.copy_files(dir, &manifest, |f| f.name != TREE && !deferred.contains(&f.name))?;
        let mut files = HashMap::new();
        for f in manifest.files.iter().filter(|f| deferred.contains(&f.name)) {
            let path = dir.join(&f.name);
            let local = |source| S3Error::Local { path: path.clone(), source };
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(local)?;
            file.set_len(f.len).map_err(local)?;
            let chunks = Mutex::new(vec![Chunk::Missing; f.len.div_ceil(CHUNK) as usize]);
            files.insert(
                f.name.clone(),
                Deferred { file, len: f.len, chunks, changed: Condvar::new() },
            );
        }
        let path = dir.join(MANIFEST);
        std::fs::write(&path, &bytes).map_err(|source| S3Error::Local { path, source })?;
        let order = manifest.files.iter().filter(|f| deferred.contains(&f.name));
        let copying = Arc::new(Copying {
            shared: Arc::clone(&self.shared),
            files,
            order: order.map(|f| f.name.clone()).collect(),
            stop: AtomicBool::new(false),
            early: AtomicU64::new(0),
            background: AtomicU64::new(0),
        });
        let background = Arc::clone(&copying);
        let thread = std::thread::Builder::new()
            .name("s3-copy".into())
            .spawn(move || background.copy_all(delay))
            .map_err(|source| S3Error::Runtime { url: self.shared.url.to_string(), source })?;
        Ok(LazyCopy { copying, thread: Some(thread) })
    }
}
