//! An image in S3 copied into a local directory, for [`torpor_image::ImageReader`].
//!
//! The manifest comes first (it says which files there are and how long each is), then
//! every file in ranges of [`RANGE`] bytes, [`PARALLEL`] ranges at once whatever file
//! they belong to, each written at its place as it arrives; the manifest is written into
//! the directory last, so that an interrupted copy is no image.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;

use futures::{StreamExt, TryStreamExt};
use torpor_image::{FileEntry, Manifest, MANIFEST};

use crate::{S3Error, S3Store};

/// Bytes asked for in one ranged GET.
const RANGE: u64 = 16 << 20;
/// Ranged GETs under way at once.
pub(crate) const PARALLEL: usize = 8;

impl S3Store {
    /// The image's manifest, decoded and checked.
    pub fn manifest(&self) -> Result<(Vec<u8>, Manifest), S3Error> {
        let s = &self.shared;
        let url = s.url.to_string();
        let got = s.block_on(async {
            let r = s.store.get(&s.key(MANIFEST)).await?;
            r.bytes().await
        });
        let bytes = match got {
            Ok(b) => b.to_vec(),
            // A missing bucket is NotFound too, and deserves its own words.
            Err(e @ object_store::Error::NotFound { .. })
                if !crate::reason(&e).starts_with("NoSuchBucket") =>
            {
                return Err(S3Error::NoImage { url })
            }
            Err(e) => return Err(self.request("download", MANIFEST)(e)),
        };
        let manifest = torpor_image::decode_manifest(&bytes, Path::new(&s.url_of(MANIFEST)))
            .map_err(|source| S3Error::Manifest { url, source })?;
        Ok((bytes, manifest))
    }

    /// Copies the image into `dir` (which exists, and which no one else can write), the
    /// manifest last; [`S3Store::bytes_moved`] counts the bytes as they land. Returns the
    /// bytes copied.
    pub fn download(&self, dir: &Path) -> Result<u64, S3Error> {
        let (bytes, manifest) = self.manifest()?;
        let total = self.copy_files(dir, &manifest, |_| true)?;
        let path = dir.join(MANIFEST);
        std::fs::write(&path, &bytes).map_err(|source| S3Error::Local { path, source })?;
        Ok(total)
    }

    /// Copies the files of `manifest` that `which` accepts into `dir`.
    pub(crate) fn copy_files(
        &self,
        dir: &Path,
        manifest: &Manifest,
        which: impl Fn(&FileEntry) -> bool,
    ) -> Result<u64, S3Error> {
        let s = &self.shared;
        let local = |path: &Path| {
            let path = path.to_path_buf();
            move |source| S3Error::Local { path: path.clone(), source }
        };
        let mut files: HashMap<usize, File> = HashMap::new();
        let mut jobs = Vec::new();
        for (i, f) in manifest.files.iter().enumerate().filter(|(_, f)| which(f)) {
            // The names come from the manifest, which was checked: one plain component.
            let path = dir.join(&f.name);
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(local(&path))?;
            file.set_len(f.len).map_err(local(&path))?;
            files.insert(i, file);
            let starts = (0..f.len).step_by(RANGE as usize);
            jobs.extend(starts.map(|at| (i, at..(at + RANGE).min(f.len))));
        }
        s.block_on(async {
            let mut ranges = futures::stream::iter(jobs)
                .map(|(i, range)| {
                    let name = &manifest.files[i].name;
                    let key = s.key(name);
                    async move {
                        let got = s.store.get_range(&key, range.clone()).await;
                        got.map(|b| (i, range, b)).map_err(self.request("download", name))
                    }
                })
                .buffer_unordered(PARALLEL);
            let mut total = 0;
            while let Some((i, range, data)) = ranges.try_next().await? {
                let name = &manifest.files[i].name;
                let want = range.end - range.start;
                if data.len() as u64 != want {
                    return Err(S3Error::Short {
                        url: s.url.to_string(),
                        name: name.clone(),
                        offset: range.start,
                        want,
                        got: data.len() as u64,
                    });
                }
                // Only files opened above have ranges.
                let Some(file) = files.get(&i) else { continue };
                file.write_all_at(&data, range.start).map_err(local(&dir.join(name)))?;
                total += want;
                s.moved.fetch_add(want, Ordering::Relaxed);
            }
            Ok(total)
        })
    }
}
