//! Signed webhooks (`[webhooks]`): what happened (an allocation started or
//! ended, a budget was spent, a user or label was revoked, the node began
//! to drain) POSTed as JSON to one URL, signed with HMAC-SHA256 of the
//! exact body (`X-Turnkey-Signature: sha256=HEX`).
//!
//! Those that report an event (the relay shards' event handler, the
//! budget check, the revoke handler, the drain) only build it and
//! `try_send` it into a bounded queue: a full queue drops the event and
//! counts it, nobody waits. One delivery task, owned by the lifecycle,
//! POSTs them one at a time and retries a failed one with a doubling
//! back-off (capped by `retry_max_secs`) until a 2xx or `max_attempts`:
//! delivery is at least once (a POST that timed out after the sink took
//! it is sent again), and each event carries a unique `id` so the sink can
//! drop duplicates. At stop, delivery goes on for up to a second for what
//! is queued (a drain that ends at once still announces itself); what is
//! left then is lost. The URL, secret and events are read at each event, so
//! SIGHUP applies them; the queue's size is fixed at start.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hmac13::{Hmac, KeyInit, Mac};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{BudgetAction, WebhooksConfig};
use crate::lifecycle::Lifecycle;
use crate::turn::auth::identity;
use crate::turn::events::Event;
use crate::turn::revoked::Revokee;
use crate::turn::server::transport_name;

/// Every event type, as `webhooks.events` names them.
pub use crate::config::WEBHOOK_EVENTS as EVENTS;

/// The header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "x-turnkey-signature";

/// The first pause after a failed attempt; it doubles up to the cap.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// How long delivery goes on after the stop token, for what is queued
/// (within the appliance's stop grace, `app.rs`).
const FLUSH: Duration = Duration::from_secs(1);

/// Who an event is about: a user or a label (a budget's or a
/// revocation's subject).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Subject {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl From<&Revokee> for Subject {
    fn from(who: &Revokee) -> Self {
        match who {
            Revokee::User(u) => Subject {
                user: Some(u.clone()),
                label: None,
            },
            Revokee::Label(l) => Subject {
                user: None,
                label: Some(l.clone()),
            },
        }
    }
}

/// One allocation, as both of its events describe it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AllocationInfo {
    pub user: String,
    pub label: Option<String>,
    pub client: SocketAddr,
    pub transport: &'static str,
    pub relayed: Vec<SocketAddr>,
}

/// What happened, with its type (`type`) and details (`data`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", content = "data")]
pub enum Hook {
    #[serde(rename = "allocation.started")]
    AllocationStarted(AllocationInfo),
    #[serde(rename = "allocation.ended")]
    AllocationEnded {
        #[serde(flatten)]
        allocation: AllocationInfo,
        duration_secs: f64,
        bytes_to_peer: u64,
        bytes_to_client: u64,
        packets_to_peer: u64,
        packets_to_client: u64,
        reason: String,
    },
    #[serde(rename = "budget.exceeded")]
    BudgetExceeded {
        #[serde(flatten)]
        subject: Subject,
        /// Bytes both ways since the node started counting.
        bytes: u64,
        bytes_per_day: u64,
        bytes_per_month: u64,
        action: BudgetAction,
    },
    #[serde(rename = "user.revoked")]
    UserRevoked {
        #[serde(flatten)]
        subject: Subject,
        /// Unix seconds until which its credentials are refused.
        refused_until: u64,
    },
    #[serde(rename = "node.draining")]
    NodeDraining {},
}

impl Hook {
    /// The type's name, as in [`EVENTS`].
    pub fn name(&self) -> &'static str {
        match self {
            Hook::AllocationStarted(_) => EVENTS[0],
            Hook::AllocationEnded { .. } => EVENTS[1],
            Hook::BudgetExceeded { .. } => EVENTS[2],
            Hook::UserRevoked { .. } => EVENTS[3],
            Hook::NodeDraining {} => EVENTS[4],
        }
    }

    /// The hook of an allocation event of the core (None for the others).
    pub fn of_event(event: &Event) -> Option<Hook> {
        let info = |username: &str,
                    client: &crate::turn::allocation::FiveTuple,
                    relayed: &[Option<SocketAddr>; 2]| {
            let who = identity(username);
            AllocationInfo {
                user: who.user.to_owned(),
                label: who.label.map(str::to_owned),
                client: client.client,
                transport: transport_name(client.transport),
                relayed: relayed.iter().flatten().copied().collect(),
            }
        };
        match event {
            Event::AllocationStarted {
                client,
                relayed,
                username,
                ..
            } => Some(Hook::AllocationStarted(info(username, client, relayed))),
            Event::AllocationEnded {
                client,
                relayed,
                username,
                reason,
                duration,
                usage,
                ..
            } => Some(Hook::AllocationEnded {
                allocation: info(username, client, relayed),
                duration_secs: duration.as_secs_f64(),
                bytes_to_peer: usage.bytes_to_peer,
                bytes_to_client: usage.bytes_to_client,
                packets_to_peer: usage.packets_to_peer,
                packets_to_client: usage.packets_to_client,
                reason: reason.to_string(),
            }),
            _ => None,
        }
    }
}

/// What the sink receives.
#[derive(Debug, Serialize)]
struct Envelope<'a> {
    /// Unique per event: this node's random id and a counter, in hex.
    id: String,
    /// Unix seconds when the event happened.
    timestamp: u64,
    #[serde(flatten)]
    hook: &'a Hook,
}

/// The delivery counters (`metrics.rs` exports them).
#[derive(Debug, Default)]
pub struct WebhookStats {
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_attempts: AtomicU64,
    pub queued: AtomicI64,
}

/// One event waiting: its signed body.
#[derive(Debug)]
struct Pending {
    body: Bytes,
    signature: String,
}

/// This node's webhooks; see the module doc.
pub struct Webhooks {
    config: ArcSwap<WebhooksConfig>,
    queue: mpsc::Sender<Pending>,
    /// Taken by [`Webhooks::start`].
    receiver: Mutex<Option<mpsc::Receiver<Pending>>>,
    node: u64,
    counter: AtomicU64,
    pub stats: Arc<WebhookStats>,
}

impl Webhooks {
    /// The queue is `cfg.queue` long (at least 1); nothing is delivered
    /// until [`Webhooks::start`].
    pub fn new(cfg: &WebhooksConfig) -> Arc<Self> {
        let (queue, receiver) = mpsc::channel(cfg.queue.max(1));
        Arc::new(Webhooks {
            config: ArcSwap::from_pointee(cfg.clone()),
            queue,
            receiver: Mutex::new(Some(receiver)),
            node: rand::random(),
            counter: AtomicU64::new(0),
            stats: Arc::default(),
        })
    }

    /// Applies a reloaded `[webhooks]` (not its queue size).
    pub fn configure(&self, cfg: &WebhooksConfig) {
        self.config.store(Arc::new(cfg.clone()));
    }

    /// Queues `hook` if webhooks are on and its type is wanted; never
    /// waits (a full queue drops it, counted).
    pub fn send(&self, hook: Hook) {
        let cfg = self.config.load();
        if cfg.url.is_empty()
            || !(cfg.events.is_empty() || cfg.events.iter().any(|e| e == hook.name()))
        {
            return;
        }
        let envelope = Envelope {
            id: format!(
                "{:016x}{:016x}",
                self.node,
                self.counter.fetch_add(1, Relaxed)
            ),
            timestamp: crate::ice::unix_now(),
            hook: &hook,
        };
        let body = match serde_json::to_vec(&envelope) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::warn!(error = %e, "webhook event not serialized");
                return;
            }
        };
        let signature = sign(cfg.secret.expose().as_bytes(), &body);
        match self.queue.try_send(Pending { body, signature }) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Relaxed);
            }
            Err(_) => {
                self.stats.dropped_queue_full.fetch_add(1, Relaxed);
            }
        }
    }

    /// Starts the delivery task (stopped by `life`); a second call does
    /// nothing.
    pub fn start(self: &Arc<Self>, life: &Lifecycle) {
        let receiver = self
            .receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(receiver) = receiver {
            life.spawn(self.clone().deliver(receiver, life.child()));
        }
    }

    async fn deliver(
        self: Arc<Self>,
        mut receiver: mpsc::Receiver<Pending>,
        stop: CancellationToken,
    ) {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        // At stop, what is queued (a drain's `node.draining` among it)
        // still gets up to FLUSH; then the task ends whatever is left.
        let over = async {
            stop.cancelled().await;
            tokio::time::sleep(FLUSH).await;
        };
        tokio::pin!(over);
        loop {
            let pending = if stop.is_cancelled() {
                match receiver.try_recv() {
                    Ok(p) => p,
                    Err(_) => return,
                }
            } else {
                tokio::select! {
                    p = receiver.recv() => match p {
                        Some(p) => p,
                        None => return,
                    },
                    () = stop.cancelled() => continue,
                }
            };
            self.stats.queued.fetch_sub(1, Relaxed);
            let mut pause = FIRST_RETRY;
            let mut attempts = 0u32;
            loop {
                let cfg = self.config.load_full();
                if cfg.url.is_empty() {
                    // Turned off by a reload: what is queued is not wanted.
                    break;
                }
                let attempt = post(&client, &cfg, &pending);
                let ok = tokio::select! {
                    r = attempt => r,
                    () = &mut over => return,
                };
                attempts += 1;
                match ok {
                    Ok(()) => {
                        self.stats.delivered.fetch_add(1, Relaxed);
                        break;
                    }
                    Err(e) => {
                        self.stats.failed_attempts.fetch_add(1, Relaxed);
                        tracing::debug!(error = %e, attempts, "webhook not delivered");
                    }
                }
                if cfg.max_attempts > 0 && attempts >= cfg.max_attempts {
                    self.stats.dropped_attempts.fetch_add(1, Relaxed);
                    tracing::warn!(attempts, "webhook event dropped: every attempt failed");
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = &mut over => return,
                }
                pause = (pause * 2).min(Duration::from_secs(cfg.retry_max_secs));
            }
        }
    }
}

/// `sha256=` and the hex HMAC-SHA256 of `body` keyed with `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// One POST of `pending` to the configured URL, within its timeout; Ok
/// on a 2xx.
async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    cfg: &WebhooksConfig,
    pending: &Pending,
) -> Result<(), String> {
    let request = hyper::Request::post(cfg.url.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "turnkey")
        .header(SIGNATURE_HEADER, pending.signature.as_str())
        .body(Full::new(pending.body.clone()))
        .map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(cfg.timeout_secs);
    match tokio::time::timeout(timeout, client.request(request)).await {
        Err(_) => Err("timed out".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(response)) if response.status().is_success() => Ok(()),
        Ok(Ok(response)) => Err(format!("status {}", response.status())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_rfc_4231s_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let hooks = Webhooks::new(&WebhooksConfig {
            url: "http://127.0.0.1:9/".into(),
            secret: crate::config::Secret::new("0123456789abcdef"),
            queue: 2,
            ..WebhooksConfig::default()
        });
        for _ in 0..5 {
            hooks.send(Hook::NodeDraining {});
        }
        assert_eq!(hooks.stats.queued.load(Relaxed), 2);
        assert_eq!(hooks.stats.dropped_queue_full.load(Relaxed), 3);
    }

    #[test]
    fn unwanted_types_and_an_empty_url_queue_nothing() {
        let hooks = Webhooks::new(&WebhooksConfig {
            url: "http://127.0.0.1:9/".into(),
            events: vec!["node.draining".into()],
            ..WebhooksConfig::default()
        });
        hooks.send(Hook::UserRevoked {
            subject: Subject {
                user: Some("alice".into()),
                label: None,
            },
            refused_until: 0,
        });
        assert_eq!(hooks.stats.queued.load(Relaxed), 0);
        hooks.send(Hook::NodeDraining {});
        assert_eq!(hooks.stats.queued.load(Relaxed), 1);
        hooks.configure(&WebhooksConfig::default());
        hooks.send(Hook::NodeDraining {});
        assert_eq!(hooks.stats.queued.load(Relaxed), 1);
    }

    #[test]
    fn the_body_names_type_id_timestamp_and_data() {
        let hook = Hook::UserRevoked {
            subject: Subject {
                user: None,
                label: Some("acme".into()),
            },
            refused_until: 7,
        };
        let body = serde_json::to_value(Envelope {
            id: "x".into(),
            timestamp: 1,
            hook: &hook,
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"id": "x", "timestamp": 1, "type": "user.revoked",
                "data": {"label": "acme", "refused_until": 7}})
        );
    }
}
