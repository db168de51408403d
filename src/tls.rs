//! TLS for `turns:` and HTTPS/WSS: a certificate store that every new
//! handshake reads, so a certificate replaced on disk is served to the next
//! client (on SIGHUP, or when the files' modification time changes) while
//! established connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// ALPN ids we accept: HTTP (to axum) and RFC 7443's STUN/TURN id.
pub const ALPN_HTTP2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
pub const ALPN_TURN: &[u8] = b"stun.turn";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("config key `{key}`: cannot read {path}: {err}")]
    Read {
        key: &'static str,
        path: PathBuf,
        err: String,
    },
    #[error(
        "config key `tls.key_file`: the key does not fit the certificate or is unsupported: {0}"
    )]
    Key(String),
    #[error("TLS setup: {0}")]
    Setup(String),
}

pub struct CertStore {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
    stamp: std::sync::Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_file", &self.cert_file)
            .finish()
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn load(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Read {
            key: "tls.cert_file",
            path: cert_file.into(),
            err: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Read {
            key: "tls.cert_file",
            path: cert_file.into(),
            err: "no certificate in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsError::Read {
        key: "tls.key_file",
        path: key_file.into(),
        err: e.to_string(),
    })?;
    let provider = ring::default_provider();
    let ck =
        CertifiedKey::from_der(certs, key, &provider).map_err(|e| TlsError::Key(e.to_string()))?;
    Ok(ck)
}

impl CertStore {
    pub fn open(cert_file: &Path, key_file: &Path) -> Result<Arc<CertStore>, TlsError> {
        let ck = load(cert_file, key_file)?;
        Ok(Arc::new(CertStore {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            current: ArcSwap::from_pointee(ck),
            stamp: std::sync::Mutex::new((mtime(cert_file), mtime(key_file))),
        }))
    }

    /// Re-reads the files; on error the old certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let ck = load(&self.cert_file, &self.key_file)?;
        self.current.store(Arc::new(ck));
        if let Ok(mut s) = self.stamp.lock() {
            *s = (mtime(&self.cert_file), mtime(&self.key_file));
        }
        Ok(())
    }

    /// Reloads when either file's modification time moved. Returns whether
    /// it did, and the error if the new files are unusable.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = (mtime(&self.cert_file), mtime(&self.key_file));
        let changed = self.stamp.lock().map(|s| *s != now).unwrap_or(false);
        if changed {
            // Record the stamp first, so a broken file is reported once.
            if let Ok(mut s) = self.stamp.lock() {
                *s = now;
            }
            self.reload()?;
        }
        Ok(changed)
    }

    /// A rustls server config reading this store on every handshake.
    /// Watches the files until `stop`: a changed pair is loaded for the
    /// next handshakes; an unusable one is logged and the old certificate
    /// stays. (The modification time is read every `every`: a deploy hook
    /// that copies new files in needs no signal.)
    pub async fn watch(
        self: Arc<Self>,
        every: std::time::Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            match self.reload_if_changed() {
                Ok(true) => tracing::info!("TLS certificate files changed: reloaded"),
                Ok(false) => {}
                Err(e) => tracing::error!(
                    "TLS certificate files changed but are unusable, the old certificate stays: {e}"
                ),
            }
        }
    }

    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut cfg =
            rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Setup(e.to_string()))?
                .with_no_client_auth()
                .with_cert_resolver(self.clone());
        // Server preference order: a client that offers `stun.turn` is a
        // TURN client even if it offers `http/1.1` too (coturn's does).
        cfg.alpn_protocols = vec![ALPN_TURN.to_vec(), ALPN_HTTP2.to_vec(), ALPN_HTTP1.to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
