//! Who used the relay, and how much: allocations, allocation-seconds, and
//! bytes and packets each way, per user and per label (the tenant a
//! token's `label` claim names, signed into the REST username; see
//! `turn/auth.rs`), since start or since an operator's reset.
//!
//! The [`UsageBook`] is the one owner of these totals. It counts nothing
//! on the packet path: the relay shards hand it the core's
//! `AllocationStarted` / `AllocationEnded` events (`relay/events.rs`), and
//! an allocation's bytes arrive with its end. What live allocations relayed
//! so far is added at read time from the core's own per-allocation counts
//! (the admin API asks the shards, [`UsageBook::report`] merges).
//!
//! Labels are few by design (tenants, customers): at most `max_labels`
//! distinct ones are ever kept, later ones count under [`OTHER`], so the
//! per-label Prometheus series stay bounded. Users are many: they are never
//! a metrics label, and past [`MAX_USERS`] new ones count under `other` too,
//! so the book's memory is bounded however many credentials are minted.
//!
//! With the Redis backend the book also hands every change to
//! [`cluster`], which sums them across nodes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::turn::auth::identity;
use crate::turn::events::{Event, Usage};
use crate::turn::revoked::Revokee;
use crate::turn::server::AllocationInfo;
use crate::webhooks::Webhooks;
use cluster::{Cluster, Delta};

pub mod cluster;

/// Where labels past `usage.max_labels`, and users past [`MAX_USERS`],
/// are counted.
pub const OTHER: &str = "other";

/// Distinct users the book keeps before new ones count under [`OTHER`].
pub const MAX_USERS: usize = 100_000;

/// What one user or label used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Tally {
    /// Allocations started.
    pub allocations: u64,
    /// Of those, still live (filled in by [`UsageBook::report`]).
    pub active: u64,
    pub allocation_seconds: f64,
    pub bytes_to_peer: u64,
    pub bytes_to_client: u64,
    pub packets_to_peer: u64,
    pub packets_to_client: u64,
}

impl Tally {
    pub fn bytes(&self) -> u64 {
        self.bytes_to_peer.saturating_add(self.bytes_to_client)
    }

    fn usage(&self) -> Usage {
        Usage {
            bytes_to_peer: self.bytes_to_peer,
            bytes_to_client: self.bytes_to_client,
            packets_to_peer: self.packets_to_peer,
            packets_to_client: self.packets_to_client,
        }
    }

    fn add(&mut self, seconds: f64, u: &Usage) {
        self.allocation_seconds += seconds;
        self.bytes_to_peer = self.bytes_to_peer.saturating_add(u.bytes_to_peer);
        self.bytes_to_client = self.bytes_to_client.saturating_add(u.bytes_to_client);
        self.packets_to_peer = self.packets_to_peer.saturating_add(u.packets_to_peer);
        self.packets_to_client = self.packets_to_client.saturating_add(u.packets_to_client);
    }
}

/// What the usage report groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum By {
    User,
    Label,
}

/// One row of the report: a user's or a label's tally. An allocation
/// without a label counts under the label `""`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub name: String,
    pub bytes: u64,
    #[serde(flatten)]
    pub tally: Tally,
}

#[derive(Default)]
struct Book {
    /// Since start or the last reset.
    by_user: HashMap<String, Tally>,
    by_label: HashMap<String, Tally>,
    /// Since start, never reset: Prometheus counters must not go down. Its
    /// keys are every label ever admitted (at most `max_labels`, plus
    /// `other` and `""`).
    labels_ever: HashMap<String, Tally>,
    /// Bytes of ended allocations per user since start, never reset (for
    /// byte budgets, `usage_budgets.rs`).
    users_ever: HashMap<String, u64>,
    /// Unix seconds of the start or the last reset.
    since: u64,
}

/// The per-user and per-label totals; see the module doc.
pub struct UsageBook {
    max_labels: usize,
    book: Mutex<Book>,
    cluster: Option<Arc<Cluster>>,
    /// Told of every allocation start and end (`webhooks.rs`); off
    /// unless [`UsageBook::with_webhooks`] gave one.
    webhooks: Arc<Webhooks>,
}

impl UsageBook {
    pub fn new(max_labels: usize, now_unix: u64, cluster: Option<Arc<Cluster>>) -> Self {
        UsageBook {
            max_labels,
            cluster,
            webhooks: Webhooks::new(&crate::config::WebhooksConfig::default()),
            book: Mutex::new(Book {
                since: now_unix,
                ..Book::default()
            }),
        }
    }

    /// The book that also hands the allocation events to `webhooks`.
    pub fn with_webhooks(mut self, webhooks: Arc<Webhooks>) -> Self {
        self.webhooks = webhooks;
        self
    }

    pub fn webhooks(&self) -> &Arc<Webhooks> {
        &self.webhooks
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts an allocation event (the others are not usage).
    pub fn record(&self, event: &Event) {
        let (username, ended) = match event {
            Event::AllocationStarted { username, .. } => (username, None),
            Event::AllocationEnded {
                username,
                duration,
                usage,
                ..
            } => (username, Some((duration.as_secs_f64(), usage))),
            _ => return,
        };
        let who = identity(username);
        let mut book = self.lock();
        let label = book.label_key(who.label.unwrap_or(""), self.max_labels);
        let user = book.user_key(who.user);
        let Book {
            by_user,
            by_label,
            labels_ever,
            users_ever,
            ..
        } = &mut *book;
        let mut change = Tally::default();
        match ended {
            None => change.allocations = 1,
            Some((seconds, usage)) => change.add(seconds, usage),
        }
        *users_ever.entry(user.clone()).or_default() += change.bytes();
        for t in [
            by_user.entry(user.clone()).or_default(),
            by_label.entry(label.clone()).or_default(),
            labels_ever.entry(label.clone()).or_default(),
        ] {
            t.allocations += change.allocations;
            t.add(change.allocation_seconds, &change.usage());
        }
        drop(book);
        if let Some(c) = &self.cluster {
            c.add(Delta {
                user,
                label,
                tally: change,
            });
        }
    }

    /// The name a username counts under in a report grouped `by`.
    fn name_of(&self, book: &Book, by: By, username: &str) -> String {
        let who = identity(username);
        match by {
            By::User => book.user_key(who.user),
            By::Label => book.label_key(who.label.unwrap_or(""), self.max_labels),
        }
    }

    /// The report: the book's totals plus what the `live` allocations
    /// relayed so far, sorted by bytes (most first), at most `limit` rows;
    /// and the unix time the totals run from.
    pub fn report(&self, by: By, live: &[AllocationInfo], limit: usize) -> (Vec<Row>, u64) {
        let (rows, since) = {
            let book = self.lock();
            let rows = match by {
                By::User => book.by_user.clone(),
                By::Label => book.by_label.clone(),
            };
            (rows, book.since)
        };
        (self.finish(rows, by, live, limit), since)
    }

    /// The report over every node (`cluster.rs`), this node's live
    /// allocations added; `None` without the Redis backend.
    pub async fn cluster_report(
        &self,
        by: By,
        live: &[AllocationInfo],
        limit: usize,
    ) -> Option<redis::RedisResult<Vec<Row>>> {
        let cluster = self.cluster.as_ref()?;
        Some(
            cluster
                .read(by)
                .await
                .map(|rows| self.finish(rows, by, live, limit)),
        )
    }

    /// Changes the cluster sums lost (a full queue, a failed write).
    pub fn cluster_dropped(&self) -> Option<u64> {
        self.cluster
            .as_ref()
            .map(|c| c.dropped.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Starts every node's sums afresh; `None` without Redis.
    pub async fn reset_cluster(&self) -> Option<redis::RedisResult<()>> {
        Some(self.cluster.as_ref()?.reset().await)
    }

    /// `rows` with the `live` allocations added, sorted and cut to `limit`.
    fn finish(
        &self,
        mut rows: HashMap<String, Tally>,
        by: By,
        live: &[AllocationInfo],
        limit: usize,
    ) -> Vec<Row> {
        {
            let book = self.lock();
            for a in live {
                let t = rows
                    .entry(self.name_of(&book, by, &a.username))
                    .or_default();
                t.active += 1;
                t.add(
                    a.age_secs as f64,
                    &Usage {
                        bytes_to_peer: a.bytes_to_peer,
                        bytes_to_client: a.bytes_to_client,
                        packets_to_peer: a.packets_to_peer,
                        packets_to_client: a.packets_to_client,
                    },
                );
            }
        }
        let mut rows: Vec<Row> = rows
            .into_iter()
            .map(|(name, tally)| Row {
                name,
                bytes: tally.bytes(),
                tally,
            })
            .collect();
        rows.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
        rows.truncate(limit);
        rows
    }

    /// Bytes the ended allocations of `who` relayed since start, never
    /// reset.
    pub fn ended_bytes(&self, who: &Revokee) -> u64 {
        let book = self.lock();
        match who {
            Revokee::User(u) => book.users_ever.get(u).copied().unwrap_or(0),
            Revokee::Label(l) => book.labels_ever.get(l).map_or(0, Tally::bytes),
        }
    }

    /// Starts the totals afresh (the Prometheus counters keep counting).
    pub fn reset(&self, now_unix: u64) {
        let mut book = self.lock();
        book.by_user.clear();
        book.by_label.clear();
        book.since = now_unix;
    }

    /// Every label's totals since start, for the Prometheus counters (only
    /// ended allocations: a counter cannot take back a live guess).
    pub fn labels_ever(&self) -> Vec<(String, Tally)> {
        let book = self.lock();
        let mut all: Vec<_> = book
            .labels_ever
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

impl Book {
    /// The key a label counts under: itself while fewer than `max_labels`
    /// named labels were ever seen (or it is one of them), else [`OTHER`].
    /// No label (`""`) and `other` itself take no place.
    fn label_key(&self, label: &str, max_labels: usize) -> String {
        let special = label.is_empty() || label == OTHER;
        let known = || self.labels_ever.contains_key(label);
        let named = || {
            self.labels_ever
                .keys()
                .filter(|k| !k.is_empty() && k.as_str() != OTHER)
                .count()
        };
        if special || known() || named() < max_labels {
            label.to_string()
        } else {
            OTHER.to_string()
        }
    }

    fn user_key(&self, user: &str) -> String {
        if self.by_user.contains_key(user) || self.by_user.len() < MAX_USERS {
            user.to_string()
        } else {
            OTHER.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::allocation::{FiveTuple, Transport};
    use crate::turn::events::EndReason;
    use std::time::Duration;

    fn client() -> FiveTuple {
        FiveTuple {
            client: "198.51.100.1:5000".parse().unwrap(),
            server: "192.0.2.1:3478".parse().unwrap(),
            transport: Transport::Udp,
        }
    }

    fn started(username: &str) -> Event {
        Event::AllocationStarted {
            id: 1,
            client: client(),
            relayed: [None, None],
            username: username.into(),
        }
    }

    fn ended(username: &str, secs: u64, to_peer: u64, to_client: u64) -> Event {
        Event::AllocationEnded {
            id: 1,
            client: client(),
            relayed: [None, None],
            username: username.into(),
            reason: EndReason::ClientDeleted,
            duration: Duration::from_secs(secs),
            usage: Usage {
                bytes_to_peer: to_peer,
                bytes_to_client: to_client,
                packets_to_peer: to_peer / 100,
                packets_to_client: to_client / 100,
            },
        }
    }

    fn live(username: &str, to_peer: u64) -> AllocationInfo {
        AllocationInfo {
            id: 9,
            user: identity(username).user.to_string(),
            username: username.into(),
            client: client().client,
            transport: "udp",
            relayed: Vec::new(),
            age_secs: 10,
            expires_in_secs: 600,
            bytes_to_peer: to_peer,
            bytes_to_client: 0,
            packets_to_peer: to_peer / 100,
            packets_to_client: 0,
        }
    }

    #[test]
    fn users_and_labels_add_up_from_the_events_and_the_live_counts() {
        let book = UsageBook::new(10, 1000, None);
        for e in [
            started("100:alice|acme"),
            ended("100:alice|acme", 30, 1000, 2000),
            started("100:bob|globex"),
            started("100:alice|acme"),
            started("carol"),
            ended("carol", 5, 100, 0),
        ] {
            book.record(&e);
        }
        let (rows, since) = book.report(By::User, &[live("100:bob|globex", 5000)], 10);
        assert_eq!(since, 1000);
        let names: Vec<_> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["bob", "alice", "carol"], "sorted by bytes");
        assert_eq!(rows[0].bytes, 5000);
        assert_eq!(rows[0].tally.active, 1);
        assert_eq!(rows[0].tally.allocation_seconds, 10.0);
        assert_eq!(rows[1].tally.allocations, 2);
        assert_eq!(rows[1].tally.bytes_to_client, 2000);
        assert_eq!(rows[1].tally.packets_to_client, 20);
        assert_eq!(rows[1].tally.allocation_seconds, 30.0);
        let (rows, _) = book.report(By::Label, &[], 2);
        assert_eq!(rows.len(), 2, "limit");
        assert_eq!((rows[0].name.as_str(), rows[0].bytes), ("acme", 3000));
        assert_eq!((rows[1].name.as_str(), rows[1].bytes), ("", 100));
    }

    #[test]
    fn labels_past_the_limit_count_as_other_and_stay_bounded() {
        let book = UsageBook::new(2, 0, None);
        for i in 0..50 {
            let name = format!("100:u{i}|tenant{i}");
            book.record(&started(&name));
            book.record(&ended(&name, 1, 10, 0));
        }
        book.record(&ended("100:x|other", 1, 5, 0));
        let labels: Vec<_> = book.labels_ever().into_iter().map(|(l, _)| l).collect();
        assert_eq!(labels, ["other", "tenant0", "tenant1"]);
        let (rows, _) = book.report(By::Label, &[live("100:y|tenant7", 1)], 10);
        let other = rows.iter().find(|r| r.name == OTHER).unwrap();
        assert_eq!(other.bytes, 48 * 10 + 5 + 1);
        assert_eq!(other.tally.allocations, 48);
        assert_eq!(book.report(By::User, &[], 100).0.len(), 51);
    }

    #[test]
    fn a_reset_starts_the_report_afresh_but_not_the_counters() {
        let book = UsageBook::new(10, 0, None);
        book.record(&started("1:a|acme"));
        book.record(&ended("1:a|acme", 1, 10, 10));
        book.reset(50);
        let (rows, since) = book.report(By::Label, &[], 10);
        assert!(rows.is_empty());
        assert_eq!(since, 50);
        assert_eq!(book.labels_ever()[0].1.bytes(), 20);
    }
}
