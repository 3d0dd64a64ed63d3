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
//! dump run by root makes it, is trusted as it is. The parents of an incremental image
//! count as part of it.
//!
//! A restore by any other user needs no rule of its own while torpor holds no capability:
//! the kernel refuses ids and capabilities that user does not have. A torpor given
//! `CAP_CHECKPOINT_RESTORE` and `CAP_SYS_PTRACE` as file capabilities, though, hands
//! those to the processes it makes, which could keep them; run by a user, such a torpor
//! restores only processes of that user's uid and gid with no capabilities, whatever
//! `--allow-credentials` says.

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
pub(crate) fn check_credentials(
    reader: &ImageReader,
    tree: &Tree,
    allow: bool,
    packed_from: Option<&std::path::Path>,
) -> Result<()> {
    if !is_root() {
        return own_only(tree);
    }
    if allow {
        return Ok(());
    }
    // The parents of an incremental image supply page data, so whoever can write them
    // can write the processes' memory too.
    let parents = torpor_image::pages::open_parents(reader, false)?;
    let mut paths: Vec<PathBuf> = packed_from.map(|p| p.to_path_buf()).into_iter().collect();
    for r in std::iter::once(reader).chain(parents.iter().map(|(r, _)| r)) {
        let dir = r.dir();
        paths.push(dir.to_path_buf());
        paths.extend(r.manifest().files.iter().map(|f| dir.join(&f.name)));
        paths.push(dir.join(torpor_image::MANIFEST));
    }
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
        // Restore opens and creates the files the image names with root's rights before
        // the processes take on their ids: each must be one the writer could open.
        if let Some((path, how)) = paths_denied(tree, w) {
            return Err(RestoreError::Credentials {
                pid: tree.root_pid,
                what: format!("with {path} open for {how}"),
                owner: w.name.clone(),
                uid: w.uid,
                path: w.owns.clone(),
            });
        }
    }
    Ok(())
}

/// Read, write and search (execute) permission bits, as in the "other" class.
const R: u32 = 4;
const W: u32 = 2;
const X: u32 = 1;

/// The first path of `tree` that restore opens or creates for its processes and that
/// `w` could not, with what was wanted. Checks the permission bits along the path (not
/// ACLs, which can only be missed in the writer's disfavour when they deny what the
/// bits allow; `inspect` shows the paths).
fn paths_denied(tree: &Tree, w: &Writer) -> Option<(String, &'static str)> {
    use torpor_image::model::OpenFileKind as K;

    let mut want: Vec<(&str, u32)> = Vec::new();
    for (i, f) in tree.files.iter().enumerate() {
        if f.memfd.is_some() {
            continue;
        }
        if f.saved_content.is_some() {
            // A deleted file is made again next to where it was.
            let dir = std::path::Path::new(&f.path).parent().and_then(|d| d.to_str());
            want.push((dir.unwrap_or("/"), W | X));
            continue;
        }
        // What its descriptors need; a file only mapped (or the executable) is read.
        let bits = tree
            .processes
            .iter()
            .flat_map(|p| &p.open_files)
            .filter(|o| matches!(o.kind, K::Regular { file } if file == i))
            .fold(0, |b, o| b | access(o.flags));
        want.push((&f.path, if bits == 0 { R } else { bits }));
    }
    for p in &tree.processes {
        match p.cwd.strip_suffix(" (deleted)") {
            // A deleted working directory is made again next to where it was.
            Some(old) => {
                let dir = std::path::Path::new(old).parent().and_then(|d| d.to_str());
                want.push((dir.unwrap_or("/"), W | X));
            }
            None => want.push((&p.cwd, X)),
        }
        want.push((&p.root, X));
        for o in &p.open_files {
            let rw = access(o.flags);
            match &o.kind {
                K::ProcFile { path } | K::CharDevice { path, .. } => want.push((path, rw)),
                K::Directory { path } => want.push((path, R | X)),
                K::UnixBound { name, .. } if name.starts_with('/') => {
                    let dir = std::path::Path::new(name).parent().and_then(|d| d.to_str());
                    want.push((dir.unwrap_or("/"), W | X));
                }
                K::Inotify { watches } => want.extend(watches.iter().map(|x| (&*x.path, R))),
                _ => {}
            }
        }
    }
    want.into_iter().find(|&(path, bits)| !may(w, path, bits)).map(|(path, bits)| {
        let how = match bits {
            X => "search",
            R => "reading",
            b if b & W != 0 && b & R != 0 => "reading and writing",
            _ => "writing",
        };
        (path.to_string(), how)
    })
}

/// The permission bits `open` flags need.
fn access(flags: i32) -> u32 {
    match flags & libc::O_ACCMODE {
        libc::O_WRONLY => W,
        libc::O_RDWR => R | W,
        _ => R,
    }
}

/// Whether `w` may search every directory leading to `path` and has `bits` on it. A
/// path that does not exist is left to restore, which refuses it.
fn may(w: &Writer, path: &str, bits: u32) -> bool {
    let Ok(real) = std::fs::canonicalize(path) else { return true };
    let allowed = |p: &std::path::Path, bits: u32| match std::fs::metadata(p) {
        Err(_) => false,
        Ok(m) => {
            let mode = m.mode();
            let class = if m.uid() == w.uid {
                mode >> 6
            } else if w.groups.contains(&m.gid()) {
                mode >> 3
            } else {
                mode
            };
            class & bits == bits
        }
    };
    real.ancestors().skip(1).all(|d| allowed(d, X)) && allowed(&real, bits)
}

/// The rule for a torpor run by a user other than root; see the module documentation.
fn own_only(tree: &Tree) -> Result<()> {
    let me = std::process::id() as i32;
    let held = torpor_sys::proc::status(me).map_or(0, |s| s.cap_prm);
    if held == 0 {
        return Ok(());
    }
    let (uid, gid) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
    for p in &tree.processes {
        let c = &p.creds;
        let what = if c.uids.iter().any(|&u| u != uid) {
            format!("as uid {:?}", c.uids)
        } else if c.gids.iter().any(|&g| g != gid) {
            format!("as gid {:?}", c.gids)
        } else if c.cap_permitted | c.cap_effective | c.cap_inheritable | c.cap_ambient != 0 {
            format!("with capabilities {:#x}", c.cap_permitted | c.cap_inheritable | c.cap_ambient)
        } else {
            continue;
        };
        return Err(RestoreError::NotYours { pid: p.pid, what, uid });
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

    #[test]
    fn paths_need_the_writers_permission_bits_all_the_way() {
        use std::os::unix::fs::PermissionsExt;
        let set = |p: &std::path::Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let tmp = tempfile::tempdir().unwrap();
        let (dir, file) = (tmp.path().join("d"), tmp.path().join("d/f"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(&file, b"x").unwrap();
        set(tmp.path(), 0o755);
        let me = nix::unistd::geteuid().as_raw();
        let other = Writer { uid: me + 1, name: "u".into(), groups: [].into(), owns: "i".into() };
        let owner = Writer { uid: me, name: "o".into(), groups: [].into(), owns: "i".into() };
        let f = file.to_str().unwrap();
        set(&dir, 0o755);
        set(&file, 0o644);
        assert!(may(&other, f, R) && !may(&other, f, W) && may(&owner, f, R | W));
        set(&file, 0o600);
        assert!(!may(&other, f, R) && may(&owner, f, R | W));
        set(&file, 0o644);
        set(&dir, 0o700);
        assert!(!may(&other, f, R), "a directory it cannot search");
        assert!(may(&other, "/no/such/path", R), "left to restore");
    }
}
