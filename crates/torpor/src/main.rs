//! `torpor`: hibernate a running Linux process to disk and wake it later.
//!
//! A thin layer over `torpor-dump` and `torpor-restore`: arguments, messages, exit codes.
//! Exit status: 0 success, 1 the operation failed, 2 usage error; `restore` without
//! `--detach` exits with the restored process's own status.

mod check;
mod demo;
mod inspect;
mod list;
mod man;
mod migrate;
mod progress;
mod registry;
mod remote;
mod run;
mod single;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueHint};

#[derive(Parser)]
#[command(
    name = "torpor",
    version,
    about = "Hibernate a running Linux process to disk and wake it later",
    after_help = "Examples:\n  torpor dump 4242 -D /var/tmp/app.img       hibernate pid 4242\n  \
                  torpor inspect /var/tmp/app.img            see what the image holds\n  \
                  torpor restore -D /var/tmp/app.img         wake it, wait for it to end\n  \
                  torpor list /var/tmp                       the images saved there\n  \
                  torpor demo                                see it happen to a counter\n\n\
                  `torpor COMMAND --help` shows the options and examples of each command."
)]
struct Cli {
    /// Log what torpor does (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Print nothing but errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Write logs to this file (appended) instead of stderr, at least at the -v level.
    #[arg(long, global = true, value_name = "PATH", value_hint = ValueHint::FilePath)]
    log_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Freeze a process, write its image into a directory or one file, then end it.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["dir", "output", "exe"])))]
    #[command(after_help = "Examples:\n  \
        torpor dump 4242 -D /var/tmp/app.img                  hibernate pid 4242 and its children\n  \
        torpor dump 4242 -o app.torpor                        the image as one file\n  \
        torpor dump 4242 -o - | ssh host torpor restore -     wake it on another machine\n  \
        torpor dump 4242 --exe app.run                        an executable: ./app.run wakes it\n  \
        torpor dump 4242 -D snap.img --leave-running          a snapshot; the process runs on\n  \
        torpor dump 4242 -D s3://bucket/app                   into S3 or an S3-compatible store\n  \
        torpor dump 4242 -D app.img --tcp-established         keep its open TCP connections\n  \
        torpor dump 4242 -D job.img --shell-job               a job of an interactive shell")]
    Dump {
        /// The process to hibernate.
        pid: i32,
        /// Directory to write the image into (created, mode 0700), or
        /// `s3://BUCKET/PREFIX` to stream it into object storage (one object per file;
        /// settings from the AWS_* variables and ~/.aws, as the AWS tools read them).
        #[arg(short = 'D', long = "dir", value_hint = ValueHint::DirPath)]
        dir: Option<PathBuf>,
        /// Write the image as one file instead (mode 0600), or to standard output with
        /// `-`, written front to back (a pipe, ssh, object storage).
        #[arg(short = 'o', long = "output", value_name = "FILE", value_hint = ValueHint::FilePath)]
        output: Option<PathBuf>,
        /// Write an executable (mode 0700) that wakes the process when run: a copy of
        /// torpor carrying the image; `./FILE --detach` and restore's other options work.
        #[arg(long, value_name = "FILE", value_hint = ValueHint::FilePath)]
        exe: Option<PathBuf>,
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
        /// Only with -D: a single file must hold all of its image.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["output", "exe"])]
        parent: Option<PathBuf>,
        /// Copy the memory in rounds while the process runs, then freeze it only to copy
        /// what it wrote since the last round (needs userfaultfd write protection and
        /// PAGEMAP_SCAN, Linux 6.7 or later).
        #[arg(long)]
        pre_copy: bool,
        /// Encrypt the image with the key in FILE (`torpor keygen FILE` makes one): its
        /// memory and records cannot be read, nor changed unnoticed, without it; restore
        /// needs the same key. With --parent, the parent must be encrypted with it too.
        #[arg(long, value_name = "FILE", value_hint = ValueHint::FilePath)]
        encrypt_key: Option<PathBuf>,
    },
    /// Move a running process to another host: its memory is copied while it runs, it is
    /// frozen only for the last pages written and its small state, and wakes there.
    #[command(after_help = "Examples:\n  \
        torpor migrate 4242 --to dest:7000 --tls-cert src.pem --tls-key src.key --tls-ca ca.pem\n  \
        torpor migrate 4242 --to 10.0.0.2:7000 --insecure --tcp-established\n\n\
        The destination runs `torpor serve --listen ADDR`. Until it answers that the process \
        woke there, any failure (refusal, cut network, timeout) leaves the process running \
        here as before. Established TCP connections move (--tcp-established) when the \
        destination takes over the address: see `torpor serve --before-restore` and \
        docs/migration.md.")]
    Migrate {
        /// The process to move (with its children).
        pid: i32,
        /// The destination: HOST:PORT where `torpor serve` listens.
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// Move established TCP connections too (TCP_REPAIR) instead of refusing them.
        #[arg(long)]
        tcp_established: bool,
        #[command(flatten)]
        tls: migrate::TlsArgs,
        /// The name the destination's certificate must carry, when not the HOST of --to.
        #[arg(long, value_name = "NAME", requires = "tls_cert")]
        tls_name: Option<String>,
        /// Seconds a silent destination is waited for (also how long it may take to
        /// restore) before the migration fails and the process runs on here.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// Receive processes that `torpor migrate` sends, and wake them here.
    #[command(after_help = "Examples:\n  \
        torpor serve --listen 0.0.0.0:7000 --tls-cert dst.pem --tls-key dst.key --tls-ca ca.pem\n  \
        torpor serve --listen 10.0.0.2:7000 --insecure --once \\\n      \
        --before-restore 'ip -n src addr del 10.0.0.100/24 dev eth0; ip addr add 10.0.0.100/24 dev eth0'\n\n\
        Each image is kept in a private temporary directory until the process is woken, then \
        removed. Processes run as root here with what the image holds: only accept sources \
        you trust (mutual TLS checks their certificates).")]
    Serve {
        /// The address and port to listen on.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: String,
        /// Take one migration, then exit (0 if it woke, 1 if not).
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        tls: migrate::TlsArgs,
        /// A shell command run once the whole image is here and before it is restored,
        /// while the source's process is frozen: the place to move a service address to
        /// this host. If it fails, nothing is restored and the process runs on at the
        /// source. $TORPOR_MIGRATION_SOURCE and $TORPOR_MIGRATION_PID describe it.
        #[arg(long, value_name = "CMD")]
        before_restore: Option<String>,
        /// A shell command run when the restore fails after --before-restore ran: the place
        /// to give the address back to the source, where the process runs on.
        #[arg(long, value_name = "CMD")]
        after_failed_restore: Option<String>,
        /// Where to keep incoming images until they are restored (default: $TMPDIR).
        #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
        work_dir: Option<PathBuf>,
        /// Seconds a silent source is waited for before its migration is given up.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
        /// Wake each process before its memory is loaded (as `torpor restore --lazy`), so
        /// that the source's copy is frozen only until its state is rebuilt here. A page
        /// found damaged afterwards can then only end the woken process, whose source
        /// copy is gone.
        #[arg(long)]
        lazy: bool,
    },
    /// Wake the process saved in an image, with its original pid, and wait for it.
    #[command(after_help = "Examples:\n  \
        torpor restore -D /var/tmp/app.img                    wake it, wait, exit with its status\n  \
        torpor restore app.torpor                             the same from a single-file image\n  \
        ssh host cat app.torpor | torpor restore -            from standard input\n  \
        torpor restore -D app.img --detach --pidfile app.pid  wake it in the background\n  \
        torpor restore s3://bucket/app                        from object storage\n  \
        torpor restore -D job.img --shell-job                 wake a shell job in this terminal")]
    Restore {
        /// The image: a single-file image, `-` for standard input, a directory, or
        /// `s3://BUCKET/PREFIX` (copied into a private temporary directory first).
        #[arg(required_unless_present = "dir_flag", value_name = "IMAGE",
              value_hint = ValueHint::AnyPath)]
        image: Option<PathBuf>,
        /// Directory holding the image.
        #[arg(short = 'D', long = "dir", id = "dir_flag", value_name = "DIR",
              conflicts_with = "image", value_hint = ValueHint::DirPath)]
        dir: Option<PathBuf>,
        /// Return as soon as the process runs instead of waiting for it to end.
        #[arg(long)]
        detach: bool,
        /// Write the restored process's pid into this file.
        #[arg(long, value_hint = ValueHint::FilePath)]
        pidfile: Option<PathBuf>,
        /// Reach the running kernel's vDSO through jumps even when it is the saved one
        /// (tests the path taken after a reboot into another kernel).
        #[arg(long, hide = true)]
        force_vdso_jumps: bool,
        /// Wake a job dumped with --shell-job in this terminal, in the foreground.
        #[arg(long)]
        shell_job: bool,
        /// As root, restore the user ids, group ids and capabilities the image holds
        /// even when a user other than root could have written it (by default refused:
        /// an image a user can write must not become a root process).
        #[arg(long)]
        allow_credentials: bool,
        /// Let the process run before its memory is loaded: torpor serves its pages as
        /// it touches them and loads the rest in the background, then reports "all pages
        /// loaded" (with --detach, from a process of its own).
        #[arg(long)]
        lazy: bool,
        /// With --lazy, start loading pages nobody asked for only after this many
        /// milliseconds (lets tests act while pages are missing; from object storage,
        /// the background copy of the page files waits as long).
        #[arg(long, hide = true, default_value_t = 0)]
        lazy_prefetch_after_ms: u64,
        /// The key file of an encrypted image (the one given to `dump --encrypt-key`).
        #[arg(long, visible_alias = "key", value_name = "FILE", value_hint = ValueHint::FilePath)]
        encrypt_key: Option<PathBuf>,
    },
    /// Check an image completely (checksums, format, CPU, files) without restoring it.
    #[command(
        after_help = "Example:\n  torpor verify -D /var/tmp/app.img && torpor restore -D /var/tmp/app.img"
    )]
    Verify {
        /// The image: a single-file image, `-` for standard input, a directory, or
        /// `s3://BUCKET/PREFIX` (copied into a private temporary directory first).
        #[arg(required_unless_present = "dir_flag", value_name = "IMAGE",
              value_hint = ValueHint::AnyPath)]
        image: Option<PathBuf>,
        /// Directory holding the image.
        #[arg(short = 'D', long = "dir", id = "dir_flag", value_name = "DIR",
              conflicts_with = "image", value_hint = ValueHint::DirPath)]
        dir: Option<PathBuf>,
        /// The key file of an encrypted image.
        #[arg(long, visible_alias = "key", value_name = "FILE", value_hint = ValueHint::FilePath)]
        encrypt_key: Option<PathBuf>,
    },
    /// Show what an image holds: processes, threads, memory, descriptors, and any damage.
    #[command(after_help = "Examples:\n  \
        torpor inspect /var/tmp/app.img                         at a glance\n  \
        torpor inspect --json app.img | jq '.processes[].pid'   for scripts\n\n\
        Exit status: 0 for an intact image, 1 when faults were found;\n\
        what could be read is shown all the same.")]
    Inspect {
        /// Directory holding the image (also accepted as -D DIR), or a single-file image,
        /// or `-` for one on standard input, or `s3://BUCKET/PREFIX`.
        #[arg(required_unless_present = "dir_flag", value_hint = ValueHint::AnyPath)]
        dir: Option<PathBuf>,
        /// The same as DIR.
        #[arg(
            short = 'D',
            long = "dir",
            id = "dir_flag",
            value_name = "DIR",
            conflicts_with = "dir",
            value_hint = ValueHint::DirPath
        )]
        dir_flag: Option<PathBuf>,
        /// Print JSON for scripts (schema in docs/inspect-json.md).
        #[arg(long)]
        json: bool,
        /// The key file of an encrypted image: without it only its manifest can be shown.
        #[arg(long, visible_alias = "key", value_name = "FILE", value_hint = ValueHint::FilePath)]
        encrypt_key: Option<PathBuf>,
    },
    /// Make a new random key for encrypted images (`dump --encrypt-key FILE`).
    #[command(after_help = "Examples:\n  \
        torpor keygen app.key                                 a new key, mode 0600\n  \
        torpor dump 4242 -D app.img --encrypt-key app.key     an image only the key opens\n  \
        torpor restore -D app.img --encrypt-key app.key       wake it\n\n\
        Keep the key apart from the images: whoever holds both can read them. A key lost\n\
        is every image made with it lost.")]
    Keygen {
        /// The file to write: 64 hex digits and a newline, mode 0600. An existing file is
        /// never replaced.
        #[arg(value_hint = ValueHint::FilePath)]
        file: PathBuf,
    },
    /// List the images in a directory: root pid, processes, size, age, command.
    #[command(after_help = "Examples:\n  \
        torpor list /var/tmp             every image directory in /var/tmp\n  \
        torpor list --json /var/tmp      the same for scripts")]
    List {
        /// The directory holding images (directories and single files), or one image.
        #[arg(value_hint = ValueHint::AnyPath)]
        dir: PathBuf,
        /// Print JSON for scripts: an array of {path, root_pid, pid_namespace, processes,
        /// command, bytes, created_unix, complete, encrypted, problem}.
        #[arg(long)]
        json: bool,
    },
    /// Start a program as the first process of its own pid namespace, so that its tree
    /// can be woken even where its pids are taken; waits for it.
    #[command(after_help = "Examples:\n  \
        torpor run -- python3 server.py         start it; `torpor ps` lists it with its pid\n  \
        torpor run --pidfile s.pid -- ./server  the pid to give `torpor dump`, in a file")]
    Run {
        /// Write the program's pid (as seen from outside) into this file.
        #[arg(long, value_hint = ValueHint::FilePath)]
        pidfile: Option<PathBuf>,
        /// The program and its arguments.
        #[arg(trailing_var_arg = true, required = true, value_hint = ValueHint::CommandWithArguments)]
        cmd: Vec<String>,
    },
    /// List the programs started with `torpor run` that are still running.
    #[command(after_help = "Example:\n  \
        torpor ps                      PID, processes in its tree, memory, age, command\n  \
        torpor dump \"$(torpor ps --json | jq '.[0].pid')\" -D app.img")]
    Ps {
        /// Print JSON for scripts: an array of {pid, processes, rss_bytes, started_unix,
        /// command, cwd}.
        #[arg(long)]
        json: bool,
    },
    /// Report which kernel features torpor relies on are present here.
    Check,
    /// Start a small counting program, hibernate it, wake it, show the count carry on.
    Demo,
    /// Print a shell completion script for bash, zsh, fish, elvish or PowerShell.
    #[command(after_help = "Examples:\n  \
        torpor completions bash > /etc/bash_completion.d/torpor\n  \
        torpor completions zsh > \"${fpath[1]}/_torpor\"\n  \
        torpor completions fish > ~/.config/fish/completions/torpor.fish")]
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), of torpor or of one of its commands.
    #[command(after_help = "Examples:\n  \
        torpor man | man -l -                 read it now\n  \
        torpor man dump | man -l -            the page of `torpor dump`\n  \
        torpor man --dir /usr/local/share/man/man1   install every page")]
    Man {
        /// The command whose page to print, instead of torpor's own.
        command: Option<String>,
        /// Write every page (torpor.1, torpor-dump.1...) into this directory instead.
        #[arg(long, conflicts_with = "command", value_hint = ValueHint::DirPath)]
        dir: Option<PathBuf>,
    },
    /// The demo's counting program (internal).
    #[command(name = "__count", hide = true)]
    Count { log: PathBuf },
    /// The guard a dump starts, which undoes the dump if torpor dies (internal).
    #[command(name = "__guard", hide = true)]
    Guard { kind: String, pid: i32, torpor: i32 },
}

fn main() -> ExitCode {
    // A self-restoring executable (`torpor dump --exe`) is `torpor restore <itself>`.
    let parsed = match single::exe_args() {
        Some(args) => Cli::try_parse_from(args),
        None => Cli::try_parse(),
    };
    let cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    let logs_on_stderr = match init_logging(cli.verbose, cli.quiet, cli.log_file.as_deref()) {
        Ok(on_stderr) => on_stderr,
        Err(e) => {
            eprintln!("torpor: {e:#}");
            return ExitCode::from(1);
        }
    };
    let show_progress = progress::wanted(cli.quiet, logs_on_stderr);
    match run(cli, show_progress) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            match hint(&e) {
                Some(h) => eprintln!("torpor: {e:#}; {h}"),
                None => eprintln!("torpor: {e:#}"),
            }
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

/// What to do next about a failure, when the message itself does not say it.
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    use torpor_dump::DumpError;
    use torpor_image::ImageError;
    use torpor_restore::RestoreError;

    let permission = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
            || c.to_string().contains("Operation not permitted")
    });
    if permission && !nix::unistd::geteuid().is_root() {
        return Some(
            "torpor needs root (or CAP_CHECKPOINT_RESTORE with CAP_SYS_PTRACE); \
             `torpor check` shows what is missing here",
        );
    }
    for c in e.chain() {
        if let Some(d) = c.downcast_ref::<DumpError>() {
            return match d {
                DumpError::NoSuchProcess { .. } => Some(
                    "check the pid (`ps -p PID`; `torpor ps` lists the programs \
                     `torpor run` started)",
                ),
                DumpError::Traced { .. } => Some("detach the debugger, then dump again"),
                DumpError::Zombie { .. } => {
                    Some("it has nothing left to save; its parent reaps it with wait()")
                }
                DumpError::Image(i) => image_hint(i),
                _ => None,
            };
        }
        if let Some(r) = c.downcast_ref::<RestoreError>() {
            return match r {
                RestoreError::FileChanged { .. } => {
                    Some("put the file back as it was at the dump, or dump the process again")
                }
                RestoreError::Image(i) => image_hint(i),
                RestoreError::Unsupported { .. } => {
                    Some("use the torpor that made the image (`torpor inspect DIR` names it)")
                }
                _ => None,
            };
        }
        if let Some(i) = c.downcast_ref::<ImageError>() {
            return image_hint(i);
        }
    }
    None
}

/// Sets up logging: to `log_file` when given (at least at info level), else to stderr.
/// Returns whether logs other than warnings may appear on stderr.
fn init_logging(verbose: u8, quiet: bool, log_file: Option<&std::path::Path>) -> Result<bool> {
    let level = match (quiet, verbose, log_file.is_some()) {
        (true, _, false) => "error",
        (_, 0, false) => "warn",
        (_, 0 | 1, _) => "info",
        (_, 2, _) => "debug",
        _ => "trace",
    };
    let from_env = std::env::var_os("TORPOR_LOG").is_some();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TORPOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    match log_file {
        Some(path) => {
            let file =
                std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(
                    || {
                        format!(
                            "cannot open the log file {} (does its directory exist and can \
                         torpor write there?)",
                            path.display()
                        )
                    },
                )?;
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
            Ok(false)
        }
        None => {
            tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
            Ok(from_env || verbose > 0)
        }
    }
}

fn run(cli: Cli, show_progress: bool) -> Result<u8> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Dump {
            pid,
            dir,
            output,
            exe,
            leave_running,
            inherit_stdio,
            tcp_established,
            external,
            shell_job,
            no_sync,
            compress,
            parent,
            pre_copy,
            encrypt_key,
        } => {
            let key = encrypt_key.as_deref().map(load_key).transpose()?;
            for (what, path) in [("-o", &output), ("--exe", &exe), ("--parent", &parent)] {
                if let Some(p) = path.as_deref().filter(|p| remote::is_remote(p)) {
                    remote::refuse(what, p)?;
                }
            }
            let (target, store) = match (dir, output, exe) {
                (Some(dir), _, _) if remote::is_remote(&dir) => {
                    let (store, shown) = remote::dump_store(&dir)?;
                    (single::DumpTarget::stored(shown), Some(store))
                }
                (Some(dir), _, _) => {
                    (single::dump_target(single::Target::Dir(dir), !no_sync)?, None)
                }
                (_, Some(file), _) => {
                    (single::dump_target(single::Target::File(file), !no_sync)?, None)
                }
                (_, _, Some(file)) => {
                    (single::dump_target(single::Target::Exe(file), !no_sync)?, None)
                }
                _ => unreachable!("clap requires one of them"),
            };
            let dir = target.dir.clone();
            let moved = store.as_ref().map(|s| s.bytes_moved());
            let opts = torpor_dump::DumpOptions {
                pid,
                dir: dir.clone(),
                leave_running,
                inherit_stdio,
                tcp_established,
                external,
                shell_job,
                no_sync: no_sync || !target.sync_dir,
                compress: compress.map(|level| level.unwrap_or(torpor_image::pages::DEFAULT_LEVEL)),
                parent,
                pre_copy,
                // Through /proc: this very program, even if replaced or removed since.
                guard: Some(PathBuf::from("/proc/self/exe")),
                after_commit: target.after_commit.clone(),
                store: store.map(remote::image_store),
                key,
            };
            let bar = if show_progress {
                let estimate = progress::dump_estimate(pid);
                let measure = match moved {
                    Some(done) => progress::Measure::Counted { done, total: estimate },
                    None => progress::Measure::DirSize { dir: dir.clone(), estimate },
                };
                progress::Progress::start(format!("saving pid {pid}"), measure)
            } else {
                progress::Progress::none()
            };
            // An interrupted dump would leave the process stopped halfway through a call
            // torpor runs in it: an interruption waits until it is itself again.
            tracing::info!("dump of pid {pid} into {} begins", target.shown);
            let s = with_signals_deferred(|| torpor_dump::dump(&opts));
            bar.finish();
            let shown = target.shown.clone();
            // The temporary directory of a single-file dump goes now.
            drop(target);
            let s = s.with_context(|| format!("dump of pid {pid} failed"))?;
            tracing::info!("dump of pid {pid} done: {s:?}");
            if !quiet {
                eprintln!(
                    "torpor: pid {pid} saved to {}: {} pages ({}), {} zero pages skipped{}, frozen {:.1} ms, total {:.1} ms{}",
                    shown,
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
            image,
            dir,
            detach,
            pidfile,
            force_vdso_jumps,
            shell_job,
            allow_credentials,
            lazy,
            lazy_prefetch_after_ms,
            encrypt_key,
        } => {
            let key = encrypt_key.as_deref().map(load_key).transpose()?;
            let given = image.or(dir).expect("clap requires one of them");
            if lazy && detach && remote::is_remote(&given) {
                anyhow::bail!(
                    "--lazy --detach cannot restore from {}: the page server would outlive \
                     torpor, which removes the temporary copy of the image the server reads \
                     from; restore without one of them",
                    given.display()
                );
            }
            let (opened, fetch, copy) = match lazy && remote::is_remote(&given) {
                true => {
                    let delay = std::time::Duration::from_millis(lazy_prefetch_after_ms);
                    let c = remote::download_lazily(&given, delay)?;
                    (single::Opened::copied(c.copied), Some(c.fetch), Some(c.copy))
                }
                false => (single::open(&given, show_progress)?, None, None),
            };
            if opened.unpacked && lazy && detach {
                anyhow::bail!(
                    "--lazy --detach needs an image directory: the page server reads the \
                     image after torpor returns, and {} is unpacked into a temporary one \
                     that goes when torpor does; restore without one of them",
                    opened.shown.display()
                );
            }
            let dir = opened.dir.clone();
            let shown = opened.shown.clone();
            let opts = torpor_restore::RestoreOptions {
                dir: dir.clone(),
                detach,
                force_vdso_jumps,
                shell_job,
                lazy,
                lazy_prefetch_after: std::time::Duration::from_millis(lazy_prefetch_after_ms),
                guard: Some(PathBuf::from("/proc/self/exe")),
                allow_credentials,
                fetch,
                // Standard input is what the caller chose to feed in, and an object store
                // what the caller reached with credentials of its choosing; a file is
                // judged by who could have written it.
                packed_from: (opened.unpacked
                    && given.as_os_str() != "-"
                    && !remote::is_remote(&given))
                .then(|| given.clone()),
                key,
            };
            let bar = if show_progress {
                let measure = progress::Measure::ReadBytes { total: progress::image_size(&dir) };
                progress::Progress::start(format!("waking {}", shown.display()), measure)
            } else {
                progress::Progress::none()
            };
            tracing::info!("restore from {} begins", shown.display());
            let mut registered = false;
            // A lazy restore keeps the signals held until every page is loaded: the page
            // server takes them and kills the tree, which cannot run without its memory.
            let r = with_signals_deferred(|| -> Result<_> {
                let restored = torpor_restore::restore(&opts);
                bar.finish();
                let mut r =
                    restored.with_context(|| format!("restore from {} failed", shown.display()))?;
                tracing::info!("restore from {} done: pid {} runs", shown.display(), r.pid);
                if let Some(p) = &pidfile {
                    write_pidfile(p, r.pid)?;
                }
                registered = register_woken(&dir, r.pid, opts.key.as_ref());
                if !quiet {
                    eprintln!(
                        "torpor: pid {} woken from {} ({}) in {:.1} ms{}",
                        r.pid,
                        shown.display(),
                        human(r.image_bytes),
                        r.total.as_secs_f64() * 1e3,
                        if lazy { "; loading its memory" } else { "" }
                    );
                }
                if let Some(server) = r.pages.take() {
                    serve_pages(server, r.pid, detach, quiet)?;
                }
                Ok(r)
            });
            // An unpacked copy is not needed once the processes run (nor, lazily, once
            // every page is in).
            drop(copy);
            drop(opened);
            let r = r?;
            if detach {
                return Ok(0);
            }
            let code = match r.job {
                Some((pgid, tty, modes)) => {
                    torpor_restore::terminal::wait_job(r.pid, pgid, tty, modes)
                }
                None => torpor_restore::wait(r.pid),
            }
            .with_context(|| format!("waiting for pid {} failed", r.pid));
            if registered {
                registry::remove(r.pid);
            }
            Ok(code?.clamp(0, 255) as u8)
        }
        Command::Verify { image, dir, encrypt_key } => {
            let key = encrypt_key.as_deref().map(load_key).transpose()?;
            let given = image.or(dir).expect("clap requires one of them");
            let opened = single::open(&given, show_progress).with_context(|| {
                format!("image {} is not usable", single_shown(&given).display())
            })?;
            let (dir, shown) = (opened.dir.clone(), opened.shown.clone());
            let bar = if show_progress {
                let measure = progress::Measure::ReadBytes { total: progress::image_size(&dir) };
                progress::Progress::start(format!("checking {}", shown.display()), measure)
            } else {
                progress::Progress::none()
            };
            let checked = torpor_restore::check_image(&dir, key.as_ref());
            bar.finish();
            let (reader, tree) = checked.with_context(|| {
                format!(
                    "image {} is not usable (`torpor inspect {}` shows what it holds)",
                    shown.display(),
                    shown.display()
                )
            })?;
            if !quiet {
                let p = &tree.processes[0];
                println!(
                    "{}: complete and intact; pid {} ({}), {} mappings, {} descriptors, made by torpor {} on kernel {}",
                    shown.display(),
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
        Command::Migrate { pid, to, tcp_established, tls, tls_name, timeout } => {
            migrate::migrate(&migrate::MigrateOptions {
                pid,
                to: &to,
                tls: &tls,
                tls_name: tls_name.as_deref(),
                tcp_established,
                timeout: std::time::Duration::from_secs(timeout),
                quiet,
            })
        }
        Command::Serve {
            listen,
            once,
            tls,
            before_restore,
            after_failed_restore,
            work_dir,
            timeout,
            lazy,
        } => migrate::serve(&migrate::ServeOptions {
            listen,
            once,
            security: tls.security("torpor serve")?,
            before_restore,
            after_failed_restore,
            work_dir,
            timeout: std::time::Duration::from_secs(timeout),
            quiet,
            lazy,
        }),
        Command::Run { pidfile, cmd } => run::run(&cmd, pidfile.as_deref(), quiet),
        Command::Inspect { dir, dir_flag, json, encrypt_key } => {
            let key = encrypt_key.as_deref().map(load_key).transpose()?;
            let dir = dir.or(dir_flag).expect("clap requires one of them");
            inspect::run(&dir, json, key.as_ref())
        }
        Command::Keygen { file } => {
            let key = torpor_image::crypt::Key::generate()?;
            key.save_new(&file)?;
            if !quiet {
                eprintln!(
                    "torpor: new key written to {} (mode 0600); keep it apart from the images",
                    file.display()
                );
            }
            Ok(0)
        }
        Command::Completions { shell } => {
            // Some generators offer hidden commands too: leave them out of the definition.
            let full = Cli::command();
            let mut cmd = clap::Command::new("torpor")
                .args(full.get_arguments().cloned())
                .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
            clap_complete::generate(shell, &mut cmd, "torpor", &mut std::io::stdout());
            Ok(0)
        }
        Command::Man { command, dir } => man::run(command.as_deref(), dir.as_deref()),
        Command::Ps { json } => registry::ps(json),
        Command::List { dir, json } => {
            if remote::is_remote(&dir) {
                anyhow::bail!(
                    "torpor list reads local directories; `torpor inspect {}` shows an image \
                     in object storage",
                    dir.display()
                );
            }
            list::run(&dir, json)
        }
        Command::Check => check::run(quiet),
        Command::Demo => demo::run(),
        Command::Count { log } => demo::count(&log),
        Command::Guard { kind, pid, torpor } => Ok(match kind.as_str() {
            "dump" => torpor_dump::run_guard(pid, torpor),
            _ => torpor_restore::run_guard(pid, torpor),
        } as u8),
    }
}

/// How a single-file image named on the command line appears in messages.
fn single_shown(path: &std::path::Path) -> PathBuf {
    match path.as_os_str() == "-" {
        true => PathBuf::from(single::STDIN_NAME),
        false => path.to_path_buf(),
    }
}

/// Reads a key file, warning when other users can read it too.
fn load_key(path: &std::path::Path) -> Result<torpor_image::crypt::Key> {
    use std::os::unix::fs::PermissionsExt;
    let key = torpor_image::crypt::Key::load(path)?;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "the key file {} can be read by other users (mode {mode:04o}); \
                 `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
    }
    Ok(key)
}

fn image_hint(e: &torpor_image::ImageError) -> Option<&'static str> {
    use torpor_image::ImageError;
    match e {
        ImageError::WrongKey { .. } => {
            Some("use the key file given to `torpor dump --encrypt-key` for this image")
        }
        ImageError::Tampered { .. } | ImageError::ManifestTampered { .. } => {
            Some("the image was changed since the key sealed it; nothing from it was let run")
        }
        ImageError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Some("check the path; `torpor list DIR` lists the images in a directory")
        }
        ImageError::Checksum { .. } | ImageError::Length { .. } | ImageError::Missing { .. } => {
            Some("the image is damaged; `torpor inspect DIR` shows what it still holds")
        }
        ImageError::Version { .. } => {
            Some("restore it with the torpor version that made it (`torpor inspect DIR`)")
        }
        ImageError::Write { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe => {
            Some("whatever read the image stopped before its end; the process was left as it was")
        }
        ImageError::Write { path, .. } if remote::is_remote(path) => Some(
            "check the URL, the credentials (AWS_* variables, ~/.aws) and that the store \
             answers; the process was left as it was",
        ),
        ImageError::CreateDir { .. } | ImageError::Write { .. } => {
            Some("choose a directory torpor can write, with room for the image")
        }
        _ => None,
    }
}

/// Lists a tree woken from an image made under `torpor run` in `torpor ps`, as its first
/// start was; returns whether it did.
fn register_woken(dir: &std::path::Path, pid: i32, key: Option<&torpor_image::crypt::Key>) -> bool {
    let Some(tree) = torpor_image::read_partial_keyed(dir, key).tree.filter(|t| t.pid_ns) else {
        return false;
    };
    let Some(ticks) = registry::start_ticks(pid) else { return false };
    let cmd = tree.processes.first().map(|p| p.cmdline.clone()).unwrap_or_default();
    match registry::add(pid, ticks, &cmd) {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("`torpor ps` will not list pid {pid}: {e:#}");
            false
        }
    }
}

/// The pre-copy part of the dump summary: rounds, what each stored, the setup stop.
pub(crate) fn pre_copy_line(p: &torpor_dump::PreCopyReport) -> String {
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
pub(crate) fn with_signals_deferred<T>(f: impl FnOnce() -> T) -> T {
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
