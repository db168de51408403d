//! Who may get a TURN credential (`/api/ice-servers`) or a signaling socket
//! (`/ws`, `/socket.io/`): one decision, three modes (`access.mode`).
//!
//! - `open`: anyone (the embedded default, for the demo and local use);
//! - `origin`: browsers on the operator's own pages only: the `Origin`
//!   header must be one of `access.allowed_origins`. A same-origin `GET`
//!   carries no `Origin`; it is taken as coming from the page's own origin
//!   when the browser says so (`Sec-Fetch-Site: same-origin`) and the host
//!   it asked for is an allowed origin's. This stops other websites, not a
//!   script that forges headers: that is what `token` is for;
//! - `token`: the application's own users only: a JWT (HS256) signed with
//!   one of `access.token_secret`, carrying `sub` (the user, which becomes
//!   the TURN username's user part, so quotas count the app's user), `exp`
//!   and optionally `room` (the only room the socket may join) and `label`
//!   (the tenant its usage counts under, signed into the TURN username).
//!
//! In every mode each client address may mint `access.mints_per_minute`
//! credentials (429 beyond), counted through [`MintBudget`]. [`Doorman`]
//! is the running appliance's one decision: the rules (swapped by reload),
//! the mint budget (which spans reloads), and the refusal counters; the
//! HTTP API, `/ws` and socket.io all ask it.
//!
//! Cross-origin pages (CORS, [`Access::cors_allows`]): `open` serves any
//! origin; `origin` only `access.allowed_origins`; `token` the listed
//! origins, or any origin while none is listed (the token, not the page's
//! origin, is the proof there, and it is no cookie a foreign page could
//! ride on).

use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::budget::{PerAddress, Rate};
use crate::config::{AccessConfig, AccessMode, Secret};
use crate::counter::inc;

/// What a request shows about itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct Credentials<'a> {
    pub origin: Option<&'a str>,
    /// `Sec-Fetch-Site`, set by browsers.
    pub fetch_site: Option<&'a str>,
    /// The `Host` header as sent (host[:port]).
    pub host: Option<&'a str>,
    /// From `Authorization: Bearer` or `?token=`.
    pub token: Option<&'a str>,
}

/// What an admitted request may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// The application's user (token mode): the TURN username's user part.
    pub user: Option<String>,
    /// The only room this client may join (token mode, `room` claim).
    pub room: Option<String>,
    /// The usage label its credentials carry (token mode, `label` claim).
    pub label: Option<String>,
    /// An allowed `Origin` to echo in CORS headers.
    pub cors_origin: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    // The order is the index of `AccessStats::refused`.
    #[error("this origin may not use this server")]
    Origin,
    #[error("an access token is required")]
    NoToken,
    #[error("the access token is invalid or expired")]
    BadToken,
    #[error("too many credentials requested from this address; try again later")]
    TooMany,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::Origin,
        Refusal::NoToken,
        Refusal::BadToken,
        Refusal::TooMany,
    ];

    pub fn status(self) -> u16 {
        match self {
            Refusal::Origin => 403,
            Refusal::NoToken | Refusal::BadToken => 401,
            Refusal::TooMany => 429,
        }
    }

    /// The metrics label.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Origin => "origin",
            Refusal::NoToken => "no_token",
            Refusal::BadToken => "bad_token",
            Refusal::TooMany => "too_many",
        }
    }
}

/// A refusal as the HTTP answer every public endpoint gives it: the
/// status, and the reason in words as JSON.
impl axum::response::IntoResponse for Refusal {
    fn into_response(self) -> axum::response::Response {
        let status = axum::http::StatusCode::from_u16(self.status())
            .unwrap_or(axum::http::StatusCode::FORBIDDEN);
        (
            status,
            axum::Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}

/// The rules of one configuration; rebuilt on reload.
pub struct Access {
    mode: AccessMode,
    origins: Vec<String>,
    keys: Vec<jsonwebtoken::DecodingKey>,
    pub mints: Rate,
}

/// The claims turnkey reads from a verified token.
struct Claims {
    sub: String,
    room: Option<String>,
    label: Option<String>,
}

impl Claims {
    /// `sub` a plain user name; `room`, when present, a string: a `room`
    /// of another type (`null` included) is refused rather than read as
    /// "no restriction"; `label`, when present, a valid usage label
    /// (`turn::auth::valid_label`), or the token is refused.
    fn from_json(v: &serde_json::Value) -> Option<Claims> {
        let sub = v.get("sub")?.as_str()?;
        // The user goes into TURN usernames: plain characters only.
        let plain = !sub.is_empty()
            && sub.len() <= 128
            && sub
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
        if !plain {
            return None;
        }
        let room = match v.get("room") {
            None => None,
            Some(serde_json::Value::String(r)) => Some(r.clone()),
            Some(_) => return None,
        };
        let label = match v.get("label") {
            None => None,
            Some(serde_json::Value::String(l)) if crate::turn::auth::valid_label(l) => {
                Some(l.clone())
            }
            Some(_) => return None,
        };
        Some(Claims {
            sub: sub.to_string(),
            room,
            label,
        })
    }
}

impl Access {
    pub fn new(cfg: &AccessConfig) -> Self {
        Access {
            mode: cfg.mode,
            origins: cfg
                .allowed_origins
                .iter()
                .map(|o| normalise_origin(o))
                .collect(),
            keys: cfg
                .token_secret
                .iter()
                .filter_map(|s: &Secret| {
                    jsonwebtoken::DecodingKey::from_secret(s.expose().as_bytes()).ok()
                })
                .collect(),
            mints: per_minute(cfg.mints_per_minute),
        }
    }

    pub fn mode(&self) -> AccessMode {
        self.mode
    }

    /// Whether the request may have a credential or a socket, and on what
    /// terms. The mint budget is the caller's (it spans reloads).
    pub fn admit(&self, c: &Credentials<'_>) -> Result<Admission, Refusal> {
        match self.mode {
            AccessMode::Open => Ok(Admission::default()),
            AccessMode::Origin => {
                let origin = match c.origin {
                    Some(o) => normalise_origin(o),
                    None if c.fetch_site == Some("same-origin") => {
                        // The page's own origin: its host must be allowed.
                        let host = c.host.unwrap_or_default().to_ascii_lowercase();
                        return match self.origins.iter().find(|o| origin_host(o) == host) {
                            Some(_) => Ok(Admission::default()),
                            None => Err(Refusal::Origin),
                        };
                    }
                    None => return Err(Refusal::Origin),
                };
                if self.origins.contains(&origin) {
                    Ok(Admission {
                        cors_origin: Some(origin),
                        ..Admission::default()
                    })
                } else {
                    Err(Refusal::Origin)
                }
            }
            AccessMode::Token => {
                let token = c.token.filter(|t| !t.is_empty()).ok_or(Refusal::NoToken)?;
                let claims = self.verify(token).ok_or(Refusal::BadToken)?;
                Ok(Admission {
                    user: Some(claims.sub),
                    room: claims.room,
                    label: claims.label,
                    cors_origin: c
                        .origin
                        .map(normalise_origin)
                        .filter(|o| self.cors_allows(o)),
                })
            }
        }
    }

    /// Whether a page on `origin` may read answers cross-origin (CORS):
    /// see the module doc.
    pub fn cors_allows(&self, origin: &str) -> bool {
        let listed = || self.origins.contains(&normalise_origin(origin));
        match self.mode {
            AccessMode::Open => true,
            AccessMode::Origin => listed(),
            AccessMode::Token => self.origins.is_empty() || listed(),
        }
    }

    /// The claims of a token signed with one of the keys, current (`exp`)
    /// and already valid (`nbf`, RFC 7519 §4.1.5), with no leeway.
    fn verify(&self, token: &str) -> Option<Claims> {
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.set_required_spec_claims(&["exp", "sub"]);
        v.validate_nbf = true;
        v.leeway = 0;
        self.keys.iter().find_map(|k| {
            let c = jsonwebtoken::decode::<serde_json::Value>(token, k, &v).ok()?;
            Claims::from_json(&c.claims)
        })
    }
}

/// Refusals so far, by [`Refusal`] (in the order of [`Refusal::ALL`]).
#[derive(Debug, Default)]
pub struct AccessStats {
    pub refused: [AtomicU64; 4],
}

impl AccessStats {
    pub fn refused(&self, r: Refusal) -> u64 {
        self.refused[r as usize].load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The running appliance's access decision: who may have a credential or
/// a signaling socket, and which pages may read the answers.
pub struct Doorman {
    rules: ArcSwap<Access>,
    /// Spans reloads.
    mints: MintBudget,
    pub stats: Arc<AccessStats>,
}

impl Doorman {
    pub fn new(cfg: &AccessConfig) -> Arc<Doorman> {
        Arc::new(Doorman {
            rules: ArcSwap::from_pointee(Access::new(cfg)),
            mints: MintBudget::new(),
            stats: Arc::default(),
        })
    }

    /// New rules (reload); the mint budget carries over.
    pub fn set_rules(&self, cfg: &AccessConfig) {
        self.rules.store(Arc::new(Access::new(cfg)));
    }

    pub fn mode(&self) -> AccessMode {
        self.rules.load().mode()
    }

    /// Whether a request from `ip` presenting `c` may have a credential or
    /// a socket, and on what terms: the access rules, then the address's
    /// mint budget. Every refusal is counted.
    pub fn admit(&self, c: &Credentials<'_>, ip: IpAddr) -> Result<Admission, Refusal> {
        let rules = self.rules.load();
        let decided = rules
            .admit(c)
            .and_then(|a| self.mints.take(ip, rules.mints, Instant::now()).map(|()| a));
        if let Err(r) = decided {
            inc(&self.stats.refused[r as usize]);
        }
        decided
    }

    /// See [`Access::cors_allows`].
    pub fn cors_allows(&self, origin: &str) -> bool {
        self.rules.load().cors_allows(origin)
    }
}

/// `n` a minute, all of them at once if need be (a page that reloads a
/// few times must not be refused). In units of 1/60 of a mint, so the rate
/// is exact: see [`MintBudget::take`].
fn per_minute(n: u64) -> Rate {
    Rate {
        per_sec: n,
        burst: n * 60,
    }
}

/// Credentials minted per client address.
pub struct MintBudget {
    per_address: Mutex<PerAddress>,
}

impl MintBudget {
    pub fn new() -> Self {
        MintBudget {
            per_address: Mutex::new(PerAddress::new(65_536)),
        }
    }

    /// Spends one mint of `ip`'s budget, if there is one left.
    pub fn take(&self, ip: IpAddr, rate: Rate, now: Instant) -> Result<(), Refusal> {
        let mut p = self
            .per_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if p.tracked() > 60_000 {
            p.sweep(now);
        }
        if p.allow_units(ip, rate, now, 60) {
            Ok(())
        } else {
            Err(Refusal::TooMany)
        }
    }
}

impl Default for MintBudget {
    fn default() -> Self {
        Self::new()
    }
}

/// `Scheme://Host[:port]` as browsers send it: lowercase, no trailing `/`.
pub fn normalise_origin(o: &str) -> String {
    o.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// The `host[:port]` of an origin.
fn origin_host(o: &str) -> &str {
    o.split_once("://").map_or(o, |(_, h)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(mode: AccessMode) -> Access {
        Access::new(&AccessConfig {
            mode,
            allowed_origins: vec!["https://app.example".into(), "http://localhost:8080".into()],
            token_secret: vec![
                Secret::new("current-token-secret-0123456789abcdef"),
                Secret::new("previous-token-secret-0123456789abcdef"),
            ],
            mints_per_minute: 30,
        })
    }

    fn jwt(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn exp(from_now: i64) -> i64 {
        crate::ice::unix_now() as i64 + from_now
    }

    #[test]
    fn open_admits_anyone() {
        assert_eq!(
            access(AccessMode::Open).admit(&Credentials::default()),
            Ok(Admission::default())
        );
    }

    #[test]
    fn origin_admits_listed_origins_and_same_origin_pages() {
        let a = access(AccessMode::Origin);
        let with = |origin, fetch_site, host| Credentials {
            origin,
            fetch_site,
            host,
            token: None,
        };
        let ok = a
            .admit(&with(Some("https://APP.example/"), None, None))
            .unwrap();
        assert_eq!(ok.cors_origin.as_deref(), Some("https://app.example"));
        assert_eq!(
            a.admit(&with(Some("https://evil.example"), None, None)),
            Err(Refusal::Origin)
        );
        assert_eq!(
            a.admit(&with(Some("https://app.example:444"), None, None)),
            Err(Refusal::Origin)
        );
        assert_eq!(
            a.admit(&with(None, None, Some("localhost:8080"))),
            Err(Refusal::Origin)
        );
        assert!(a
            .admit(&with(None, Some("same-origin"), Some("localhost:8080")))
            .is_ok());
        assert_eq!(
            a.admit(&with(None, Some("same-origin"), Some("other:8080"))),
            Err(Refusal::Origin)
        );
        assert_eq!(
            a.admit(&with(None, Some("cross-site"), Some("localhost:8080"))),
            Err(Refusal::Origin)
        );
    }

    #[test]
    fn token_needs_a_valid_fresh_token_from_a_configured_secret() {
        let a = access(AccessMode::Token);
        fn tok(t: &str) -> Credentials<'_> {
            Credentials {
                token: Some(t),
                ..Credentials::default()
            }
        }
        assert_eq!(a.admit(&Credentials::default()), Err(Refusal::NoToken));
        let good = jwt(
            "previous-token-secret-0123456789abcdef",
            serde_json::json!({"sub": "user-42", "exp": exp(60), "room": "a"}),
        );
        let ok = a.admit(&tok(&good)).unwrap();
        assert_eq!(
            (ok.user.as_deref(), ok.room.as_deref()),
            (Some("user-42"), Some("a"))
        );
        let expired = jwt(
            "current-token-secret-0123456789abcdef",
            serde_json::json!({"sub": "u", "exp": exp(-5)}),
        );
        assert_eq!(a.admit(&tok(&expired)), Err(Refusal::BadToken));
        let foreign = jwt(
            "some-other-secret-0123456789abcdef",
            serde_json::json!({"sub": "u", "exp": exp(60)}),
        );
        assert_eq!(a.admit(&tok(&foreign)), Err(Refusal::BadToken));
        let no_sub = jwt(
            "current-token-secret-0123456789abcdef",
            serde_json::json!({"exp": exp(60)}),
        );
        assert_eq!(a.admit(&tok(&no_sub)), Err(Refusal::BadToken));
        let odd_sub = jwt(
            "current-token-secret-0123456789abcdef",
            serde_json::json!({"sub": "a:b", "exp": exp(60)}),
        );
        assert_eq!(a.admit(&tok(&odd_sub)), Err(Refusal::BadToken));
        assert_eq!(a.admit(&tok("not.a.jwt")), Err(Refusal::BadToken));
    }

    #[test]
    fn a_token_not_yet_valid_or_with_a_room_or_label_of_the_wrong_kind_is_refused() {
        let a = access(AccessMode::Token);
        let key = "current-token-secret-0123456789abcdef";
        let admit = |claims: serde_json::Value| {
            let t = jwt(key, claims);
            a.admit(&Credentials {
                token: Some(&t),
                ..Credentials::default()
            })
        };
        let now = exp(0);
        // nbf (RFC 7519 §4.1.5): no leeway.
        assert_eq!(
            admit(serde_json::json!({"sub": "u", "exp": now + 600, "nbf": now + 300})),
            Err(Refusal::BadToken)
        );
        assert!(admit(serde_json::json!({"sub": "u", "exp": now + 600, "nbf": now - 1})).is_ok());
        for room in [
            serde_json::Value::Null,
            serde_json::json!(7),
            serde_json::json!(["a"]),
            serde_json::json!({"name": "a"}),
            serde_json::json!(true),
        ] {
            assert_eq!(
                admit(serde_json::json!({"sub": "u", "exp": now + 600, "room": room})),
                Err(Refusal::BadToken),
                "room {room}"
            );
        }
        let ok = admit(serde_json::json!({"sub": "u", "exp": now + 600, "room": "standup"}));
        assert_eq!(ok.unwrap().room.as_deref(), Some("standup"));
        let ok = admit(serde_json::json!({"sub": "u", "exp": now + 600}));
        assert_eq!(ok.unwrap().room, None);
        // A label must be one (`turn::auth::valid_label`): it goes into
        // the TURN username.
        let ok = admit(serde_json::json!({"sub": "u", "exp": now + 600, "label": "acme"}));
        assert_eq!(ok.unwrap().label.as_deref(), Some("acme"));
        assert_eq!(
            admit(serde_json::json!({"sub": "u", "exp": now + 600})).map(|a| a.label),
            Ok(None)
        );
        for label in [
            serde_json::json!("a|b"),
            serde_json::json!(""),
            serde_json::json!(7),
            serde_json::Value::Null,
        ] {
            assert_eq!(
                admit(serde_json::json!({"sub": "u", "exp": now + 600, "label": label})),
                Err(Refusal::BadToken),
                "label {label}"
            );
        }
    }

    #[test]
    fn cors_follows_the_mode() {
        let any = "https://elsewhere.example";
        let listed = "https://APP.example";
        assert!(access(AccessMode::Open).cors_allows(any));
        let origin = access(AccessMode::Origin);
        assert!(origin.cors_allows(listed) && !origin.cors_allows(any));
        assert!(!origin.cors_allows("null"));
        // Token mode: the listed origins when there are some…
        let token = access(AccessMode::Token);
        assert!(token.cors_allows(listed) && !token.cors_allows(any));
        // …any origin when none is listed.
        let unlisted = Access::new(&AccessConfig {
            mode: AccessMode::Token,
            allowed_origins: vec![],
            token_secret: vec![Secret::new("current-token-secret-0123456789abcdef")],
            mints_per_minute: 30,
        });
        assert!(unlisted.cors_allows(any));
    }

    #[test]
    fn the_doorman_counts_refusals_and_its_budget_spans_reloads() {
        let cfg = AccessConfig {
            mode: AccessMode::Origin,
            allowed_origins: vec!["https://app.example".into()],
            token_secret: vec![],
            mints_per_minute: 2,
        };
        let d = Doorman::new(&cfg);
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        let from = |o| Credentials {
            origin: Some(o),
            ..Credentials::default()
        };
        assert_eq!(
            d.admit(&from("https://evil.example"), ip),
            Err(Refusal::Origin)
        );
        assert!(d.admit(&from("https://app.example"), ip).is_ok());
        d.set_rules(&cfg);
        assert!(d.admit(&from("https://app.example"), ip).is_ok());
        assert_eq!(
            d.admit(&from("https://app.example"), ip),
            Err(Refusal::TooMany)
        );
        assert_eq!(
            (
                d.stats.refused(Refusal::Origin),
                d.stats.refused(Refusal::TooMany)
            ),
            (1, 1)
        );
    }

    #[test]
    fn the_mint_budget_is_per_address() {
        let b = MintBudget::new();
        let rate = per_minute(30);
        let now = Instant::now();
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let passed = (0..100).filter(|_| b.take(a, rate, now).is_ok()).count();
        assert_eq!(passed, 30);
        assert!(b.take("198.51.100.2".parse().unwrap(), rate, now).is_ok());
    }
}
