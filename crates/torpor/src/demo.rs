//! `torpor demo`: hibernate and wake a small counting program, showing each step.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The counting program: prints 1, 2, 3... every 200 ms, forever.
pub fn count(log: &Path) -> Result<u8> {
    let mut f = File::options().append(true).create(true).open(log)?;
    let mut n = 0u64;
    loop {
        n += 1;
        writeln!(f, "{n}")?;
        sleep(Duration::from_millis(200));
    }
}

fn lines(log: &Path) -> Vec<String> {
    fs::read_to_string(log).unwrap_or_default().lines().map(String::from).collect()
}

fn wait_lines(log: &Path, n: usize) -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = lines(log);
        if l.len() >= n {
            return Ok(l);
        }
        if Instant::now() > deadline {
            bail!("the counter did not count (log {})", log.display());
        }
        sleep(Duration::from_millis(50));
    }
}

pub fn run() -> Result<u8> {
    let dir = std::env::temp_dir().join(format!("torpor-demo-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let log = dir.join("count.log");
    let image = dir.join("image");
    let exe = std::env::current_exe().context("cannot find torpor's own executable")?;

    let mut cmd = Command::new(exe);
    // SAFETY: close_range is async-signal-safe and touches only the child's table; the
    // counter should hold stdio and nothing torpor's caller happened to leave open.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let mut child = cmd
        .arg("__count")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the counter")?;
    let pid = child.id() as i32;
    println!("1. started a counter, pid {pid}, counting into {}", log.display());
    let before = wait_lines(&log, 5)?;
    println!("   it counts: {}", before.join(" "));

    let s = torpor_dump::dump(&torpor_dump::DumpOptions {
        pid,
        dir: image.clone(),
        leave_running: false,
        inherit_stdio: false,
        tcp_established: false,
        shell_job: false,
        pre_copy: false,
    })
    .context("dump failed")?;
    // As its tracer, dump may already have reaped it.
    let _ = child.wait();
    let last = lines(&log).last().cloned().unwrap_or_default();
    println!(
        "2. hibernated it into {} ({} pages, frozen {:.1} ms); pid {pid} is gone, last count {last}",
        image.display(),
        s.pages_stored,
        s.frozen.as_secs_f64() * 1e3
    );
    sleep(Duration::from_millis(600));
    if lines(&log).len() != before.len().max(lines(&log).len()) {
        bail!("the counter still counts after the dump");
    }
    println!("   ... nothing counts for a while ...");

    let r = torpor_restore::restore(&torpor_restore::RestoreOptions {
        dir: image.clone(),
        ..Default::default()
    })
    .context("restore failed")?;
    println!(
        "3. woke it from the image: pid {} again, in {:.1} ms",
        r.pid,
        r.total.as_secs_f64() * 1e3
    );
    let n = lines(&log).len();
    let after = wait_lines(&log, n + 5)?;
    println!("   it counts on: {}", after[n.saturating_sub(1)..].join(" "));
    // SAFETY: kill takes only integers; the woken counter is our child.
    unsafe { libc::kill(r.pid, libc::SIGTERM) };
    let _ = torpor_restore::wait(r.pid);
    let ok = after.iter().enumerate().all(|(i, l)| l.parse::<usize>().ok() == Some(i + 1));
    if !ok {
        bail!("the count did not carry on without a gap: see {}", log.display());
    }
    println!(
        "4. the count carried on from {last} without a gap; stopped it. Image left in {}",
        image.display()
    );
    Ok(0)
}
