//! ICE grants: the `iceServers` a client is handed (STUN and TURN URLs in
//! the order browsers should try them) with a fresh, time-limited TURN
//! REST credential. One place for `/api/ice-servers`, signaling's `joined`
//! and its periodic `ice-servers` refresh.
//!
//! What goes into the URLs: `http.public_host` when set, else the host the
//! client used to reach us (its `Host` header, checked by [`host_of`]),
//! else the advertised relay IP; the bound ports (or `tls.public_port`).
//! The settings swap on reload; the minting secret is read from the relay's
//! current rules, so a rotated secret mints at once.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rand::Rng;
use serde::Serialize;

use crate::turn::auth::mint_labelled;
use crate::turn::server::Rules;

/// One `RTCIceServer`.
#[derive(Debug, Clone, Serialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// An `RTCConfiguration`-shaped answer, with the credential's lifetime.
#[derive(Debug, Clone, Serialize)]
pub struct IceServers {
    #[serde(rename = "iceServers")]
    pub ice_servers: Vec<IceServer>,
    pub ttl: u64,
}

/// What goes into `iceServers` URLs; replaced whole on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceSettings {
    pub public_host: Option<String>,
    pub advertised_ip: IpAddr,
    pub turn_port: u16,
    pub tcp_port: Option<u16>,
    pub tls_port: Option<u16>,
    pub rest_ttl_secs: u64,
}

/// Hands out `iceServers` with fresh credentials.
pub struct IceGrants {
    settings: ArcSwap<IceSettings>,
    rules: Arc<ArcSwap<Rules>>,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl IceGrants {
    pub fn new(settings: IceSettings, rules: Arc<ArcSwap<Rules>>) -> Self {
        IceGrants {
            settings: ArcSwap::from_pointee(settings),
            rules,
        }
    }

    pub fn settings(&self) -> Arc<IceSettings> {
        self.settings.load_full()
    }

    pub fn set_settings(&self, s: IceSettings) {
        self.settings.store(Arc::new(s));
    }

    /// A fresh `RTCConfiguration` for a client that reached us as `host`
    /// (already checked with [`host_of`]). The credential is `user`'s when
    /// the access rules name one (token mode: the app's user, so quotas
    /// count it), otherwise a random id's; it carries `label` (a token's
    /// `label` claim) inside the signed username, so usage counts under it.
    pub fn grant(&self, host: Option<&str>, user: Option<&str>, label: Option<&str>) -> IceServers {
        let ice = self.settings.load();
        let host = ice
            .public_host
            .clone()
            .or_else(|| host.map(str::to_string))
            .unwrap_or_else(|| match ice.advertised_ip {
                IpAddr::V6(v6) => format!("[{v6}]"),
                v4 => v4.to_string(),
            });
        let port = ice.turn_port;
        let mut servers = vec![IceServer {
            urls: vec![format!("stun:{host}:{port}")],
            username: None,
            credential: None,
        }];
        let rules = self.rules.load();
        if let Some(secret) = rules.credentials.minting_secret() {
            let random;
            let user = match user {
                Some(u) => u,
                None => {
                    random = format!("{:016x}", rand::rng().random::<u64>());
                    &random
                }
            };
            let cred = mint_labelled(secret, user, label, unix_now(), ice.rest_ttl_secs);
            // In the order browsers should try them: UDP, TCP, then TLS.
            let mut urls = vec![format!("turn:{host}:{port}?transport=udp")];
            if let Some(p) = ice.tcp_port {
                urls.push(format!("turn:{host}:{p}?transport=tcp"));
            }
            if let Some(p) = ice.tls_port {
                urls.push(format!("turns:{host}:{p}?transport=tcp"));
            }
            servers.push(IceServer {
                urls,
                username: Some(cred.username),
                credential: Some(cred.password),
            });
        }
        IceServers {
            ice_servers: servers,
            ttl: ice.rest_ttl_secs,
        }
    }

    /// The grant as signaling sends it: the list as JSON and its lifetime.
    pub fn grant_json(
        &self,
        host: Option<&str>,
        user: Option<&str>,
        label: Option<&str>,
    ) -> (serde_json::Value, Duration) {
        let s = self.grant(host, user, label);
        (
            serde_json::to_value(&s.ice_servers).unwrap_or_default(),
            Duration::from_secs(s.ttl),
        )
    }
}

/// The host part of a `Host` header, without the port, if it is a plain DNS
/// name or IP literal. IPv6 literals keep their brackets so the value can go
/// straight into a `turn:` URI. Anything else is `None`: the header is
/// client-controlled and ends up inside URLs we hand out.
pub fn host_of(header: &str) -> Option<&str> {
    let split = if header.starts_with('[') {
        header.find(']')? + 1
    } else {
        header.find(':').unwrap_or(header.len())
    };
    let (host, port) = header.split_at_checked(split)?;
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => {
            !v6.is_empty()
                && v6
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        }
    };
    (port_ok && host_ok).then_some(host)
}

/// [`host_of`] of a request's `Host` header.
pub fn host_from_headers(headers: &axum::http::HeaderMap) -> Option<String> {
    let h = headers.get(axum::http::header::HOST)?.to_str().ok()?;
    host_of(h).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_ports_and_keeps_plain_names() {
        let cases = [
            ("example.org", Some("example.org")),
            ("example.org:8443", Some("example.org")),
            ("127.0.0.1:3000", Some("127.0.0.1")),
            ("[::1]:8080", Some("[::1]")),
            ("[2001:db8::1]", Some("[2001:db8::1]")),
            ("", None),
            (":80", None),
            ("example.org:", None),
            ("example.org:80x", None),
            ("evil.org/path?x=", None),
            ("evil/host", None),
            ("a b", None),
            ("[::1", None),
            ("[]:80", None),
            ("[::1]x", None),
            ("[zz::1]", None),
        ];
        for (header, want) in cases {
            assert_eq!(host_of(header), want, "{header:?}");
        }
    }

    fn grants(public_host: Option<&str>, secret: bool) -> IceGrants {
        use crate::config::Secret;
        use crate::turn::auth::Credentials;
        use crate::turn::policy::PeerPolicy;
        let secrets = if secret {
            vec![Secret::new("0123456789abcdef0123")]
        } else {
            Vec::new()
        };
        let rules = Rules {
            credentials: Credentials::new("turnkey".into(), secrets, Default::default()),
            policy: PeerPolicy::new(Vec::new(), Vec::new(), Vec::new(), 49152..=65535),
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            user_quota: 0,
            total_quota: 0,
            max_permissions: 8,
            max_channels: 8,
            lifetimes: Default::default(),
            alternate_server: None,
            limits: Default::default(),
        };
        IceGrants::new(
            IceSettings {
                public_host: public_host.map(str::to_string),
                advertised_ip: "2001:db8::7".parse().unwrap(),
                turn_port: 3478,
                tcp_port: Some(3478),
                tls_port: Some(443),
                rest_ttl_secs: 600,
            },
            Arc::new(ArcSwap::from_pointee(rules)),
        )
    }

    #[test]
    fn urls_in_browser_order_with_a_fresh_credential() {
        let g = grants(None, true).grant(Some("page.example"), None, None);
        assert_eq!(g.ttl, 600);
        assert_eq!(g.ice_servers[0].urls, ["stun:page.example:3478"]);
        assert_eq!(
            g.ice_servers[1].urls,
            [
                "turn:page.example:3478?transport=udp",
                "turn:page.example:3478?transport=tcp",
                "turns:page.example:443?transport=tcp"
            ]
        );
        let user = g.ice_servers[1].username.as_deref().unwrap();
        let expiry: u64 = user.split(':').next().unwrap().parse().unwrap();
        assert!(expiry.abs_diff(unix_now() + 600) <= 2, "{user}");
    }

    #[test]
    fn a_named_user_gets_the_credential() {
        let g = grants(None, true).grant(Some("h"), Some("user-42"), Some("acme"));
        let user = g.ice_servers[1].username.as_deref().unwrap();
        assert!(user.ends_with(":user-42|acme"), "{user}");
    }

    #[test]
    fn public_host_wins_and_the_relay_ip_is_the_last_resort() {
        let g = grants(Some("turn.example"), true).grant(Some("page.example"), None, None);
        assert_eq!(g.ice_servers[0].urls, ["stun:turn.example:3478"]);
        let g = grants(None, true).grant(None, None, None);
        assert_eq!(g.ice_servers[0].urls, ["stun:[2001:db8::7]:3478"]);
    }

    #[test]
    fn without_a_secret_only_stun_is_granted() {
        let g = grants(None, false).grant(Some("h"), None, None);
        assert_eq!(g.ice_servers.len(), 1);
    }
}
