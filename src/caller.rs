//! Who is calling: one reading of a request for every public endpoint
//! that asks (`/api/ice-servers`, `/ws`, socket.io's handshake), so they
//! cannot drift apart. The client address is the one the public listener
//! recorded (`public.rs`: the connection's, or a trusted proxy's
//! `X-Forwarded-For`); the token comes from `Authorization: Bearer` or,
//! for clients that cannot set headers (a browser's WebSocket), `?token=`;
//! the origin and fetch metadata are the browser's.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};

use crate::access::Credentials;

/// What a request shows about its sender.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Unspecified when served without a recorded address (unit tests).
    pub ip: IpAddr,
    pub token: Option<String>,
    pub origin: Option<String>,
    /// `Sec-Fetch-Site`, set by browsers.
    pub fetch_site: Option<String>,
    /// The `Host` header as sent (host[:port]).
    pub host: Option<String>,
}

impl Caller {
    /// Reads a request's head (also socketioxide's copy of a handshake's).
    pub fn of(parts: &Parts) -> Caller {
        let get = |h: &str| header_str(&parts.headers, h).map(str::to_string);
        let bearer = header_str(&parts.headers, header::AUTHORIZATION.as_str())
            .and_then(bearer_token)
            .map(str::to_string);
        Caller {
            ip: parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip()),
            token: bearer.or_else(|| query_token(parts.uri.query())),
            origin: get("origin"),
            fetch_site: get("sec-fetch-site"),
            host: get("host"),
        }
    }

    /// The request as the access rules see it.
    pub fn credentials(&self) -> Credentials<'_> {
        Credentials {
            origin: self.origin.as_deref(),
            fetch_site: self.fetch_site.as_deref(),
            host: self.host.as_deref(),
            token: self.token.as_deref(),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Caller, Infallible> {
        Ok(Caller::of(parts))
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The token of `Authorization: Bearer T` (the scheme is case-insensitive,
/// RFC 9110 §11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The `token` of a query string (`?token=…`). Tokens are base64url, so
/// no percent-decoding is needed.
pub fn query_token(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = axum::http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut p = b.body(()).unwrap().into_parts().0;
        p.extensions
            .insert(ConnectInfo(SocketAddr::from(([198, 51, 100, 7], 5000))));
        p
    }

    #[test]
    fn the_token_comes_from_a_bearer_header_first_then_the_query() {
        let c = Caller::of(&parts(
            "/ws?token=from-query",
            &[("authorization", "bearer from-header")],
        ));
        assert_eq!(c.token.as_deref(), Some("from-header"));
        let c = Caller::of(&parts("/ws?a=1&token=from-query", &[]));
        assert_eq!(c.token.as_deref(), Some("from-query"));
        let c = Caller::of(&parts("/ws", &[("authorization", "Basic dXNlcg==")]));
        assert_eq!(c.token, None);
        let c = Caller::of(&parts("/ws", &[("authorization", "Bearer ")]));
        assert_eq!(c.token, None);
    }

    #[test]
    fn the_address_origin_and_host_are_read() {
        let c = Caller::of(&parts(
            "/api/ice-servers",
            &[
                ("origin", "https://app.example"),
                ("host", "turn.example:8080"),
                ("sec-fetch-site", "cross-site"),
            ],
        ));
        assert_eq!(c.ip, IpAddr::from([198, 51, 100, 7]));
        let cred = c.credentials();
        assert_eq!(cred.origin, Some("https://app.example"));
        assert_eq!(cred.host, Some("turn.example:8080"));
        assert_eq!(cred.fetch_site, Some("cross-site"));
    }
}
