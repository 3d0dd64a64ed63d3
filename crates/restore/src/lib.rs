//! Validate a torpor image and bring its process back.
//!
//! 1. Read the whole image and check every checksum, the format version, the CPU's XSAVE
//!    features, that the pid is free and that every file the process uses is unchanged,
//!    before anything is created.
//! 2. Open the process's files in torpor, then create the process with its pid
//!    (`clone3` + `set_tid`); it installs its descriptors and stops (see `child`).
//! 3. Drive it under ptrace with system calls run inside it (see `torpor_sys::remote`):
//!    replace torpor's address space with the saved one, page data read straight from
//!    the image by the process itself, move the vDSO, then signals, timers, limits and
//!    credentials (see `space` and `state`).
//! 4. Load its registers and signal mask and let it go.
//!
//! The new process dies with torpor (`PTRACE_O_EXITKILL` and a parent-death signal) until
//! it is handed over, so a failed or interrupted restore leaves nothing running.

mod child;
mod prepare;
mod space;
mod state;

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use torpor_image::{model, ImageReader};
use torpor_sys::{ptrace, Remote};

/// What to restore and how.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub dir: PathBuf,
    /// The caller will not wait for the process (it is reparented when torpor exits), so
    /// a parent-death signal is not set on it.
    pub detach: bool,
    /// Always reach the running kernel's vDSO through jumps from the saved one, as after
    /// a reboot into another kernel (for testing that path).
    pub force_vdso_jumps: bool,
}

/// A restored, running process.
#[derive(Debug, Clone)]
pub struct Restored {
    pub pid: i32,
    pub verify_time: Duration,
    pub total: Duration,
    pub image_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Image(#[from] torpor_image::ImageError),
    #[error("the image holds {what}, which this version of torpor cannot restore")]
    Unsupported { what: String },
    #[error(
        "the image needs CPU state this machine lacks: XSAVE features {missing:#x} are not \
         enabled here (image uses {used:#x}, this CPU has {have:#x})"
    )]
    Cpu { used: u64, have: u64, missing: u64 },
    #[error("the image is for {arch}, this machine is {here}")]
    Arch { arch: String, here: &'static str },
    #[error(
        "pid {pid} is taken by {holder}; free the pid, or start the program under \
         `torpor run` so it can be woken in its own pid namespace"
    )]
    PidTaken { pid: i32, holder: String },
    #[error("file {path} has changed since the dump ({why}); restoring could corrupt the process")]
    FileChanged { path: String, why: String },
    #[error("cannot open {what}")]
    Prepare { what: String, source: io::Error },
    #[error("cannot create pid {pid}")]
    Clone { pid: i32, source: io::Error },
    #[error("pid {pid}: the new process could not {step}")]
    ChildSetup { pid: i32, step: &'static str, source: io::Error },
    #[error("pid {pid}: {step}")]
    Step { pid: i32, step: String, source: torpor_sys::Error },
    #[error("pid {pid}: cannot map {start:#x}-{end:#x} ({what})")]
    Map { pid: i32, start: u64, end: u64, what: String, source: torpor_sys::Error },
    #[error("pid {pid}: {what}")]
    Vdso { pid: i32, what: String },
}

pub type Result<T> = std::result::Result<T, RestoreError>;

/// Names whoever holds a pid, for messages.
pub(crate) fn describe_pid(pid: i32) -> String {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "another process".into());
    let state = torpor_sys::proc::status(pid).map(|s| s.state).unwrap_or('?');
    if state == 'Z' {
        format!("{comm} (pid {pid}, a zombie its parent has not reaped)")
    } else {
        format!("{comm} (pid {pid})")
    }
}

/// Checks an image completely, creating nothing.
pub fn check_image(dir: &std::path::Path) -> Result<(ImageReader, model::Tree)> {
    let reader = ImageReader::open(dir)?;
    reader.verify_all(|_| {})?;
    let tree = reader.read_tree()?;
    prepare::validate(&reader, &tree)?;
    Ok((reader, tree))
}

/// Restores the image in `opts.dir` and lets the process run.
pub fn restore(opts: &RestoreOptions) -> Result<Restored> {
    let t0 = Instant::now();
    let (reader, tree) = check_image(&opts.dir)?;
    let verify_time = t0.elapsed();
    let process = &tree.processes[0];
    let pid = process.pid;
    for t in &process.threads {
        prepare::check_pid_free(t.tid)?;
    }
    prepare::check_files(&tree)?;

    let mut prepared = prepare::prepare(&reader, &tree, process)?;
    let child = child::spawn(&mut prepared.plan)?;
    debug_assert_eq!(child, pid);
    // From here on, any failure kills the half-made process.
    let result = take_over(opts, &reader, &tree, process, &prepared);
    // The files were inherited by the child; torpor's copies are not needed any more.
    drop(prepared);
    if let Err(e) = result {
        // SAFETY: kill takes only integers; `pid` is our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = ptrace::wait_exit(pid);
        return Err(e);
    }
    let image_bytes = reader.manifest().files.iter().map(|f| f.len).sum();
    Ok(Restored { pid, verify_time, total: t0.elapsed(), image_bytes })
}

fn take_over(
    opts: &RestoreOptions,
    reader: &ImageReader,
    tree: &model::Tree,
    process: &model::Process,
    prepared: &prepare::Prepared,
) -> Result<()> {
    let pid = process.pid;
    let step = |what: &str| {
        let step = what.to_string();
        move |source| RestoreError::Step { pid, step, source }
    };
    ptrace::seize_builder(pid).map_err(step("attach to the new process"))?;
    ptrace::interrupt_and_wait(pid).map_err(step("stop the new process"))?;
    ptrace::set_sigmask(pid, !0).map_err(step("block signals"))?;

    let mut space = space::Space::take(pid, process)?;
    // Before the saved mappings exist: the kernel refuses to change the executable
    // while the old one (torpor, which the image may also be) is still mapped.
    state::set_mm(&space, process, prepared)?;
    space.rebuild(opts, reader, tree, process, prepared)?;
    let others = state::restore_state(&space, opts, process, prepared)?;
    space.finish()?;

    // Every thread is ready before any runs.
    let remotes: Vec<&Remote> = std::iter::once(space.remote()).chain(others.iter()).collect();
    for (t, r) in process.threads.iter().zip(&remotes) {
        state::load_registers(r, t)?;
        ptrace::set_sigmask(t.tid, t.blocked).map_err(step("set the signal mask"))?;
    }
    for r in remotes.iter().rev() {
        ptrace::detach(r.tid(), 0).map_err(step("let the process run"))?;
    }
    Ok(())
}

/// Waits for a restored process (a child of this one) to end; returns its exit code, or
/// 128 plus the signal that killed it, as shells do.
pub fn wait(pid: i32) -> io::Result<i32> {
    let status = ptrace::wait_exit(pid)?;
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}
