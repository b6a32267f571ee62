//! The replication link's security: mutual TLS (rustls), both sites' certificates signed by
//! one CA. The backup refuses a primary whose certificate that CA did not sign, and the primary
//! refuses a backup likewise, before a single frame is read.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};

/// A site's TLS files, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signs both sites' certificates.
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("TLS setup: {0}")]
    Config(#[from] rustls::Error),
    #[error("{0}")]
    Verifier(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |detail: String| TlsError::File {
        path: path.to_owned(),
        detail,
    };
    let list: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if list.is_empty() {
        return Err(file_err("no certificate in the file".into()));
    }
    Ok(list)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca)? {
        roots.add(cert).map_err(|e| TlsError::File {
            path: ca.to_owned(),
            detail: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The backup's side: presents its certificate, requires one from the primary.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&files.certificate)?, key(&files.key)?)?;
    Ok(Arc::new(config))
}

/// The primary's side: checks the backup's certificate, presents its own.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(certs(&files.certificate)?, key(&files.key)?)?;
    Ok(Arc::new(config))
}

/// A replication connection: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum Channel {
    Plain(TcpStream),
    ToBackup(Box<StreamOwned<ClientConnection, TcpStream>>),
    FromPrimary(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Channel {
    /// The primary's end of a new link to the backup at `peer`: TCP (1 s to connect, no
    /// Nagle, reads time out after 5 s), then TLS when configured.
    pub fn open(
        peer: std::net::SocketAddr,
        tls: Option<&Arc<ClientConfig>>,
    ) -> Result<Channel, String> {
        let tcp = TcpStream::connect_timeout(&peer, std::time::Duration::from_secs(1))
            .map_err(|e| format!("connect {peer}: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        Channel::connect(tcp, tls, peer.ip()).map_err(|e| format!("TLS with {peer}: {e}"))
    }

    /// The primary's end: TLS to the backup at `peer` (whose certificate must name its IP).
    pub fn connect(
        tcp: TcpStream,
        tls: Option<&Arc<ClientConfig>>,
        peer: IpAddr,
    ) -> io::Result<Channel> {
        let Some(config) = tls else {
            return Ok(Channel::Plain(tcp));
        };
        let conn = ClientConnection::new(config.clone(), ServerName::IpAddress(peer.into()))
            .map_err(io::Error::other)?;
        let mut stream = StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(Channel::ToBackup(Box::new(stream)))
    }

    /// The backup's end: the TLS handshake, which fails for a primary the CA did not sign.
    pub fn accept(tcp: TcpStream, tls: Option<&Arc<ServerConfig>>) -> io::Result<Channel> {
        let Some(config) = tls else {
            return Ok(Channel::Plain(tcp));
        };
        let conn = ServerConnection::new(config.clone()).map_err(io::Error::other)?;
        let mut stream = StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(Channel::FromPrimary(Box::new(stream)))
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Channel::Plain(s) => s,
            Channel::ToBackup(s) => &s.sock,
            Channel::FromPrimary(s) => &s.sock,
        }
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Channel::Plain(s) => s.read(buf),
            Channel::ToBackup(s) => s.read(buf),
            Channel::FromPrimary(s) => s.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Channel::Plain(s) => s.write(buf),
            Channel::ToBackup(s) => s.write(buf),
            Channel::FromPrimary(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Channel::Plain(s) => s.flush(),
            Channel::ToBackup(s) => s.flush(),
            Channel::FromPrimary(s) => s.flush(),
        }
    }
}
