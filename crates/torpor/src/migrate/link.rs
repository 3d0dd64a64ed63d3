//! The connection a migration runs over: TCP, with mutual TLS unless the operator said
//! `--insecure`.
//!
//! The stream carries a process's whole memory (keys, passwords, sessions) and the
//! destination restores whatever arrives as root, so both ends authenticate: the
//! destination checks the source's client certificate against its CA, the source checks
//! the destination's certificate (against its CA, for the host name or address it
//! dialled). Plain TCP is only for networks the operator trusts, and must be asked for.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The TLS options `torpor serve` and `torpor migrate` share.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This host's certificate chain (PEM) for mutual TLS.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate(s) (PEM) the other host's certificate must be signed by.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// Send the process's memory in clear text, and (on serve) restore what anyone who
    /// can reach the port sends: only on a network you trust entirely.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub insecure: bool,
}

/// How the connection is protected.
pub enum Security {
    Tls {
        cert: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca: rustls::RootCertStore,
    },
    Insecure,
}

impl TlsArgs {
    /// Loads the certificates, or refuses to go on without TLS unless `--insecure` was
    /// given. `what` names the command for the refusal.
    pub fn security(&self, what: &str) -> Result<Security> {
        if self.insecure {
            return Ok(Security::Insecure);
        }
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca)
        else {
            bail!(
                "{what} refuses to run without TLS: the connection carries the process's whole \
                 memory, and the destination runs what it receives as root. Give \
                 --tls-cert FILE --tls-key FILE --tls-ca FILE (mutual TLS: each host's \
                 certificate signed by the CA the other trusts), or --insecure on a network \
                 you trust entirely"
            );
        };
        let cert = certificates(cert)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("cannot read a private key from {}", key.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in certificates(ca)? {
            roots
                .add(c)
                .with_context(|| format!("{} holds an unusable CA certificate", ca.display()))?;
        }
        Ok(Security::Tls { cert, key, ca: roots })
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<_, _>>())
        .with_context(|| format!("cannot read certificates from {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate (PEM, BEGIN CERTIFICATE)", path.display());
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A byte stream both ways: plain TCP or TLS over it.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// An established link and the TCP socket under it (for timeouts and shutdown).
pub struct Link {
    pub stream: Box<dyn Stream>,
    pub tcp: TcpStream,
    pub peer: SocketAddr,
}

/// Sets the deadlines after which a silent peer counts as gone: a cut cable never
/// resets a connection, so without them either end would wait for TCP's own 15 minutes.
pub fn set_timeout(tcp: &TcpStream, timeout: Duration) -> io::Result<()> {
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    // Unacknowledged data older than this ends the connection.
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let fd = std::os::fd::OwnedFd::from(tcp.try_clone()?);
    torpor_sys::sock::set_tcp_opt(&fd, libc::TCP_USER_TIMEOUT, ms)?;
    tcp.set_nodelay(true)
}

/// Dials the destination `to` (HOST:PORT) from the source.
pub fn connect(
    to: &str,
    security: &Security,
    server_name: Option<&str>,
    timeout: Duration,
) -> Result<Link> {
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(to)
        .with_context(|| format!("cannot resolve {to} (HOST:PORT)"))?
        .collect();
    let mut last = None;
    let mut tcp = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = match (tcp, last) {
        (Some(t), _) => t,
        (None, Some(e)) => return Err(e).with_context(|| format!("cannot connect to {to}")),
        (None, None) => bail!("{to} resolves to no address"),
    };
    set_timeout(&tcp, timeout)
        .with_context(|| format!("cannot set timeouts on the connection to {to}"))?;
    let peer = tcp.peer_addr().with_context(|| format!("connection to {to}"))?;
    let stream: Box<dyn Stream> = match security {
        Security::Insecure => Box::new(tcp.try_clone().context("cannot duplicate a socket")?),
        Security::Tls { cert, key, ca } => {
            let host = server_name.map(str::to_string).unwrap_or_else(|| host_of(to));
            let name = ServerName::try_from(host.clone()).with_context(|| {
                format!("{host:?} is not a host name or address to check a certificate for")
            })?;
            let config = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .context("TLS setup")?
                .with_root_certificates(ca.clone())
                .with_client_auth_cert(cert.clone(), key.clone_key())
                .context("the --tls-cert and --tls-key do not make a usable client identity")?;
            let conn =
                rustls::ClientConnection::new(Arc::new(config), name).context("TLS setup")?;
            let tls = rustls::StreamOwned::new(
                conn,
                tcp.try_clone().context("cannot duplicate a socket")?,
            );
            Box::new(handshake(tls, &to)?)
        }
    };
    Ok(Link { stream, tcp, peer })
}

/// Completes the TLS handshake at once, so that a certificate problem is reported as one
/// rather than as a failure of the first message.
fn handshake<C, D>(
    mut tls: rustls::StreamOwned<C, TcpStream>,
    peer: &dyn std::fmt::Display,
) -> Result<rustls::StreamOwned<C, TcpStream>>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
{
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .with_context(|| format!("TLS handshake with {peer} failed"))?;
    }
    Ok(tls)
}

/// The host part of HOST:PORT or [V6]:PORT, as a certificate must name it.
fn host_of(to: &str) -> String {
    let host = to.rsplit_once(':').map_or(to, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']').to_string()
}

/// The server side: what `accept` wraps each connection in.
pub struct Acceptor {
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Acceptor {
    pub fn new(security: &Security) -> Result<Acceptor> {
        let tls = match security {
            Security::Insecure => None,
            Security::Tls { cert, key, ca } => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(ca.clone()),
                    provider(),
                )
                .build()
                .context("cannot check client certificates against --tls-ca")?;
                let config = rustls::ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .context("TLS setup")?
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(cert.clone(), key.clone_key())
                    .context("the --tls-cert and --tls-key do not make a usable server identity")?;
                Some(Arc::new(config))
            }
        };
        Ok(Acceptor { tls })
    }

    /// Completes the handshake on an accepted connection; a client without a
    /// certificate the CA signed is refused here.
    pub fn accept(&self, tcp: TcpStream, timeout: Duration) -> Result<Link> {
        let peer = tcp.peer_addr().context("accepted connection")?;
        set_timeout(&tcp, timeout).context("cannot set timeouts on an accepted connection")?;
        let stream: Box<dyn Stream> = match &self.tls {
            None => Box::new(tcp.try_clone().context("cannot duplicate a socket")?),
            Some(config) => {
                let conn =
                    rustls::ServerConnection::new(Arc::clone(config)).context("TLS setup")?;
                let tls = rustls::StreamOwned::new(
                    conn,
                    tcp.try_clone().context("cannot duplicate a socket")?,
                );
                Box::new(handshake(tls, &peer)?)
            }
        };
        Ok(Link { stream, tcp, peer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_what_the_certificate_must_name() {
        assert_eq!(host_of("10.0.0.2:7000"), "10.0.0.2");
        assert_eq!(host_of("[fd00::2]:7000"), "fd00::2");
        assert_eq!(host_of("dest.example:7000"), "dest.example");
    }

    #[test]
    fn no_tls_and_no_insecure_is_refused_naming_the_flags() {
        let err = TlsArgs::default().security("torpor migrate").err().expect("refused");
        let msg = format!("{err:#}");
        for flag in ["--tls-cert", "--tls-key", "--tls-ca", "--insecure"] {
            assert!(msg.contains(flag), "{flag} not named: {msg}");
        }
    }
}
