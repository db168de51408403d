//! What a shard does with the core's events (`turn/events.rs`): the
//! allocation log lines, the lifecycle counters of `turn/stats.rs` and the
//! usage per user and label (`usage/`), and the allocation webhooks
//! (`webhooks.rs`, queued, never waited for). The core counts none of these
//! itself, so each is counted once, here.

use std::sync::atomic::Ordering;

use crate::turn::auth::identity;
use crate::turn::events::Event;
use crate::turn::server::transport_name;
use crate::turn::stats::{inc, TurnStats};
use crate::usage::UsageBook;
use crate::webhooks::Hook;

pub fn record(stats: &TurnStats, usage: &UsageBook, event: &Event) {
    usage.record(event);
    if let Some(hook) = Hook::of_event(event) {
        usage.webhooks().send(hook);
    }
    match event {
        Event::AllocationStarted {
            id,
            client,
            relayed,
            username,
        } => {
            inc(&stats.allocations_created);
            stats.allocations_active.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                id,
                user = %username,
                label = %identity(username).label.unwrap_or(""),
                client = %client.client,
                transport = transport_name(client.transport),
                relayed = ?relayed.iter().flatten().collect::<Vec<_>>(),
                "allocation started"
            );
        }
        Event::AllocationEnded {
            id,
            client,
            relayed,
            username,
            reason,
            duration,
            usage,
        } => {
            if reason.is_expiry() {
                inc(&stats.allocations_expired);
            } else {
                inc(&stats.allocations_deleted);
            }
            stats.allocations_active.fetch_sub(1, Ordering::Relaxed);
            tracing::info!(
                id,
                user = %username,
                label = %identity(username).label.unwrap_or(""),
                client = %client.client,
                transport = transport_name(client.transport),
                relayed = ?relayed.iter().flatten().collect::<Vec<_>>(),
                secs = duration.as_secs(),
                bytes_to_peer = usage.bytes_to_peer,
                bytes_to_client = usage.bytes_to_client,
                packets_to_peer = usage.packets_to_peer,
                packets_to_client = usage.packets_to_client,
                "allocation ended: {reason}"
            );
        }
        Event::PermissionInstalled { allocation, peer } => {
            tracing::debug!(allocation, %peer, "permission installed");
        }
        Event::PermissionRemoved {
            allocation,
            peer,
            reason,
        } => {
            tracing::debug!(allocation, %peer, "permission removed: {reason}");
        }
        Event::ChannelBound {
            allocation,
            number,
            peer,
        } => {
            tracing::debug!(
                allocation,
                channel = number.get(),
                %peer,
                "channel bound"
            );
        }
        Event::ChannelUnbound {
            allocation,
            number,
            peer,
            reason,
        } => {
            tracing::debug!(
                allocation,
                channel = number.get(),
                %peer,
                "channel unbound: {reason}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::allocation::{FiveTuple, Transport};
    use crate::turn::events::{EndReason, Usage};
    use std::time::Duration;

    #[test]
    fn lifecycle_counters_follow_the_events() {
        let stats = TurnStats::default();
        let book = UsageBook::new(10, 0, None);
        let client = FiveTuple {
            client: "198.51.100.1:5000".parse().unwrap(),
            server: "192.0.2.1:3478".parse().unwrap(),
            transport: Transport::Udp,
        };
        let relayed = [Some("192.0.2.1:50000".parse().unwrap()), None];
        let ended = |reason| Event::AllocationEnded {
            id: 1,
            client,
            relayed,
            username: "alice".into(),
            reason,
            duration: Duration::from_secs(1),
            usage: Usage::default(),
        };
        for _ in 0..3 {
            record(
                &stats,
                &book,
                &Event::AllocationStarted {
                    id: 1,
                    client,
                    relayed,
                    username: "alice".into(),
                },
            );
        }
        record(&stats, &book, &ended(EndReason::MaxAge));
        record(&stats, &book, &ended(EndReason::Revoked));
        let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(n(&stats.allocations_created), 3);
        assert_eq!(n(&stats.allocations_expired), 1);
        assert_eq!(n(&stats.allocations_deleted), 1);
        assert_eq!(stats.allocations_active.load(Ordering::Relaxed), 1);
        let (rows, _) = book.report(crate::usage::By::User, &[], 10);
        assert_eq!(
            rows[0].tally.allocations, 3,
            "the usage book heard them too"
        );
    }
}
