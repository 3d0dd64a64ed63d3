//! The migration protocol: frames on one stream from `torpor migrate` (the source) to
//! `torpor serve` (the destination), and the few answers back.
//!
//! ```text
//!  frame  = kind (u8) | length (u32, little endian) | payload (length bytes)
//!
//!  source                                 destination
//!    Begin(magic, version)  ───────────▶
//!                           ◀───────────  Ready | Failed(why)
//!    Create(id, name)       ───────────▶  file `name` of the image, mode 0600
//!    Append(id, bytes) ...  ───────────▶  appended to it, front to back
//!    Finish(id)             ───────────▶  closed
//!    Remove(name)           ───────────▶  a file given up
//!    Commit(manifest)       ───────────▶  manifest written, image restored
//!                           ◀───────────  Restored(pid) | Failed(why)
//!    Abandon                ───────────▶  everything received removed
//! ```
//!
//! The destination may send `Failed` at any time and close the stream; the source reads
//! it when its next write fails. A stream that ends before `Restored` was read is a
//! failed migration on both sides.
//!
//! The framing is written by hand: the messages are few and flat, and most of the bytes
//! are page data that goes from the dump's buffers to the socket unchanged; a
//! serialization crate would add a copy and a schema without adding safety. The reader
//! bounds every length before it allocates.

use std::io::{self, Read, Write};

/// Opens a Begin frame: "this is a torpor image stream".
const MAGIC: &[u8; 8] = b"TORPORMG";
/// Bumped whenever a frame changes meaning; both ends must speak the same.
const VERSION: u32 = 1;
/// The longest payload accepted: appends are sent in pieces of [`CHUNK`], and a manifest
/// or a record file is far smaller.
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// How many bytes of page data one Append frame carries at most.
pub const CHUNK: usize = 1 << 20;
/// The longest file name accepted (a Linux name component).
const MAX_NAME: usize = 255;

/// One message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Begin { version: u32 },
    Create { id: u32, name: String },
    Append { id: u32, data: Vec<u8> },
    Finish { id: u32 },
    Remove { name: String },
    Commit { manifest: Vec<u8> },
    Abandon,
    Ready,
    Restored { pid: i32 },
    Failed { why: String },
}

const BEGIN: u8 = 1;
const CREATE: u8 = 2;
const APPEND: u8 = 3;
const FINISH: u8 = 5;
const REMOVE: u8 = 6;
const COMMIT: u8 = 7;
const ABANDON: u8 = 8;
const READY: u8 = 64;
const RESTORED: u8 = 65;
const FAILED: u8 = 66;

impl Frame {
    /// The Begin frame of this version of torpor.
    pub fn begin() -> Frame {
        Frame::Begin { version: VERSION }
    }

    /// Writes the frame (not flushed).
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        match self {
            Frame::Append { id, data } => write_append(w, *id, data),
            _ => {
                let (kind, payload) = self.encode();
                header(w, kind, payload.len())?;
                w.write_all(&payload)
            }
        }
    }

    fn encode(&self) -> (u8, Vec<u8>) {
        let with_id = |id: &u32, rest: &[u8]| [&id.to_le_bytes()[..], rest].concat();
        match self {
            Frame::Begin { version } => (BEGIN, [&MAGIC[..], &version.to_le_bytes()].concat()),
            Frame::Create { id, name } => (CREATE, with_id(id, name.as_bytes())),
            Frame::Append { id, data } => (APPEND, with_id(id, data)),
            Frame::Finish { id } => (FINISH, with_id(id, &[])),
            Frame::Remove { name } => (REMOVE, name.as_bytes().to_vec()),
            Frame::Commit { manifest } => (COMMIT, manifest.clone()),
            Frame::Abandon => (ABANDON, Vec::new()),
            Frame::Ready => (READY, Vec::new()),
            Frame::Restored { pid } => (RESTORED, pid.to_le_bytes().to_vec()),
            Frame::Failed { why } => (FAILED, why.as_bytes().to_vec()),
        }
    }

    /// Reads one frame; `Ok(None)` when the stream ends cleanly between two frames.
    pub fn read_from(r: &mut impl Read) -> io::Result<Option<Frame>> {
        let mut head = [0u8; 5];
        match r.read(&mut head[..1])? {
            0 => return Ok(None),
            _ => r.read_exact(&mut head[1..])?,
        }
        let kind = head[0];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        if len > MAX_PAYLOAD {
            return Err(bad(format!("a frame of {len} bytes (at most {MAX_PAYLOAD})")));
        }
        let mut payload = vec![0u8; len as usize];
        r.read_exact(&mut payload)?;
        Frame::decode(kind, payload).map(Some)
    }

    fn decode(kind: u8, mut p: Vec<u8>) -> io::Result<Frame> {
        let id = |p: &[u8]| -> io::Result<u32> {
            let b = p.get(..4).ok_or_else(|| bad(format!("frame {kind} without its file id")))?;
            Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
        };
        let name = |b: &[u8]| -> io::Result<String> {
            let name = std::str::from_utf8(b).map_err(|_| bad("a file name not in UTF-8"))?;
            let plain = !name.is_empty()
                && name.len() <= MAX_NAME
                && name != "."
                && name != ".."
                && !name.contains(['/', '\0']);
            if !plain {
                return Err(bad(format!("file name {name:?} is not one plain path component")));
            }
            Ok(name.to_string())
        };
        let empty = |p: &[u8], n: usize| -> io::Result<()> {
            match p.len() == n {
                true => Ok(()),
                false => Err(bad(format!("frame {kind} of {} bytes, expected {n}", p.len()))),
            }
        };
        Ok(match kind {
            BEGIN => {
                if p.len() != 12 || &p[..8] != MAGIC {
                    return Err(bad("the stream does not start as a torpor migration"));
                }
                Frame::Begin { version: id(&p[8..])? }
            }
            CREATE => Frame::Create { id: id(&p)?, name: name(&p[4..])? },
            APPEND => {
                let id = id(&p)?;
                p.drain(..4);
                Frame::Append { id, data: p }
            }
            FINISH => {
                empty(&p, 4)?;
                Frame::Finish { id: id(&p)? }
            }
            REMOVE => Frame::Remove { name: name(&p)? },
            COMMIT => Frame::Commit { manifest: p },
            ABANDON => {
                empty(&p, 0)?;
                Frame::Abandon
            }
            READY => {
                empty(&p, 0)?;
                Frame::Ready
            }
            RESTORED => {
                empty(&p, 4)?;
                Frame::Restored { pid: id(&p)? as i32 }
            }
            FAILED => Frame::Failed { why: String::from_utf8_lossy(&p).into_owned() },
            _ => return Err(bad(format!("unknown frame kind {kind}"))),
        })
    }
}

/// Whether a Begin frame's version is the one this torpor speaks; the refusal if not.
pub fn check_version(version: u32) -> Result<(), String> {
    match version == VERSION {
        true => Ok(()),
        false => Err(format!(
            "the source speaks migration protocol version {version}, this torpor {VERSION}; \
             use the same torpor version on both hosts"
        )),
    }
}

fn header(w: &mut impl Write, kind: u8, len: usize) -> io::Result<()> {
    let len = u32::try_from(len).ok().filter(|&l| l <= MAX_PAYLOAD);
    let len = len.ok_or_else(|| bad("a frame longer than the protocol allows"))?;
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head)
}

/// Writes page data as Append frames of at most [`CHUNK`] bytes, without copying it.
pub fn write_append(w: &mut impl Write, id: u32, data: &[u8]) -> io::Result<()> {
    for piece in data.chunks(CHUNK) {
        header(w, APPEND, piece.len() + 4)?;
        w.write_all(&id.to_le_bytes())?;
        w.write_all(piece)?;
    }
    Ok(())
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("migration protocol: {}", what.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) -> Frame {
        let mut buf = Vec::new();
        f.write_to(&mut buf).unwrap();
        let mut r = &buf[..];
        let back = Frame::read_from(&mut r).unwrap().unwrap();
        assert!(r.is_empty(), "{f:?} left bytes behind");
        back
    }

    #[test]
    fn every_frame_reads_back_as_written() {
        let frames = [
            Frame::begin(),
            Frame::Create { id: 7, name: "pages-1.img".into() },
            Frame::Append { id: 7, data: vec![1, 2, 3] },
            Frame::Finish { id: 7 },
            Frame::Remove { name: "pages-1.img".into() },
            Frame::Commit { manifest: b"{}".to_vec() },
            Frame::Abandon,
            Frame::Ready,
            Frame::Restored { pid: 4242 },
            Frame::Failed { why: "no room".into() },
        ];
        for f in frames {
            assert_eq!(roundtrip(f.clone()), f);
        }
    }

    #[test]
    fn a_large_append_goes_in_pieces() {
        let data = vec![9u8; CHUNK * 2 + 5];
        let mut buf = Vec::new();
        write_append(&mut buf, 3, &data).unwrap();
        let mut r = &buf[..];
        let mut got = Vec::new();
        while let Some(Frame::Append { id, data }) = Frame::read_from(&mut r).unwrap() {
            assert_eq!(id, 3);
            assert!(data.len() <= CHUNK);
            got.extend(data);
        }
        assert_eq!(got, data);
    }

    #[test]
    fn hostile_frames_are_refused() {
        let refused = |bytes: &[u8]| {
            let mut r = bytes;
            Frame::read_from(&mut r).expect_err("accepted a hostile frame")
        };
        // Too long to allocate.
        refused(&[APPEND, 0xff, 0xff, 0xff, 0xff]);
        // A name that climbs out of the image directory.
        refused(&[CREATE, 8, 0, 0, 0, 1, 0, 0, 0, b'.', b'.', b'/', b'x']);
        // Not a torpor stream.
        refused(&[BEGIN, 12, 0, 0, 0, b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'1', 1, 0, 0, 0]);
        // Unknown kind, truncated payload.
        refused(&[99, 0, 0, 0, 0]);
        refused(&[FINISH, 4, 0, 0, 0, 1]);
    }

    #[test]
    fn another_version_is_refused_with_advice() {
        assert!(check_version(VERSION).is_ok());
        assert!(check_version(VERSION + 1).unwrap_err().contains("same torpor version"));
    }
}
