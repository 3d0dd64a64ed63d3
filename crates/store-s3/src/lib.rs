//! torpor images in S3 or any S3-compatible object store, named `s3://BUCKET/PREFIX`.
//!
//! Each file of an image is one object, `PREFIX/NAME`; the manifest, `PREFIX/manifest.json`,
//! is written last and is what makes the objects an image, as in a directory.
//!
//! ```text
//!   dump (synchronous)                     S3Store's runtime (2 threads)
//!   ──────────────────                     ─────────────────────────────
//!   begin ─────────────────────────────▶   list PREFIX (bucket, credentials), delete manifest
//!   create(NAME), append… ─────────────▶   one PUT if small; else a multipart upload,
//!                                            PART bytes a part, IN_FLIGHT parts at once
//!   finish ────────────────────────────▶   last part, complete the upload
//!   commit(manifest) ──────────────────▶   PUT manifest.json
//!   abandon(names) ────────────────────▶   DELETE each (an unfinished upload is aborted
//!                                            when its sink is dropped)
//! ```
//!
//! Reading goes the other way: [`S3Store::download`] fetches the manifest, then every file
//! it lists in ranges, several at once, into a local directory for
//! [`torpor_image::ImageReader`].
//!
//! Connection settings come from the environment as the AWS tools read it
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` or
//! `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`), then from the profile
//! `AWS_PROFILE` of `~/.aws/credentials` and `~/.aws/config` ([`profile`]). With an
//! endpoint, requests name the bucket in the path (`ENDPOINT/BUCKET/KEY`), which
//! self-hosted stores such as Garage and MinIO expect.
//!
//! The rest of torpor is synchronous: the store owns a small tokio runtime and blocks on
//! it, so no caller needs to know about async.

mod download;
mod lazy;
pub mod profile;
mod upload;

use std::ffi::OsStr;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjPath;
use object_store::{ClientConfigKey, ObjectStore, RetryConfig};
use torpor_image::{ImageError, MANIFEST};

pub use lazy::LazyCopy;

/// The scheme of the URLs this crate serves.
pub const SCHEME: &str = "s3://";

/// Whether a path given on the command line is an `s3://` URL.
pub fn is_url(path: &OsStr) -> bool {
    path.to_str().is_some_and(|s| s.starts_with(SCHEME))
}

/// Why an image could not be stored in or read from S3.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("{url} is not an S3 URL: {why} (the form is s3://BUCKET/PREFIX)")]
    Url { url: String, why: &'static str },
    #[error("cannot set up an S3 client for {url}")]
    Client {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot start the threads that talk to {url}")]
    Runtime {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot {what} {url}: {reason}")]
    Request {
        what: &'static str,
        url: String,
        /// The server's or the connection's own words ([`reason`]).
        reason: String,
        kind: io::ErrorKind,
    },
    #[error("{url} holds no torpor image: there is no {url}/{MANIFEST}")]
    NoImage { url: String },
    #[error("{url}/{name}: the object holds {got} bytes at offset {offset}, {want} expected")]
    Short { url: String, name: String, offset: u64, want: u64, got: u64 },
    #[error("the manifest of {url} is not usable")]
    Manifest {
        url: String,
        #[source]
        source: ImageError,
    },
    #[error("cannot write {}", path.display())]
    Local {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `s3://BUCKET/PREFIX`, split.
#[derive(Debug, Clone, PartialEq)]
pub struct S3Url {
    pub bucket: String,
    /// Without slashes at either end; empty for the top of the bucket.
    pub prefix: String,
}

impl S3Url {
    pub fn parse(url: &str) -> Result<Self, S3Error> {
        let bad = |why| S3Error::Url { url: url.to_string(), why };
        let rest = url.strip_prefix(SCHEME).ok_or_else(|| bad("it does not start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("the bucket name is missing"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|c| c == "." || c == "..") {
            return Err(bad("`.` and `..` have no meaning in an object key"));
        }
        if prefix.contains("//") {
            return Err(bad("the prefix has an empty component"));
        }
        Ok(Self { bucket: bucket.to_string(), prefix: prefix.to_string() })
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.prefix.is_empty() {
            true => write!(f, "{SCHEME}{}", self.bucket),
            false => write!(f, "{SCHEME}{}/{}", self.bucket, self.prefix),
        }
    }
}

/// Parts of a multipart upload, in bytes. S3 wants at least 5 MiB in each part but the
/// last; bigger parts mean fewer requests, and this much per part in flight.
const PART: usize = 8 << 20;
/// Parts of one file uploaded at once: enough to keep a link busy while the dump reads
/// on, few enough that a file holds at most `(IN_FLIGHT + 1) * PART` bytes in memory.
const IN_FLIGHT: usize = 4;

/// How a request that fails for a reason worth retrying (a dropped connection, a 5xx) is
/// retried: a few times, and not for long, since a dump waits (the process frozen,
/// perhaps) and a server that is down should be reported soon.
fn retry() -> RetryConfig {
    RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(30), ..Default::default() }
}

/// What the runtime's tasks and the synchronous side share.
struct Shared {
    url: S3Url,
    store: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
    /// Bytes of image files handed over for upload or downloaded so far, for a
    /// progress bar.
    moved: Arc<AtomicU64>,
}

impl Shared {
    /// The key of the image file `name`.
    fn key(&self, name: &str) -> ObjPath {
        match self.url.prefix.is_empty() {
            true => ObjPath::from(name),
            false => ObjPath::from(format!("{}/{name}", self.url.prefix)),
        }
    }

    /// The URL of the image file `name`, for messages.
    fn url_of(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }
}

/// An image in an S3 bucket, under a prefix. Implements [`torpor_image::Store`] for dumps.
#[derive(Clone)]
pub struct S3Store {
    shared: Arc<Shared>,
}

impl S3Store {
    /// Sets up a client for `url` from the environment and the AWS files. Sends nothing:
    /// a wrong setting shows with the first request.
    pub fn open(url: &str) -> Result<Self, S3Error> {
        let parsed = S3Url::parse(url)?;
        let shown = parsed.to_string();
        let profile = profile::Profile::load();
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&parsed.bucket);
        let env = |k: &str| std::env::var_os(k).is_some();
        let fill = [
            ("AWS_ACCESS_KEY_ID", AmazonS3ConfigKey::AccessKeyId, profile.access_key_id),
            (
                "AWS_SECRET_ACCESS_KEY",
                AmazonS3ConfigKey::SecretAccessKey,
                profile.secret_access_key,
            ),
            ("AWS_SESSION_TOKEN", AmazonS3ConfigKey::Token, profile.session_token),
            ("AWS_ENDPOINT_URL", AmazonS3ConfigKey::Endpoint, profile.endpoint_url.clone()),
        ];
        for (var, key, value) in fill {
            if let (false, Some(v)) = (env(var), value) {
                builder = builder.with_config(key, v);
            }
        }
        if let (false, false, Some(r)) =
            (env("AWS_REGION"), env("AWS_DEFAULT_REGION"), profile.region)
        {
            builder = builder.with_region(r);
        }
        let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
        if let Some(e) = &endpoint {
            // Self-hosted stores have no per-bucket host names.
            builder = builder.with_virtual_hosted_style_request(false);
            // An endpoint the user wrote as http:// is meant as such (a store on loopback
            // or a private network); AWS_ALLOW_HTTP, when set, still has the last word.
            if e.starts_with("http://") && !env("AWS_ALLOW_HTTP") {
                builder = builder.with_allow_http(true);
            }
        }
        let store = builder
            .with_retry(retry())
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout), "5s")
            .build()
            .map_err(|source| S3Error::Client { url: shown, source })?;
        Self::over(parsed, Arc::new(store))
    }

    /// The image at `url` in `store`, with a runtime to reach it.
    fn over(url: S3Url, store: Arc<dyn ObjectStore>) -> Result<Self, S3Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("torpor-s3")
            .enable_all()
            .build()
            .map_err(|source| S3Error::Runtime { url: url.to_string(), source })?;
        let moved = Arc::new(AtomicU64::new(0));
        let shared = Shared { url, store, runtime, moved };
        Ok(Self { shared: Arc::new(shared) })
    }

    /// The image's URL, normalized.
    pub fn url(&self) -> &S3Url {
        &self.shared.url
    }

    /// Bytes of image files uploaded (handed over) or downloaded so far.
    pub fn bytes_moved(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.shared.moved)
    }

    fn request(&self, what: &'static str, name: &str) -> impl Fn(object_store::Error) -> S3Error {
        let url = self.shared.url_of(name);
        move |source| request_error(what, url.clone(), source)
    }
}

/// An [`S3Error`] as the [`torpor_image::Store`] interface reports it, message and all.
fn to_io(e: S3Error) -> io::Error {
    let kind = match &e {
        S3Error::Request { kind, .. } => *kind,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

/// A failed request to `url`, described by what went wrong at the bottom of it.
fn request_error(what: &'static str, url: String, e: object_store::Error) -> S3Error {
    let kind = match e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    S3Error::Request { what, url, reason: reason(&e), kind }
}

/// The innermost cause of `e`, in a line: object_store's errors repeat their causes in
/// their own messages, so the chain printed whole says everything several times. An S3
/// error document is cut down to its code and message.
fn reason(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    let text = inner.to_string();
    let tag = |name: &str| {
        let start = text.find(&format!("<{name}>"))? + name.len() + 2;
        let end = start + text[start..].find(&format!("</{name}>"))?;
        Some(text[start..end].to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ => text.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

impl torpor_image::Store for S3Store {
    fn begin(&self) -> io::Result<()> {
        let s = &self.shared;
        // Listing checks the bucket and the credentials before anything is written; a
        // delete of a missing key succeeds even in a bucket that is not there.
        let prefix = (!s.url.prefix.is_empty()).then(|| ObjPath::from(s.url.prefix.as_str()));
        s.block_on(s.store.list_with_delimiter(prefix.as_ref()))
            .map_err(|source| request_error("list", s.url.to_string(), source))
            .map_err(to_io)?;
        match s.block_on(s.store.delete(&s.key(MANIFEST))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(to_io(self.request("delete the old manifest", MANIFEST)(e))),
        }
    }

    fn create(&self, name: &str) -> io::Result<Box<dyn torpor_image::Sink>> {
        Ok(Box::new(upload::Upload::new(Arc::clone(&self.shared), name)))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let s = &self.shared;
        match s.block_on(s.store.delete(&s.key(name))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(to_io(self.request("delete", name)(e))),
        }
    }

    fn commit(&self, manifest: &[u8]) -> io::Result<()> {
        let s = &self.shared;
        let payload = object_store::PutPayload::from(manifest.to_vec());
        s.block_on(s.store.put(&s.key(MANIFEST), payload))
            .map(drop)
            .map_err(|e| to_io(self.request("upload", MANIFEST)(e)))
    }

    fn abandon(&self, names: &[String]) {
        let s = &self.shared;
        let keys: Vec<ObjPath> =
            names.iter().map(String::as_str).chain([MANIFEST]).map(|n| s.key(n)).collect();
        s.block_on(async {
            for key in &keys {
                if let Err(e) = s.store.delete(key).await {
                    tracing::debug!("cannot delete {key} after a failed dump: {e}");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use object_store::memory::InMemory;
    use torpor_image::{ImageReader, ImageWriter, Store};

    use super::*;

    /// A store over object_store's in-memory backend, which keeps the S3 semantics this
    /// crate relies on (multipart uploads, ranged reads, deletes) without a server; the
    /// integration tests use a real one.
    fn memory(url: &str) -> (S3Store, Arc<InMemory>) {
        let mem = Arc::new(InMemory::new());
        let store = S3Store::over(S3Url::parse(url).unwrap(), mem.clone()).unwrap();
        (store, mem)
    }

    fn keys(s: &S3Store, mem: &InMemory) -> Vec<String> {
        use futures::TryStreamExt;
        let mut keys: Vec<String> = s
            .shared
            .block_on(mem.list(None).map_ok(|m| m.location.to_string()).try_collect())
            .unwrap();
        keys.sort();
        keys
    }

    /// Bytes that differ from one offset to the next, so a misplaced range shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()
    }

    fn manifest() -> torpor_image::Manifest {
        torpor_image::Manifest {
            magic: String::new(),
            format_version: 0,
            torpor_version: "0".into(),
            created_unix: 0,
            kernel_release: "6".into(),
            arch: "x86_64".into(),
            cpu: Default::default(),
            root_pid: 1,
            files: Vec::new(),
            parent: None,
            encryption: None,
        }
    }

    /// Writes an image of a small file and a big one (three parts and a bit) to `store`.
    fn write_image(store: &S3Store, big: &[u8]) {
        let dyn_store: Arc<dyn Store> = Arc::new(store.clone());
        let mut w = ImageWriter::with_store(dyn_store, Path::new("s3://b/img")).unwrap();
        w.write_file("tree.json", b"{}").unwrap();
        let mut f = w.create_file("pages-1.img").unwrap();
        for piece in big.chunks(1 << 20) {
            f.write_all(piece).unwrap();
        }
        w.finish_file(f).unwrap();
        w.commit(manifest()).unwrap();
    }

    #[test]
    fn an_image_goes_up_in_parts_and_comes_back_whole() {
        let (store, mem) = memory("s3://b/img/");
        let big = pattern(3 * PART + 12345);
        write_image(&store, &big);
        assert_eq!(keys(&store, &mem), ["img/manifest.json", "img/pages-1.img", "img/tree.json"]);

        let dir = tempfile::tempdir().unwrap();
        let got = store.download(dir.path()).unwrap();
        assert_eq!(got, big.len() as u64 + 2);
        assert_eq!(std::fs::read(dir.path().join("pages-1.img")).unwrap(), big);
        ImageReader::open(dir.path()).unwrap().verify_all(|_| {}).unwrap();
    }

    #[test]
    fn an_abandoned_dump_leaves_no_object_and_no_upload() {
        let (store, mem) = memory("s3://b/gone");
        let dyn_store: Arc<dyn Store> = Arc::new(store.clone());
        let mut w = ImageWriter::with_store(dyn_store, Path::new("s3://b/gone")).unwrap();
        w.write_file("tree.json", b"{}").unwrap();
        let mut f = w.create_file("pages-1.img").unwrap();
        f.write_all(&pattern(2 * PART)).unwrap();
        // A file given up half way (its sink dropped) and the image abandoned.
        drop(f);
        w.abandon();
        assert!(keys(&store, &mem).is_empty(), "{:?}", keys(&store, &mem));
    }

    #[test]
    fn a_dump_starts_by_removing_an_old_manifest() {
        let (store, mem) = memory("s3://b/img");
        write_image(&store, &pattern(100));
        store.begin().unwrap();
        assert_eq!(keys(&store, &mem), ["img/pages-1.img", "img/tree.json"]);
        let dir = tempfile::tempdir().unwrap();
        let e = store.download(dir.path()).unwrap_err().to_string();
        assert!(e.contains("s3://b/img holds no torpor image"), "{e}");
    }

    #[test]
    fn a_lazy_copy_serves_ranges_before_the_whole_file() {
        let (store, _mem) = memory("s3://b/img");
        let big = pattern(5 * (1 << 20) + 777);
        write_image(&store, &big);
        let dir = tempfile::tempdir().unwrap();
        let copy = store
            .download_lazily(dir.path(), Duration::from_secs(3600), |m, tree| {
                assert_eq!(tree, b"{}");
                assert_eq!(m.files.len(), 2);
                vec!["pages-1.img".to_string()]
            })
            .unwrap();
        let fetch = copy.fetcher();
        let local = std::fs::File::open(dir.path().join("pages-1.img")).unwrap();
        let mut buf = vec![0; 9000];
        let at = 3 * (1 << 20) - 100;
        fetch.fetch("pages-1.img", &[(at, buf.len() as u64)]).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&local, &mut buf, at).unwrap();
        assert_eq!(buf, big[at as usize..at as usize + buf.len()]);
        // A range past the end is an error, not a wait.
        assert!(fetch.fetch("pages-1.img", &[(big.len() as u64, 1)]).is_err());
        // Files not deferred are whole already.
        fetch.whole("tree.json").unwrap();
        fetch.whole("pages-1.img").unwrap();
        assert_eq!(std::fs::read(dir.path().join("pages-1.img")).unwrap(), big);
        ImageReader::open(dir.path()).unwrap().verify_all(|_| {}).unwrap();
    }

    #[test]
    fn a_reason_is_the_innermost_cause_in_one_line() {
        #[derive(Debug, thiserror::Error)]
        #[error("request failed, repeating its cause: {0}")]
        struct Outer(#[source] io::Error);
        let denied = io::Error::other(
            "Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?>\n\
             <Error><Code>AccessDenied</Code><Message>Forbidden: Invalid signature</Message>\
             </Error>",
        );
        assert_eq!(reason(&Outer(denied)), "AccessDenied: Forbidden: Invalid signature");
        let refused = io::Error::other("Connection refused\n   (os error 111)");
        assert_eq!(reason(&Outer(refused)), "Connection refused (os error 111)");
    }

    #[test]
    fn urls_split_into_bucket_and_prefix() {
        let u = S3Url::parse("s3://b/some/where/").unwrap();
        assert_eq!(u, S3Url { bucket: "b".into(), prefix: "some/where".into() });
        assert_eq!(u.to_string(), "s3://b/some/where");
        assert_eq!(S3Url::parse("s3://b").unwrap().prefix, "");
        for bad in ["s3:///x", "http://b/x", "s3://b/a/../c", "s3://b/a//c"] {
            let e = S3Url::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
