//! Revocations (`POST /admin/revoke`) on every node: this node refuses the
//! user's or label's credentials (`turn/revoked.rs`, through
//! [`Control::revoke`]) and ends their allocations on its shards; with
//! the Redis signaling backend it also publishes the order on
//! `PREFIX revoke`, and every node applies what arrives there the same
//! way, so a revocation on one node holds on all of them as soon as Redis
//! delivers it.
//!
//! Only nodes subscribed when the order is published hear it (Redis
//! pub/sub keeps nothing): a node that was cut off from Redis misses it,
//! and a node that restarts forgets its revocations, as a single node
//! does. The subscriber reconnects every second while Redis is away.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::SignalingBackend;
use crate::control::Control;
use crate::lifecycle::Lifecycle;
use crate::relay::{end_everywhere, ShardHandle};
use crate::turn::revoked::Revokee;
use crate::turn::server::EndWhich;
use crate::webhooks::{Hook, Subject};

/// How long publishing or (re)subscribing may take, and the pause between
/// subscription attempts.
const REDIS_WAIT: Duration = Duration::from_secs(1);

/// What one node tells the others.
#[derive(Debug, Serialize, Deserialize)]
struct Order {
    who: Revokee,
    /// Unix seconds, as the publishing node computed it.
    until: u64,
    /// The publishing node, which applied the order already.
    from: u64,
}

struct Bus {
    client: redis::Client,
    channel: String,
}

/// This node's part in revocations; see the module doc.
pub struct Revoker {
    control: Arc<Control>,
    shards: Vec<ShardHandle>,
    bus: Option<Bus>,
    node: u64,
}

/// What a revocation did here.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Revoked {
    /// Allocations this node ended.
    pub ended: usize,
    /// When the refusal lapses (unix seconds).
    pub refused_until: u64,
    /// Whether the other nodes were told (always false without Redis).
    pub published: bool,
}

impl Revoker {
    /// With the Redis backend, also subscribes to the other nodes' orders
    /// (a task `life` stops).
    pub fn start(control: Arc<Control>, shards: Vec<ShardHandle>, life: &Lifecycle) -> Arc<Self> {
        let cfg = control.config().signaling;
        let bus = match cfg.backend {
            SignalingBackend::Memory => None,
            // The URL was accepted when signaling started on it.
            SignalingBackend::Redis => {
                redis::Client::open(cfg.redis_url.as_str())
                    .ok()
                    .map(|client| Bus {
                        client,
                        channel: format!("{}revoke", cfg.redis_prefix),
                    })
            }
        };
        let r = Arc::new(Revoker {
            control,
            shards,
            bus,
            node: rand::random(),
        });
        if r.bus.is_some() {
            life.spawn(r.clone().listen(life.child()));
        }
        r
    }

    /// Revokes `who` here and, with Redis, everywhere.
    pub async fn revoke(&self, who: Revokee) -> Revoked {
        // Refused first, then ended: no new allocation slips in between.
        let refused_until = self.control.revoke(who.clone());
        self.control.webhooks().send(Hook::UserRevoked {
            subject: Subject::from(&who),
            refused_until,
        });
        let ended = end_everywhere(&self.shards, EndWhich::from(&who)).await;
        let mut published = false;
        if let Some(bus) = &self.bus {
            let order = Order {
                who,
                until: refused_until,
                from: self.node,
            };
            published = match tokio::time::timeout(REDIS_WAIT, bus.publish(&order)).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "revocation not published to the other nodes");
                    false
                }
                Err(_) => {
                    tracing::warn!("revocation not published to the other nodes: timed out");
                    false
                }
            };
        }
        Revoked {
            ended,
            refused_until,
            published,
        }
    }

    /// Applies the other nodes' orders until `stop`.
    async fn listen(self: Arc<Self>, stop: CancellationToken) {
        let Some(bus) = &self.bus else { return };
        loop {
            let subscribed = async {
                let mut ps = bus.client.get_async_pubsub().await?;
                ps.subscribe(&bus.channel).await?;
                Ok::<_, redis::RedisError>(ps)
            };
            if let Ok(Ok(ps)) = tokio::time::timeout(REDIS_WAIT, subscribed).await {
                tracing::info!(channel = %bus.channel, "listening for revocations from other nodes");
                let mut orders = ps.into_on_message();
                loop {
                    tokio::select! {
                        m = orders.next() => match m {
                            Some(m) => self.apply(m.get_payload_bytes()).await,
                            None => break,
                        },
                        () = stop.cancelled() => return,
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(REDIS_WAIT) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    async fn apply(&self, payload: &[u8]) {
        let order = match serde_json::from_slice::<Order>(payload) {
            Ok(o) if o.from != self.node => o,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable revocation from another node");
                return;
            }
        };
        self.control.revoke_until(order.who.clone(), order.until);
        let ended = end_everywhere(&self.shards, EndWhich::from(&order.who)).await;
        tracing::info!(who = ?order.who, ended, "revocation from another node applied");
    }
}

impl Bus {
    async fn publish(&self, order: &Order) -> redis::RedisResult<()> {
        let mut conn = self.client.get_multiplexed_async_connection().await?;
        let body = serde_json::to_string(order).unwrap_or_default();
        redis::cmd("PUBLISH")
            .arg(&self.channel)
            .arg(body)
            .query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_read_back_as_written() {
        let o = Order {
            who: Revokee::Label("acme".into()),
            until: 7,
            from: 9,
        };
        let text = serde_json::to_string(&o).unwrap();
        assert_eq!(text, r#"{"who":{"label":"acme"},"until":7,"from":9}"#);
        let back: Order = serde_json::from_str(&text).unwrap();
        assert_eq!((back.who, back.until, back.from), (o.who, 7, 9));
    }
}
