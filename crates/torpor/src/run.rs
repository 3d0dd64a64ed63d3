//! `torpor run`: start a program as the first process of its own pid namespace, so the
//! tree it grows can be woken later even when its pids are taken on this machine.

use std::ffi::CStr;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// `mount(2)` on C strings; `None` for a null argument.
fn mount(src: Option<&CStr>, target: &CStr, fstype: Option<&CStr>, flags: u64) -> io::Result<()> {
    let p = |s: Option<&CStr>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string alive for the call, or null where
    // mount(2) allows it; no data argument is passed.
    let r = unsafe { libc::mount(p(src), target.as_ptr(), p(fstype), flags, std::ptr::null()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn run(cmd: &[String], pidfile: Option<&Path>, quiet: bool) -> Result<u8> {
    let Some(program) = cmd.first() else { bail!("no command to run") };

    // The new pid namespace is for the children made from here on; the new mount
    // namespace, private, keeps the /proc mounted for them out of the rest of the system.
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWNS) } < 0 {
        return Err(io::Error::last_os_error())
            .context("cannot create a pid namespace (torpor run needs CAP_SYS_ADMIN)");
    }
    mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE)
        .context("cannot make the new mount namespace private")?;

    // The program's /proc is mounted over this one: keep a way to this pid namespace's
    // view, where its pid (the one to give `torpor dump`) has a start time.
    let host_proc = std::fs::File::open("/proc").context("cannot open /proc")?;

    let mut command = Command::new(program);
    command.args(&cmd[1..]);
    // SAFETY: the closure makes one mount system call on static strings, which is
    // async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            mount(
                Some(c"proc"),
                c"/proc",
                Some(c"proc"),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            )
        });
    }
    let mut child = command.spawn().with_context(|| format!("cannot start {program}"))?;
    let pid = child.id();
    if let Some(path) = pidfile {
        std::fs::write(path, format!("{pid}\n"))
            .with_context(|| format!("cannot write pid file {}", path.display()))?;
    }
    let ticks = crate::registry::start_ticks_at(&host_proc, pid as i32).unwrap_or(0);
    let registered = match crate::registry::add(pid as i32, ticks, cmd) {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("`torpor ps` will not list pid {pid}: {e:#}");
            false
        }
    };
    if !quiet {
        eprintln!(
            "torpor: {program} runs as pid {pid} (pid 1 in its own pid namespace); \
             `torpor dump {pid} -D DIR` hibernates its whole tree"
        );
    }
    let status = child.wait();
    if registered {
        crate::registry::remove(pid as i32);
    }
    let status = status.with_context(|| format!("waiting for pid {pid} failed"))?;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128 + sig as u8,
        _ => 1,
    })
}
