//! Live migration: `torpor migrate PID --to HOST:PORT` on the source, `torpor serve` on
//! the destination (see docs/migration.md).
//!
//! The source runs an ordinary dump with pre-copy whose image goes over the network
//! ([`store::NetStore`]) instead of to a directory: memory is copied while the process
//! runs, the process is frozen for the last dirty pages and its small state, and the
//! destination's answer to the commit (it woke the process) is what lets the dump end
//! the source's copy. Any failure before that answer lets it run on where it was.

mod link;
mod serve;
mod store;
mod wire;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

pub use link::TlsArgs;
pub use serve::{serve, ServeOptions};

/// What `torpor migrate` was asked to do.
pub struct MigrateOptions<'a> {
    pub pid: i32,
    pub to: &'a str,
    pub tls: &'a TlsArgs,
    pub tls_name: Option<&'a str>,
    pub tcp_established: bool,
    pub timeout: Duration,
    pub quiet: bool,
}

pub fn migrate(o: &MigrateOptions) -> Result<u8> {
    let (pid, to) = (o.pid, o.to);
    let security = o.tls.security("torpor migrate")?;
    let link = link::connect(to, &security, o.tls_name, o.timeout)
        .with_context(|| format!("migration of pid {pid} failed before it began"))?;
    let net = store::NetStore::new(link, to, o.timeout);
    let opts = torpor_dump::DumpOptions {
        pid,
        dir: PathBuf::from(to),
        tcp_established: o.tcp_established,
        pre_copy: true,
        // Through /proc: this very program, even if replaced or removed since.
        guard: Some(PathBuf::from("/proc/self/exe")),
        store: Some(torpor_dump::ImageStore(Arc::new(net.clone()))),
        ..Default::default()
    };
    tracing::info!("migration of pid {pid} to {to} begins");
    let failed = || format!("migration of pid {pid} to {to} failed; it runs on here");
    let s = match crate::with_signals_deferred(|| torpor_dump::dump(&opts)) {
        Ok(s) => s,
        // Every file of this image goes to the destination: a failure to store one is
        // the network's or the destination's, which the store's error says; the name of
        // the file it was on says nothing more.
        Err(torpor_dump::DumpError::Image(torpor_image::ImageError::Write { source, .. })) => {
            return Err(anyhow::Error::new(source).context(failed()))
        }
        Err(e) => return Err(anyhow::Error::new(e).context(failed())),
    };
    // The connections' peers were held back here until the process left; its address
    // has moved on with it, and so have the rules' purpose.
    if let Some(tag) = &s.net_lock {
        if let Err(e) = torpor_sys::netlock::unlock(tag) {
            tracing::warn!("cannot remove the firewall rules {tag}: {e}");
        }
    }
    let sent = net.bytes_sent();
    let running: u64 = s.pre_copy.iter().flat_map(|p| &p.rounds).map(|r| r.bytes).sum();
    if !o.quiet {
        let there = net.restored_pid().map_or(String::new(), |p| format!(" (pid {p} there)"));
        eprintln!(
            "torpor: pid {pid} migrated to {to}{there}: frozen {:.1} ms, {} sent ({} while \
             it ran, {} frozen), total {:.1} ms",
            s.frozen.as_secs_f64() * 1e3,
            crate::human(sent),
            crate::human(running),
            crate::human(sent.saturating_sub(running)),
            s.total.as_secs_f64() * 1e3
        );
        if let Some(p) = &s.pre_copy {
            eprintln!("torpor: {}", crate::pre_copy_line(p));
        }
    }
    Ok(0)
}
