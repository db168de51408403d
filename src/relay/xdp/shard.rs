//! A shard's side of the fast path: it writes the entries of its own
//! allocations into the program's maps as the cache orders (so every
//! entry has exactly one writer, the shard that owns its allocation), and
//! once a second folds the entries' per-CPU counters back into the core
//! (the allocation's counts and budgets), the relayed-traffic metrics, and
//! at an allocation's end into the usage its `AllocationEnded` carries.
//!
//! Only control-path work happens here (a few `bpf(2)` calls per event
//! and per binding per second); the packet path of the shard is untouched.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cache::{Binding, Cache, Caps, Order};
use super::maps::{Entry, EntryCount};
use super::Maps;
use crate::turn::allocation::{ChannelNumber, Transport};
use crate::turn::events::{Event, Usage};
use crate::turn::server::Server;
use crate::turn::stats::{Direction, Framing, TurnStats};

const SWEEP: Duration = Duration::from_secs(1);

struct Installed {
    slot: u32,
    entry: Entry,
    /// The counters as last read: client → peer, peer → client.
    seen: [EntryCount; 2],
}

/// A binding taken out; its counters are read once more at the next
/// sweep (a packet already past the lookup may still count) before its
/// slot is reused.
struct Retiring {
    slot: u32,
    allocation: u64,
    seen: [EntryCount; 2],
}

pub struct XdpShard {
    maps: Arc<Maps>,
    cache: Cache,
    /// Where relay sockets bind, per family (the wildcard address means
    /// "the kernel's choice of source", which the program asks the FIB).
    relay_bind: [Option<IpAddr>; 2],
    installed: HashMap<(u64, ChannelNumber), Installed>,
    retiring: Vec<Retiring>,
    /// Counted by the program, not yet told to the core.
    pending: HashMap<u64, Usage>,
    stats: Arc<TurnStats>,
    next_sweep: Option<Instant>,
    warned_full: bool,
    /// The shard that copies the program's per-reason counters.
    first: bool,
}

impl XdpShard {
    pub fn new(
        maps: Arc<Maps>,
        own: Vec<IpAddr>,
        relay_bind: [Option<IpAddr>; 2],
        stats: Arc<TurnStats>,
        first: bool,
    ) -> Self {
        XdpShard {
            maps,
            cache: Cache::new(own),
            relay_bind,
            installed: HashMap::new(),
            retiring: Vec::new(),
            pending: HashMap::new(),
            stats,
            next_sweep: None,
            warned_full: false,
            first,
        }
    }

    /// Follows one of the core's events; an `AllocationEnded` gets what
    /// the fast path relayed for it since the last sweep added to its usage.
    pub fn on_event(&mut self, event: &mut Event) {
        for order in self.cache.on_event(event) {
            self.apply(order);
        }
        if let Event::AllocationEnded { id, usage, .. } = event {
            if let Some(u) = self.pending.remove(id) {
                usage.bytes_to_peer += u.bytes_to_peer;
                usage.bytes_to_client += u.bytes_to_client;
                usage.packets_to_peer += u.packets_to_peer;
                usage.packets_to_client += u.packets_to_client;
                self.count(&u);
            }
        }
    }

    /// Once a second (called every turn of the shard's loop): reads the
    /// counters, tells the core, and moves allocations in or out of the
    /// fast path for their rates.
    pub fn sweep(&mut self, now: Instant, core: &mut Server) {
        if self.next_sweep.is_some_and(|t| now < t) {
            return;
        }
        self.next_sweep = Some(now + SWEEP);
        let maps = self.maps.clone();
        for ((allocation, _), inst) in self.installed.iter_mut() {
            let delta = read(&maps, inst.slot, &mut inst.seen);
            add(self.pending.entry(*allocation).or_default(), &delta);
        }
        for mut r in std::mem::take(&mut self.retiring) {
            let delta = read(&maps, r.slot, &mut r.seen);
            add(self.pending.entry(r.allocation).or_default(), &delta);
            maps.free_slot(r.slot);
        }
        let pending = std::mem::take(&mut self.pending);
        core.absorb(now, &pending);
        for u in pending.values() {
            self.count(u);
        }
        let (allocation, shard) = core.bandwidth_caps();
        let bytes = core.relayed_bytes();
        let orders = self.cache.sweep(now, Caps { allocation, shard }, |id| {
            bytes.get(&id).copied()
        });
        for order in orders {
            self.apply(order);
        }
        self.stats.xdp_bindings.store(
            self.installed.len() as i64,
            std::sync::atomic::Ordering::Relaxed,
        );
        if self.first {
            for (i, (_, n)) in self.maps.reasons().into_iter().enumerate() {
                if let Some(c) = self.stats.xdp_packets.get(i) {
                    c.store(n, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    fn apply(&mut self, order: Order) {
        match order {
            Order::Put(b) => self.put(b),
            Order::Drop(b) => self.drop_binding(b),
        }
    }

    fn put(&mut self, b: Binding) {
        let key = (b.allocation, b.channel);
        if self.installed.contains_key(&key) {
            return;
        }
        let Some(bind_ip) = self.relay_bind[usize::from(b.relayed.is_ipv6())] else {
            return;
        };
        let Some(slot) = self.maps.take_slot() else {
            if !self.warned_full {
                self.warned_full = true;
                tracing::warn!("the XDP maps are full: further channels relay in user space");
            }
            return;
        };
        let entry = Entry::new(
            b.client.client,
            b.client.server,
            b.channel.get(),
            SocketAddr::new(bind_ip, b.relayed.port()),
            b.peer,
            slot,
        );
        let written = self
            .maps
            .clients
            .put(&entry.client_key, &entry.client_val)
            .and_then(|()| self.maps.peers.put(&entry.peer_key, &entry.peer_val));
        if let Err(e) = written {
            tracing::warn!(allocation = b.allocation, "XDP entry not written: {e}");
            let _ = self.maps.clients.delete(&entry.client_key);
            let _ = self.maps.peers.delete(&entry.peer_key);
            self.maps.free_slot(slot);
            return;
        }
        self.installed.insert(
            key,
            Installed {
                slot,
                entry,
                seen: [EntryCount::default(); 2],
            },
        );
    }

    fn drop_binding(&mut self, b: Binding) {
        let Some(mut inst) = self.installed.remove(&(b.allocation, b.channel)) else {
            return;
        };
        let _ = self.maps.clients.delete(&inst.entry.client_key);
        let _ = self.maps.peers.delete(&inst.entry.peer_key);
        let delta = read(&self.maps, inst.slot, &mut inst.seen);
        add(self.pending.entry(b.allocation).or_default(), &delta);
        self.retiring.push(Retiring {
            slot: inst.slot,
            allocation: b.allocation,
            seen: inst.seen,
        });
    }

    /// The relayed-traffic metrics hear of what the program relayed.
    fn count(&self, u: &Usage) {
        use Direction::*;
        let s = &self.stats;
        s.relayed_many(
            Transport::Udp,
            ClientToPeer,
            Framing::ChannelData,
            u.packets_to_peer,
            u.bytes_to_peer,
        );
        s.relayed_many(
            Transport::Udp,
            PeerToClient,
            Framing::ChannelData,
            u.packets_to_client,
            u.bytes_to_client,
        );
    }

    /// Bindings in the fast path now.
    pub fn bindings(&self) -> usize {
        self.installed.len()
    }
}

/// What a slot's two entries counted since `seen`, which moves on.
fn read(maps: &Maps, slot: u32, seen: &mut [EntryCount; 2]) -> Usage {
    let now = [2 * slot, 2 * slot + 1].map(|e| maps.count(e).unwrap_or_default());
    let d = |i: usize| {
        (
            now[i].packets.saturating_sub(seen[i].packets),
            now[i].bytes.saturating_sub(seen[i].bytes),
        )
    };
    let ((p0, b0), (p1, b1)) = (d(0), d(1));
    *seen = now;
    Usage {
        bytes_to_peer: b0,
        bytes_to_client: b1,
        packets_to_peer: p0,
        packets_to_client: p1,
    }
}

fn add(to: &mut Usage, u: &Usage) {
    to.bytes_to_peer += u.bytes_to_peer;
    to.bytes_to_client += u.bytes_to_client;
    to.packets_to_peer += u.packets_to_peer;
    to.packets_to_client += u.packets_to_client;
}
