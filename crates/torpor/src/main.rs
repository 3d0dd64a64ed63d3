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
        /// The process is a job of an interactive shell: its terminal is saved as the
        /// one to wake in (`torpor restore --shell-job` in any terminal).
        #[arg(long)]
        shell_job: bool,
        /// Do not wait for the image to reach the disk before ending the process: faster,
        /// but a machine crash in the next half minute or so can lose the process.
        #[arg(long)]
        no_sync: bool,
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
    /// The guard a dump starts, which undoes the dump if torpor dies (internal).
    #[command(name = "__guard", hide = true)]
    Guard { kind: String, pid: i32, torpor: i32 },
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
            shell_job,
            no_sync,
        } => {
            let opts = torpor_dump::DumpOptions {
                pid,
                dir: dir.clone(),
                leave_running,
                inherit_stdio,
                tcp_established,
                shell_job,
                no_sync,
                // Through /proc: this very program, even if replaced or removed since.
                guard: Some(PathBuf::from("/proc/self/exe")),
            };
            let s =
                // An interrupted dump would leave the process stopped halfway through a call
                // torpor runs in it: an interruption waits until it is itself again.
                with_signals_deferred(|| torpor_dump::dump(&opts))
                    .with_context(|| format!("dump of pid {pid} failed"))?;
            if !quiet {
                eprintln!(
                    "torpor: pid {pid} saved to {}: {} pages ({}), {} zero pages skipped, frozen {:.1} ms, total {:.1} ms{}",
                    dir.display(),
                    s.pages_stored,
                    human(s.image_bytes),
                    s.zero_pages_skipped,
                    s.frozen.as_secs_f64() * 1e3,
                    s.total.as_secs_f64() * 1e3,
                    if leave_running { ", left running" } else { "" }
                );
            }
            Ok(0)
        }
        Command::Restore { dir, detach, pidfile, force_vdso_jumps, shell_job } => {
            let opts = torpor_restore::RestoreOptions {
                dir: dir.clone(),
                detach,
                force_vdso_jumps,
                shell_job,
                guard: Some(PathBuf::from("/proc/self/exe")),
            };
            let r = with_signals_deferred(|| torpor_restore::restore(&opts))
                .with_context(|| format!("restore from {} failed", dir.display()))?;
            if let Some(p) = &pidfile {
                write_pidfile(p, r.pid)?;
            }
            if !quiet {
                eprintln!(
                    "torpor: pid {} woken from {} ({}) in {:.1} ms",
                    r.pid,
                    dir.display(),
                    human(r.image_bytes),
                    r.total.as_secs_f64() * 1e3
                );
            }
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
        Command::Guard { kind, pid, torpor } => Ok(match kind.as_str() {
            "dump" => torpor_dump::run_guard(pid, torpor),
            _ => torpor_restore::run_guard(pid, torpor),
        } as u8),
    }
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
