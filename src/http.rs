//! The HTTP side: health, `/api/ice-servers`, metrics, signaling at `/ws`
//! and the demo page (embedded in the binary, or from `http.static_dir`).

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::app::AppState;

#[derive(rust_embed::Embed)]
#[folder = "static/"]
struct Assets;

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

pub fn router(state: AppState) -> Router {
    let mut r = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/ice-servers", get(ice_servers));
    if state.serve_metrics_here {
        r = r.route("/metrics", get(metrics));
    }
    let r = r
        .with_state(state.clone())
        .merge(crate::signal::router(state.signaling.clone()));
    match &state.static_dir {
        Some(dir) => r.fallback_service(tower_http::services::ServeDir::new(dir)),
        None => r.fallback(embedded),
    }
}

/// A router with only `/metrics`, for a separate `metrics.listen`.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

/// The hostname part of a Host header (`h`, `h:port`, `[v6]:port`).
pub fn host_from_header(headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let name = if let Some(rest) = host.strip_prefix('[') {
        format!("[{}]", rest.split(']').next()?)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h).to_string()
    };
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    ok.then_some(name)
}

async fn ice_servers(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let host = host_from_header(&headers);
    let servers = s.ice_servers(host.as_deref());
    ([(header::CACHE_CONTROL, "no-store")], Json(servers)).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    match s.metrics.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn embedded(uri: Uri) -> Response {
    let path = uri.path().trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    match Assets::get(path) {
        Some(file) => {
            let mime = mime_guess::from_path(path).first_or_octet_stream();
            (
                [
                    (header::CONTENT_TYPE, mime.as_ref().to_string()),
                    (header::CACHE_CONTROL, "no-cache".to_string()),
                ],
                file.data,
            )
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, HeaderValue::from_str(v).unwrap());
        m
    }

    #[test]
    fn host_header_forms() {
        assert_eq!(
            host_from_header(&h("example.com:8080")).as_deref(),
            Some("example.com")
        );
        assert_eq!(
            host_from_header(&h("example.com")).as_deref(),
            Some("example.com")
        );
        assert_eq!(
            host_from_header(&h("127.0.0.1:80")).as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(host_from_header(&h("[::1]:8080")).as_deref(), Some("[::1]"));
        assert_eq!(host_from_header(&h("evil/host")), None);
        assert_eq!(host_from_header(&HeaderMap::new()), None);
    }
}
