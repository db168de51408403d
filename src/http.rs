//! The HTTP side: health, `/api/ice-servers`, metrics, signaling at `/ws`
//! and the demo page (embedded in the binary, or from `http.static_dir`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::access::{query_token, Credentials};
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
        .route("/api/ice-servers", get(ice_servers));
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
/// admit (`access.rs`); CORS headers for an allowed origin.
async fn ice_servers(
    State(s): State<HttpState>,
    headers: HeaderMap,
    uri: Uri,
    extensions: axum::http::Extensions,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let token = bearer.or_else(|| query_token(uri.query()));
    let get = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    let credentials = Credentials {
        origin: get("origin"),
        fetch_site: get("sec-fetch-site"),
        host: get("host"),
        token: token.as_deref(),
    };
    let ip = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    let admission = match s.control.admit(&credentials, ip) {
        Ok(a) => a,
        Err(refused) => {
            let status = StatusCode::from_u16(refused.status()).unwrap_or(StatusCode::FORBIDDEN);
            return (
                status,
                Json(serde_json::json!({ "error": refused.to_string() })),
            )
                .into_response();
        }
    };
    let host = host_from_headers(&headers);
    let servers = s
        .control
        .ice()
        .grant(host.as_deref(), admission.user.as_deref());
    let mut response = ([(header::CACHE_CONTROL, "no-store")], Json(servers)).into_response();
    if let Some(origin) = admission
        .cors_origin
        .and_then(|o| axum::http::HeaderValue::from_str(&o).ok())
    {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::VARY, axum::http::HeaderValue::from_static("Origin"));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            axum::http::HeaderValue::from_static("authorization"),
        );
    }
    response
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
