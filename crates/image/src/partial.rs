//! Reading as much as possible of an image that may be incomplete or damaged, for tools
//! that describe an image (`torpor inspect`) rather than restore it.
//!
//! [`ImageReader`] refuses an image at its first fault, which is what restore needs.
//! [`read_partial`] goes on past faults: it takes the normal path first and, when that
//! fails, reads the manifest and `tree.json` each on their own, collecting every fault
//! it meets. It never reads page data, so its cost does not grow with the memory saved.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::model::Tree;
use crate::{
    check_tree, decode_manifest, hash_bytes, read_limited, ImageError, ImageReader, Manifest,
    MANIFEST, MAX_RECORD_BYTES, TREE,
};

/// What [`read_partial`] could read of an image, and what is wrong with it.
#[derive(Debug)]
pub struct PartialImage {
    /// The image directory.
    pub dir: PathBuf,
    /// The manifest, when it could be read and decoded.
    pub manifest: Option<Manifest>,
    /// The process tree, when `tree.json` could be decoded (even if it failed a check).
    pub tree: Option<Tree>,
    /// Every fault found, in the order found; empty for an intact image (as far as the
    /// records go: page data checksums are not read, `ImageReader::verify_all` does that).
    pub problems: Vec<ImageError>,
}

/// Reads the manifest and the process tree of the image in `dir` as far as they can be
/// read. Never fails: what cannot be read is `None` and its fault is in `problems`.
pub fn read_partial(dir: &Path) -> PartialImage {
    read_partial_keyed(dir, None)
}

/// [`read_partial`] with the key of an encrypted image. Without it, or when the image's
/// manifest does not open with it, the tree of an encrypted image is not read.
pub fn read_partial_keyed(dir: &Path, key: Option<&crate::crypt::Key>) -> PartialImage {
    let mut out =
        PartialImage { dir: dir.to_path_buf(), manifest: None, tree: None, problems: Vec::new() };

    // The normal path: an intact image reads as restore would read it.
    match ImageReader::open_keyed(dir, key) {
        Ok(reader) => match reader.read_tree() {
            Ok(tree) => {
                out.manifest = Some(reader.manifest().clone());
                out.tree = Some(tree);
                return out;
            }
            Err(e) => out.problems.push(e),
        },
        Err(ImageError::NotADirectory { path }) => {
            out.problems.push(ImageError::NotADirectory { path });
            return out;
        }
        Err(ImageError::Read { path, source }) if path == dir => {
            out.problems.push(ImageError::Read { path, source });
            return out;
        }
        Err(e) => out.problems.push(e),
    }

    // Something is wrong: read each part on its own, noting every fault once.
    let first = out.problems.first().map(|e| e.to_string());
    let note = |problems: &mut Vec<ImageError>, e: ImageError| {
        if Some(e.to_string()) != first {
            problems.push(e);
        }
    };

    let manifest_path = dir.join(MANIFEST);
    match read_limited(&manifest_path, MAX_RECORD_BYTES) {
        Ok(bytes) => match decode_manifest(&bytes, &manifest_path) {
            Ok(m) => out.manifest = Some(m),
            Err(e) => note(&mut out.problems, e),
        },
        Err(ImageError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            note(&mut out.problems, ImageError::NoManifest { dir: dir.to_path_buf() })
        }
        Err(e) => note(&mut out.problems, e),
    }

    if let Some(m) = &out.manifest {
        for f in &m.files {
            let p = dir.join(&f.name);
            let fault = match fs::metadata(&p) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    Some(ImageError::Missing { path: p })
                }
                Err(source) => Some(ImageError::Read { path: p, source }),
                Ok(meta) if !meta.is_file() => {
                    Some(ImageError::Corrupt { path: p, why: "not a regular file".to_string() })
                }
                Ok(meta) if meta.len() != f.len => {
                    Some(ImageError::Length { path: p, expected: f.len, actual: meta.len() })
                }
                Ok(_) => None,
            };
            if let Some(e) = fault {
                note(&mut out.problems, e);
            }
        }
    }

    // The records of an encrypted image are sealed; the normal path said why it could not
    // open them.
    if out.manifest.as_ref().is_some_and(|m| m.encryption.is_some()) {
        return out;
    }

    let tree_path = dir.join(TREE);
    let bytes = match read_limited(&tree_path, MAX_RECORD_BYTES) {
        Ok(b) => b,
        Err(ImageError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            // Without a manifest, its absence already says the image is incomplete.
            if out.manifest.is_some() {
                note(&mut out.problems, ImageError::Missing { path: tree_path });
            }
            return out;
        }
        Err(e) => {
            note(&mut out.problems, e);
            return out;
        }
    };
    if let Some(entry) = out.manifest.as_ref().and_then(|m| m.files.iter().find(|f| f.name == TREE))
    {
        let actual = hash_bytes(&bytes);
        if bytes.len() as u64 == entry.len && actual != entry.xxh3 {
            let e = ImageError::Checksum {
                path: tree_path.clone(),
                expected: entry.xxh3.clone(),
                actual,
            };
            note(&mut out.problems, e);
        }
    }
    match serde_json::from_slice::<Tree>(&bytes) {
        Ok(tree) => {
            if let Some(m) = &out.manifest {
                if let Err(e) = check_tree(&tree, m, &tree_path) {
                    note(&mut out.problems, e);
                }
            }
            out.tree = Some(tree);
        }
        Err(e) => note(
            &mut out.problems,
            ImageError::Corrupt { path: tree_path, why: format!("cannot decode: {e}") },
        ),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{write_sample, PAGES, PID};

    #[test]
    fn intact_image_reads_whole_without_problems() {
        let (_tmp, dir) = write_sample();
        let p = read_partial(&dir);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(p.manifest.expect("manifest").root_pid, PID);
        assert_eq!(p.tree.expect("tree").processes[0].pid, PID);
    }

    #[test]
    fn missing_page_file_still_gives_the_tree() {
        let (_tmp, dir) = write_sample();
        fs::remove_file(dir.join(PAGES)).unwrap();
        let p = read_partial(&dir);
        assert!(p.manifest.is_some());
        assert_eq!(p.tree.expect("tree").processes[0].pid, PID);
        assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
        assert!(p.problems[0].to_string().contains(PAGES), "{}", p.problems[0]);
    }

    #[test]
    fn missing_manifest_still_gives_the_tree() {
        let (_tmp, dir) = write_sample();
        fs::remove_file(dir.join(MANIFEST)).unwrap();
        let p = read_partial(&dir);
        assert!(p.manifest.is_none());
        assert!(p.tree.is_some());
        assert!(matches!(p.problems[..], [ImageError::NoManifest { .. }]), "{:?}", p.problems);
    }

    #[test]
    fn garbled_tree_is_named_and_the_manifest_kept() {
        let (_tmp, dir) = write_sample();
        let len = fs::metadata(dir.join(TREE)).unwrap().len() as usize;
        fs::write(dir.join(TREE), vec![b'#'; len]).unwrap();
        let p = read_partial(&dir);
        assert!(p.manifest.is_some());
        assert!(p.tree.is_none());
        let text: Vec<String> = p.problems.iter().map(|e| e.to_string()).collect();
        assert!(text.iter().any(|t| t.contains("checksum")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("cannot decode")), "{text:?}");
    }

    #[test]
    fn not_a_directory_is_one_problem() {
        let (_tmp, dir) = write_sample();
        let p = read_partial(&dir.join(TREE));
        assert!(p.manifest.is_none() && p.tree.is_none());
        assert!(matches!(p.problems[..], [ImageError::NotADirectory { .. }]), "{:?}", p.problems);
    }
}
