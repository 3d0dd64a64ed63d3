//! Filling mappings from page files the restored process cannot read itself.
//!
//! A raw page file of the image is read by the process, straight into its mappings (see
//! `space`). A compressed or encrypted one, or pages an incremental image leaves in its
//! parents, are
//! read by torpor, a frame per worker thread, and written into the process with
//! `process_vm_writev` while the mapping is still writable. Frames are
//! independent, so the workers need no order; the frame a mapping ends in is kept for the
//! next mapping, whose data usually starts in it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use torpor_image::model::{self, PageRun};
use torpor_image::pages::PageSource;
use torpor_image::ImageReader;
use torpor_sys::{mem, PAGE};

use crate::{RestoreError, Result};

/// Zeros written per piece for runs recorded as all zero.
const ZEROS: usize = 1 << 20;

/// Page data: the image of the chain (0 the one restored, 1 its parent...) and the pid
/// whose page file it is.
type SourceKey = (u32, i32);
/// A frame: the page data holding it, and its number.
type FrameKey = (SourceKey, u64);

/// The page files of an image that torpor reads for the processes.
pub(crate) struct Unpacker {
    /// Every process's page data in every image of the chain.
    sources: HashMap<SourceKey, PageSource>,
    /// The restored image's tree, for messages.
    tree_path: std::path::PathBuf,
    /// Frames of the previous mapping kept for the next one.
    kept: Mutex<HashMap<FrameKey, Arc<Vec<u8>>>>,
}

/// Part of a frame going to one address.
struct Piece {
    addr: u64,
    from: usize,
    len: usize,
}

impl Unpacker {
    /// Opens the page files of the image and of its parents, or returns `None` when the
    /// image has no parent and every page file is raw (the processes read them).
    pub fn open(reader: &ImageReader, tree: &model::Tree) -> Result<Option<Self>> {
        let parents = torpor_image::pages::open_parents(reader, false)?;
        let raw = !reader.is_encrypted() && tree.processes.iter().all(|p| p.page_frames.is_none());
        if parents.is_empty() && raw {
            return Ok(None);
        }
        let mut sources = HashMap::new();
        for p in &tree.processes {
            sources.insert((0, p.pid), PageSource::open(reader, p)?);
        }
        for (i, (r, t)) in parents.iter().enumerate() {
            for p in &t.processes {
                sources.insert((i as u32 + 1, p.pid), PageSource::open(r, p)?);
            }
        }
        let tree_path = reader.dir().join(torpor_image::TREE);
        Ok(Some(Self { sources, tree_path, kept: Mutex::default() }))
    }

    /// Whether torpor must fill mapping `v` of process `owner`: some of its data is
    /// compressed, encrypted or in a parent image.
    pub fn needed(&self, owner: i32, v: &model::Vma) -> bool {
        v.pages.iter().filter(|r| r.offset.is_some()).any(|r| {
            r.image > 0
                || self.sources.get(&(0, r.from_pid.unwrap_or(owner))).is_some_and(|s| !s.is_raw())
        })
    }

    /// Writes every page run of mapping `v` of process `owner` into process `pid`, which
    /// has it mapped writable. `map_err` names the mapping in a failed write.
    pub fn fill(
        &self,
        pid: i32,
        owner: i32,
        v: &model::Vma,
        map_err: &(dyn Fn(torpor_sys::Error) -> RestoreError + Sync),
    ) -> Result<()> {
        let (groups, zeros) = self.plan(owner, &v.pages)?;

        let zero = vec![0u8; ZEROS];
        let zero_pieces: Vec<(u64, &[u8])> = zeros
            .iter()
            .flat_map(|&(addr, len)| {
                (0..len).step_by(ZEROS).map(move |at| (addr + at, (len - at).min(ZEROS as u64)))
            })
            .map(|(addr, len)| (addr, &zero[..len as usize]))
            .collect();
        mem::write_pieces(pid, &zero_pieces).map_err(map_err)?;

        // The last frame of each page file used here is kept for the next mapping.
        let mut last: HashMap<SourceKey, u64> = HashMap::new();
        for ((src, frame), _) in &groups {
            let l = last.entry(*src).or_insert(*frame);
            *l = (*l).max(*frame);
        }

        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let first_error: Mutex<Option<RestoreError>> = Mutex::new(None);
        let work = || {
            let mut buf = Vec::new();
            while !failed.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((key, pieces)) = groups.get(i) else { return };
                let keep = last.get(&key.0) == Some(&key.1);
                let r = self.write_frame(pid, *key, pieces, &mut buf, keep, map_err);
                if let Err(e) = r {
                    failed.store(true, Ordering::Relaxed);
                    first_error.lock().unwrap().get_or_insert(e);
                }
            }
        };
        // Most mappings are small and need one frame: no thread for them.
        if groups.len() <= 1 {
            work();
        } else {
            std::thread::scope(|s| {
                for _ in 0..workers.min(groups.len()) {
                    s.spawn(work);
                }
            });
        }
        if let Some(e) = first_error.into_inner().unwrap() {
            return Err(e);
        }

        self.kept.lock().unwrap().retain(|(src, frame), _| last.get(src) == Some(frame));
        Ok(())
    }

    /// Splits the runs into pieces grouped by frame, in order of first use, and the
    /// ranges of the runs recorded as all zero.
    #[allow(clippy::type_complexity)]
    fn plan(
        &self,
        owner: i32,
        runs: &[PageRun],
    ) -> Result<(Vec<(FrameKey, Vec<Piece>)>, Vec<(u64, u64)>)> {
        let mut groups: Vec<(FrameKey, Vec<Piece>)> = Vec::new();
        let mut index: HashMap<FrameKey, usize> = HashMap::new();
        let mut zeros = Vec::new();
        for run in runs {
            let len = run.pages * PAGE;
            let Some(offset) = run.offset else {
                zeros.push((run.addr, len));
                continue;
            };
            let src = (run.image, run.from_pid.unwrap_or(owner));
            // Runs of this image were checked with its tree; those of parents are here.
            let source = self.sources.get(&src).filter(|s| {
                offset % PAGE == 0 && offset.checked_add(len).is_some_and(|e| e <= s.data_len())
            });
            let Some(source) = source else {
                return Err(RestoreError::Image(torpor_image::ImageError::Corrupt {
                    path: self.tree_path.clone(),
                    why: format!(
                        "the page run at {:#x} of pid {owner} refers to data that is not in \
                         image {} of the chain (pid {}, offset {offset:#x})",
                        run.addr, src.0, src.1
                    ),
                }));
            };
            let frame_len = source.frame_len();
            let mut done = 0u64;
            while done < len {
                let at = offset + done;
                let frame = at / frame_len;
                let from = at % frame_len;
                let n = (frame_len - from).min(len - done);
                let key = (src, frame);
                let g = *index.entry(key).or_insert_with(|| {
                    groups.push((key, Vec::new()));
                    groups.len() - 1
                });
                groups[g].1.push(Piece {
                    addr: run.addr + done,
                    from: from as usize,
                    len: n as usize,
                });
                done += n;
            }
        }
        Ok((groups, zeros))
    }

    /// Decompresses one frame (or takes it from those kept) and writes its pieces.
    fn write_frame(
        &self,
        pid: i32,
        key: FrameKey,
        pieces: &[Piece],
        buf: &mut Vec<u8>,
        keep: bool,
        map_err: &(dyn Fn(torpor_sys::Error) -> RestoreError + Sync),
    ) -> Result<()> {
        let kept = self.kept.lock().unwrap().get(&key).cloned();
        let frame: &[u8] = match &kept {
            Some(f) => f,
            None => {
                self.sources[&key.0].read_frame(key.1, buf)?;
                buf
            }
        };
        let mut out = Vec::with_capacity(pieces.len());
        for p in pieces {
            let bytes = frame.get(p.from..p.from + p.len).ok_or_else(|| {
                RestoreError::Image(torpor_image::ImageError::Corrupt {
                    path: self.sources[&key.0].path().to_path_buf(),
                    why: format!("frame {} is shorter than its page runs need", key.1),
                })
            })?;
            out.push((p.addr, bytes));
        }
        mem::write_pieces(pid, &out).map_err(map_err)?;
        if kept.is_none() && keep {
            self.kept.lock().unwrap().insert(key, Arc::new(std::mem::take(buf)));
        }
        Ok(())
    }
}
