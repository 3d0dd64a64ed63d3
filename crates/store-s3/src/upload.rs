//! One image file on its way to S3: a [`torpor_image::Sink`].
//!
//! A file that ends within one part goes up in a single PUT when finished. A bigger one
//! starts a multipart upload as soon as its first part is full, and each full part is
//! sent on the store's runtime while the dump appends the next; `append` waits only when
//! [`IN_FLIGHT`] parts are already on their way, which bounds the memory a file holds.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use object_store::path::Path as ObjPath;
use object_store::WriteMultipart;

use crate::{request_error, to_io, Shared, IN_FLIGHT, PART};

enum State {
    /// Less than a part so far, held until it is more or the file ends.
    Small(Vec<u8>),
    /// A multipart upload under way.
    Parts(WriteMultipart),
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

    /// Hands `data` to the multipart upload, a part at a time, each once fewer than
    /// [`IN_FLIGHT`] parts are being sent.
    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        let failed = self.failed("upload a part of");
        let State::Parts(w) = &mut self.state else {
            return Err(io::Error::other("written after it was finished"));
        };
        for piece in data.chunks(PART) {
            self.shared.block_on(w.wait_for_capacity(IN_FLIGHT)).map_err(&failed)?;
            // A full part is sent from a task of the runtime, spawned by `write`.
            let _runtime = self.shared.runtime.enter();
            w.write(piece);
        }
        Ok(())
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
            self.state = State::Parts(WriteMultipart::new_with_chunk_size(upload, PART));
            self.send(&held)?;
        }
        self.send(data)
    }

    fn finish(mut self: Box<Self>) -> io::Result<()> {
        let s = Arc::clone(&self.shared);
        match std::mem::replace(&mut self.state, State::Done) {
            State::Small(held) => s
                .block_on(s.store.put(&self.key, held.into()))
                .map(drop)
                .map_err(self.failed("upload")),
            State::Parts(mut w) => s
                .block_on(async {
                    // A part that failed is reported here; the upload is then aborted, as
                    // `finish` itself does when the last step fails.
                    if let Err(e) = w.wait_for_capacity(0).await {
                        let _ = w.abort().await;
                        return Err(e);
                    }
                    w.finish().await.map(drop)
                })
                .map_err(self.failed("upload")),
            State::Done => Ok(()),
        }
    }
}

impl Drop for Upload {
    /// A file given up leaves nothing: its parts are discarded by the server.
    fn drop(&mut self) {
        if let State::Parts(w) = std::mem::replace(&mut self.state, State::Done) {
            if let Err(e) = self.shared.block_on(w.abort()) {
                tracing::debug!(
                    "cannot abort the upload of {}: {e}",
                    self.shared.url_of(&self.name)
                );
            }
        }
    }
}
