//! A progress bar on the terminal while a dump or a restore runs: bytes done, rate and
//! time left.
//!
//! It is drawn only when stderr is a terminal, messages are not silenced (`--quiet`) and
//! logs do not go to stderr, and only once the operation has run for a moment, so a quick
//! one prints nothing but its summary line.
//!
//! The bar watches from outside instead of being told by the dump and restore libraries:
//! a dump's progress is the size of the image files growing in their directory, a
//! restore's is the bytes this process has read (`rchar` of `/proc/self/io`), which the
//! image check makes about equal to the image's size. This keeps the libraries free of
//! any user-interface concern.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How long an operation runs before its bar appears. `TORPOR_PROGRESS_DELAY_MS`
/// overrides it (the tests set 0).
const DELAY: Duration = Duration::from_millis(400);
/// How often the bar is brought up to date.
const TICK: Duration = Duration::from_millis(100);

/// What the bar measures.
pub enum Measure {
    /// Bytes of the files in an image directory being written; the total is an estimate.
    DirSize { dir: PathBuf, estimate: u64 },
    /// Bytes this process reads from now on, out of a known total.
    ReadBytes { total: u64 },
    /// Bytes a transfer counts itself (to or from object storage, where neither files
    /// nor reads show it), out of a total or an estimate.
    Counted { done: Arc<AtomicU64>, total: u64 },
}

/// A running bar; [`Progress::finish`] (or dropping it) takes it off the terminal.
pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Whether a bar may be drawn: stderr is a terminal and nobody asked for silence.
pub fn wanted(quiet: bool, logs_on_stderr: bool) -> bool {
    !quiet && !logs_on_stderr && std::io::stderr().is_terminal()
}

impl Progress {
    /// A bar that draws nothing.
    pub fn none() -> Self {
        Self { stop: Arc::new(AtomicBool::new(true)), thread: None }
    }

    /// Starts a bar labelled `what` measuring `measure`.
    pub fn start(what: String, measure: Measure) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let delay = std::env::var("TORPOR_PROGRESS_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(DELAY, Duration::from_millis);
        let base = read_bytes();
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || draw(&what, measure, base, delay, &flag))
            .ok();
        Self { stop, thread }
    }

    /// Takes the bar off the terminal.
    pub fn finish(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn draw(what: &str, measure: Measure, base: u64, delay: Duration, stop: &AtomicBool) {
    let start = Instant::now();
    while start.elapsed() < delay {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep(TICK.min(delay));
    }
    let total = match &measure {
        Measure::DirSize { estimate, .. } => *estimate,
        Measure::ReadBytes { total } => *total,
        Measure::Counted { total, .. } => *total,
    };
    let bar = ProgressBar::with_draw_target(Some(total.max(1)), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}, {eta} left",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    loop {
        let done = match &measure {
            Measure::DirSize { dir, .. } => dir_size(dir),
            // Other reads (this very file, `/proc` of the processes) are not the image's.
            Measure::ReadBytes { total } => read_bytes().saturating_sub(base).min(*total),
            Measure::Counted { done, .. } => done.load(Ordering::Relaxed),
        };
        // An estimate can fall short; the bar then ends where the work does.
        if done > bar.length().unwrap_or(0) {
            bar.set_length(done);
        }
        bar.set_position(done);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(TICK);
    }
    bar.finish_and_clear();
}

/// Total size of the regular files directly in `dir`.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
}

/// Bytes this process has read through system calls so far (`rchar`), all threads.
fn read_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("rchar:")?.trim().parse().ok()))
        .unwrap_or(0)
}

/// An estimate of the bytes a dump of `pid` will store: the anonymous memory of it and
/// its descendants (private file pages written to count as anonymous too).
pub fn dump_estimate(pid: i32) -> u64 {
    let mut total = 0u64;
    let mut todo = vec![pid];
    let mut seen = std::collections::HashSet::new();
    while let Some(p) = todo.pop() {
        if !seen.insert(p) {
            continue;
        }
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")) {
            let kib: u64 = s
                .lines()
                .find_map(|l| {
                    l.strip_prefix("Anonymous:")?.trim().strip_suffix("kB")?.trim().parse().ok()
                })
                .unwrap_or(0);
            total = total.saturating_add(kib * 1024);
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            todo.extend(children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
        }
    }
    total
}

/// Total size of the files of the image in `dir`, which a restore reads about once.
pub fn image_size(dir: &Path) -> u64 {
    dir_size(dir)
}
