//! Images kept somewhere other than a local directory.
//!
//! An [`ImageWriter`](crate::ImageWriter) normally writes files into a directory. Given a
//! [`Store`] instead ([`ImageWriter::with_store`](crate::ImageWriter::with_store)), it
//! hands each file's bytes to a [`Sink`] as they are produced, so that an image can go to
//! object storage or across the network to another host without a local copy.
//!
//! Files of an image are only ever appended to, front to back, and each is finished
//! before the manifest is stored; so a store needs no random writes, and a store that
//! keeps an object per file can upload each in parts while the dump goes on. The rule
//! that makes an image complete stays the store's to keep: the manifest is stored last,
//! by [`Store::commit`], and only once every file's [`Sink::finish`] has returned.

use std::io;

/// Where the files of an image go.
pub trait Store: Send + Sync {
    /// Called once before any file is created: removes a manifest left by an earlier
    /// image under the same name, so that an interrupted dump never leaves an old
    /// manifest describing new files.
    fn begin(&self) -> io::Result<()>;

    /// Starts the file `name` (one plain path component), replacing any of that name.
    fn create(&self, name: &str) -> io::Result<Box<dyn Sink>>;

    /// Removes the file `name` if there (it will not be listed in the manifest).
    fn remove(&self, name: &str) -> io::Result<()>;

    /// Stores the manifest's bytes. Every file it lists is finished; the image is
    /// complete once this returns, and must not be before.
    fn commit(&self, manifest: &[u8]) -> io::Result<()>;

    /// Removes what a failed dump stored: the files named (best effort: this runs after
    /// another error, which is the one reported).
    fn abandon(&self, names: &[String]);
}

/// The bytes of one file of an image, in order. A sink dropped without
/// [`Sink::finish`] belongs to a file given up: nothing of it may remain stored.
pub trait Sink: Send {
    /// Appends `data` to the file. May return before the bytes are stored; an error of
    /// an earlier append may be reported by a later call or by [`Sink::finish`].
    fn append(&mut self, data: &[u8]) -> io::Result<()>;

    /// Called between pre-copy rounds while the process runs: a chance to push what was
    /// appended so far, so that less is left once the process is frozen.
    fn checkpoint(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Waits until every byte appended is stored, and reports any error on the way.
    fn finish(self: Box<Self>) -> io::Result<()>;
}

/// An image directory whose big files are still being copied in from a store while the
/// image is read, so that a lazy restore can start before them: a reader asks for the
/// ranges it is about to read, and they are fetched first if the copy has not reached
/// them yet. A file the store did not defer is whole from the start.
pub trait Fetch: Send + Sync {
    /// Returns once every `(offset, len)` range of file `name` is in the local copy.
    fn fetch(&self, name: &str, ranges: &[(u64, u64)]) -> io::Result<()>;

    /// Returns once all of file `name` is in the local copy.
    fn whole(&self, name: &str) -> io::Result<()>;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::{ImageWriter, MANIFEST};

    /// A store in memory, to check what the writer hands to a store and in what order.
    #[derive(Default)]
    struct Memory {
        files: Mutex<BTreeMap<String, Vec<u8>>>,
        log: Mutex<Vec<String>>,
    }

    struct MemorySink {
        name: String,
        data: Vec<u8>,
        store: Arc<Memory>,
    }

    impl Sink for MemorySink {
        fn append(&mut self, data: &[u8]) -> io::Result<()> {
            self.data.extend_from_slice(data);
            Ok(())
        }

        fn finish(self: Box<Self>) -> io::Result<()> {
            self.store.log.lock().unwrap().push(format!("finish {}", self.name));
            self.store.files.lock().unwrap().insert(self.name, self.data);
            Ok(())
        }
    }

    impl Store for Arc<Memory> {
        fn begin(&self) -> io::Result<()> {
            self.files.lock().unwrap().remove(MANIFEST);
            Ok(())
        }

        fn create(&self, name: &str) -> io::Result<Box<dyn Sink>> {
            let store = Arc::clone(self);
            Ok(Box::new(MemorySink { name: name.into(), data: Vec::new(), store }))
        }

        fn remove(&self, name: &str) -> io::Result<()> {
            self.files.lock().unwrap().remove(name);
            Ok(())
        }

        fn commit(&self, manifest: &[u8]) -> io::Result<()> {
            self.log.lock().unwrap().push("commit".into());
            self.files.lock().unwrap().insert(MANIFEST.into(), manifest.to_vec());
            Ok(())
        }

        fn abandon(&self, names: &[String]) {
            let mut files = self.files.lock().unwrap();
            names.iter().for_each(|n| drop(files.remove(n)));
        }
    }

    #[test]
    fn a_store_gets_every_file_then_the_manifest() {
        let mem = Arc::new(Memory::default());
        let store: Arc<dyn Store> = Arc::new(Arc::clone(&mem));
        let mut w = ImageWriter::with_store(store, Path::new("mem://image")).unwrap();
        w.write_file("tree.json", b"{}").unwrap();
        let mut f = w.create_file("pages-1.img").unwrap();
        f.write_all(&vec![7; 3 << 20]).unwrap();
        w.finish_file(f).unwrap();
        let gone = w.create_file("pages-2.img").unwrap();
        w.remove_file(gone);
        w.commit(crate::tests::sample_manifest()).unwrap();

        let log = mem.log.lock().unwrap().clone();
        assert_eq!(log, ["finish tree.json", "finish pages-1.img", "commit"]);
        let files = mem.files.lock().unwrap();
        assert_eq!(files.keys().collect::<Vec<_>>(), ["manifest.json", "pages-1.img", "tree.json"]);
        assert_eq!(files["pages-1.img"].len(), 3 << 20);
        let manifest = crate::decode_manifest(&files[MANIFEST], Path::new("mem")).unwrap();
        let names: Vec<_> = manifest.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["tree.json", "pages-1.img"]);
        assert_eq!(manifest.files[1].xxh3, crate::hash_bytes(&files["pages-1.img"]));
    }

    #[test]
    fn an_abandoned_image_leaves_nothing_in_the_store() {
        let mem = Arc::new(Memory::default());
        let store: Arc<dyn Store> = Arc::new(Arc::clone(&mem));
        let mut w = ImageWriter::with_store(store, Path::new("mem://image")).unwrap();
        w.write_file("tree.json", b"{}").unwrap();
        w.abandon();
        assert!(mem.files.lock().unwrap().is_empty());
    }
}
