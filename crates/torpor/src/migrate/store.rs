//! The source side: an image [`Store`] whose files go over a [`Link`] to `torpor serve`.
//!
//! Every sink shares the one connection; their frames interleave, each naming its file.
//! [`Store::commit`] returns only once the destination has restored the image and said
//! so: that answer is the commit point of the migration, after which the dump ends the
//! source's process. Any failure before it (a refusal, a cut connection, a timeout)
//! fails the dump, which then lets the process run on as before.

use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use torpor_image::{Sink, Store};

use super::link::Link;
use super::wire::{self, Frame};

/// How much the writer gathers before a send: large writes keep TLS records full.
const BUFFER: usize = 4 << 20;

/// The connection and what became of it.
struct Conn {
    out: BufWriter<Box<dyn super::link::Stream>>,
    /// Why the link is unusable, once it is: every later call fails with this.
    broken: Option<String>,
}

/// Cheap to clone: every clone is the same connection.
#[derive(Clone)]
pub struct NetStore(Arc<Inner>);

struct Inner {
    conn: Mutex<Conn>,
    tcp: std::net::TcpStream,
    /// The destination, for messages.
    to: String,
    next_id: AtomicU32,
    sent: AtomicU64,
    /// The restored root's pid on the destination, once committed.
    restored: Mutex<Option<i32>>,
    /// How long the destination may take to restore after the commit.
    restore_timeout: Duration,
}

impl NetStore {
    pub fn new(link: Link, to: &str, restore_timeout: Duration) -> NetStore {
        NetStore(Arc::new(Inner {
            conn: Mutex::new(Conn {
                out: BufWriter::with_capacity(BUFFER, link.stream),
                broken: None,
            }),
            tcp: link.tcp,
            to: to.to_string(),
            next_id: AtomicU32::new(1),
            sent: AtomicU64::new(0),
            restored: Mutex::new(None),
            restore_timeout,
        }))
    }

    /// Bytes handed to the connection so far (frames included).
    pub fn bytes_sent(&self) -> u64 {
        self.0.sent.load(Ordering::Relaxed)
    }

    /// The pid the destination woke the process as.
    pub fn restored_pid(&self) -> Option<i32> {
        *self.0.restored.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// Runs `f` on the connection; the first failure breaks it for good, with the
    /// destination's own reason if it sent one before closing.
    fn with<T>(&self, f: impl FnOnce(&mut Conn) -> io::Result<T>) -> io::Result<T> {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &c.broken {
            return Err(io::Error::other(why.clone()));
        }
        match f(&mut c) {
            Ok(v) => Ok(v),
            Err(e) => {
                let silent =
                    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut);
                let why = match self.reason_sent(&mut c) {
                    Some(refusal) => format!("{} refused the migration: {refusal}", self.to),
                    // A cut network: no reset, only silence until the deadline.
                    None if silent => format!(
                        "the connection to {} timed out: no answer within {} s (--timeout)",
                        self.to,
                        self.restore_timeout.as_secs()
                    ),
                    None => format!("the connection to {} failed: {e}", self.to),
                };
                c.broken = Some(why.clone());
                Err(io::Error::new(e.kind(), why))
            }
        }
    }

    /// A Failed frame the destination sent before it closed the connection, if any.
    fn reason_sent(&self, c: &mut Conn) -> Option<String> {
        let _ = self.tcp.set_read_timeout(Some(Duration::from_secs(1)));
        match Frame::read_from(c.out.get_mut()) {
            Ok(Some(Frame::Failed { why })) => Some(why),
            _ => None,
        }
    }

    fn send(&self, frame: &Frame) -> io::Result<()> {
        self.with(|c| self.put(c, frame))
    }

    fn put(&self, c: &mut Conn, frame: &Frame) -> io::Result<()> {
        let mut counted = Counted { inner: &mut c.out, n: 0 };
        frame.write_to(&mut counted)?;
        self.sent.fetch_add(counted.n, Ordering::Relaxed);
        Ok(())
    }

    /// Sends `frame` and waits for the destination's answer to it.
    fn ask(&self, frame: &Frame, timeout: Duration) -> io::Result<Frame> {
        self.with(|c| {
            self.put(c, frame)?;
            c.out.flush()?;
            self.tcp.set_read_timeout(Some(timeout))?;
            match Frame::read_from(c.out.get_mut())? {
                Some(f) => Ok(f),
                None => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the destination closed the connection without an answer",
                )),
            }
        })
    }

    /// A Failed answer as the error the dump reports; anything else unexpected too.
    fn refused(&self, answer: Frame, to_what: &str) -> io::Error {
        let why = match answer {
            Frame::Failed { why } => format!("{} refused the migration: {why}", self.to),
            other => format!("{} answered {to_what} with {other:?}", self.to),
        };
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).broken = Some(why.clone());
        io::Error::other(why)
    }
}

/// A writer that counts what goes through.
struct Counted<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Store for NetStore {
    fn begin(&self) -> io::Result<()> {
        // The destination says it can take an image before anything is frozen.
        match self.0.ask(&Frame::begin(), self.0.restore_timeout) {
            Ok(Frame::Ready) => Ok(()),
            Ok(other) => Err(self.0.refused(other, "the start")),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(io::Error::new(
                e.kind(),
                format!("{e}; is `torpor serve` what listens on {}?", self.0.to),
            )),
            Err(e) => Err(e),
        }
    }

    fn create(&self, name: &str) -> io::Result<Box<dyn Sink>> {
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        self.0.send(&Frame::Create { id, name: name.to_string() })?;
        Ok(Box::new(NetSink { store: Arc::clone(&self.0), id }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.0.send(&Frame::Remove { name: name.to_string() })
    }

    fn commit(&self, manifest: &[u8]) -> io::Result<()> {
        let inner = &self.0;
        match inner.ask(&Frame::Commit { manifest: manifest.to_vec() }, inner.restore_timeout)? {
            Frame::Restored { pid } => {
                *inner.restored.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid);
                Ok(())
            }
            other => Err(inner.refused(other, "the commit")),
        }
    }

    fn abandon(&self, _names: &[String]) {
        // The destination removes everything it received when told, or when the
        // connection ends without a commit.
        let inner = &self.0;
        let _ = inner.with(|c| {
            inner.put(c, &Frame::Abandon)?;
            c.out.flush()
        });
        let _ = inner.tcp.shutdown(std::net::Shutdown::Both);
    }
}

/// One file of the image on its way.
struct NetSink {
    store: Arc<Inner>,
    id: u32,
}

impl Sink for NetSink {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        let id = self.id;
        self.store.with(|c| {
            let mut counted = Counted { inner: &mut c.out, n: 0 };
            wire::write_append(&mut counted, id, data)?;
            self.store.sent.fetch_add(counted.n, Ordering::Relaxed);
            Ok(())
        })
    }

    /// Between pre-copy rounds: what was gathered goes out while the process runs.
    fn checkpoint(&mut self) -> io::Result<()> {
        self.store.with(|c| c.out.flush())
    }

    /// The bytes are sent, not yet known to be stored: the destination's answer to the
    /// commit says that they all were, for every file at once.
    fn finish(self: Box<Self>) -> io::Result<()> {
        self.store.send(&Frame::Finish { id: self.id })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::BufReader;
    use std::net::{TcpListener, TcpStream};
    use std::path::Path;

    use super::*;
    use torpor_image::ImageWriter;

    /// A destination that takes frames until the commit, keeps the files it was sent,
    /// and answers the commit with `answer`.
    fn destination(
        answer: Frame,
    ) -> (NetStore, std::thread::JoinHandle<BTreeMap<String, Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let dest = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s);
            let mut names = BTreeMap::new();
            let mut files = BTreeMap::new();
            while let Some(f) = Frame::read_from(&mut r).unwrap() {
                match f {
                    Frame::Begin { .. } => Frame::Ready.write_to(r.get_mut()).unwrap(),
                    Frame::Create { id, name } => {
                        files.insert(name.clone(), Vec::new());
                        names.insert(id, name);
                    }
                    Frame::Append { id, data } => {
                        files.get_mut(&names[&id]).unwrap().extend_from_slice(&data)
                    }
                    Frame::Commit { manifest } => {
                        files.insert("manifest".into(), manifest);
                        answer.write_to(r.get_mut()).unwrap();
                        break;
                    }
                    _ => {}
                }
            }
            files
        });
        let tcp = TcpStream::connect(addr).unwrap();
        let link = Link { stream: Box::new(tcp.try_clone().unwrap()), tcp, peer: addr };
        (NetStore::new(link, &addr.to_string(), Duration::from_secs(10)), dest)
    }

    fn manifest() -> torpor_image::Manifest {
        torpor_image::Manifest {
            magic: String::new(),
            format_version: 0,
            torpor_version: "test".into(),
            created_unix: 0,
            kernel_release: "test".into(),
            arch: "x86_64".into(),
            cpu: Default::default(),
            root_pid: 1,
            files: Vec::new(),
            parent: None,
            encryption: None,
        }
    }

    fn write_image(store: &NetStore) -> torpor_image::Result<()> {
        let mut w = ImageWriter::with_store(Arc::new(store.clone()), Path::new("dest"))?;
        w.write_file("tree.json", b"{}")?;
        let mut f = w.create_file("pages-1.img")?;
        f.write_all(&vec![5; (wire::CHUNK * 2) + 7])?;
        w.finish_file(f)?;
        w.commit(manifest())
    }

    #[test]
    fn the_commit_returns_once_the_destination_woke_the_process() {
        let (store, dest) = destination(Frame::Restored { pid: 4242 });
        write_image(&store).unwrap();
        assert_eq!(store.restored_pid(), Some(4242));
        let files = dest.join().unwrap();
        assert_eq!(files["tree.json"], b"{}");
        assert_eq!(files["pages-1.img"].len(), wire::CHUNK * 2 + 7);
        assert!(files["manifest"].starts_with(b"{"));
        assert!(store.bytes_sent() > (wire::CHUNK * 2) as u64);
    }

    #[test]
    fn a_refusal_fails_the_commit_with_the_destinations_reason() {
        let (store, dest) = destination(Frame::Failed { why: "pid 7 is taken".into() });
        let err = write_image(&store).unwrap_err();
        let msg = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(msg.contains("refused the migration: pid 7 is taken"), "{msg}");
        assert_eq!(store.restored_pid(), None);
        dest.join().unwrap();
    }

    #[test]
    fn a_destination_gone_before_the_answer_fails_the_commit() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Answers the start, then hangs up.
        let dest = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s);
            Frame::read_from(&mut r).unwrap();
            Frame::Ready.write_to(r.get_mut()).unwrap();
        });
        let tcp = TcpStream::connect(addr).unwrap();
        let link = Link { stream: Box::new(tcp.try_clone().unwrap()), tcp, peer: addr };
        let store = NetStore::new(link, "dest", Duration::from_secs(10));
        let mut w = ImageWriter::with_store(Arc::new(store.clone()), Path::new("dest")).unwrap();
        dest.join().unwrap();
        w.write_file("tree.json", b"{}").unwrap_or(());
        assert!(w.commit(manifest()).is_err());
        assert_eq!(store.restored_pid(), None);
    }
}
