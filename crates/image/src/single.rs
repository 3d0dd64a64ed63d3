//! Single-file images: an image directory as one stream, written front to back without
//! ever seeking, so that it can go to a pipe, over ssh or into object storage.
//!
//! ```text
//!   offset 0   file header, 16 bytes
//!              ├── magic    "TORPORSF"           8 bytes
//!              ├── version  1                    u32 little-endian
//!              └── flags    0                    u32 little-endian
//!
//!   then one member per file, manifest.json first, then every file the manifest lists,
//!   in the manifest's order:
//!              member header, 48 bytes + name
//!              ├── magic    "MEMB"               4 bytes
//!              ├── name_len 1 to 255             u32 little-endian
//!              ├── len      data bytes           u64 little-endian
//!              ├── xxh3     of the data          16 bytes, big-endian (the manifest's hex)
//!              ├── check    xxh3-128 of the 32 bytes above and the name, big-endian
//!              └── name     name_len bytes
//!              zero bytes up to the next multiple of 4096 from offset 0
//!              data         len bytes
//!
//!   end record, 32 bytes, right after the last member's data
//!              ├── magic    "TEND"               4 bytes
//!              ├── members  count, manifest included, u32 little-endian
//!              ├── offset   of this record       u64 little-endian
//!              └── check    xxh3-128 of the 16 bytes above, big-endian
//! ```
//!
//! Every member's data starts on a 4 KiB boundary of the stream, so that page data in a
//! regular file sits where it could be mapped. What checks what: the manifest's own
//! trailer covers the manifest; the manifest's length and checksum of each file cover
//! that member's data, and each member header must repeat them; each header's `check`
//! covers its fields and name, so a damaged length is caught before it is trusted;
//! padding must be zeros; the end record must count every member and sit where the last
//! one ends. A stream cut anywhere, or with one byte changed, is refused, naming the
//! member (or header) at fault.
//!
//! A self-restoring executable is a copy of the torpor binary, zeros up to a multiple of
//! 4096, a single-file image, and a 32-byte trailer: the image's offset (u64 LE), its
//! length (u64 LE) and the magic [`EXE_MAGIC`].
//!
//! The version (`1`) goes up only if this container changes; the image inside keeps its
//! own `format_version`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use crate::{
    create_private, decode_manifest, open_regular, read_limited, ImageError, ImageReader, Manifest,
    Result, MANIFEST, MAX_RECORD_BYTES, TREE,
};

/// The first bytes of a single-file image.
pub const MAGIC: [u8; 8] = *b"TORPORSF";
/// The container version this torpor writes and reads.
pub const VERSION: u32 = 1;
/// Member data starts at multiples of this many bytes.
pub const ALIGN: u64 = 4096;
/// The last 16 bytes of a self-restoring executable.
pub const EXE_MAGIC: [u8; 16] = *b"torpor-exe-image";
/// Length of the trailer of a self-restoring executable.
pub const EXE_TRAILER_LEN: u64 = 32;

const HEADER_LEN: usize = 16;
const MEMBER_MAGIC: [u8; 4] = *b"MEMB";
const MEMBER_FIXED: usize = 48;
const END_MAGIC: [u8; 4] = *b"TEND";
const END_LEN: usize = 32;
const CHUNK: usize = 1 << 20;

/// Whether `bytes`, the start of a file, are those of a single-file image.
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

/// Where the image inside a self-restoring executable lies, from its last
/// [`EXE_TRAILER_LEN`] bytes; `None` when they are not such a trailer.
pub fn exe_trailer(trailer: &[u8]) -> Option<(u64, u64)> {
    let t: &[u8; 32] = trailer.try_into().ok()?;
    if t[16..] != EXE_MAGIC {
        return None;
    }
    let offset = u64::from_le_bytes(t[0..8].try_into().unwrap());
    let len = u64::from_le_bytes(t[8..16].try_into().unwrap());
    Some((offset, len))
}

/// The trailer [`exe_trailer`] reads.
pub fn encode_exe_trailer(offset: u64, len: u64) -> [u8; 32] {
    let mut t = [0u8; 32];
    t[0..8].copy_from_slice(&offset.to_le_bytes());
    t[8..16].copy_from_slice(&len.to_le_bytes());
    t[16..].copy_from_slice(&EXE_MAGIC);
    t
}

/// Where an image lies in a regular file: a single-file image from `offset`, `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    /// Offset of the single-file image's first byte.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Whether it is the image of a self-restoring executable.
    pub exe: bool,
}

/// Finds the single-file image in a regular file: the whole file, or the image a
/// self-restoring executable carries. `None` when the file is neither.
pub fn locate(file: &File) -> io::Result<Option<Located>> {
    let size = file.metadata()?.len();
    let mut head = [0u8; 8];
    if size >= HEADER_LEN as u64 {
        file.read_exact_at(&mut head, 0)?;
        if has_magic(&head) {
            return Ok(Some(Located { offset: 0, len: size, exe: false }));
        }
    }
    if size < EXE_TRAILER_LEN {
        return Ok(None);
    }
    let mut t = [0u8; 32];
    file.read_exact_at(&mut t, size - EXE_TRAILER_LEN)?;
    Ok(exe_trailer(&t).and_then(|(offset, len)| {
        let end = offset.checked_add(len)?;
        (end <= size - EXE_TRAILER_LEN).then_some(Located { offset, len, exe: true })
    }))
}

fn digest_u128(hex: &str) -> u128 {
    u128::from_str_radix(hex, 16).expect("the manifest holds hex digests")
}

fn member_header(name: &str, len: u64, digest: u128) -> Vec<u8> {
    let mut h = Vec::with_capacity(MEMBER_FIXED + name.len());
    h.extend_from_slice(&MEMBER_MAGIC);
    h.extend_from_slice(&(name.len() as u32).to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&digest.to_be_bytes());
    let mut check = Xxh3::new();
    check.update(&h);
    check.update(name.as_bytes());
    h.extend_from_slice(&check.digest128().to_be_bytes());
    h.extend_from_slice(name.as_bytes());
    h
}

/// Bytes of padding after `at` up to the next multiple of [`ALIGN`].
fn pad_len(at: u64) -> u64 {
    (ALIGN - at % ALIGN) % ALIGN
}

/// A stream being written, with its position for the padding.
struct Out<'a> {
    w: &'a mut dyn Write,
    at: u64,
    path: &'a Path,
}

impl Out<'_> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.w
            .write_all(b)
            .map_err(|source| ImageError::Write { path: self.path.to_path_buf(), source })?;
        self.at += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let zeros = [0u8; ALIGN as usize];
        self.put(&zeros[..pad_len(self.at) as usize])
    }
}

/// Writes the complete image in `dir` to `out` as a single-file image, front to back;
/// returns the bytes written. `out_path` names the output in messages. Each file is
/// checked against the manifest as it goes, so a file changed since the dump fails the
/// packing instead of making a stream restore would refuse.
pub fn pack(dir: &Path, out: &mut dyn Write, out_path: &Path) -> Result<u64> {
    // An encrypted image is packed as it is stored: sealed.
    let reader = ImageReader::open_as_stored(dir)?;
    if reader.manifest().parent.is_some() {
        return Err(ImageError::NotPackable {
            dir: dir.to_path_buf(),
            why: "it is incremental (its unchanged pages are in its parent image)".into(),
        });
    }
    let manifest_bytes = read_limited(&dir.join(MANIFEST), MAX_RECORD_BYTES)?;
    let mut out = Out { w: out, at: 0, path: out_path };
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    out.put(&header)?;

    out.put(&member_header(MANIFEST, manifest_bytes.len() as u64, xxh3_128(&manifest_bytes)))?;
    out.pad()?;
    out.put(&manifest_bytes)?;

    let mut buf = vec![0u8; CHUNK];
    for f in &reader.manifest().files {
        out.put(&member_header(&f.name, f.len, digest_u128(&f.xxh3)))?;
        out.pad()?;
        let path = dir.join(&f.name);
        let mut file = open_regular(&path)?;
        let mut h = Xxh3::new();
        let mut len = 0u64;
        loop {
            // Never more than the header announced; one byte more tells a file that grew.
            let want = buf.len().min((f.len - len) as usize).max(1);
            let n = match file.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(ImageError::Read { path, source }),
            };
            if len == f.len {
                len += n as u64;
                break;
            }
            h.update(&buf[..n]);
            out.put(&buf[..n])?;
            len += n as u64;
        }
        crate::check_digest(&path, f, len, &crate::digest_hex(&h))?;
    }

    let mut end = Vec::with_capacity(END_LEN);
    end.extend_from_slice(&END_MAGIC);
    end.extend_from_slice(&(reader.manifest().files.len() as u32 + 1).to_le_bytes());
    end.extend_from_slice(&out.at.to_le_bytes());
    end.extend_from_slice(&xxh3_128(&end).to_be_bytes());
    out.put(&end)?;
    out.w.flush().map_err(|source| ImageError::Write { path: out_path.to_path_buf(), source })?;
    Ok(out.at)
}

/// Where a single-file image is read from.
pub enum Input<'a> {
    /// A stream (a pipe, standard input), read once front to back.
    Stream(&'a mut dyn Read),
    /// A regular file, from `offset`, `len` bytes (see [`locate`]).
    File {
        /// The file.
        file: &'a File,
        /// Where the image starts.
        offset: u64,
        /// Its length.
        len: u64,
    },
}

/// A single-file image being read, with its position.
struct In<'s, 'n> {
    src: Input<'s>,
    at: u64,
    /// The image's name in messages.
    name: &'n Path,
}

impl In<'_, '_> {
    fn corrupt(&self, why: String) -> ImageError {
        ImageError::Corrupt { path: self.name.to_path_buf(), why }
    }

    fn read_err(&self, source: io::Error) -> ImageError {
        ImageError::Read { path: self.name.to_path_buf(), source }
    }

    /// Reads at most `buf.len()` bytes; 0 at the end.
    fn some(&mut self, buf: &mut [u8]) -> Result<usize> {
        loop {
            let r = match &mut self.src {
                Input::Stream(r) => r.read(buf),
                Input::File { file, offset, len } => {
                    let left = len.saturating_sub(self.at);
                    let want = buf.len().min(left.min(usize::MAX as u64) as usize);
                    file.read_at(&mut buf[..want], *offset + self.at)
                }
            };
            match r {
                Ok(n) => {
                    self.at += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_err(e)),
            }
        }
    }

    /// Reads exactly `buf.len()` bytes of `what`.
    fn exact(&mut self, buf: &mut [u8], what: &dyn Fn() -> String) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.some(&mut buf[done..])?;
            if n == 0 {
                return Err(self.corrupt(format!(
                    "it ends after {} bytes, inside {} (truncated?)",
                    self.at,
                    what()
                )));
            }
            done += n;
        }
        Ok(())
    }

    /// Passes over `n` bytes of `what` without reading them, where the input allows.
    fn skip(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<bool> {
        match &self.src {
            Input::File { len, .. } => {
                if self.at.saturating_add(n) > *len {
                    self.at = *len;
                    return Err(self.corrupt(format!(
                        "it ends after {} bytes, inside {} (truncated?)",
                        self.at,
                        what()
                    )));
                }
                self.at += n;
                Ok(true)
            }
            Input::Stream(_) => Ok(false),
        }
    }
}

/// One member header, as read.
struct Member {
    name: String,
    len: u64,
    digest: u128,
}

fn read_member(inp: &mut In, index: usize, expected: &str) -> Result<Member> {
    let what = || format!("the header of member {index} ({expected})");
    let mut fixed = [0u8; MEMBER_FIXED];
    inp.exact(&mut fixed, &what)?;
    if fixed[..4] != MEMBER_MAGIC {
        return Err(inp.corrupt(format!("{} does not start with \"MEMB\"", what())));
    }
    let name_len = u32::from_le_bytes(fixed[4..8].try_into().unwrap()) as usize;
    if name_len == 0 || name_len > 255 {
        return Err(inp.corrupt(format!("{} gives a name of {name_len} bytes", what())));
    }
    let mut name = vec![0u8; name_len];
    inp.exact(&mut name, &what)?;
    let mut check = Xxh3::new();
    check.update(&fixed[..32]);
    check.update(&name);
    if check.digest128().to_be_bytes() != fixed[32..48] {
        return Err(inp.corrupt(format!("{} is damaged (its check does not match)", what())));
    }
    let name = String::from_utf8(name)
        .map_err(|_| inp.corrupt(format!("{} holds a name that is not UTF-8", what())))?;
    let len = u64::from_le_bytes(fixed[8..16].try_into().unwrap());
    let digest = u128::from_be_bytes(fixed[16..32].try_into().unwrap());
    let pad = pad_len(inp.at) as usize;
    let mut zeros = [0u8; ALIGN as usize];
    let pad_what = || format!("the padding before member {index} ({name})");
    inp.exact(&mut zeros[..pad], &pad_what)?;
    if zeros[..pad].iter().any(|&b| b != 0) {
        return Err(inp.corrupt(format!("{} is not all zeros", pad_what())));
    }
    Ok(Member { name, len, digest })
}

/// What [`scan`] found, filled in as it goes so that a caller has what was read before
/// a fault.
#[derive(Debug, Default)]
pub struct Scanned {
    /// The manifest, once read and checked.
    pub manifest: Option<Manifest>,
    /// The manifest's bytes.
    pub manifest_bytes: Vec<u8>,
    /// The bytes of `tree.json`, once read and checked against the manifest.
    pub tree: Option<Vec<u8>>,
    /// The length of the single-file image, once its end record is read.
    pub len: Option<u64>,
}

/// Reads a single-file image front to back and checks every part of it (see the module
/// documentation). `keep` is asked for a file to write each member's data to (`None` to
/// drop it). With `check_data` false, the data of members other than the manifest and
/// `tree.json` is passed over unread where the input allows (for `torpor list`).
///
/// A stream must end right after the end record: reading on to its end also means the
/// writer is done (a dump ends its process only after the last byte is written).
pub fn scan(
    src: Input,
    name: &Path,
    keep: &mut dyn FnMut(&str) -> Result<Option<File>>,
    check_data: bool,
    out: &mut Scanned,
) -> Result<()> {
    let mut inp = In { src, at: 0, name };
    let mut header = [0u8; HEADER_LEN];
    inp.exact(&mut header, &|| "the file header".into())?;
    if !has_magic(&header) {
        return Err(inp.corrupt(format!(
            "not a single-file torpor image (it starts with {:?}, not \"TORPORSF\")",
            String::from_utf8_lossy(&header[..8])
        )));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
    if version != VERSION {
        return Err(inp.corrupt(format!(
            "single-file container version {version}; this torpor reads version {VERSION}"
        )));
    }

    // The manifest, first: it says what follows.
    let m = read_member(&mut inp, 0, MANIFEST)?;
    if m.name != MANIFEST {
        return Err(inp.corrupt(format!("its first member is {:?}, not {MANIFEST}", m.name)));
    }
    if m.len > MAX_RECORD_BYTES {
        return Err(inp.corrupt(format!("its manifest is {} bytes long", m.len)));
    }
    let mut bytes = vec![0u8; m.len as usize];
    inp.exact(&mut bytes, &|| format!("member 0 ({MANIFEST})"))?;
    let member_path = |n: &str| PathBuf::from(format!("{} (member {n})", name.display()));
    if xxh3_128(&bytes) != m.digest {
        return Err(ImageError::Checksum {
            path: member_path(MANIFEST),
            expected: format!("{:032x}", m.digest),
            actual: crate::hash_bytes(&bytes),
        });
    }
    let manifest = decode_manifest(&bytes, &member_path(MANIFEST))?;
    if manifest.parent.is_some() {
        return Err(inp.corrupt(
            "its image is incremental, which a single-file image cannot hold".to_string(),
        ));
    }
    if let Some(mut f) = keep(MANIFEST)? {
        f.write_all(&bytes)
            .map_err(|source| ImageError::Write { path: member_path(MANIFEST), source })?;
    }
    out.manifest_bytes = bytes;
    out.manifest = Some(manifest.clone());

    let mut buf = vec![0u8; CHUNK];
    for (i, f) in manifest.files.iter().enumerate() {
        let index = i + 1;
        let m = read_member(&mut inp, index, &f.name)?;
        if m.name != f.name || m.len != f.len || m.digest != digest_u128(&f.xxh3) {
            return Err(inp.corrupt(format!(
                "member {index} is {:?} of {} bytes, the manifest lists {:?} of {} bytes \
                 (with another checksum) there",
                m.name, m.len, f.name, f.len
            )));
        }
        let path = member_path(&f.name);
        let what = || format!("member {index} ({})", f.name);
        let is_tree = f.name == TREE;
        if is_tree && f.len > MAX_RECORD_BYTES {
            return Err(ImageError::Corrupt { path, why: format!("{} bytes", f.len) });
        }
        if !check_data && !is_tree && inp.skip(f.len, &what)? {
            continue;
        }
        let mut sink = keep(&f.name)?;
        let mut tree = Vec::new();
        let mut h = Xxh3::new();
        let mut left = f.len;
        while left > 0 {
            let want = buf.len().min(left.min(usize::MAX as u64) as usize);
            inp.exact(&mut buf[..want], &what)?;
            h.update(&buf[..want]);
            if let Some(s) = &mut sink {
                s.write_all(&buf[..want])
                    .map_err(|source| ImageError::Write { path: path.clone(), source })?;
            }
            if is_tree {
                tree.extend_from_slice(&buf[..want]);
            }
            left -= want as u64;
        }
        crate::check_digest(&path, f, f.len, &crate::digest_hex(&h))?;
        if is_tree {
            out.tree = Some(tree);
        }
    }

    let at = inp.at;
    let mut end = [0u8; END_LEN];
    inp.exact(&mut end, &|| "the end record".into())?;
    let members = u32::from_le_bytes(end[4..8].try_into().unwrap()) as usize;
    let offset = u64::from_le_bytes(end[8..16].try_into().unwrap());
    if end[..4] != END_MAGIC
        || end[16..] != xxh3_128(&end[..16]).to_be_bytes()
        || members != manifest.files.len() + 1
        || offset != at
    {
        return Err(inp.corrupt(format!(
            "its end record at byte {at} is damaged or is not where the {} members end",
            manifest.files.len() + 1
        )));
    }
    let mut extra = [0u8; 1];
    if inp.some(&mut extra)? != 0 {
        return Err(inp.corrupt(format!("bytes follow its end record at byte {}", inp.at)));
    }
    out.len = Some(inp.at);
    Ok(())
}

/// Unpacks a single-file image into `dir`, an empty private directory: every member is
/// written as a file of mode 0600 and checked against the manifest, which is written
/// first. On failure `dir` holds what was written so far (the caller removes it); the
/// error names what is wrong.
pub fn unpack(src: Input, name: &Path, dir: &Path) -> Result<Manifest> {
    let mut keep = |member: &str| -> Result<Option<File>> {
        crate::check_name(member)?;
        let path = dir.join(member);
        create_private(&path).map(Some).map_err(|source| ImageError::Write { path, source })
    };
    let mut scanned = Scanned::default();
    scan(src, name, &mut keep, true, &mut scanned)?;
    Ok(scanned.manifest.expect("a scan that succeeds has read the manifest"))
}

/// Reads the manifest and records of a single-file image as far as they can be read, for
/// tools that describe an image: what [`crate::read_partial`] does for a directory. With
/// `check_data` every member's checksum is checked too; without, the page data of a
/// regular file is not read at all.
pub fn read_partial(src: Input, name: &Path, check_data: bool) -> crate::PartialImage {
    let mut scanned = Scanned::default();
    let mut out = crate::PartialImage {
        dir: name.to_path_buf(),
        manifest: None,
        tree: None,
        problems: Vec::new(),
    };
    if let Err(e) = scan(src, name, &mut |_| Ok(None), check_data, &mut scanned) {
        out.problems.push(e);
    }
    out.manifest = scanned.manifest;
    // The records of an encrypted image are sealed: reading them takes the key, and an
    // unpacked copy (`crate::read_partial_keyed`).
    if out.manifest.as_ref().is_some_and(|m| m.encryption.is_some()) {
        out.problems.push(ImageError::Encrypted { dir: name.to_path_buf() });
        return out;
    }
    if let Some(bytes) = &scanned.tree {
        let path = PathBuf::from(format!("{} (member {TREE})", name.display()));
        match serde_json::from_slice::<crate::model::Tree>(bytes) {
            Ok(tree) => {
                if let Some(m) = &out.manifest {
                    if let Err(e) = crate::check_tree(&tree, m, &path) {
                        out.problems.push(e);
                    }
                }
                out.tree = Some(tree);
            }
            Err(e) => {
                out.problems.push(ImageError::Corrupt { path, why: format!("cannot decode: {e}") })
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use tempfile::TempDir;

    use super::*;
    use crate::tests::write_sample;

    fn packed() -> (TempDir, Vec<u8>) {
        let (t, dir) = write_sample();
        let mut bytes = Vec::new();
        let n = pack(&dir, &mut bytes, Path::new("out")).unwrap();
        assert_eq!(n, bytes.len() as u64);
        (t, bytes)
    }

    fn unpack_bytes(bytes: &[u8], into: &Path) -> Result<Manifest> {
        std::fs::create_dir(into).unwrap();
        let mut r = bytes;
        unpack(Input::Stream(&mut r), Path::new("app.torpor"), into)
    }

    #[test]
    fn round_trip_gives_the_same_image() {
        let (t, bytes) = packed();
        assert!(has_magic(&bytes));
        let into = t.path().join("back");
        let m = unpack_bytes(&bytes, &into).unwrap();
        let reader = ImageReader::open(&into).unwrap();
        reader.verify_all(|_| {}).unwrap();
        reader.read_tree().unwrap();
        assert_eq!(&m, reader.manifest());
        for f in &m.files {
            assert_eq!(
                std::fs::read(into.join(&f.name)).unwrap(),
                std::fs::read(t.path().join("img").join(&f.name)).unwrap()
            );
        }
        // Each member's data starts on a 4 KiB boundary: find the page file's.
        let pages = std::fs::read(t.path().join("img").join(crate::tests::PAGES)).unwrap();
        let at = bytes.windows(64).position(|w| w == &pages[..64]).unwrap();
        assert_eq!(at % ALIGN as usize, 0);
    }

    #[test]
    fn every_cut_is_refused() {
        let (t, bytes) = packed();
        // Every cut within the headers and a sample of cuts in the data.
        let cuts = (0..bytes.len()).filter(|c| c % 509 == 0 || bytes.len() - c < 64 || *c < 64);
        for (i, cut) in cuts.enumerate() {
            let into = t.path().join(format!("cut{i}"));
            let err = unpack_bytes(&bytes[..cut], &into).unwrap_err().to_string();
            assert!(err.contains("app.torpor"), "cut at {cut}: {err}");
            if cut >= HEADER_LEN {
                assert!(err.contains("truncated"), "cut at {cut}: {err}");
            }
        }
    }

    #[test]
    fn every_changed_byte_is_refused() {
        let (t, bytes) = packed();
        for (i, at) in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]).enumerate() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x20;
            let into = t.path().join(format!("bad{i}"));
            assert!(unpack_bytes(&bad, &into).is_err(), "byte {at} changed went unnoticed");
        }
    }

    #[test]
    fn trailing_bytes_and_damaged_member_are_named() {
        let (t, mut bytes) = packed();
        bytes.push(0);
        let err = unpack_bytes(&bytes, &t.path().join("a")).unwrap_err().to_string();
        assert!(err.contains("follow its end record"), "{err}");
        bytes.pop();
        let pages = std::fs::read(t.path().join("img").join(crate::tests::PAGES)).unwrap();
        let at = bytes.windows(64).position(|w| w == &pages[..64]).unwrap();
        bytes[at + 100] ^= 1;
        let err = unpack_bytes(&bytes, &t.path().join("b")).unwrap_err().to_string();
        assert!(err.contains(crate::tests::PAGES) && err.contains("checksum"), "{err}");
    }

    #[test]
    fn exe_trailer_is_found_and_plain_files_are_not() {
        let (t, bytes) = packed();
        let exe = t.path().join("exe");
        let mut content = vec![0x7fu8, b'E', b'L', b'F'];
        content.resize(8192, 1);
        let offset = content.len() as u64;
        content.extend_from_slice(&bytes);
        content.extend_from_slice(&encode_exe_trailer(offset, bytes.len() as u64));
        std::fs::write(&exe, &content).unwrap();
        let f = File::open(&exe).unwrap();
        let found = locate(&f).unwrap().unwrap();
        assert_eq!(found, Located { offset, len: bytes.len() as u64, exe: true });
        let p = read_partial(
            Input::File { file: &f, offset: found.offset, len: found.len },
            &exe,
            true,
        );
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert!(p.tree.is_some());

        let plain = t.path().join("plain");
        std::fs::write(&plain, &content[..8192]).unwrap();
        assert_eq!(locate(&File::open(&plain).unwrap()).unwrap(), None);
    }

    #[test]
    fn partial_read_of_a_cut_file_keeps_the_records() {
        let (t, bytes) = packed();
        let cut = t.path().join("cut");
        std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
        let f = File::open(&cut).unwrap();
        let len = f.metadata().unwrap().len();
        let p = read_partial(Input::File { file: &f, offset: 0, len }, &cut, false);
        assert!(p.manifest.is_some());
        assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
        assert!(p.problems[0].to_string().contains("truncated"));
    }
}
