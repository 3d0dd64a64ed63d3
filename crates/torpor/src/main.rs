//! `torpor`: hibernate a running Linux process to disk and wake it later.
//!
//! A thin layer over `torpor-dump` and `torpor-restore`: arguments, messages, exit codes.
//! Exit status: 0 success, 1 the operation failed, 2 usage error; `restore` without
//! `--detach` exits with the restored process's own status.

mod check;
mod demo;
mod run;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "torpor",
    version,
    about = "Hibernate a running Linux process to disk and wake it later",
    after_help = "Examples:\n  torpor dump 4242 -D /var/tmp/app.img       hibernate pid 4242\n  \
                  torpor restore -D /var/tmp/app.img         wake it, wait for it to end\n  \
                  torpor demo                                see it happen to a counter"
)]
struct Cli {
    /// Log what torpor does (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Print nothing but errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Freeze a process, write its image into a directory, then end it.
    Dump {
        /// The process to hibernate.
        pid: i32,
        /// Directory to write the image into (created, mode 0700).
        #[arg(short = 'D', long = "dir")]
        dir: PathBuf,
        /// Let the process run on after the dump instead of ending it.
        #[arg(long)]
        leave_running: bool,
        /// Save pipes and sockets on descriptors 0-2 that lead outside the tree (a
        /// pipeline, a CI runner, ssh) as inherited: restore connects them to its own.
        #[arg(long)]
        inherit_stdio: bool,
        /// Save established TCP connections (TCP_REPAIR) so they carry on after the
        /// restore, instead of refusing them.
        #[arg(long)]
        tcp_established: bool,
        /// A unix socket peer outside the tree that will still be there at restore, which
        /// then connects a new socket to its address: `unix:/path`, `unix:@abstract`,
        /// `unix:socket:[INODE]`, or `unix` for every such peer. Repeatable.
        #[arg(long, value_name = "unix[:PEER]")]
        external: Vec<torpor_dump::ExternalUnix>,
        /// The process is a job of an interactive shell: its terminal is saved as the
        /// one to wake in (`torpor restore --shell-job` in any terminal).
        #[arg(long)]
        shell_job: bool,
        /// Do not wait for the image to reach the disk before ending the process: faster,
        /// but a machine crash in the next half minute or so can lose the process.
        #[arg(long)]
        no_sync: bool,
        /// Compress the memory with zstd, on every core, at LEVEL (negative levels are
        /// faster and compress less; default 1).
        #[arg(long, value_name = "LEVEL", num_args = 0..=1, require_equals = true,
              value_parser = parse_level)]
        compress: Option<Option<i32>>,
        /// Make an incremental image over the image in this directory: only pages that
        /// changed since are stored; restore reads the rest from it (it must stay).
        #[arg(long, value_name = "DIR")]
        parent: Option<PathBuf>,
        /// Copy the memory in rounds while the process runs, then freeze it only to copy
        /// what it wrote since the last round (needs userfaultfd write protection and
        /// PAGEMAP_SCAN, Linux 6.7 or later).
        #[arg(long)]
        pre_copy: bool,
    },
    /// Wake the process saved in an image, with its original pid, and wait for it.
    Restore {
        /// Directory holding the image.
        #[arg(short = 'D', long = "dir")]
        dir: PathBuf,
        /// Return as soon as the process runs instead of waiting for it to end.
        #[arg(long)]
        detach: bool,
        /// Write the restored process's pid into this file.
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// Reach the running kernel's vDSO through jumps even when it is the saved one
        /// (tests the path taken after a reboot into another kernel).
        #[arg(long, hide = true)]
        force_vdso_jumps: bool,
        /// Wake a job dumped with --shell-job in this terminal, in the foreground.
        #[arg(long)]
        shell_job: bool,
        /// Let the process run before its memory is loaded: torpor serves its pages as
        /// it touches them and loads the rest in the background, then reports "all pages
        /// loaded" (with --detach, from a process of its own).
        #[arg(long)]
        lazy: bool,
        /// With --lazy, start loading pages nobody asked for only after this many
        /// milliseconds (lets tests act while pages are missing).
        #[arg(long, hide = true, default_value_t = 0)]
        lazy_prefetch_after_ms: u64,
    },
    /// Check an image completely (checksums, format, CPU, files) without restoring it.
    Verify {
        #[arg(short = 'D', long = "dir")]
        dir: PathBuf,
    },
    /// Start a program as the first process of its own pid namespace, so that its tree
    /// can be woken even where its pids are taken; waits for it.
    Run {
        /// Write the program's pid (as seen from outside) into this file.
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// The program and its arguments.
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// Report which kernel features torpor relies on are present here.
    Check,
    /// Start a small counting program, hibernate it, wake it, show the count carry on.
    Demo,
    /// The demo's counting program (internal).
    #[command(name = "__count", hide = true)]
    Count { log: PathBuf },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    init_logging(cli.verbose, cli.quiet);
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("torpor: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// A zstd compression level within the range the library supports.
fn parse_level(s: &str) -> std::result::Result<i32, String> {
    let level: i32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    let range = torpor_image::pages::levels();
    if !range.contains(&level) {
        return Err(format!("levels go from {} to {}", range.start(), range.end()));
    }
    Ok(level)
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "info",
        (_, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TORPOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn run(cli: Cli) -> Result<u8> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Dump {
            pid,
            dir,
            leave_running,
            inherit_stdio,
            tcp_established,
            external,
            shell_job,
            no_sync,
            compress,
            parent,
            pre_copy,
        } => {
            let opts = torpor_dump::DumpOptions {
                pid,
                dir: dir.clone(),
                leave_running,
                inherit_stdio,
                tcp_established,
                external,
                shell_job,
                no_sync,
                compress: compress.map(|level| level.unwrap_or(torpor_image::pages::DEFAULT_LEVEL)),
                parent,
                pre_copy,
            };
            let s =
                // An interrupted dump would leave the process stopped halfway through a call
                // torpor runs in it: an interruption waits until it is itself again.
                with_signals_deferred(|| torpor_dump::dump(&opts))
                    .with_context(|| format!("dump of pid {pid} failed"))?;
            if !quiet {
                eprintln!(
                    "torpor: pid {pid} saved to {}: {} pages ({}), {} zero pages skipped{}, frozen {:.1} ms, total {:.1} ms{}",
                    dir.display(),
                    s.pages_stored,
                    human(s.image_bytes),
                    s.zero_pages_skipped,
                    if s.pages_from_parent > 0 {
                        format!(", {} unchanged pages left in the parent", s.pages_from_parent)
                    } else {
                        String::new()
                    },
                    s.frozen.as_secs_f64() * 1e3,
                    s.total.as_secs_f64() * 1e3,
                    if leave_running { ", left running" } else { "" }
                );
                if let Some(p) = &s.pre_copy {
                    eprintln!("torpor: {}", pre_copy_line(p));
                }
            }
            Ok(0)
        }
        Command::Restore {
            dir,
            detach,
            pidfile,
            force_vdso_jumps,
            shell_job,
            lazy,
            lazy_prefetch_after_ms,
        } => {
            let opts = torpor_restore::RestoreOptions {
                dir: dir.clone(),
                detach,
                force_vdso_jumps,
                shell_job,
                lazy,
                lazy_prefetch_after: std::time::Duration::from_millis(lazy_prefetch_after_ms),
            };
            // A lazy restore keeps the signals held until every page is loaded: the page
            // server takes them and kills the tree, which cannot run without its memory.
            let r = with_signals_deferred(|| -> Result<_> {
                let mut r = torpor_restore::restore(&opts)
                    .with_context(|| format!("restore from {} failed", dir.display()))?;
                if let Some(p) = &pidfile {
                    write_pidfile(p, r.pid)?;
                }
                if !quiet {
                    eprintln!(
                        "torpor: pid {} woken from {} ({}) in {:.1} ms{}",
                        r.pid,
                        dir.display(),
                        human(r.image_bytes),
                        r.total.as_secs_f64() * 1e3,
                        if lazy { "; loading its memory" } else { "" }
                    );
                }
                if let Some(server) = r.pages.take() {
                    serve_pages(server, r.pid, detach, quiet)?;
                }
                Ok(r)
            })?;
            if detach {
                return Ok(0);
            }
            let code = match r.job {
                Some((pgid, tty, modes)) => {
                    torpor_restore::terminal::wait_job(r.pid, pgid, tty, modes)
                }
                None => torpor_restore::wait(r.pid),
            }
            .with_context(|| format!("waiting for pid {} failed", r.pid))?;
            Ok(code.clamp(0, 255) as u8)
        }
        Command::Verify { dir } => {
            let (reader, tree) = torpor_restore::check_image(&dir)
                .with_context(|| format!("image {} is not usable", dir.display()))?;
            if !quiet {
                let p = &tree.processes[0];
                println!(
                    "{}: complete and intact; pid {} ({}), {} mappings, {} descriptors, made by torpor {} on kernel {}",
                    dir.display(),
                    p.pid,
                    p.cmdline.first().map(String::as_str).unwrap_or("?"),
                    p.vmas.len(),
                    p.fds.len(),
                    reader.manifest().torpor_version,
                    reader.manifest().kernel_release
                );
            }
            Ok(0)
        }
        Command::Run { pidfile, cmd } => run::run(&cmd, pidfile.as_deref(), quiet),
        Command::Check => check::run(quiet),
        Command::Demo => demo::run(),
        Command::Count { log } => demo::count(&log),
    }
}

/// The pre-copy part of the dump summary: rounds, what each stored, the setup stop.
fn pre_copy_line(p: &torpor_dump::PreCopyReport) -> String {
    if p.processes == 0 {
        return "pre-copy: nothing could be tracked, all memory was copied frozen".into();
    }
    let rounds: Vec<String> = p
        .rounds
        .iter()
        .map(|r| format!("{} in {:.1} ms", human(r.bytes), r.took.as_secs_f64() * 1e3))
        .collect();
    format!(
        "pre-copy: {} round{} while running ({}), stopped {:.1} ms to set up",
        p.rounds.len(),
        if p.rounds.len() == 1 { "" } else { "s" },
        rounds.join(", "),
        p.setup_frozen.as_secs_f64() * 1e3
    )
}

/// Serves a lazy restore's pages until all are loaded (with `detach`, from a child
/// process, which reports on its own), and reports.
fn serve_pages(
    mut server: torpor_restore::lazy::PageServer,
    pid: i32,
    detach: bool,
    quiet: bool,
) -> Result<()> {
    let report = move |loaded: Result<torpor_restore::lazy::LoadStats, _>| match loaded {
        Ok(s) => {
            if !quiet {
                eprintln!(
                    "torpor: pid {pid}: all pages loaded ({}) in {:.1} ms, {} faults answered",
                    human(s.bytes),
                    s.took.as_secs_f64() * 1e3,
                    s.faults
                );
            }
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("lazy restore of pid {pid} failed"))),
    };
    if detach {
        server
            .detach(move |loaded| match report(loaded) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("torpor: {e:#}");
                    1
                }
            })
            .context("cannot start the page server")?;
        return Ok(());
    }
    server.start().context("cannot start the page server")?;
    let loaded = server.finish();
    if loaded.is_err() {
        // The server killed the tree; the root is this process's child.
        let _ = torpor_restore::wait(pid);
    }
    report(loaded)
}

/// Runs `f` with SIGINT, SIGTERM, SIGHUP and SIGQUIT held back; one that arrived meanwhile
/// takes effect when `f` is done.
fn with_signals_deferred<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset operations on locals; pthread_sigmask on this thread only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        let r = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

fn write_pidfile(path: &std::path::Path, pid: i32) -> Result<()> {
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("cannot write pid file {}", path.display()))?;
    writeln!(f, "{pid}").with_context(|| format!("cannot write pid file {}", path.display()))
}

/// Bytes in a human unit.
pub(crate) fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
