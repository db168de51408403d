//! The HTTP side: health, `/api/ice-servers`, metrics, signaling at `/ws`
//! and the demo page (embedded in the binary, or from `http.static_dir`).

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::caller::Caller;
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
}

pub fn router(state: HttpState) -> Router {
    let r = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // The self-test page (`static/selftest.html`) under a short name;
        // a redirect works with `http.static_dir` too.
        .route(
            "/selftest",
            get(|| async { axum::response::Redirect::permanent("/selftest.html") }),
        )
        .route(
            "/api/ice-servers",
            get(ice_servers).options(ice_servers_preflight),
        );
    let r = r
        .with_state(state.clone())
        .merge(crate::signal::router(state.control.signaling().clone()));
    match &state.static_dir {
        Some(dir) => r.fallback_service(tower_http::services::ServeDir::new(dir)),
        None => r.fallback(embedded),
    }
}

/// What `turn.tcp_http = "redirect"` serves on the TURN TCP port: every
/// request is sent to the same path on the HTTPS origin.
pub fn redirect_router(control: Arc<Control>) -> Router {
    Router::new().fallback(move |headers: HeaderMap, uri: Uri| {
        let control = control.clone();
        async move {
            let ice = control.ice().settings();
            let host = ice
                .public_host
                .clone()
                .or_else(|| host_from_headers(&headers))
                .unwrap_or_else(|| ice.advertised_ip.to_string());
            let port = match ice.tls_port {
                Some(443) | None => String::new(),
                Some(p) => format!(":{p}"),
            };
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            axum::response::Redirect::permanent(&format!("https://{host}{port}{path}"))
        }
    })
}

/// `/metrics`, on `metrics.listen` only: never on a public listener.
pub fn metrics_router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 503 while draining (take the node out of the balancer). While the
/// signaling backend (Redis) is unreachable: 200 `degraded`, not 503, as
/// every node shares the outage, calls in progress and the relay keep
/// working, and taking all nodes out of a balancer would end them.
async fn readyz(State(s): State<HttpState>) -> Response {
    if s.control.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if !s.control.signaling().backend_up() {
        "degraded\n".into_response()
    } else {
        "ready\n".into_response()
    }
}

/// `/api/ice-servers`: a fresh credential for whoever the access rules
/// admit (`access.rs`); CORS headers for an origin the rules allow.
async fn ice_servers(State(s): State<HttpState>, caller: Caller) -> Response {
    let admission = match s.control.doorman().admit(&caller.credentials(), caller.ip) {
        Ok(a) => a,
        Err(refused) => return refused.into_response(),
    };
    let servers = s.control.ice().grant(
        caller.host.as_deref().and_then(crate::ice::host_of),
        admission.user.as_deref(),
        admission.label.as_deref(),
    );
    let mut response = ([(header::CACHE_CONTROL, "no-store")], Json(servers)).into_response();
    if let Some(origin) = admission.cors_origin {
        cors_headers(response.headers_mut(), &origin);
    }
    response
}

/// The CORS preflight of `/api/ice-servers`, so a page on another origin
/// may send `Authorization: Bearer`: 204 with the CORS headers for an
/// origin the access rules allow, 403 without them otherwise (the browser
/// then sends nothing).
async fn ice_servers_preflight(State(s): State<HttpState>, caller: Caller) -> Response {
    match caller.origin.as_deref() {
        Some(origin) if s.control.doorman().cors_allows(origin) => {
            let mut response = StatusCode::NO_CONTENT.into_response();
            let h = response.headers_mut();
            cors_headers(h, &crate::access::normalise_origin(origin));
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            response
        }
        _ => StatusCode::FORBIDDEN.into_response(),
    }
}

fn cors_headers(h: &mut HeaderMap, origin: &str) {
    let Ok(origin) = HeaderValue::from_str(origin) else {
        return;
    };
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization"),
    );
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
