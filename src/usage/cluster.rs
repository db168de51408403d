//! Usage summed across nodes, with the Redis signaling backend: every
//! node adds what its allocations used, as they start and end, to a few
//! Redis hashes (`PREFIX usage:user:FIELD` and `PREFIX usage:label:FIELD`,
//! user or label → total), and any node reads the sums back
//! (`GET /admin/usage?scope=cluster`).
//!
//! The shard thread never waits on Redis: the book hands each change to a
//! bounded queue with `try_send` (a full queue drops it and counts the
//! drop), and one task owned by the lifecycle writes them in batches. A
//! batch that fails to write is dropped and counted the same way: usage
//! is a report, not a ledger. The sums cover ended allocations on every
//! node, and the reading node adds its own live ones.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{By, Tally};
use crate::config::{Config, SignalingBackend};
use crate::lifecycle::Lifecycle;

/// Changes queued for Redis before new ones are dropped.
const QUEUE: usize = 4096;
/// Changes written in one pipeline at most.
const BATCH: usize = 256;
/// How long one Redis write or read may take.
const REDIS_WAIT: Duration = Duration::from_secs(1);

/// The tally fields, in the order [`fields`] gives them: the hash names.
const FIELDS: [&str; 6] = [
    "allocations",
    "allocation_ms",
    "bytes_to_peer",
    "bytes_to_client",
    "packets_to_peer",
    "packets_to_client",
];

fn fields(t: &Tally) -> [u64; 6] {
    [
        t.allocations,
        (t.allocation_seconds * 1000.0) as u64,
        t.bytes_to_peer,
        t.bytes_to_client,
        t.packets_to_peer,
        t.packets_to_client,
    ]
}

/// One change: what a user (and the label it counted under) used.
#[derive(Debug)]
pub(super) struct Delta {
    pub user: String,
    pub label: String,
    pub tally: Tally,
}

/// This node's link to the cluster's usage.
pub struct Cluster {
    tx: mpsc::Sender<Delta>,
    client: redis::Client,
    prefix: String,
    /// Changes lost to a full queue or a failed write.
    pub dropped: AtomicU64,
}

impl Cluster {
    /// With the Redis backend, the link and its writer task (stopped by
    /// `life`); without, none.
    pub fn start(cfg: &Config, life: &Lifecycle) -> Option<Arc<Cluster>> {
        let s = &cfg.signaling;
        if s.backend != SignalingBackend::Redis {
            return None;
        }
        // The URL was validated with the config.
        let client = redis::Client::open(s.redis_url.as_str()).ok()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let c = Arc::new(Cluster {
            tx,
            client,
            prefix: format!("{}usage:", s.redis_prefix),
            dropped: AtomicU64::new(0),
        });
        life.spawn(c.clone().write(rx, life.child()));
        Some(c)
    }

    /// Queues a change without waiting (called on the shard thread).
    pub(super) fn add(&self, d: Delta) {
        if self.tx.try_send(d).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn key(&self, by: By, field: &str) -> String {
        let by = match by {
            By::User => "user",
            By::Label => "label",
        };
        format!("{}{by}:{field}", self.prefix)
    }

    async fn write(self: Arc<Self>, mut rx: mpsc::Receiver<Delta>, stop: CancellationToken) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, BATCH) => if n == 0 { return },
                () = stop.cancelled() => return,
            }
            let mut pipe = redis::pipe();
            for d in &batch {
                for (i, v) in fields(&d.tally).into_iter().enumerate() {
                    if v > 0 {
                        pipe.hincr(self.key(By::User, FIELDS[i]), &d.user, v)
                            .ignore();
                        pipe.hincr(self.key(By::Label, FIELDS[i]), &d.label, v)
                            .ignore();
                    }
                }
            }
            let written = async {
                let mut conn = self.client.get_multiplexed_async_connection().await?;
                pipe.query_async::<()>(&mut conn).await
            };
            if !matches!(tokio::time::timeout(REDIS_WAIT, written).await, Ok(Ok(()))) {
                self.dropped
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                tracing::warn!(changes = batch.len(), "usage not written to Redis");
            }
            batch.clear();
        }
    }

    /// Every node's sums by user or label.
    pub async fn read(&self, by: By) -> redis::RedisResult<HashMap<String, Tally>> {
        let read = async {
            let mut conn = self.client.get_multiplexed_async_connection().await?;
            let mut pipe = redis::pipe();
            for f in FIELDS {
                pipe.hgetall(self.key(by, f));
            }
            pipe.query_async::<Vec<HashMap<String, u64>>>(&mut conn)
                .await
        };
        let hashes = tokio::time::timeout(REDIS_WAIT, read)
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "timed out")))??;
        let mut out: HashMap<String, Tally> = HashMap::new();
        for (i, hash) in hashes.into_iter().enumerate() {
            for (name, v) in hash {
                let t = out.entry(name).or_default();
                match i {
                    0 => t.allocations = v,
                    1 => t.allocation_seconds = v as f64 / 1000.0,
                    2 => t.bytes_to_peer = v,
                    3 => t.bytes_to_client = v,
                    4 => t.packets_to_peer = v,
                    _ => t.packets_to_client = v,
                }
            }
        }
        Ok(out)
    }

    /// Starts every node's sums afresh.
    pub async fn reset(&self) -> redis::RedisResult<()> {
        let mut conn = self.client.get_multiplexed_async_connection().await?;
        let mut pipe = redis::pipe();
        for by in [By::User, By::Label] {
            for f in FIELDS {
                pipe.del(self.key(by, f)).ignore();
            }
        }
        pipe.query_async::<()>(&mut conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_name_the_tally_in_order() {
        let t = Tally {
            allocations: 1,
            active: 9,
            allocation_seconds: 2.5,
            bytes_to_peer: 3,
            bytes_to_client: 4,
            packets_to_peer: 5,
            packets_to_client: 6,
        };
        assert_eq!(fields(&t), [1, 2500, 3, 4, 5, 6]);
        assert_eq!(FIELDS.len(), fields(&t).len());
    }
}
