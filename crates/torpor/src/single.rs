//! Single-file images and self-restoring executables on the command line.
//!
//! The dump and restore libraries work on image directories. A single-file image is
//! made by dumping into a private temporary directory and packing it
//! ([`torpor_image::single::pack`]) before the process is ended, and read by unpacking
//! it into a private temporary directory, checking every byte on the way, before the
//! restore starts. Both directories are removed when torpor is done with them.

use std::fs::{self, File};
use std::io::{self, BufWriter, IsTerminal, Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;
use torpor_image::single::{self, Input};
use torpor_image::ImageError;

/// How standard input and output are named in messages.
pub const STDIN_NAME: &str = "standard input";
const STDOUT_NAME: &str = "standard output";

/// Where a dump goes.
pub enum Target {
    /// An image directory (`-D DIR`).
    Dir(PathBuf),
    /// A single-file image (`-o FILE`), or standard output (`-o -`).
    File(PathBuf),
    /// A self-restoring executable (`--exe FILE`).
    Exe(PathBuf),
}

/// The directory a dump writes, and what turns it into the target before the process
/// is ended.
pub struct DumpTarget {
    /// Where the dump writes the image directory.
    pub dir: PathBuf,
    /// The target as the summary names it.
    pub shown: String,
    /// Packs the directory into the target.
    pub after_commit: Option<torpor_dump::AfterCommit>,
    /// Whether the dump itself should sync the directory (not when it is packed: the
    /// output file is synced instead).
    pub sync_dir: bool,
    /// The temporary directory, removed on drop.
    _tmp: Option<TempDir>,
}

/// The directory of `path`, for files made next to it.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

impl DumpTarget {
    /// A dump whose files go to a store, named `shown`: nothing local to write or pack.
    pub fn stored(shown: String) -> Self {
        Self { dir: PathBuf::from(&shown), shown, after_commit: None, sync_dir: false, _tmp: None }
    }
}

/// Prepares a dump into `target`. `durable`: the result must reach the disk before the
/// process is ended.
pub fn dump_target(target: Target, durable: bool) -> Result<DumpTarget> {
    let (out, exe) = match target {
        Target::Dir(dir) => {
            let shown = dir.display().to_string();
            return Ok(DumpTarget {
                dir,
                shown,
                after_commit: None,
                sync_dir: durable,
                _tmp: None,
            });
        }
        Target::File(p) => (p, false),
        Target::Exe(p) => (p, true),
    };
    let to_stdout = !exe && out.as_os_str() == "-";
    if to_stdout && io::stdout().is_terminal() {
        bail!(
            "refusing to write an image to a terminal; send standard output to a file or a \
             pipe (`torpor dump PID -o - | ssh host torpor restore -`), or give -o FILE"
        );
    }
    // The image is written next to where it goes, so that it needs no room elsewhere,
    // except for a stream, which has no "next to".
    let builder = tempfile::Builder::new().prefix(".torpor-dump-").clone();
    let tmp = match to_stdout {
        true => builder.tempdir(),
        false => builder.tempdir_in(parent_dir(&out)),
    }
    .with_context(|| {
        format!(
            "cannot make a temporary directory for the image {}",
            if to_stdout { "in $TMPDIR".to_string() } else { format!("next to {}", out.display()) }
        )
    })?;
    let dir = tmp.path().join("image");
    let shown = if to_stdout { STDOUT_NAME.to_string() } else { out.display().to_string() };
    let pack = move |dir: &Path| -> torpor_image::Result<()> {
        if to_stdout {
            let mut w = BufWriter::with_capacity(1 << 20, io::stdout().lock());
            single::pack(dir, &mut w, Path::new(STDOUT_NAME)).map(drop)
        } else {
            write_file(dir, &out, exe, durable)
        }
    };
    Ok(DumpTarget {
        dir,
        shown,
        after_commit: Some(torpor_dump::AfterCommit(Arc::new(pack))),
        sync_dir: false,
        _tmp: Some(tmp),
    })
}

/// Packs the image in `dir` into the file `dest` (an executable with `exe`), written
/// under a temporary name and renamed into place, so `dest` is never half written.
fn write_file(dir: &Path, dest: &Path, exe: bool, durable: bool) -> torpor_image::Result<()> {
    let werr = |source| ImageError::Write { path: dest.to_path_buf(), source };
    let mut tmp = tempfile::Builder::new()
        .prefix(".torpor-")
        .suffix(".tmp")
        .tempfile_in(parent_dir(dest))
        .map_err(werr)?;
    let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
    let mut offset = 0;
    if exe {
        offset = copy_self(&mut w).map_err(werr)?;
    }
    let len = single::pack(dir, &mut w, dest)?;
    if exe {
        w.write_all(&single::encode_exe_trailer(offset, len)).map_err(werr)?;
    }
    w.flush().map_err(werr)?;
    drop(w);
    // Private like every image file; the executable bit only for its owner.
    let mode = if exe { 0o700 } else { 0o600 };
    tmp.as_file().set_permissions(fs::Permissions::from_mode(mode)).map_err(werr)?;
    if durable {
        tmp.as_file().sync_all().map_err(werr)?;
    }
    tmp.persist(dest).map_err(|e| werr(e.error))?;
    if durable {
        File::open(parent_dir(dest)).and_then(|d| d.sync_all()).map_err(werr)?;
    }
    Ok(())
}

/// Copies the torpor binary (without any image it carries) to `w`, then zeros up to a
/// multiple of 4096, so that the image's pages are aligned in the executable too.
/// Returns the bytes written.
fn copy_self(w: &mut impl Write) -> io::Result<u64> {
    let me = File::open("/proc/self/exe")?;
    let len = match single::locate(&me)? {
        Some(l) if l.exe => l.offset,
        _ => me.metadata()?.len(),
    };
    let copied = io::copy(&mut (&me).take(len), w)?;
    if copied != len {
        return Err(io::Error::other("torpor's own executable changed while it was copied"));
    }
    let pad = (single::ALIGN - copied % single::ALIGN) % single::ALIGN;
    w.write_all(&vec![0u8; pad as usize])?;
    Ok(copied + pad)
}

/// If this process runs a self-restoring executable, the arguments that make it
/// `torpor restore <itself> ARGS...`. Costs one open, one stat and one 32-byte read.
pub fn exe_args() -> Option<Vec<std::ffi::OsString>> {
    let me = File::open("/proc/self/exe").ok()?;
    let size = me.metadata().ok()?.len();
    let mut t = [0u8; single::EXE_TRAILER_LEN as usize];
    me.read_exact_at(&mut t, size.checked_sub(single::EXE_TRAILER_LEN)?).ok()?;
    single::exe_trailer(&t)?;
    let path = std::env::current_exe().ok()?;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| "torpor".into());
    Some([argv0, "restore".into(), path.into_os_string()].into_iter().chain(args).collect())
}

/// An image ready to read as a directory.
pub struct Opened {
    /// The image directory.
    pub dir: PathBuf,
    /// What the user named, for messages.
    pub shown: PathBuf,
    /// Whether it was unpacked from a single file or stream.
    pub unpacked: bool,
    _tmp: Option<TempDir>,
}

impl Opened {
    /// An image copied from object storage into a temporary directory.
    pub fn copied(copied: crate::remote::Copied) -> Self {
        Self { dir: copied.dir, shown: copied.shown, unpacked: true, _tmp: Some(copied.tmp) }
    }
}

/// A single-file image: its file and where it lies in it, or standard input.
pub enum Source {
    /// A regular file holding a single-file image (or an executable carrying one).
    File { file: File, located: single::Located },
    /// Standard input.
    Stdin,
}

impl Source {
    /// Lets [`single`] read it.
    pub fn input<'a>(&'a self, stdin: &'a mut dyn Read) -> Input<'a> {
        match self {
            Source::File { file, located } => {
                Input::File { file, offset: located.offset, len: located.len }
            }
            Source::Stdin => Input::Stream(stdin),
        }
    }

    /// Its length, when known.
    pub fn len(&self) -> u64 {
        match self {
            Source::File { located, .. } => located.len,
            Source::Stdin => 0,
        }
    }
}

/// What `path` names: `Ok(None)` for a directory (or nothing at all: the directory
/// reader says what is wrong), a single-file source otherwise; an error for a file that
/// holds no image.
pub fn source(path: &Path) -> Result<Option<Source>> {
    if path.as_os_str() == "-" {
        return Ok(Some(Source::Stdin));
    }
    match fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        _ => return Ok(None),
    }
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    match single::locate(&file).with_context(|| format!("cannot read {}", path.display()))? {
        Some(located) => Ok(Some(Source::File { file, located })),
        None => bail!(
            "{} is not a torpor image: neither an image directory, nor a single-file image \
             (`torpor dump -o`), nor an executable `torpor dump --exe` made",
            path.display()
        ),
    }
}

/// Opens the image `path` names for reading as a directory: a directory as it is; a
/// single-file image, an executable carrying one, or `-` (standard input) unpacked into
/// a private temporary directory, removed when the result is dropped; an `s3://` URL
/// copied into one.
pub fn open(path: &Path, show_progress: bool) -> Result<Opened> {
    if crate::remote::is_remote(path) {
        return crate::remote::download(path, show_progress).map(Opened::copied);
    }
    let Some(src) = source(path)? else {
        return Ok(Opened {
            dir: path.to_path_buf(),
            shown: path.to_path_buf(),
            unpacked: false,
            _tmp: None,
        });
    };
    let shown = match src {
        Source::Stdin => PathBuf::from(STDIN_NAME),
        Source::File { .. } => path.to_path_buf(),
    };
    // Next to the file when possible, so the copy takes room where the image already
    // does (not in a memory-backed /tmp); $TMPDIR for a stream or a read-only directory.
    let builder = tempfile::Builder::new().prefix(".torpor-restore-").clone();
    let tmp = match src {
        Source::File { .. } => builder.tempdir_in(parent_dir(path)).or_else(|_| builder.tempdir()),
        Source::Stdin => builder.tempdir(),
    }
    .context("cannot make a temporary directory to unpack the image into")?;
    let dir = tmp.path().join("image");
    fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let bar = if show_progress {
        let measure = crate::progress::Measure::ReadBytes { total: src.len() };
        crate::progress::Progress::start(format!("unpacking {}", shown.display()), measure)
    } else {
        crate::progress::Progress::none()
    };
    if let Source::Stdin = src {
        if io::stdin().is_terminal() {
            bail!("refusing to read an image from a terminal; `torpor restore -` reads a stream");
        }
    }
    let unpacked = interruptible(|| {
        let mut reader: Box<dyn Read> = match &src {
            Source::File { file, located } => {
                Box::new(At { file, at: located.offset, end: located.offset + located.len })
            }
            Source::Stdin => Box::new(io::stdin().lock()),
        };
        single::unpack(Input::Stream(&mut Interruptible(&mut reader)), &shown, &dir)
    });
    bar.finish();
    match unpacked {
        Ok(r) => r?,
        Err(signal) => {
            // The unpacked copy goes before the signal takes its usual effect.
            drop(tmp);
            reraise(signal);
            bail!("interrupted while unpacking {}", shown.display());
        }
    };
    Ok(Opened { dir, shown, unpacked: true, _tmp: Some(tmp) })
}

/// A range of a regular file, read front to back with positional reads.
struct At<'a> {
    file: &'a File,
    at: u64,
    end: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(self.end.saturating_sub(self.at).min(usize::MAX as u64) as usize);
        let n = self.file.read_at(&mut buf[..want], self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// The signal that asked torpor to stop while it unpacked, or 0.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The signals that end torpor, which unpacking notes instead.
const STOP_SIGNALS: [nix::sys::signal::Signal; 4] = {
    use nix::sys::signal::Signal::*;
    [SIGINT, SIGTERM, SIGHUP, SIGQUIT]
};

extern "C" fn note_stop(signal: libc::c_int) {
    STOP_SIGNAL.store(signal, Ordering::Relaxed);
}

/// A reader that fails once a stop signal has arrived (a read waiting on a pipe returns
/// `EINTR` then, the handler being installed without `SA_RESTART`).
struct Interruptible<R>(R);

impl<R: Read> Read for Interruptible<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if STOP_SIGNAL.load(Ordering::Relaxed) != 0 {
                return Err(io::Error::other("interrupted by a signal"));
            }
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}

/// Runs `f` with the stop signals noted rather than acted on, so that what `f` leaves
/// in a temporary directory can be removed; returns the signal that came, if one did.
fn interruptible<T>(f: impl FnOnce() -> T) -> std::result::Result<T, i32> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};

    STOP_SIGNAL.store(0, Ordering::Relaxed);
    let note = SigAction::new(SigHandler::Handler(note_stop), SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
    let old: Vec<_> = STOP_SIGNALS.iter().map(|&s| unsafe { sigaction(s, &note) }).collect();
    let r = f();
    for (&s, old) in STOP_SIGNALS.iter().zip(old) {
        if let Ok(old) = old {
            // SAFETY: puts back the action that was there before.
            let _ = unsafe { sigaction(s, &old) };
        }
    }
    match STOP_SIGNAL.swap(0, Ordering::Relaxed) {
        0 => Ok(r),
        signal => Err(signal),
    }
}

/// Delivers `signal` again, now that its usual action is back.
fn reraise(signal: i32) {
    // SAFETY: raise takes an integer.
    unsafe { libc::raise(signal) };
}

/// [`torpor_image::read_partial`] for any image `path` names, for `inspect` and `list`;
/// `check_data`: read and check every member of a single file, not only the records.
pub fn read_partial(path: &Path, check_data: bool) -> Result<torpor_image::PartialImage> {
    if crate::remote::is_remote(path) {
        // The records are all this reads: the page files are left where they are (they
        // would come in the background, which never starts).
        let c = crate::remote::download_lazily(path, std::time::Duration::MAX)?;
        let mut partial = torpor_image::read_partial(&c.copied.dir);
        // The copy goes with this function; messages name the image as the user did.
        partial.dir = c.copied.shown;
        return Ok(partial);
    }
    match source(path)? {
        None => Ok(torpor_image::read_partial(path)),
        Some(src) => {
            let shown = match src {
                Source::Stdin => PathBuf::from(STDIN_NAME),
                Source::File { .. } => path.to_path_buf(),
            };
            let mut stdin = io::stdin().lock();
            Ok(single::read_partial(src.input(&mut stdin), &shown, check_data))
        }
    }
}
