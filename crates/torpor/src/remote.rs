//! Images at `s3://BUCKET/PREFIX` URLs, wherever an image directory is accepted.
//!
//! A dump streams into the bucket through [`torpor_store_s3::S3Store`], with no local
//! copy. Reading an image (restore, verify, inspect) copies it first into a private
//! temporary directory, removed when the caller is done with it: the restore reads page
//! data through descriptors its processes share, which must be local files. A lazy
//! restore starts before its big page files are copied: what it reads of them is fetched
//! first, with ranged reads, while the rest comes in the background.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;
use torpor_store_s3::S3Store;

use crate::progress::{Measure, Progress};

/// Whether `path` names an image in object storage.
pub fn is_remote(path: &Path) -> bool {
    torpor_store_s3::is_url(path.as_os_str())
}

/// The store for a dump to `url`, and the URL as messages show it.
pub fn dump_store(url: &Path) -> Result<(S3Store, String)> {
    let store = open(url)?;
    let shown = store.url().to_string();
    Ok((store, shown))
}

fn open(url: &Path) -> Result<S3Store> {
    let text = url.to_str().context("an s3:// URL must be UTF-8")?;
    Ok(S3Store::open(text)?)
}

/// A refusal for options that need a local path where an s3:// URL was given.
pub fn refuse(what: &str, url: &Path) -> Result<()> {
    bail!(
        "{what} cannot be {}: an image in object storage is written with -D s3://BUCKET/PREFIX \
         and read from the same URL",
        url.display()
    )
}

/// An image copied from object storage into a private temporary directory.
pub struct Copied {
    /// The image directory, inside `tmp`.
    pub dir: PathBuf,
    /// The URL, normalized, for messages.
    pub shown: PathBuf,
    /// The temporary directory, removed when dropped.
    pub tmp: TempDir,
}

/// A new temporary directory of mode 0700 under `$TMPDIR`, and the empty directory
/// inside it that an image is copied into.
fn private_copy_dir() -> Result<(tempfile::TempDir, PathBuf)> {
    let tmp = tempfile::Builder::new()
        .prefix(".torpor-s3-")
        .tempdir()
        .context("cannot make a temporary directory to copy the image into")?;
    let dir = tmp.path().join("image");
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok((tmp, dir))
}

/// Copies the image at `url` into a new directory of mode 0700 under `$TMPDIR`.
pub fn download(url: &Path, show_progress: bool) -> Result<Copied> {
    let store = open(url)?;
    let shown = PathBuf::from(store.url().to_string());
    // Fetching the manifest first checks the URL and the credentials and gives the size.
    let (_, manifest) = store.manifest()?;
    let total = manifest.files.iter().map(|f| f.len).sum();
    let (tmp, dir) = private_copy_dir()?;
    let bar = match show_progress {
        true => Progress::start(
            format!("fetching {}", shown.display()),
            Measure::Counted { done: store.bytes_moved(), total },
        ),
        false => Progress::none(),
    };
    let copied = store.download(&dir);
    bar.finish();
    copied?;
    tracing::info!("{} copied into {}", shown.display(), dir.display());
    Ok(Copied { dir, shown, tmp })
}

/// An image copied from object storage for a lazy restore: its big page files are
/// still coming when this returns, and `fetch` gets what the restore reads first.
pub struct LazilyCopied {
    pub copied: Copied,
    pub fetch: torpor_restore::Fetcher,
    /// The background copy, stopped when dropped: drop it before the directory goes.
    pub copy: torpor_store_s3::LazyCopy,
}

/// Copies the image at `url` as [`download`] does, but leaves the page files that a
/// lazy restore reads only through its fetcher to come in the background, after `delay`.
pub fn download_lazily(url: &Path, delay: std::time::Duration) -> Result<LazilyCopied> {
    let store = open(url)?;
    let shown = PathBuf::from(store.url().to_string());
    let (tmp, dir) = private_copy_dir()?;
    // A tree that does not decode defers nothing; the restore then reports what is wrong.
    let copy = store.download_lazily(&dir, delay, |manifest, tree| {
        serde_json::from_slice(tree)
            .map(|tree| torpor_restore::lazy_files(manifest, &tree))
            .unwrap_or_default()
    })?;
    let fetch = torpor_restore::Fetcher(copy.fetcher());
    Ok(LazilyCopied { copied: Copied { dir, shown, tmp }, fetch, copy })
}

/// The store of a dump, as [`torpor_dump::DumpOptions::store`] takes it.
pub fn image_store(store: S3Store) -> torpor_dump::ImageStore {
    torpor_dump::ImageStore(Arc::new(store))
}
