//! One image file on its way to S3: a [`torpor_image::Sink`].
//!
//! A file that ends within one part goes up in a single PUT when finished. A bigger one
//! starts a multipart upload as soon as its first part is full, and each full part is
//! sent by a task of the store's runtime while the dump appends the next; `append` waits
//! only when [`IN_FLIGHT`] parts are already on their way, which bounds the memory a file
//! holds. (object_store's own `WriteMultipart` does the same, but when completing the
//! upload fails it reports the failure of the abort that follows instead of the cause.)

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use object_store::path::Path as ObjPath;
use object_store::MultipartUpload;
use tokio::task::JoinSet;

use crate::{request_error, to_io, Shared, IN_FLIGHT, PART};

/// A multipart upload under way.
struct Parts {
    upload: Box<dyn MultipartUpload>,
    /// The part being filled.
    buffer: Vec<u8>,
    /// The parts being sent.
    sending: JoinSet<object_store::Result<()>>,
}

enum State {
    /// Less than a part so far, held until it is more or the file ends.
    Small(Vec<u8>),
    Parts(Parts),
    /// Finished, or failed in a way that left nothing to clean up.
    Done,
}

pub(crate) struct Upload {
    shared: Arc<Shared>,
    name: String,
    key: ObjPath,
    state: State,
}

impl Upload {
    pub(crate) fn new(shared: Arc<Shared>, name: &str) -> Self {
        let key = shared.key(name);
        Self { shared, name: name.to_string(), key, state: State::Small(Vec::new()) }
    }

    fn failed(&self, what: &'static str) -> impl Fn(object_store::Error) -> io::Error {
        let url = self.shared.url_of(&self.name);
        move |source| to_io(request_error(what, url.clone(), source))
    }

    /// Waits until at most `left` parts are being sent; the first that failed is the
    /// error.
    fn wait_for(&mut self, left: usize) -> io::Result<()> {
        let failed = self.failed("upload a part of");
        let State::Parts(p) = &mut self.state else { return Ok(()) };
        let shared = &self.shared;
        shared.block_on(async {
            while p.sending.len() > left {
                match p.sending.join_next().await {
                    Some(Ok(sent)) => sent.map_err(&failed)?,
                    Some(Err(e)) => return Err(io::Error::other(e)),
                    None => break,
                }
            }
            Ok(())
        })
    }

    /// Appends `data` to the parts, sending each part as it fills up.
    fn send(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let State::Parts(p) = &mut self.state else {
                return Err(io::Error::other("written after it was finished"));
            };
            let n = data.len().min(PART - p.buffer.len());
            p.buffer.extend_from_slice(&data[..n]);
            data = &data[n..];
            if p.buffer.len() == PART {
                self.wait_for(IN_FLIGHT - 1)?;
                self.send_part();
            }
        }
        Ok(())
    }

    /// Sends the part being filled, if anything is in it.
    fn send_part(&mut self) {
        let State::Parts(p) = &mut self.state else { return };
        if p.buffer.is_empty() {
            return;
        }
        let part = std::mem::replace(&mut p.buffer, Vec::with_capacity(PART));
        let sent = p.upload.put_part(part.into());
        p.sending.spawn_on(sent, self.shared.runtime.handle());
    }
}

impl torpor_image::Sink for Upload {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.shared.moved.fetch_add(data.len() as u64, Ordering::Relaxed);
        if let State::Small(held) = &mut self.state {
            if held.len() + data.len() < PART {
                held.extend_from_slice(data);
                return Ok(());
            }
            let held = std::mem::take(held);
            let s = &self.shared;
            let upload = s
                .block_on(s.store.put_multipart(&self.key))
                .map_err(self.failed("start the upload of"))?;
            let buffer = Vec::with_capacity(PART);
            self.state = State::Parts(Parts { upload, buffer, sending: JoinSet::new() });
            self.send(&held)?;
        }
        self.send(data)
    }

    fn finish(mut self: Box<Self>) -> io::Result<()> {
        let s = Arc::clone(&self.shared);
        if let State::Small(held) = &mut self.state {
            let held = std::mem::take(held);
            self.state = State::Done;
            return s
                .block_on(s.store.put(&self.key, held.into()))
                .map(drop)
                .map_err(self.failed("upload"));
        }
        // On an error the upload stays in `state`, and dropping it aborts it.
        self.send_part();
        self.wait_for(0)?;
        let State::Parts(p) = &mut self.state else { return Ok(()) };
        s.block_on(p.upload.complete()).map_err(self.failed("complete the upload of"))?;
        self.state = State::Done;
        Ok(())
    }
}

impl Drop for Upload {
    /// A file given up leaves nothing: its parts are discarded by the server.
    fn drop(&mut self) {
        if let State::Parts(mut p) = std::mem::replace(&mut self.state, State::Done) {
            let aborted = self.shared.block_on(async {
                p.sending.shutdown().await;
                p.upload.abort().await
            });
            if let Err(e) = aborted {
                tracing::debug!(
                    "cannot abort the upload of {}: {e}",
                    self.shared.url_of(&self.name)
                );
            }
        }
    }
}
