//! A working directory deleted before the dump.
//!
//! A process may run on in a directory removed under it (a build tree cleaned, a temporary
//! directory removed by another process). Such a directory is empty, since only an empty
//! directory can be removed, and no file can be made in it afterwards: all the process can
//! still do there is fail to reach anything by a relative path. An empty directory that
//! the process enters and that is then removed stands for it exactly.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::{RestoreError, Result};

/// What `/proc/PID/cwd` shows after a directory's removal.
const DELETED: &str = " (deleted)";

/// An empty directory made for a process to enter, removed when dropped.
pub(crate) struct StandIn {
    path: PathBuf,
}

impl StandIn {
    /// For a saved working directory `saved` that was deleted (and is not, by chance, an
    /// existing directory whose name ends like a deleted one's), makes an empty directory
    /// to enter: at its old path when that is free and its parent still exists, so that
    /// the process sees the same name, else under the temporary directory.
    pub(crate) fn for_cwd(pid: i32, saved: &str) -> Result<Option<StandIn>> {
        let Some(old) = saved.strip_suffix(DELETED) else {
            return Ok(None);
        };
        if Path::new(saved).is_dir() {
            return Ok(None);
        }
        let fallback = std::env::temp_dir().join(format!("torpor-cwd-{pid}"));
        let made = make_dir(Path::new(old)).or_else(|_| make_dir(&fallback));
        match made {
            Ok(path) => Ok(Some(StandIn { path })),
            Err(source) => {
                Err(RestoreError::DeletedCwd { pid, path: fallback.display().to_string(), source })
            }
        }
    }

    pub(crate) fn path(&self) -> &str {
        // Made from a saved path (UTF-8) or the temporary directory's; a lossy form
        // could only name another directory, which chdir would then not find.
        self.path.to_str().unwrap_or_default()
    }
}

fn make_dir(path: &Path) -> std::io::Result<PathBuf> {
    // Only the owner may enter while it exists; once removed, nothing can enter it.
    std::fs::DirBuilder::new().mode(0o700).create(path)?;
    Ok(path.to_path_buf())
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.path) {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}
