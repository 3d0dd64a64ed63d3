//! Who may restore what: the credential rule.
//!
//! An image is data that whoever can write its files controls, and the tree records the
//! user ids, group ids and capabilities its processes run with. A restore run by root
//! sets whatever ids the image holds, so an image a user can write would otherwise let
//! that user start a process as root. The rule: when torpor runs as root, every process
//! of the image must run with ids that every possible writer of the image holds (its
//! user id, its primary and supplementary groups) and with no capabilities, unless the
//! user says they trust the image (`--allow-credentials`). An image written by root
//! alone (the directory and each file owned by root, writable by no one else), as a
//! dump run by root makes it, is trusted as it is.
//!
//! A restore by any other user needs no rule: the kernel refuses ids and capabilities
//! that user does not have.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use torpor_image::model::{Creds, Tree};
use torpor_image::ImageReader;

use crate::{RestoreError, Result};

/// Someone other than root who could have written the image.
struct Writer {
    uid: u32,
    name: String,
    /// The groups the writer is in: primary and supplementary.
    groups: BTreeSet<u32>,
    /// A file or directory of the image they own, for the message.
    owns: PathBuf,
}

/// Checks the credentials of every process in `tree` against who could have written the
/// image `reader` reads; see the module documentation. Does nothing unless torpor runs as
/// root or when `allow` is set.
pub(crate) fn check_credentials(reader: &ImageReader, tree: &Tree, allow: bool) -> Result<()> {
    if allow || !is_root() {
        return Ok(());
    }
    let dir = reader.dir();
    let mut paths = vec![dir.to_path_buf()];
    paths.extend(reader.manifest().files.iter().map(|f| dir.join(&f.name)));
    paths.push(dir.join(torpor_image::MANIFEST));
    let mut writers: Vec<Writer> = Vec::new();
    for path in paths {
        let meta = std::fs::symlink_metadata(&path).map_err(|source| RestoreError::Prepare {
            what: format!("{}", path.display()),
            source,
        })?;
        // Group- or world-writable: anyone in that group, or anyone at all, may have
        // changed it. torpor makes its images 0700 and 0600.
        if meta.mode() & 0o022 != 0 {
            return Err(RestoreError::ImageWritable { path, mode: meta.mode() & 0o7777 });
        }
        if meta.uid() == 0 {
            continue;
        }
        if !writers.iter().any(|w| w.uid == meta.uid()) {
            writers.push(writer(meta.uid(), path));
        }
        // The group of a file its owner made is one they are in (a user can give their
        // files only to their own groups); it counts even for a uid without an account.
        if let Some(w) = writers.iter_mut().find(|w| w.uid == meta.uid()) {
            w.groups.insert(meta.gid());
        }
    }
    for w in &writers {
        for p in &tree.processes {
            if let Some(what) = exceeds(&p.creds, w) {
                return Err(RestoreError::Credentials {
                    pid: p.pid,
                    what,
                    owner: w.name.clone(),
                    uid: w.uid,
                    path: w.owns.clone(),
                });
            }
        }
    }
    Ok(())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The user `uid`, with the groups the user database gives them (none for a uid without
/// an entry).
fn writer(uid: u32, owns: PathBuf) -> Writer {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten();
    let mut groups = BTreeSet::new();
    let name = match &user {
        Some(u) => {
            groups.insert(u.gid.as_raw());
            if let Ok(c) = std::ffi::CString::new(u.name.as_bytes()) {
                if let Ok(list) = nix::unistd::getgrouplist(&c, u.gid) {
                    groups.extend(list.iter().map(|g| g.as_raw()));
                }
            }
            format!("user {}", u.name)
        }
        None => "a user".to_string(),
    };
    Writer { uid, name, groups, owns }
}

/// What in `c` the writer `w` does not hold, if anything.
fn exceeds(c: &Creds, w: &Writer) -> Option<String> {
    if let Some(u) = c.uids.iter().find(|&&u| u != w.uid) {
        return Some(format!("as uid {u}"));
    }
    if let Some(g) = c.gids.iter().chain(&c.groups).find(|g| !w.groups.contains(g)) {
        return Some(format!("in group {g}"));
    }
    let caps = c.cap_permitted | c.cap_effective | c.cap_inheritable | c.cap_ambient;
    if caps != 0 {
        return Some(format!("with capabilities {caps:#x}"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(uid: u32, gid: u32) -> Creds {
        Creds {
            uids: [uid; 4],
            gids: [gid; 4],
            groups: vec![],
            cap_inheritable: 0,
            cap_permitted: 0,
            cap_effective: 0,
            cap_bounding: u64::MAX,
            cap_ambient: 0,
            no_new_privs: false,
        }
    }

    #[test]
    fn only_the_writers_own_ids_and_no_capabilities_fit() {
        let w = Writer {
            uid: 1000,
            name: "user u".into(),
            groups: [1000, 27].into(),
            owns: "img".into(),
        };
        assert_eq!(exceeds(&creds(1000, 1000), &w), None);
        assert_eq!(exceeds(&creds(1000, 27), &w), None);
        assert_eq!(exceeds(&creds(0, 1000), &w).unwrap(), "as uid 0");
        let mut c = creds(1000, 1000);
        c.uids[2] = 0;
        assert_eq!(exceeds(&c, &w).unwrap(), "as uid 0");
        assert_eq!(exceeds(&creds(1000, 0), &w).unwrap(), "in group 0");
        let mut c = creds(1000, 1000);
        c.groups.push(4);
        assert_eq!(exceeds(&c, &w).unwrap(), "in group 4");
        let mut c = creds(1000, 1000);
        c.cap_permitted = 1 << 21;
        assert_eq!(exceeds(&c, &w).unwrap(), "with capabilities 0x200000");
    }
}
