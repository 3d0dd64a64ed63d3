//! Encryption of an image (`torpor dump --encrypt-key FILE`).
//!
//! One 32-byte key, kept by the user in a file, opens an image. From it and a random salt
//! that the manifest records, HKDF-SHA256 derives every key the image uses, each for one
//! purpose (the `info` strings below):
//!
//! ```text
//!   key check     "torpor-image key check"       stored in the manifest: tells a wrong
//!                                                key from a damaged manifest
//!   manifest MAC  "torpor-image manifest mac"    HMAC-SHA256 over the manifest
//!   file key      "torpor-image file" NAME NONCE one per file of the image
//! ```
//!
//! Every file but the manifest is sealed the same way, whatever it holds:
//!
//! ```text
//!   | "TORPSEAL" | nonce (16) | segment 0 | segment 1 | ... | segment n-1 (last) |
//!   segment i = ChaCha20-Poly1305 of plaintext bytes [i * 64 KiB, (i + 1) * 64 KiB),
//!               then its 16-byte tag; nonce = 7 zero bytes, i (4 bytes big-endian),
//!               1 on the last segment and 0 on the others (the STREAM construction)
//! ```
//!
//! The file key depends on the file's name and on the random nonce in its header, so no
//! two files, nor two versions of one file, share a key; the segment's number and the
//! last-segment flag in the AEAD nonce mean that segments cannot be reordered, dropped or
//! cut off unnoticed; the file's name is also the associated data of every segment. A
//! segment can be opened on its own, so a reader takes any byte range of a file without
//! the rest: restore fills memory frame by frame and a lazy restore reads the one page
//! faulted on.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::stream::{NewStream, StreamBE32, StreamPrimitive};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::{ImageError, Result};

/// Bytes of a key.
pub const KEY_LEN: usize = 32;
/// Longest key file read: hex text with some white space around it.
const MAX_KEY_FILE: usize = 256;
/// What the manifest's [`Encryption::cipher`] says for the scheme this module writes.
pub const CIPHER: &str = "chacha20poly1305-stream64k-hkdf-sha256";
/// Plaintext bytes per sealed segment: small enough that reading one page costs little,
/// large enough that the 16-byte tags cost nothing (0.02 %).
pub const SEGMENT: usize = 64 << 10;
/// Bytes added to each segment: the Poly1305 tag.
const TAG: usize = 16;
/// The first bytes of a sealed file.
const MAGIC: &[u8; 8] = b"TORPSEAL";
/// Bytes of the random nonce after the magic.
const FILE_NONCE: usize = 16;
/// Bytes before the first segment.
pub const HEADER: usize = MAGIC.len() + FILE_NONCE;
/// Bytes of the image's salt.
const SALT: usize = 16;

type Stream = StreamBE32<ChaCha20Poly1305>;

/// Why a key cannot be read or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file cannot be read.
    #[error("cannot read the key file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The key file holds something else than a key.
    #[error(
        "the key file {path} does not hold a key: it must be {KEY_LEN} bytes, or their hex \
         or base64 text (`torpor keygen FILE` makes one)"
    )]
    Format {
        /// The file.
        path: PathBuf,
    },
    /// A new key file cannot be written.
    #[error("cannot write the key file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The system's random source failed.
    #[error("cannot get random bytes from the system: {0}")]
    Random(getrandom::Error),
}

/// The key that opens an image. Wiped from memory when dropped.
#[derive(Clone)]
pub struct Key(Zeroizing<[u8; KEY_LEN]>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Random bytes from the kernel.
fn random<const N: usize>() -> std::result::Result<[u8; N], KeyError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(KeyError::Random)?;
    Ok(b)
}

impl Key {
    /// A new random key.
    pub fn generate() -> std::result::Result<Self, KeyError> {
        Ok(Self(Zeroizing::new(random()?)))
    }

    /// Reads a key file: 32 bytes, or their hex or (standard) base64 text, with or without
    /// a final newline.
    pub fn load(path: &Path) -> std::result::Result<Self, KeyError> {
        use std::io::Read;
        let err = |source| KeyError::Read { path: path.to_path_buf(), source };
        // A key in any form is short: a bigger file (a device, a wrong path) is no key,
        // and is not read whole.
        let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_KEY_FILE + 1));
        File::open(path)
            .and_then(|f| f.take(MAX_KEY_FILE as u64 + 1).read_to_end(&mut bytes))
            .map_err(err)?;
        if bytes.len() > MAX_KEY_FILE {
            return Err(KeyError::Format { path: path.to_path_buf() });
        }
        Self::parse(&bytes).ok_or_else(|| KeyError::Format { path: path.to_path_buf() })
    }

    /// A key from the bytes of a key file, if they hold one.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        use base64::Engine;
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        if bytes.len() == KEY_LEN {
            key.copy_from_slice(bytes);
            return Some(Self(key));
        }
        let text = bytes.trim_ascii();
        if hex::decode_to_slice(text, key.as_mut_slice()).is_ok() {
            return Some(Self(key));
        }
        let decoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(text).ok()?);
        (decoded.len() == KEY_LEN).then(|| {
            key.copy_from_slice(&decoded);
            Self(key)
        })
    }

    /// Writes the key into a new file at `path`, as hex text, mode 0600; refuses to
    /// replace any file (a key lost is every image made with it lost).
    pub fn save_new(&self, path: &Path) -> std::result::Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| KeyError::Write { path: path.to_path_buf(), source };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        let text = Zeroizing::new(format!("{}\n", hex::encode(self.0.as_slice())));
        f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(err)
    }
}

/// What the manifest of an encrypted image records to open it. Nothing here helps
/// without the key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Encryption {
    /// The scheme: [`CIPHER`].
    pub cipher: String,
    /// Random salt of the key derivation, in hex.
    pub salt: String,
    /// A value derived from the key, in hex: a key that derives another is the wrong one.
    pub key_check: String,
    /// HMAC-SHA256 of the manifest (see [`Sealing::manifest_mac`]), in hex.
    pub mac: String,
}

/// The keys of one image, derived from the user's key and the image's salt.
pub struct Sealing {
    salt: [u8; SALT],
    kdf: Hkdf<Sha256>,
    key_check: [u8; 32],
}

impl std::fmt::Debug for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealing(..)")
    }
}

impl Sealing {
    /// The keys of a new image: a fresh salt.
    pub fn create(key: &Key) -> std::result::Result<Self, KeyError> {
        Ok(Self::derive(key, random()?))
    }

    fn derive(key: &Key, salt: [u8; SALT]) -> Self {
        let kdf = Hkdf::<Sha256>::new(Some(&salt), key.0.as_slice());
        let mut key_check = [0u8; 32];
        kdf.expand(b"torpor-image key check", &mut key_check).expect("32 bytes fit HKDF");
        Self { salt, kdf, key_check }
    }

    /// The keys of an existing image, if `key` is the one it was made with; `path` (the
    /// manifest) is for messages.
    pub fn open(key: &Key, e: &Encryption, path: &Path) -> Result<Self> {
        let corrupt = |why: String| ImageError::Corrupt { path: path.to_path_buf(), why };
        if e.cipher != CIPHER {
            return Err(corrupt(format!("encrypted with {:?}, not {CIPHER:?}", e.cipher)));
        }
        let mut salt = [0u8; SALT];
        hex::decode_to_slice(&e.salt, &mut salt)
            .map_err(|_| corrupt(format!("its salt {:?} is not {SALT} hex bytes", e.salt)))?;
        let s = Self::derive(key, salt);
        if hex::encode(s.key_check) != e.key_check {
            return Err(ImageError::WrongKey { path: path.to_path_buf() });
        }
        Ok(s)
    }

    /// What the manifest records, with `mac` empty until [`Sealing::manifest_mac`].
    pub fn encryption(&self) -> Encryption {
        Encryption {
            cipher: CIPHER.to_string(),
            salt: hex::encode(self.salt),
            key_check: hex::encode(self.key_check),
            mac: String::new(),
        }
    }

    /// HMAC-SHA256 of a manifest's encoding, in hex.
    pub fn manifest_mac(&self, body: &[u8]) -> String {
        hex::encode(self.mac(body).finalize().into_bytes())
    }

    /// Whether `mac` is the HMAC of `body`, compared in constant time.
    pub fn check_manifest_mac(&self, body: &[u8], mac: &str) -> bool {
        let Ok(tag) = hex::decode(mac) else { return false };
        self.mac(body).verify_slice(&tag).is_ok()
    }

    /// The HMAC of `body` with the manifest's key.
    fn mac(&self, body: &[u8]) -> Hmac<Sha256> {
        let mut key = Zeroizing::new([0u8; 32]);
        self.kdf.expand(b"torpor-image manifest mac", key.as_mut_slice()).expect("32 bytes fit");
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key.as_slice()).expect("any length");
        m.update(body);
        m
    }

    /// The cipher of file `name` with the nonce of its header.
    fn stream(&self, name: &str, nonce: &[u8; FILE_NONCE]) -> Stream {
        let mut info = b"torpor-image file\0".to_vec();
        info.extend_from_slice(name.as_bytes());
        info.push(0);
        info.extend_from_slice(nonce);
        let mut key = Zeroizing::new([0u8; 32]);
        self.kdf.expand(&info, key.as_mut_slice()).expect("32 bytes fit HKDF");
        let aead = ChaCha20Poly1305::new(key.as_slice().into());
        // The key is new for every file, so the STREAM nonce prefix need not vary.
        Stream::from_aead(aead, &Default::default())
    }

    /// Starts sealing file `name`: the returned sealer's [`Sealer::header`] comes first.
    pub fn sealer(&self, name: &str) -> std::result::Result<Sealer, KeyError> {
        let nonce: [u8; FILE_NONCE] = random()?;
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&nonce);
        Ok(Sealer {
            stream: self.stream(name, &nonce),
            name: name.to_string(),
            header: Some(header),
            plain: Vec::with_capacity(SEGMENT),
            segment: 0,
            scratch: Vec::with_capacity(SEGMENT + TAG),
        })
    }

    /// Opens the sealed file `file` named `name` in the image, `stored` bytes long; `path`
    /// is for messages.
    pub fn open_file(
        &self,
        file: File,
        name: &str,
        stored: u64,
        path: &Path,
    ) -> Result<SealedFile> {
        self.open_source(Source::File(file), name, stored, path)
    }

    /// Opens a sealed file of the image already read whole.
    pub fn open_bytes(&self, bytes: Vec<u8>, name: &str, path: &Path) -> Result<SealedFile> {
        let stored = bytes.len() as u64;
        self.open_source(Source::Bytes(bytes), name, stored, path)
    }

    fn open_source(
        &self,
        file: Source,
        name: &str,
        stored: u64,
        path: &Path,
    ) -> Result<SealedFile> {
        let corrupt = |why: String| ImageError::Corrupt { path: path.to_path_buf(), why };
        let Some(plain_len) = plain_len(stored) else {
            return Err(corrupt(format!("{stored} bytes cannot be a sealed file")));
        };
        let mut head = [0u8; HEADER];
        file.read_exact_at(&mut head, 0)
            .map_err(|source| ImageError::Read { path: path.to_path_buf(), source })?;
        if &head[..MAGIC.len()] != MAGIC {
            return Err(corrupt("it does not start as a sealed file does".into()));
        }
        let nonce: [u8; FILE_NONCE] = head[MAGIC.len()..].try_into().expect("header length");
        Ok(SealedFile {
            stream: self.stream(name, &nonce),
            name: name.to_string(),
            path: path.to_path_buf(),
            file,
            plain_len,
        })
    }
}

/// Plaintext bytes of a sealed file of `stored` bytes, if that length is possible.
pub fn plain_len(stored: u64) -> Option<u64> {
    let body = stored.checked_sub(HEADER as u64)?;
    let seg = (SEGMENT + TAG) as u64;
    let n = body.div_ceil(seg).max(1);
    let plain = body.checked_sub(n * TAG as u64)?;
    // Every segment but the last is full; the last holds at least one byte unless it is
    // the only one.
    // Less than a tag after the last whole segment is no segment at all.
    let last = plain.checked_sub((n - 1) * SEGMENT as u64)?;
    (last > 0 || n == 1).then_some(plain)
}

/// Seals one file as it is written.
pub struct Sealer {
    stream: Stream,
    name: String,
    /// The header, until it is handed out.
    header: Option<Vec<u8>>,
    /// Plaintext of the segment being filled.
    plain: Vec<u8>,
    segment: u32,
    scratch: Vec<u8>,
}

impl Sealer {
    /// Seals `data`, appending to `out` what is ready to be written: the header first,
    /// then every full segment. A full segment waits until more data comes, since only
    /// then is it known not to be the last.
    pub fn seal(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        if let Some(h) = self.header.take() {
            out.extend_from_slice(&h);
        }
        while !data.is_empty() {
            if self.plain.len() == SEGMENT {
                self.flush(false, out)?;
            }
            let n = (SEGMENT - self.plain.len()).min(data.len());
            self.plain.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        Ok(())
    }

    /// Seals what is left as the last segment.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        if let Some(h) = self.header.take() {
            out.extend_from_slice(&h);
        }
        self.flush(true, out)
    }

    fn flush(&mut self, last: bool, out: &mut Vec<u8>) -> io::Result<()> {
        self.scratch.clear();
        self.scratch.extend_from_slice(&self.plain);
        self.stream
            .encrypt_in_place(self.segment, last, self.name.as_bytes(), &mut self.scratch)
            .map_err(|_| io::Error::other("the cipher refused a segment"))?;
        self.segment = self.segment.checked_add(1).ok_or_else(|| {
            io::Error::other(format!("more than {} segments in one file", u32::MAX))
        })?;
        out.extend_from_slice(&self.scratch);
        self.plain.clear();
        Ok(())
    }
}

/// Where the bytes of a sealed file are.
enum Source {
    File(File),
    Bytes(Vec<u8>),
}

impl Source {
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        match self {
            Source::File(f) => f.read_exact_at(buf, at),
            Source::Bytes(b) => {
                let end = at.checked_add(buf.len() as u64).filter(|&e| e <= b.len() as u64);
                let end = end.ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
                buf.copy_from_slice(&b[at as usize..end as usize]);
                Ok(())
            }
        }
    }
}

/// A sealed file of an image, opened for reading any byte range of its plaintext.
pub struct SealedFile {
    stream: Stream,
    name: String,
    path: PathBuf,
    file: Source,
    plain_len: u64,
}

impl SealedFile {
    /// Plaintext bytes.
    pub fn len(&self) -> u64 {
        self.plain_len
    }

    /// Whether the plaintext is empty.
    pub fn is_empty(&self) -> bool {
        self.plain_len == 0
    }

    /// Number of segments.
    fn segments(&self) -> u64 {
        self.plain_len.div_ceil(SEGMENT as u64).max(1)
    }

    /// Reads and opens segment `i` into `out`, replacing its content.
    pub fn read_segment(&self, i: u64, out: &mut Vec<u8>) -> Result<()> {
        let count = self.segments();
        if i >= count {
            return Err(ImageError::Corrupt {
                path: self.path.clone(),
                why: format!("segment {i} is past its end ({count} segments)"),
            });
        }
        let plain_start = i * SEGMENT as u64;
        let plain = (self.plain_len - plain_start).min(SEGMENT as u64) as usize;
        let at = HEADER as u64 + i * (SEGMENT + TAG) as u64;
        out.clear();
        out.resize(plain + TAG, 0);
        self.file
            .read_exact_at(out, at)
            .map_err(|source| ImageError::Read { path: self.path.clone(), source })?;
        let last = i + 1 == count;
        self.stream.decrypt_in_place(i as u32, last, self.name.as_bytes(), out).map_err(|_| {
            ImageError::Tampered {
                path: self.path.clone(),
                segment: i,
                from: at,
                to: at + (plain + TAG) as u64,
            }
        })
    }

    /// Opens every segment, reporting the first that fails authentication.
    pub fn verify(&self) -> Result<()> {
        let mut seg = Vec::with_capacity(SEGMENT + TAG);
        (0..self.segments()).try_for_each(|i| self.read_segment(i, &mut seg))
    }

    /// Fills `buf` with the plaintext from offset `off`.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let end = off.checked_add(buf.len() as u64).filter(|&e| e <= self.plain_len);
        if end.is_none() {
            return Err(ImageError::Corrupt {
                path: self.path.clone(),
                why: format!(
                    "{} bytes at offset {off} are past its end ({} bytes)",
                    buf.len(),
                    self.plain_len
                ),
            });
        }
        let mut seg = Vec::with_capacity(SEGMENT + TAG);
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            let i = at / SEGMENT as u64;
            self.read_segment(i, &mut seg)?;
            let from = (at - i * SEGMENT as u64) as usize;
            let n = (seg.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&seg[from..from + n]);
            done += n;
        }
        Ok(())
    }

    /// Writes the whole plaintext into `out`, segment by segment.
    pub fn copy_to(&self, out: &mut dyn io::Write) -> Result<()> {
        let mut seg = Vec::with_capacity(SEGMENT + TAG);
        for i in 0..self.segments() {
            self.read_segment(i, &mut seg)?;
            out.write_all(&seg).map_err(|source| ImageError::Write {
                path: PathBuf::from(format!("the copy of {}", self.path.display())),
                source,
            })?;
        }
        Ok(())
    }

    /// The whole plaintext.
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.plain_len as usize);
        self.copy_to(&mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(s: &Sealing, name: &str, data: &[u8], pieces: usize) -> Vec<u8> {
        let mut sealer = s.sealer(name).unwrap();
        let mut out = Vec::new();
        for p in data.chunks(pieces.max(1)) {
            sealer.seal(p, &mut out).unwrap();
        }
        sealer.finish(&mut out).unwrap();
        out
    }

    fn open(s: &Sealing, name: &str, bytes: &[u8]) -> Result<SealedFile> {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), bytes).unwrap();
        let f = File::open(tmp.path()).unwrap();
        s.open_file(f, name, bytes.len() as u64, Path::new(name))
    }

    #[test]
    fn every_length_round_trips_and_any_range_reads_back() {
        let s = Sealing::create(&Key::generate().unwrap()).unwrap();
        let lens = [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT, 3 * SEGMENT + 77];
        // Pieces smaller than a segment, of one, and of several.
        let pieces = [10_000, SEGMENT, 2 * SEGMENT + 5];
        for (len, piece) in lens.iter().flat_map(|&l| pieces.iter().map(move |&p| (l, p))) {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 300) as u8).collect();
            let sealed = seal(&s, "pages-1.img", &data, piece);
            assert_eq!(plain_len(sealed.len() as u64), Some(len as u64), "{len} by {piece}");
            let f = open(&s, "pages-1.img", &sealed).unwrap();
            assert_eq!(f.read_all().unwrap(), data);
            if len > 10 {
                let mut buf = vec![0u8; len - 10];
                f.read_at(&mut buf, 5).unwrap();
                assert_eq!(buf, data[5..len - 5]);
            }
        }
    }

    /// Stored length of `plain` content bytes.
    fn sealed_len(plain: u64) -> u64 {
        HEADER as u64 + TAG as u64 * plain.div_ceil(SEGMENT as u64).max(1) + plain
    }

    #[test]
    fn only_lengths_a_sealed_file_can_have_are_accepted() {
        for stored in 0..3 * (SEGMENT + TAG) as u64 + 100 {
            if let Some(plain) = plain_len(stored) {
                assert_eq!(sealed_len(plain), stored, "{stored}");
            }
        }
        for plain in (0..5 * SEGMENT as u64).step_by(4093) {
            assert_eq!(plain_len(sealed_len(plain)), Some(plain), "{plain}");
        }
        let seg = (SEGMENT + TAG) as u64;
        for bad in [0, HEADER as u64, HEADER as u64 + 15, HEADER as u64 + seg + 5] {
            assert_eq!(plain_len(bad), None, "{bad}");
        }
    }

    #[test]
    fn plaintext_does_not_show() {
        let s = Sealing::create(&Key::generate().unwrap()).unwrap();
        let data = b"the secret is 42 ".repeat(10_000);
        let sealed = seal(&s, "tree.json", &data, 4096);
        assert!(!sealed.windows(13).any(|w| w == b"the secret is"));
    }

    #[test]
    fn flipped_byte_cut_end_and_renamed_file_are_refused() {
        let s = Sealing::create(&Key::generate().unwrap()).unwrap();
        let data = vec![7u8; 2 * SEGMENT + 100];
        let sealed = seal(&s, "pages-1.img", &data, SEGMENT);
        let mut bad = sealed.clone();
        bad[HEADER + SEGMENT + TAG + 5] ^= 1;
        let f = open(&s, "pages-1.img", &bad).unwrap();
        f.read_segment(0, &mut Vec::new()).unwrap();
        let e = f.read_segment(1, &mut Vec::new()).unwrap_err().to_string();
        assert!(e.contains("pages-1.img") && e.contains("segment 1"), "{e}");

        // Two whole segments, the second not marked last.
        let cut = &sealed[..HEADER + 2 * (SEGMENT + TAG)];
        let e = open(&s, "pages-1.img", cut).unwrap().read_all().unwrap_err();
        assert!(matches!(e, ImageError::Tampered { segment: 1, .. }), "{e}");

        let e = open(&s, "pages-2.img", &sealed).unwrap().read_all().unwrap_err();
        assert!(matches!(e, ImageError::Tampered { segment: 0, .. }), "{e}");
    }

    #[test]
    fn wrong_key_is_told_apart_from_a_damaged_manifest() {
        let key = Key::generate().unwrap();
        let s = Sealing::create(&key).unwrap();
        let mut e = s.encryption();
        let body = b"{\"files\": []}";
        e.mac = s.manifest_mac(body);
        let opened = Sealing::open(&key, &e, Path::new("m")).unwrap();
        assert!(opened.check_manifest_mac(body, &e.mac));
        assert!(!opened.check_manifest_mac(b"{\"files\": [1]}", &e.mac));
        let other = Key::generate().unwrap();
        let err = Sealing::open(&other, &e, Path::new("m")).unwrap_err();
        assert!(matches!(err, ImageError::WrongKey { .. }), "{err}");
    }

    #[test]
    fn key_files_in_every_form() {
        let raw: Vec<u8> = (0..32).collect();
        let hex_text = format!("{}\n", hex::encode(&raw));
        let b64 = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(&raw)
        };
        for form in [raw.clone(), hex_text.into_bytes(), b64.into_bytes()] {
            assert_eq!(Key::parse(&form).unwrap().0.as_slice(), raw.as_slice());
        }
        assert!(Key::parse(b"short").is_none());
        assert!(Key::parse(&[1u8; 33]).is_none());

        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("k");
        let k = Key::generate().unwrap();
        k.save_new(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Key::load(&path).unwrap().0.as_slice(), k.0.as_slice());
        assert!(matches!(k.save_new(&path), Err(KeyError::Write { .. })));
        assert!(matches!(Key::load(Path::new("/dev/zero")), Err(KeyError::Format { .. })));
    }
}
