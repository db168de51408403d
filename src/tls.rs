//! TLS for `turns:` and HTTPS/WSS: a certificate store that every new
//! handshake reads, so a certificate replaced on disk is served to the next
//! client (on SIGHUP, or when the files' modification time changes) while
//! established connections keep theirs. With ACME (`acme.rs`) the store has
//! no files: the ACME loop installs what it gets, and the store answers
//! TLS-ALPN-01 challenges (RFC 8737) from the same resolver.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
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
/// RFC 8737's id: the ACME server's validation handshake, never routed.
pub const ALPN_ACME: &[u8] = b"acme-tls/1";

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
    /// The PEM files the certificate comes from; `None` when ACME owns it.
    files: Option<Files>,
    current: ArcSwap<CertifiedKey>,
    /// The current certificate's notAfter (Unix seconds; 0 = unknown).
    expiry: AtomicI64,
    /// TLS-ALPN-01 certificates by domain, set while an order is pending.
    /// Only a ClientHello offering `acme-tls/1` alone reads it.
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

struct Files {
    cert_file: PathBuf,
    key_file: PathBuf,
    stamp: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_file", &self.files.as_ref().map(|f| &f.cert_file))
            .finish()
    }
}

/// A certificate's validity (notBefore, notAfter) in Unix seconds.
pub fn validity(cert: &CertificateDer<'_>) -> Option<(i64, i64)> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let v = x.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

fn expiry_of(ck: &CertifiedKey) -> i64 {
    ck.cert.first().and_then(validity).map_or(0, |(_, end)| end)
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
            expiry: AtomicI64::new(expiry_of(&ck)),
            files: Some(Files {
                cert_file: cert_file.into(),
                key_file: key_file.into(),
                stamp: Mutex::new((mtime(cert_file), mtime(key_file))),
            }),
            current: ArcSwap::from_pointee(ck),
            challenges: Mutex::new(HashMap::new()),
        }))
    }

    /// A store without files, serving `ck` until [`CertStore::install`]
    /// replaces it (ACME).
    pub fn managed(ck: CertifiedKey) -> Arc<CertStore> {
        Arc::new(CertStore {
            expiry: AtomicI64::new(expiry_of(&ck)),
            files: None,
            current: ArcSwap::from_pointee(ck),
            challenges: Mutex::new(HashMap::new()),
        })
    }

    /// The next handshakes get `ck`; established connections keep theirs.
    pub fn install(&self, ck: CertifiedKey) {
        self.expiry.store(expiry_of(&ck), Ordering::Relaxed);
        self.current.store(Arc::new(ck));
    }

    /// The served certificate's notAfter, Unix seconds (0 = unknown).
    pub fn expiry(&self) -> i64 {
        self.expiry.load(Ordering::Relaxed)
    }

    /// Whether the certificate comes from files (and SIGHUP re-reads them).
    pub fn has_files(&self) -> bool {
        self.files.is_some()
    }

    /// Answer TLS-ALPN-01 for `domain` with `ck` (or stop, with `None`).
    pub fn set_challenge(&self, domain: &str, ck: Option<CertifiedKey>) {
        let mut map = self.challenges.lock().unwrap_or_else(|e| e.into_inner());
        match ck {
            Some(ck) => map.insert(domain.to_ascii_lowercase(), Arc::new(ck)),
            None => map.remove(&domain.to_ascii_lowercase()),
        };
    }

    /// Re-reads the files; on error the old certificate stays. A store
    /// without files has nothing to re-read.
    pub fn reload(&self) -> Result<(), TlsError> {
        let Some(f) = &self.files else {
            return Ok(());
        };
        let ck = load(&f.cert_file, &f.key_file)?;
        self.install(ck);
        if let Ok(mut s) = f.stamp.lock() {
            *s = (mtime(&f.cert_file), mtime(&f.key_file));
        }
        Ok(())
    }

    /// Reloads when either file's modification time moved. Returns whether
    /// it did, and the error if the new files are unusable.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let Some(f) = &self.files else {
            return Ok(false);
        };
        let now = (mtime(&f.cert_file), mtime(&f.key_file));
        let changed = f.stamp.lock().map(|s| *s != now).unwrap_or(false);
        if changed {
            // Record the stamp first, so a broken file is reported once.
            if let Ok(mut s) = f.stamp.lock() {
                *s = now;
            }
            self.reload()?;
        }
        Ok(changed)
    }

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

    /// A rustls server config reading this store on every handshake.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut cfg =
            rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Setup(e.to_string()))?
                .with_no_client_auth()
                .with_cert_resolver(self.clone());
        // Server preference order: a client that offers `stun.turn` is a
        // TURN client even if it offers `http/1.1` too (coturn's does).
        // `acme-tls/1` last: chosen only when a client offers nothing else.
        cfg.alpn_protocols = vec![
            ALPN_TURN.to_vec(),
            ALPN_HTTP2.to_vec(),
            ALPN_HTTP1.to_vec(),
            ALPN_ACME.to_vec(),
        ];
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if offers_only_acme(&hello) {
            // RFC 8737 §3: the challenge certificate for the SNI name, or
            // no handshake at all (never the real certificate).
            let name = hello.server_name()?.to_ascii_lowercase();
            let map = self.challenges.lock().unwrap_or_else(|e| e.into_inner());
            return map.get(&name).cloned();
        }
        Some(self.current.load_full())
    }
}

/// RFC 8737 §3: the ACME server offers `acme-tls/1` and nothing else.
fn offers_only_acme(hello: &ClientHello<'_>) -> bool {
    let Some(mut alpn) = hello.alpn() else {
        return false;
    };
    let mut any = false;
    alpn.all(|p| {
        any = true;
        p == ALPN_ACME
    }) && any
}
