//! Certificates by ACME (RFC 8555) for `tls.acme_domains`: order one when
//! the cache has none, renew at two thirds of its lifetime, retry with
//! back-off while the current certificate keeps serving, and install each
//! new one into the [`CertStore`] every TLS handshake reads, so live
//! connections and allocations never notice.
//!
//! The protocol is `instant-acme`'s; this module is the glue: the cache
//! (account key and certificate, so a restart does not order again), the
//! TLS-ALPN-01 answer (RFC 8737: a certificate with the acmeIdentifier
//! extension, handed to the store, which serves it only to a ClientHello
//! offering `acme-tls/1` alone), or with `http.acme_listen` the HTTP-01
//! answer (RFC 8555 §8.3: the key authorization at
//! `/.well-known/acme-challenge/TOKEN`, the one path that listener serves),
//! and the schedule. The schedule is plain
//! functions of time ([`renew_at`], [`backoff`]) so it is tested without a
//! clock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use sha1::{Digest, Sha1};
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;
use crate::tls::{validity, CertStore};

/// The first retry after a failed order; each further failure doubles it.
const FIRST_RETRY: Duration = Duration::from_secs(10);
/// The longest wait between two tries.
const MAX_RETRY: Duration = Duration::from_secs(3600);
/// One order, from the first request to the certificate.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The ACME server refused or failed (its own words), or was unreachable.
    #[error("{0}")]
    Protocol(String),
    #[error("the ACME server offers no {0:?} challenge for {1}")]
    NotOffered(ChallengeType, String),
    #[error("validation of {domain} failed: {why}")]
    Invalid { domain: String, why: String },
    #[error("the order took longer than {0:?}")]
    TimedOut(Duration),
    #[error("cache {path}: {err}")]
    Cache { path: PathBuf, err: String },
    #[error("the issued certificate is unusable: {0}")]
    Certificate(String),
}

impl From<instant_acme::Error> for AcmeError {
    fn from(e: instant_acme::Error) -> Self {
        AcmeError::Protocol(chain(&e))
    }
}

/// An error with its causes, so "unreachable" says which connection failed.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let more = c.to_string();
        if !s.contains(&more) {
            s.push_str(": ");
            s.push_str(&more);
        }
        src = c.source();
    }
    s
}

/// Orders by result, for `turnkey_tls_acme_orders_total{result}`.
#[derive(Default)]
pub struct AcmeStats {
    pub issued: AtomicU64,
    pub failed: AtomicU64,
}

/// When to renew a certificate valid from `not_before` to `not_after`
/// (Unix seconds): two thirds into its lifetime.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before).max(0) * 2 / 3
}

/// The wait after the `failures`-th failure in a row (1 = the first).
pub fn backoff(failures: u32) -> Duration {
    let doubled = FIRST_RETRY.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    doubled.min(MAX_RETRY)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A short stable name for `parts` (a cache file per directory and set of
/// domains: switching from staging to production orders anew).
fn tag(parts: &[&str]) -> String {
    let mut h = Sha1::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A certificate and its key as PEM, as issued or as cached.
struct Issued {
    chain_pem: String,
    key_pem: String,
}

impl Issued {
    fn certified_key(&self) -> Result<CertifiedKey, AcmeError> {
        let bad = |e: String| AcmeError::Certificate(e);
        let certs = CertificateDer::pem_slice_iter(self.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no certificate in the chain".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| bad(e.to_string()))?;
        CertifiedKey::from_der(certs, key, &ring::default_provider())
            .map_err(|e| bad(e.to_string()))
    }
}

/// HTTP-01 answers by token while an order is pending.
#[derive(Default)]
struct Http01Tokens(Mutex<HashMap<String, String>>);

impl Http01Tokens {
    fn set(&self, token: &str, key_authorization: String) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(token.to_string(), key_authorization);
    }

    fn get(&self, token: &str) -> Option<String> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(token).cloned()
    }

    fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// What the ACME loop works from: the `[tls]` ACME keys, checked.
pub struct Acme {
    domains: Vec<String>,
    email: Option<String>,
    directory: String,
    ca_file: Option<PathBuf>,
    dir: PathBuf,
    store: Arc<CertStore>,
    stats: Arc<AcmeStats>,
    /// HTTP-01 (`http.acme_listen` set) instead of TLS-ALPN-01.
    http01: bool,
    tokens: Arc<Http01Tokens>,
    /// When the next order is due (Unix seconds).
    due: i64,
}

impl Acme {
    /// The store HTTPS and TURN/TLS will read: the cached certificate when
    /// there is a usable one, else a self-signed placeholder until the
    /// first order succeeds.
    pub fn prepare(tls: &TlsConfig, http01: bool) -> Result<(Acme, Arc<CertStore>), AcmeError> {
        let dir = tls.acme_cache_dir.clone();
        make_private_dir(&dir)?;
        let mut acme = Acme {
            domains: tls.acme_domains.clone(),
            email: tls.acme_email.clone(),
            directory: tls.acme_directory.clone(),
            ca_file: tls.acme_ca_file.clone(),
            dir,
            // Replaced below; a store is needed to build the struct.
            store: CertStore::managed(placeholder(&tls.acme_domains)?),
            stats: Arc::new(AcmeStats::default()),
            http01,
            tokens: Arc::default(),
            due: unix_now(),
        };
        let names = acme.domains.join(",");
        match acme.cached() {
            Some((ck, (start, end))) if end > unix_now() => {
                acme.due = renew_at(start, end);
                tracing::info!(
                    domains = names,
                    "ACME: serving the cached certificate (valid until {end}, renewal due at {})",
                    acme.due
                );
                acme.store = CertStore::managed(ck);
            }
            _ => tracing::warn!(
                domains = names,
                "ACME: no valid certificate cached: serving a self-signed placeholder until the order succeeds"
            ),
        }
        let store = acme.store.clone();
        Ok((acme, store))
    }

    pub fn stats(&self) -> Arc<AcmeStats> {
        self.stats.clone()
    }

    /// What `http.acme_listen` serves: the HTTP-01 answers, and 404 for
    /// everything else.
    pub fn http01_app(&self) -> axum::Router {
        use axum::extract::Path as UrlPath;
        use axum::response::IntoResponse;
        let tokens = self.tokens.clone();
        let answer = move |UrlPath(token): UrlPath<String>| async move {
            match tokens.get(&token) {
                Some(k) => k.into_response(),
                None => axum::http::StatusCode::NOT_FOUND.into_response(),
            }
        };
        axum::Router::new().route(
            "/.well-known/acme-challenge/{token}",
            axum::routing::get(answer),
        )
    }

    fn cert_paths(&self) -> (PathBuf, PathBuf) {
        let mut parts = vec![self.directory.as_str()];
        parts.extend(self.domains.iter().map(String::as_str));
        let t = tag(&parts);
        (
            self.dir.join(format!("cert-{t}.pem")),
            self.dir.join(format!("key-{t}.pem")),
        )
    }

    fn account_path(&self) -> PathBuf {
        self.dir
            .join(format!("account-{}.json", tag(&[&self.directory])))
    }

    /// The cached certificate for these domains and this directory, if
    /// readable, with its validity.
    fn cached(&self) -> Option<(CertifiedKey, (i64, i64))> {
        let (cert, key) = self.cert_paths();
        let issued = Issued {
            chain_pem: std::fs::read_to_string(cert).ok()?,
            key_pem: std::fs::read_to_string(key).ok()?,
        };
        let ck = issued.certified_key().ok()?;
        let v = validity(ck.cert.first()?)?;
        Some((ck, v))
    }

    /// Orders when due, until `stop`. A failure keeps the current
    /// certificate and tries again after [`backoff`].
    pub async fn run(mut self, stop: CancellationToken) {
        let mut failures = 0u32;
        let names = self.domains.join(",");
        loop {
            let wait = Duration::from_secs(self.due.saturating_sub(unix_now()).max(0) as u64);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return,
            }
            let result = tokio::select! {
                r = tokio::time::timeout(ORDER_TIMEOUT, self.order()) => {
                    r.unwrap_or(Err(AcmeError::TimedOut(ORDER_TIMEOUT)))
                }
                () = stop.cancelled() => return,
            };
            // Whatever happened, no challenge stays answerable.
            for d in &self.domains {
                self.store.set_challenge(d, None);
            }
            self.tokens.clear();
            match result.and_then(|issued| self.adopt(&issued)) {
                Ok((start, end)) => {
                    failures = 0;
                    self.stats.issued.fetch_add(1, Ordering::Relaxed);
                    self.due = renew_at(start, end);
                    tracing::info!(
                        domains = names,
                        "ACME: certificate issued and installed (valid until {end}, renewal due at {})",
                        self.due
                    );
                }
                Err(e) => {
                    failures += 1;
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    let retry = backoff(failures);
                    self.due = unix_now() + retry.as_secs() as i64;
                    tracing::error!(
                        domains = names,
                        "ACME: order failed, the current certificate stays; next try in {}s: {e}",
                        retry.as_secs()
                    );
                }
            }
        }
    }

    /// Installs and caches a new certificate; returns its validity.
    fn adopt(&self, issued: &Issued) -> Result<(i64, i64), AcmeError> {
        let ck = issued.certified_key()?;
        let v = ck
            .cert
            .first()
            .and_then(validity)
            .ok_or_else(|| AcmeError::Certificate("no readable validity".into()))?;
        let (cert, key) = self.cert_paths();
        // The key first: a cache with a new certificate and an old key
        // would not load, one with a new key and the old certificate won't
        // either, and either way the next start simply orders again.
        write_private(&key, issued.key_pem.as_bytes())?;
        write_private(&cert, issued.chain_pem.as_bytes())?;
        self.store.install(ck);
        Ok(v)
    }

    async fn account(&self) -> Result<Account, AcmeError> {
        let builder = || match &self.ca_file {
            Some(ca) => Account::builder_with_root(ca),
            None => Account::builder(),
        };
        let path = self.account_path();
        if let Ok(text) = std::fs::read_to_string(&path) {
            let creds: AccountCredentials =
                serde_json::from_str(&text).map_err(|e| AcmeError::Cache {
                    path: path.clone(),
                    err: e.to_string(),
                })?;
            return Ok(builder()?.from_credentials(creds).await?);
        }
        let contact = self.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, creds) = builder()?
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.directory.clone(),
                None,
            )
            .await?;
        let json = serde_json::to_vec(&creds).map_err(|e| AcmeError::Cache {
            path: path.clone(),
            err: e.to_string(),
        })?;
        write_private(&path, &json)?;
        Ok(account)
    }

    /// One order: TLS-ALPN-01 for every pending authorization, then the
    /// CSR (a fresh key each time) and the certificate.
    async fn order(&self) -> Result<Issued, AcmeError> {
        let account = self.account().await?;
        let ids: Vec<Identifier> = self
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let mut order = match account.new_order(&NewOrder::new(&ids)).await {
            Ok(o) => o,
            Err(instant_acme::Error::Api(p))
                if p.r#type.as_deref()
                    == Some("urn:ietf:params:acme:error:accountDoesNotExist") =>
            {
                // The server forgot the cached account (a reset test CA, a
                // deactivated account): the next try registers anew.
                let _ = std::fs::remove_file(self.account_path());
                return Err(AcmeError::Protocol(format!(
                    "{p}; the cached account was dropped, the next try registers a new one"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => {
                    return Err(AcmeError::Invalid {
                        domain: authz.identifier().to_string(),
                        why: format!("authorization is {other:?}"),
                    })
                }
            }
            let domain = authz.identifier().to_string();
            let kind = match self.http01 {
                true => ChallengeType::Http01,
                false => ChallengeType::TlsAlpn01,
            };
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or_else(|| AcmeError::NotOffered(kind, domain.clone()))?;
            let key_authorization = challenge.key_authorization();
            if self.http01 {
                let token = challenge.token.clone();
                self.tokens
                    .set(&token, key_authorization.as_str().to_string());
            } else {
                let digest = key_authorization.digest();
                self.store
                    .set_challenge(&domain, Some(challenge_cert(&domain, digest.as_ref())?));
            }
            challenge.set_ready().await?;
        }
        let status = order
            .poll_ready(&RetryPolicy::new().timeout(ORDER_TIMEOUT))
            .await?;
        if status != OrderStatus::Ready {
            return Err(self.why_invalid(&mut order).await);
        }
        let key_pem = order.finalize().await?;
        let chain_pem = order
            .poll_certificate(&RetryPolicy::new().timeout(ORDER_TIMEOUT))
            .await?;
        Ok(Issued { chain_pem, key_pem })
    }

    /// The ACME server's own words on why a challenge failed (DNS, a
    /// closed port, a wrong certificate), for the log line.
    async fn why_invalid(&self, order: &mut instant_acme::Order) -> AcmeError {
        let mut authorizations = order.authorizations();
        while let Some(Ok(mut authz)) = authorizations.next().await {
            let domain = authz.identifier().to_string();
            if let Ok(state) = authz.refresh().await {
                if let Some(p) = state.challenges.iter().find_map(|c| c.error.as_ref()) {
                    return AcmeError::Invalid {
                        domain,
                        why: p.to_string(),
                    };
                }
            }
        }
        AcmeError::Protocol("the order became invalid".into())
    }
}

/// RFC 8737 §3: a self-signed certificate for `domain` carrying the
/// SHA-256 of the key authorization in a critical acmeIdentifier extension.
fn challenge_cert(domain: &str, digest: &[u8]) -> Result<CertifiedKey, AcmeError> {
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()])
        .map_err(|e| AcmeError::Certificate(e.to_string()))?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    self_signed(params)
}

/// Served until the first certificate arrives: clients see a TLS error,
/// never a wrong name from another site.
fn placeholder(domains: &[String]) -> Result<CertifiedKey, AcmeError> {
    let mut params = rcgen::CertificateParams::new(domains.to_vec())
        .map_err(|e| AcmeError::Certificate(e.to_string()))?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "turnkey placeholder (ACME pending)",
    );
    self_signed(params)
}

fn self_signed(params: rcgen::CertificateParams) -> Result<CertifiedKey, AcmeError> {
    let bad = |e: String| AcmeError::Certificate(e);
    let key = rcgen::KeyPair::generate().map_err(|e| bad(e.to_string()))?;
    let cert = params.self_signed(&key).map_err(|e| bad(e.to_string()))?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // Not `CertifiedKey::from_der`: its key/certificate check parses the
    // certificate with webpki, which refuses the critical acmeIdentifier
    // extension. rcgen signed this pair itself, so they match.
    let signer = ring::default_provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| bad(e.to_string()))?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signer))
}

/// The cache directory, 0700: it holds the account key.
fn make_private_dir(dir: &Path) -> Result<(), AcmeError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |e: std::io::Error| AcmeError::Cache {
        path: dir.into(),
        err: e.to_string(),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)
}

/// Writes `path` (0600) through a temporary file and a rename, so a crash
/// never leaves half a key.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| AcmeError::Cache {
        path: path.into(),
        err: e.to_string(),
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_two_thirds_into_the_lifetime() {
        // A 90-day certificate: renewed after 60 days.
        let day = 86_400;
        assert_eq!(renew_at(1_000, 1_000 + 90 * day), 1_000 + 60 * day);
        // Pebble's short certificates work the same way.
        assert_eq!(renew_at(0, 30), 20);
        // A certificate that ends before it starts is due at once.
        assert_eq!(renew_at(500, 100), 500);
    }

    #[test]
    fn retries_back_off_and_are_capped() {
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(2), Duration::from_secs(20));
        assert_eq!(backoff(3), Duration::from_secs(40));
        assert_eq!(backoff(12), MAX_RETRY);
        assert_eq!(backoff(u32::MAX), MAX_RETRY);
    }

    #[test]
    fn the_challenge_certificate_names_the_domain_and_carries_the_digest() {
        let digest = [7u8; 32];
        let ck = challenge_cert("turn.example.com", &digest).unwrap();
        let der = ck.cert[0].clone();
        let (_, x) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        // id-pe-acmeIdentifier, 1.3.6.1.5.5.7.1.31, critical.
        let ext = x
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // An OCTET STRING of the 32-byte digest.
        assert_eq!(&ext.value[..2], &[0x04, 32]);
        assert_eq!(&ext.value[2..], &digest);
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            r#"[DNSName("turn.example.com")]"#
        );
    }

    #[test]
    fn cache_files_differ_per_directory_and_domains() {
        let a = tag(&["https://acme.example/dir", "a.example"]);
        assert_eq!(a, tag(&["https://acme.example/dir", "a.example"]));
        assert_ne!(a, tag(&["https://staging.example/dir", "a.example"]));
        assert_ne!(a, tag(&["https://acme.example/dir", "b.example"]));
        assert_ne!(tag(&["ab", "c"]), tag(&["a", "bc"]));
    }
}
