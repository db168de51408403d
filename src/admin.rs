//! The admin API, on its own listener (`admin.listen`, off by default)
//! behind a bearer token (`admin.token`): see and end TURN sessions, read
//! usage, revoke credentials.
//!
//! - `GET /admin/allocations`: every allocation, as JSON (id, user,
//!   client, transport, relayed addresses, age, bytes each way);
//! - `DELETE /admin/allocations/{id}`: end one;
//! - `DELETE /admin/users/{user}`: end all of a user's (the user part of
//!   a REST username, as listed);
//! - `GET /admin/usage?by=user|label&limit=N&scope=node|cluster`: usage
//!   per user or label (`usage/`), live allocations included, this node's
//!   or (Redis backend) every node's; `DELETE /admin/usage` starts it
//!   afresh;
//! - `POST /admin/revoke` with `{"user": …}` or `{"label": …}`: refuse
//!   their credentials (`turn/revoked.rs`) and end their allocations.
//!
//! Allocations live in the relay shards; each request asks every shard
//! through its event queue and gathers the answers.

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::control::Control;
use crate::lifecycle::Lifecycle;
use crate::relay::{end_everywhere, list_everywhere, ShardHandle};
use crate::revocation::Revoker;
use crate::turn::revoked::Revokee;
use crate::turn::server::{AllocationInfo, EndWhich};
use crate::usage::{By, UsageBook};

#[derive(Clone)]
pub struct AdminState {
    pub control: Arc<Control>,
    pub shards: Vec<ShardHandle>,
    pub usage: Arc<UsageBook>,
    pub revoker: Arc<Revoker>,
}

/// The admin API's routes; starts this node's part in revocations
/// (`revocation.rs`), which with Redis listens to the other nodes' orders
/// whether or not this node serves the admin API.
pub fn router(
    control: Arc<Control>,
    shards: Vec<ShardHandle>,
    usage: Arc<UsageBook>,
    life: &Lifecycle,
) -> Router {
    let state = AdminState {
        revoker: Revoker::start(control.clone(), shards.clone(), life),
        control,
        shards,
        usage,
    };
    Router::new()
        .route("/admin/allocations", get(list))
        .route("/admin/allocations/{id}", delete(end_one))
        .route("/admin/users/{user}", delete(end_user))
        .route("/admin/usage", get(usage_report).delete(reset_usage))
        .route("/admin/revoke", post(revoke))
        .layer(middleware::from_fn_with_state(state.clone(), bearer))
        .with_state(state)
}

/// Every request needs `Authorization: Bearer TOKEN` with the token in
/// force (it reloads on SIGHUP).
async fn bearer(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    let token = s.control.config().admin.token;
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match (token, given) {
        (Some(t), Some(g)) if same(t.expose().as_bytes(), g.as_bytes()) => next.run(req).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({"error": "a valid admin token is required"})),
        )
            .into_response(),
    }
}

/// Compares without stopping at the first difference, so the time taken
/// does not tell how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Every shard's allocations, by id.
async fn allocations(s: &AdminState) -> Vec<AllocationInfo> {
    let mut all = list_everywhere(&s.shards).await;
    all.sort_by_key(|a| a.id);
    all
}

async fn list(State(s): State<AdminState>) -> Response {
    Json(json!({ "allocations": allocations(&s).await })).into_response()
}

#[derive(serde::Deserialize)]
struct UsageQuery {
    by: Option<By>,
    limit: Option<usize>,
    scope: Option<Scope>,
}

/// This node's usage, or every node's (Redis backend only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum Scope {
    Node,
    Cluster,
}

fn no_cluster() -> Response {
    let error = "scope=cluster needs signaling.backend = \"redis\"";
    (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response()
}

fn redis_down(e: &redis::RedisError) -> Response {
    let error = format!("Redis: {e}");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": error })),
    )
        .into_response()
}

async fn usage_report(State(s): State<AdminState>, Query(q): Query<UsageQuery>) -> Response {
    let by = q.by.unwrap_or(By::User);
    let limit = q.limit.unwrap_or(100);
    let live = allocations(&s).await;
    if q.scope == Some(Scope::Cluster) {
        return match s.usage.cluster_report(by, &live, limit).await {
            None => no_cluster(),
            Some(Err(e)) => redis_down(&e),
            Some(Ok(rows)) => {
                let dropped = s.usage.cluster_dropped();
                Json(json!({ "by": by, "scope": "cluster", "dropped": dropped, "rows": rows }))
                    .into_response()
            }
        };
    }
    let (rows, since) = s.usage.report(by, &live, limit);
    Json(json!({ "by": by, "scope": "node", "since": since, "rows": rows })).into_response()
}

/// `{"user": …}` or `{"label": …}`, exactly one.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    user: Option<String>,
    label: Option<String>,
}

async fn revoke(State(s): State<AdminState>, body: Option<Json<RevokeBody>>) -> Response {
    let who = match body.map(|Json(b)| (b.user, b.label)) {
        Some((Some(u), None)) => Revokee::User(u),
        Some((None, Some(l))) => Revokee::Label(l),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "give exactly one of `user` and `label`"})),
            )
                .into_response()
        }
    };
    Json(s.revoker.revoke(who).await).into_response()
}

async fn reset_usage(State(s): State<AdminState>, Query(q): Query<UsageQuery>) -> Response {
    if q.scope == Some(Scope::Cluster) {
        match s.usage.reset_cluster().await {
            None => return no_cluster(),
            Some(Err(e)) => return redis_down(&e),
            Some(Ok(())) => {}
        }
    }
    s.usage.reset(crate::ice::unix_now());
    Json(json!({ "reset": true })).into_response()
}

fn ended(n: usize) -> Response {
    let status = if n == 0 {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    (status, Json(json!({ "ended": n }))).into_response()
}

async fn end_one(State(s): State<AdminState>, Path(id): Path<u64>) -> Response {
    ended(end_everywhere(&s.shards, EndWhich::Id(id)).await)
}

async fn end_user(State(s): State<AdminState>, Path(user): Path<String>) -> Response {
    ended(end_everywhere(&s.shards, EndWhich::User(user)).await)
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_compare_whole() {
        assert!(super::same(b"abc", b"abc"));
        assert!(!super::same(b"abc", b"abd"));
        assert!(!super::same(b"abc", b"ab"));
    }
}
