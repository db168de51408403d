//! The HTTP side: health, `/api/ice-servers`, metrics, signaling at `/ws`
//! and the demo page (embedded in the binary, or from `http.static_dir`).

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::control::Control;
use crate::ice::host_from_headers;
use crate::metrics::Metrics;

#[derive(rust_embed::Embed)]
#[folder = "static/"]
struct Assets;

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub control: Arc<Control>,
    pub metrics: Arc<Metrics>,
    pub static_dir: Option<PathBuf>,
    /// `/metrics` on this router too (no separate `metrics.listen`).
    pub serve_metrics_here: bool,
}

pub fn router(state: HttpState) -> Router {
    let mut r = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // The self-test page (`static/selftest.html`) under a short name;
        // a redirect works with `http.static_dir` too.
        .route(
            "/selftest",
            get(|| async { axum::response::Redirect::permanent("/selftest.html") }),
        )
        .route("/api/ice-servers", get(ice_servers));
    if state.serve_metrics_here {
        r = r.route("/metrics", get(metrics));
    }
    let r = r
        .with_state(state.clone())
        .merge(crate::signal::router(state.control.signaling().clone()));
    match &state.static_dir {
        Some(dir) => r.fallback_service(tower_http::services::ServeDir::new(dir)),
        None => r.fallback(embedded),
    }
}

/// A router with only `/metrics`, for a separate `metrics.listen`.
pub fn metrics_router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<HttpState>) -> Response {
    if s.control.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn ice_servers(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let host = host_from_headers(&headers);
    let servers = s.control.ice().grant(host.as_deref());
    ([(header::CACHE_CONTROL, "no-store")], Json(servers)).into_response()
}

async fn metrics(State(s): State<HttpState>) -> Response {
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
