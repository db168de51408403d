//! The sans-IO TURN server of one shard (RFC 8489 Binding, RFC 8656 TURN).
//!
//! It owns allocations, permissions, channels and the relay port pool, and
//! touches no socket and no clock: the shell feeds it datagrams with the
//! current `Instant` and gives it an [`Io`] to put answers and relayed
//! packets into; `poll_timeout` says when it next wants `handle_timeout`.
//! The relay fast paths (`client_channel_data`, `peer_datagram`) are short
//! and allocate nothing; everything else is the control path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::rngs::SmallRng;
use rand::Rng;
use stun::attributes::*;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use stun::uattrs::UnknownAttributes;
use stun::xoraddr::XorMappedAddress;

use super::allocation::{Allocation, FiveTuple, Lapsed, RelayId, TupleHash};
use super::auth::{identity, quota_user, CredentialError, Key, Nonces};
use super::events::{EndReason, Event, Lapse, Usage};
use super::reply::{answer, AlternateServer, Reject};
use super::stats::{inc, Direction::*, Framing::*, TurnStats};
use super::wire;
pub use super::world::{Clock, CoreConfig, Io, Limits, Rules, Shared};
use crate::budget::{client_key, Gcra, PerAddress, Rate};

const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
pub(super) const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// Scratch space for one relayed packet plus its TURN framing.
const SCRATCH_LEN: usize = 65536 + wire::MAX_DATA_INDICATION_OVERHEAD + 8;
const NO_ALLOC: u32 = u32::MAX;

/// Attributes we understand; an unknown one in 0x0000–0x7FFF gets 420.
const KNOWN_REQUIRED: &[u16] = &[
    0x0001, 0x0006, 0x0008, 0x0009, 0x000A, 0x000C, 0x000D, 0x0012, 0x0013, 0x0014, 0x0015, 0x0016,
    0x0017, 0x0018, 0x0019, 0x001A, 0x001C, 0x001D, 0x001E, 0x0020, 0x0022, 0x0024, 0x0025,
];

pub struct Server {
    pub(super) cfg: CoreConfig,
    pub(super) clock: Clock,
    pub(super) rules: Arc<ArcSwap<Rules>>,
    pub(super) shared: Arc<Shared>,
    pub(super) stats: Arc<TurnStats>,
    nonces: Nonces,
    port_base: u16,
    /// Allocations by id; ids are reused through `free_ids`.
    allocs: Vec<Option<Box<Allocation>>>,
    free_ids: Vec<u32>,
    /// Allocation id per relay port, for IPv4 [0] and IPv6 [1].
    relay_slots: [Vec<u32>; 2],
    pub(super) by_client: HashMap<FiveTuple, u32, TupleHash>,
    next_sweep: Instant,
    pub(super) rng: SmallRng,
    scratch: Box<[u8]>,
    /// Bandwidth budgets (a reload takes effect at the next sweep).
    bandwidth: Bandwidth,
    /// Request budgets per client address, before authentication.
    unauth: PerAddress,
    bindings: PerAddress,
    /// The rules the allocations were last checked against (revocation).
    rules_seen: Arc<Rules>,
}

#[derive(Clone, Copy)]
struct Budgets {
    allocation: Rate,
    shard: Rate,
    unauth: Rate,
    binding: Rate,
}

impl Budgets {
    fn of(rules: &Rules, shards: usize) -> Self {
        Budgets {
            allocation: rules.limits.allocation_rate(),
            shard: rules.limits.shard_rate(shards),
            unauth: rules.limits.unauth_rate,
            binding: rules.limits.binding_rate,
        }
    }
}

/// Addresses each shard tracks for request budgets before newcomers share
/// one (bounds memory under a spoofed flood).
const TRACKED_ADDRESSES: usize = 16_384;

/// What an operator sees of one allocation (admin API).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AllocationInfo {
    pub id: u64,
    /// The quota user (the user part of a REST username).
    pub user: String,
    pub username: String,
    pub client: SocketAddr,
    pub transport: &'static str,
    pub relayed: Vec<SocketAddr>,
    pub age_secs: u64,
    pub expires_in_secs: u64,
    pub bytes_to_peer: u64,
    pub bytes_to_client: u64,
    pub packets_to_peer: u64,
    pub packets_to_client: u64,
}

/// Which allocations an operator ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndWhich {
    Id(u64),
    User(String),
    /// Every allocation whose credential carries this usage label.
    Label(String),
}

pub fn transport_name(t: super::allocation::Transport) -> &'static str {
    use super::allocation::Transport;
    match t {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
        Transport::Tls => "tls",
    }
}

/// How long a relay port that failed to bind stays out of the pool.
pub(super) const PORT_COOLDOWN: Duration = Duration::from_secs(5);

/// The shard's bandwidth: the budgets copied from the rules at each sweep
/// (so the per-packet path loads nothing shared), and the shard's share of
/// the relay's capacity.
struct Bandwidth {
    budgets: Budgets,
    capacity: Gcra,
}

impl Bandwidth {
    /// Spends `len` bytes of an allocation's budget in one direction and
    /// of the shard's capacity; false, counted as a drop, when either is
    /// exhausted.
    #[inline]
    fn spend(
        &mut self,
        a: &mut Allocation,
        d: super::stats::Direction,
        now: Instant,
        len: usize,
        stats: &TurnStats,
    ) -> bool {
        let d = d as usize;
        let len64 = len as u64;
        if !a.budget[d].take(self.budgets.allocation, now, len64)
            || !self.capacity.take(self.budgets.shard, now, len64)
        {
            inc(&stats.dropped_over_bandwidth);
            return false;
        }
        a.bytes[d] += len64;
        a.packets[d] += 1;
        true
    }
}

impl Server {
    pub fn new(
        cfg: CoreConfig,
        clock: Clock,
        rules: Arc<ArcSwap<Rules>>,
        shared: Arc<Shared>,
        stats: Arc<TurnStats>,
        // Relay ports, reservation tokens: seeded in tests and fuzzing.
        rng: SmallRng,
    ) -> Self {
        let port_base = *shared.ports_range.start();
        let nslots = shared.ports_range.clone().count();
        let rules_seen = rules.load_full();
        Server {
            bandwidth: Bandwidth {
                budgets: Budgets::of(&rules_seen, cfg.shards),
                capacity: Gcra::new(),
            },
            unauth: PerAddress::new(TRACKED_ADDRESSES),
            bindings: PerAddress::new(TRACKED_ADDRESSES),
            rules_seen,
            nonces: Nonces::new(cfg.nonce_key, cfg.nonce_lifetime.as_secs()),
            cfg,
            clock,
            rules,
            shared,
            stats,
            port_base,
            allocs: Vec::new(),
            free_ids: Vec::new(),
            relay_slots: [vec![NO_ALLOC; nslots], vec![NO_ALLOC; nslots]],
            by_client: HashMap::with_hasher(TupleHash::random()),
            next_sweep: clock.mono0 + SWEEP_INTERVAL,
            rng,
            scratch: vec![0u8; SCRATCH_LEN].into_boxed_slice(),
        }
    }

    pub fn allocation_count(&self) -> usize {
        self.by_client.len()
    }

    /// Whether a client (a stream connection, say) holds an allocation.
    pub fn has_allocation(&self, ft: &FiveTuple) -> bool {
        self.by_client.contains_key(ft)
    }

    pub(super) fn alloc(&self, id: u32) -> Option<&Allocation> {
        self.allocs.get(id as usize)?.as_deref()
    }

    pub(super) fn alloc_mut(&mut self, id: u32) -> Option<&mut Allocation> {
        self.allocs.get_mut(id as usize)?.as_deref_mut()
    }

    fn slot_index(&self, relay: RelayId) -> Option<usize> {
        Some(usize::from(relay.port.checked_sub(self.port_base)?))
    }

    /// Stores a new allocation and maps its client and relay ports to it.
    pub(super) fn insert(&mut self, a: Allocation) -> u32 {
        let relays: Vec<RelayId> = a.relays().collect();
        let ft = a.five_tuple;
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.allocs[id as usize] = Some(Box::new(a));
                id
            }
            None => {
                self.allocs.push(Some(Box::new(a)));
                (self.allocs.len() - 1) as u32
            }
        };
        for r in relays {
            if let Some(i) = self.slot_index(r) {
                self.relay_slots[usize::from(r.v6)][i] = id;
            }
        }
        self.by_client.insert(ft, id);
        id
    }

    /// A datagram (or a framed stream message) from a client.
    pub fn handle_client(&mut self, now: Instant, ft: FiveTuple, data: &[u8], io: &mut impl Io) {
        match wire::classify(data) {
            wire::Kind::ChannelData => self.client_channel_data(now, &ft, data, io),
            wire::Kind::Stun if data[..2] == wire::SEND_INDICATION.to_be_bytes() => {
                self.send_indication(now, &ft, data, io)
            }
            wire::Kind::Stun => self.stun(now, ft, data, io),
            wire::Kind::Other => inc(&self.stats.dropped_malformed),
        }
    }

    /// Client → peer over a channel: the hottest path.
    fn client_channel_data(&mut self, now: Instant, ft: &FiveTuple, data: &[u8], io: &mut impl Io) {
        let Ok((number, payload)) = wire::parse_channel_data(data) else {
            inc(&self.stats.dropped_malformed);
            return;
        };
        let a = self.by_client.get(ft).copied().and_then(|id| {
            self.allocs
                .get_mut(id as usize)
                .and_then(|a| a.as_deref_mut())
        });
        let Some(a) = a else {
            inc(&self.stats.dropped_no_allocation);
            return;
        };
        match a.channel_peer(number, now) {
            Some(peer) if a.has_permission(peer.ip(), now) => {
                if let Some(relay) = a.relay_for(peer) {
                    if !self
                        .bandwidth
                        .spend(a, ClientToPeer, now, payload.len(), &self.stats)
                    {
                        return;
                    }
                    io.send_to_peer(relay, peer, payload);
                    self.stats
                        .relayed(ft.transport, ClientToPeer, ChannelData, payload.len());
                }
            }
            _ => inc(&self.stats.dropped_no_permission),
        }
    }

    fn send_indication(&mut self, now: Instant, ft: &FiveTuple, data: &[u8], io: &mut impl Io) {
        let Ok((peer, payload)) = wire::parse_send_indication(data) else {
            inc(&self.stats.dropped_malformed);
            return;
        };
        let a = self.by_client.get(ft).copied().and_then(|id| {
            self.allocs
                .get_mut(id as usize)
                .and_then(|a| a.as_deref_mut())
        });
        let Some(a) = a else {
            inc(&self.stats.dropped_no_allocation);
            return;
        };
        let relay = match a.relay_for(peer) {
            Some(r) if a.has_permission(peer.ip(), now) => r,
            _ => {
                inc(&self.stats.dropped_no_permission);
                return;
            }
        };
        if let Err(d) = self.rules.load().policy.check(peer) {
            self.stats.denied(d);
            return;
        }
        if !self
            .bandwidth
            .spend(a, ClientToPeer, now, payload.len(), &self.stats)
        {
            return;
        }
        io.send_to_peer(relay, peer, payload);
        self.stats
            .relayed(ft.transport, ClientToPeer, Indication, payload.len());
    }

    /// A datagram from a peer on a relay socket.
    pub fn peer_datagram(
        &mut self,
        now: Instant,
        relay: RelayId,
        from: SocketAddr,
        data: &[u8],
        io: &mut impl Io,
    ) {
        let Some(i) = self.slot_index(relay) else {
            return;
        };
        let id = self.relay_slots[usize::from(relay.v6)]
            .get(i)
            .copied()
            .unwrap_or(NO_ALLOC);
        let Some(Some(a)) = self.allocs.get_mut(id as usize) else {
            return;
        };
        if !a.has_permission(from.ip(), now) {
            inc(&self.stats.dropped_no_permission);
            return;
        }
        if !self
            .bandwidth
            .spend(a, PeerToClient, now, data.len(), &self.stats)
        {
            return;
        }
        let out = &mut self.scratch;
        if let Some(ch) = a.channel_for(from, now) {
            let pad = a.five_tuple.transport.is_stream();
            if let Some(n) = wire::write_channel_data(out, ch, data, pad) {
                io.send_to_client(&a.five_tuple, &out[..n]);
                self.stats.relayed(
                    a.five_tuple.transport,
                    PeerToClient,
                    ChannelData,
                    data.len(),
                );
            }
        } else {
            let txid: [u8; 12] = self.rng.random();
            if let Some(n) = wire::write_data_indication(out, &txid, from, data) {
                io.send_to_client(&a.five_tuple, &out[..n]);
                self.stats
                    .relayed(a.five_tuple.transport, PeerToClient, Indication, data.len());
            }
        }
    }

    /// When the core next wants `handle_timeout`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.by_client.is_empty() || self.shared.reservations.load(Ordering::Relaxed) > 0)
            .then_some(self.next_sweep)
    }

    /// Expires allocations, permissions, channels and reservations.
    pub fn handle_timeout(&mut self, now: Instant, io: &mut impl Io) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_INTERVAL;
        let rules = self.rules.load_full();
        self.bandwidth.budgets = Budgets::of(&rules, self.cfg.shards);
        self.unauth.sweep(now);
        self.bindings.sweep(now);
        let max_age = rules.limits.max_allocation_age;
        let expired: Vec<(u32, EndReason)> = self
            .by_client
            .values()
            .filter_map(|&id| {
                let a = self.alloc(id)?;
                if a.expires <= now {
                    Some((id, EndReason::Expired))
                } else if max_age.is_some_and(|m| now.saturating_duration_since(a.created) >= m) {
                    Some((id, EndReason::MaxAge))
                } else {
                    None
                }
            })
            .collect();
        for (id, reason) in expired {
            self.delete(id, reason, now, io);
        }
        // A reload that removed a static user or a REST secret ends the
        // allocations made with it, when the operator asks for that.
        if !Arc::ptr_eq(&rules, &self.rules_seen) {
            self.rules_seen = rules.clone();
            if rules.limits.revoke_on_reload {
                let revoked: Vec<u32> = self
                    .by_client
                    .values()
                    .copied()
                    .filter(|&id| {
                        self.alloc(id)
                            .is_some_and(|a| !rules.credentials.still_grants(&a.username, &a.key))
                    })
                    .collect();
                for id in revoked {
                    self.delete(id, EndReason::Revoked, now, io);
                }
            }
        }
        self.return_cooled_ports(now);
        for a in self.allocs.iter_mut().flatten() {
            let allocation = a.id;
            a.prune(now, |lapsed| {
                io.event(lapse_event(allocation, lapsed, Lapse::Expired))
            });
        }
        if self.shared.reservations.load(Ordering::Relaxed) > 0 {
            for v6 in [false, true] {
                let mut ports = self.shared.lock_ports(v6);
                let stale: Vec<[u8; 8]> = ports
                    .reservations
                    .iter()
                    .filter(|(_, (_, exp))| *exp <= now)
                    .map(|(k, _)| *k)
                    .collect();
                for token in stale {
                    if let Some((port, _)) = ports.reservations.remove(&token) {
                        io.unreserve_relay(RelayId { v6, port });
                        ports.pool.give_back(port);
                        self.shared.reservations.fetch_sub(1, Ordering::Relaxed);
                        self.stats.relay_ports_used.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Puts ports whose bind failed back into the pool once cooled down.
    fn return_cooled_ports(&mut self, now: Instant) {
        for v6 in [false, true] {
            let mut ports = self.shared.lock_ports(v6);
            if ports.cooling.is_empty() {
                continue;
            }
            let (ready, cooling): (Vec<_>, Vec<_>) =
                ports.cooling.drain(..).partition(|(_, at)| *at <= now);
            ports.cooling = cooling;
            for (port, _) in ready {
                ports.pool.give_back(port);
                self.stats
                    .relay_ports_cooling
                    .fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    pub(super) fn release_port(&mut self, relay: RelayId) {
        self.shared.lock_ports(relay.v6).pool.give_back(relay.port);
        self.stats.relay_ports_used.fetch_sub(1, Ordering::Relaxed);
    }

    /// Ends an allocation: its relay ports go back, its counts drop, the
    /// shell hears of its channels, permissions and end (in that order,
    /// see `events.rs`), and a TCP/TLS client's connection closes.
    pub(super) fn delete(&mut self, id: u32, reason: EndReason, now: Instant, io: &mut impl Io) {
        let Some(a) = self.allocs.get_mut(id as usize).and_then(Option::take) else {
            return;
        };
        self.free_ids.push(id);
        self.by_client.remove(&a.five_tuple);
        for r in a.relays() {
            if let Some(i) = self.slot_index(r) {
                self.relay_slots[usize::from(r.v6)][i] = NO_ALLOC;
            }
            io.close_relay(r);
            self.release_port(r);
        }
        self.shared.total.fetch_sub(1, Ordering::Relaxed);
        self.shared
            .count_holder(&a.username, client_key(a.five_tuple.client.ip()), -1);
        for (number, peer) in a.channels() {
            io.event(lapse_event(
                a.id,
                Lapsed::Channel(number, peer),
                Lapse::AllocationEnded,
            ));
        }
        for peer in a.permissions() {
            io.event(lapse_event(
                a.id,
                Lapsed::Permission(peer),
                Lapse::AllocationEnded,
            ));
        }
        let a = *a;
        io.event(Event::AllocationEnded {
            id: a.id,
            client: a.five_tuple,
            relayed: a.relayed,
            username: a.username,
            reason,
            duration: now.saturating_duration_since(a.created),
            usage: Usage {
                bytes_to_peer: a.bytes[0],
                bytes_to_client: a.bytes[1],
                packets_to_peer: a.packets[0],
                packets_to_client: a.packets[1],
            },
        });
        if a.five_tuple.transport.is_stream() {
            io.close_client(&a.five_tuple);
        }
    }

    /// Records a new allocation in the shared counts and tells the shell.
    pub(super) fn count_new(&mut self, a: &Allocation, io: &mut impl Io) {
        self.shared.total.fetch_add(1, Ordering::Relaxed);
        self.shared
            .count_holder(&a.username, client_key(a.five_tuple.client.ip()), 1);
        io.event(Event::AllocationStarted {
            id: a.id,
            client: a.five_tuple,
            relayed: a.relayed,
            username: a.username.clone(),
        });
    }

    /// Traffic relayed outside the core (the kernel fast path,
    /// `relay/xdp/`), per allocation id: added to the allocation's counts
    /// and charged to its budgets and the shard's, so the usage, the
    /// admin API and the bandwidth caps see every byte. An allocation
    /// that is gone is skipped (its end already told its usage).
    pub fn absorb(&mut self, now: Instant, usage: &HashMap<u64, Usage>) {
        if usage.is_empty() {
            return;
        }
        let b = self.bandwidth.budgets;
        for a in self.allocs.iter_mut().flatten() {
            let Some(u) = usage.get(&a.id) else { continue };
            a.bytes[0] += u.bytes_to_peer;
            a.bytes[1] += u.bytes_to_client;
            a.packets[0] += u.packets_to_peer;
            a.packets[1] += u.packets_to_client;
            a.budget[0].charge(b.allocation, now, u.bytes_to_peer);
            a.budget[1].charge(b.allocation, now, u.bytes_to_client);
            self.bandwidth
                .capacity
                .charge(b.shard, now, u.bytes_to_peer + u.bytes_to_client);
        }
    }

    /// Each allocation's relayed application bytes so far (client →
    /// peer, peer → client), by id.
    pub fn relayed_bytes(&self) -> HashMap<u64, [u64; 2]> {
        self.allocs
            .iter()
            .flatten()
            .map(|a| (a.id, a.bytes))
            .collect()
    }

    /// The bandwidth budgets in force, bytes per second (0: none): per
    /// allocation and direction, and this shard's share of the relay's.
    pub fn bandwidth_caps(&self) -> (u64, u64) {
        let b = self.bandwidth.budgets;
        (b.allocation.per_sec, b.shard.per_sec)
    }

    /// Every allocation of this shard, for the admin API.
    pub fn allocations(&self, now: Instant) -> Vec<AllocationInfo> {
        self.allocs
            .iter()
            .flatten()
            .map(|a| AllocationInfo {
                id: a.id,
                user: quota_user(&a.username).to_string(),
                username: a.username.clone(),
                client: a.five_tuple.client,
                transport: transport_name(a.five_tuple.transport),
                relayed: a.relayed.iter().flatten().copied().collect(),
                age_secs: now.saturating_duration_since(a.created).as_secs(),
                expires_in_secs: a.expires.saturating_duration_since(now).as_secs(),
                bytes_to_peer: a.bytes[0],
                bytes_to_client: a.bytes[1],
                packets_to_peer: a.packets[0],
                packets_to_client: a.packets[1],
            })
            .collect()
    }

    /// Ends the allocations an operator names: by id, or all of a user's
    /// (the quota user, as listed). How many ended.
    pub fn end_allocations(&mut self, which: &EndWhich, now: Instant, io: &mut impl Io) -> usize {
        let ids: Vec<u32> = self
            .by_client
            .values()
            .copied()
            .filter(|&id| {
                self.alloc(id).is_some_and(|a| match which {
                    EndWhich::Id(n) => a.id == *n,
                    EndWhich::User(u) => quota_user(&a.username) == u,
                    EndWhich::Label(l) => identity(&a.username).label == Some(l.as_str()),
                })
            })
            .collect();
        for &id in &ids {
            self.delete(id, EndReason::Operator, now, io);
        }
        ids.len()
    }

    /// Ends the allocation of a stream connection that closed.
    pub fn connection_closed(&mut self, now: Instant, ft: &FiveTuple, io: &mut impl Io) {
        if let Some(&id) = self.by_client.get(ft) {
            self.delete(id, EndReason::ConnectionClosed, now, io);
        }
    }

    fn stun(&mut self, now: Instant, ft: FiveTuple, data: &[u8], io: &mut impl Io) {
        let mut m = Message::new();
        m.raw.clear();
        m.raw.extend_from_slice(data);
        if m.decode().is_err() {
            inc(&self.stats.dropped_malformed);
            return;
        }
        if m.typ.class != CLASS_REQUEST {
            // Binding indications are keep-alives; stray responses are ignored.
            return;
        }
        // Over UDP, requests that prove nothing about their sender have a
        // budget per address, so a flood (maybe with a forged source) cannot
        // use us as an amplifier beyond it. Not over TCP/TLS: the handshake
        // proved the source, the connection caps bound it, and a client
        // there never retransmits, so a dropped answer would hang it.
        let udp = !ft.transport.is_stream();
        let budget = if !udp {
            None
        } else if m.typ.method == METHOD_BINDING {
            Some((&mut self.bindings, self.bandwidth.budgets.binding))
        } else if !m.contains(ATTR_MESSAGE_INTEGRITY) {
            Some((&mut self.unauth, self.bandwidth.budgets.unauth))
        } else {
            None
        };
        if let Some((limiter, rate)) = budget {
            if !limiter.allow(ft.client.ip(), rate, now) {
                inc(&self.stats.rate_limited);
                return;
            }
        }
        let result = match m.typ.method {
            METHOD_BINDING => self.binding(&m, &ft),
            METHOD_ALLOCATE => self.allocate(now, &ft, &mut m, io),
            METHOD_REFRESH => self.refresh(now, &ft, &mut m, io),
            METHOD_CREATE_PERMISSION => self.create_permission(now, &ft, &mut m, io),
            METHOD_CHANNEL_BIND => self.channel_bind(now, &ft, &mut m, io),
            _ => Err((Reject::BadRequest, None)),
        };
        let bytes = match result {
            Ok(bytes) => bytes,
            Err((reject, None))
                if udp
                    && m.contains(ATTR_MESSAGE_INTEGRITY)
                    && !self
                        .unauth
                        .allow(ft.client.ip(), self.bandwidth.budgets.unauth, now) =>
            {
                // Credentials that did not verify: the same budget.
                let _ = reject;
                inc(&self.stats.rate_limited);
                return;
            }
            Err((reject, key)) => self.error_answer(now, &ft, &m, reject, key.as_ref()),
        };
        if let Some(b) = bytes {
            io.send_to_client(&ft, &b);
        }
    }

    fn error_answer(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        m: &Message,
        r: Reject,
        key: Option<&Key>,
    ) -> Option<Vec<u8>> {
        tracing::debug!(client = %ft.client, method = %m.typ.method, code = r.code().0, "request refused: {r:?}");
        let mut attrs: Vec<Box<dyn Setter>> = vec![Box::new(r.error_attribute())];
        match &r {
            Reject::Unauthorized | Reject::StaleNonce => {
                let rules = self.rules.load();
                attrs.push(Box::new(TextAttribute::new(
                    ATTR_REALM,
                    rules.credentials.realm().to_string(),
                )));
                attrs.push(Box::new(TextAttribute::new(
                    ATTR_NONCE,
                    self.nonces.issue(self.clock.unix(now), ft.client),
                )));
            }
            Reject::UnknownAttributes(list) => {
                attrs.push(Box::new(UnknownAttributes(
                    list.iter().map(|t| AttrType(*t)).collect(),
                )));
            }
            Reject::TryAlternate(alt) => attrs.push(Box::new(AlternateServer(*alt))),
            Reject::InsufficientCapacity => inc(&self.stats.capacity_rejections),
            Reject::Forbidden(Some(d)) => self.stats.denied(*d),
            _ => {}
        }
        // 401 and 438 must not carry MESSAGE-INTEGRITY (RFC 8489 §9.2.4).
        let key = match r {
            Reject::Unauthorized | Reject::StaleNonce => None,
            _ => key,
        };
        answer(m, CLASS_ERROR_RESPONSE, attrs, key)
    }

    fn binding(&mut self, m: &Message, ft: &FiveTuple) -> Answer {
        inc(&self.stats.binding_requests);
        unknown_attributes(m).map_err(|r| (r, None))?;
        let mapped = XorMappedAddress {
            ip: ft.client.ip(),
            port: ft.client.port(),
        };
        Ok(answer(
            m,
            CLASS_SUCCESS_RESPONSE,
            vec![Box::new(mapped)],
            None,
        ))
    }

    /// Long-term credential check (RFC 8489 §9.2.4): the username and key.
    pub(super) fn authenticate(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        m: &mut Message,
    ) -> Result<(String, Key), (Reject, Option<Key>)> {
        let unauthorized = Err((Reject::Unauthorized, None));
        if !m.contains(ATTR_MESSAGE_INTEGRITY) {
            return unauthorized;
        }
        let text = |t| TextAttribute::get_from_as(m, t).map(|a| a.text);
        let (Ok(username), Ok(_realm), Ok(nonce)) =
            (text(ATTR_USERNAME), text(ATTR_REALM), text(ATTR_NONCE))
        else {
            return Err((Reject::BadRequest, None));
        };
        let unix = self.clock.unix(now);
        if self.nonces.check(&nonce, unix, ft.client).is_err() {
            // Expired or never ours: either way the client needs a new one.
            inc(&self.stats.auth_stale_nonce);
            return Err((Reject::StaleNonce, None));
        }
        if self.shared.is_revoked(&username, unix) {
            inc(&self.stats.auth_revoked);
            return unauthorized;
        }
        // Requests on an allocation check against the key it was made with
        // (RFC 8656 §5: the same credentials for its whole life). So a call
        // outliving its REST credential, or a secret rotated or a user
        // removed by a reload, keeps its allocation; new ones need valid
        // credentials.
        let bound = self
            .by_client
            .get(ft)
            .and_then(|&id| self.alloc(id))
            .filter(|a| a.username == username)
            .map(|a| a.key);
        let keys = match bound {
            Some(key) => vec![key],
            None => match self.rules.load().credentials.keys(&username, unix) {
                Ok(k) => k,
                Err(CredentialError::Expired) => {
                    inc(&self.stats.auth_expired);
                    return unauthorized;
                }
                Err(CredentialError::UnknownUser) => {
                    inc(&self.stats.auth_bad_credential);
                    return unauthorized;
                }
            },
        };
        if m.get(ATTR_MESSAGE_INTEGRITY).map(|v| v.len()) != Ok(20) {
            return Err((Reject::BadRequest, None));
        }
        for key in keys {
            if MessageIntegrity(key.to_vec()).check(m).is_ok() {
                return Ok((username, key));
            }
        }
        inc(&self.stats.auth_bad_credential);
        unauthorized
    }

    /// Authenticates a request about an existing allocation and finds it.
    pub(super) fn existing(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        m: &mut Message,
    ) -> Result<(u32, Key), (Reject, Option<Key>)> {
        let (username, key) = self.authenticate(now, ft, m)?;
        let Some(&id) = self.by_client.get(ft) else {
            return Err((Reject::AllocationMismatch, Some(key)));
        };
        if self.alloc(id).is_none_or(|a| a.username != username) {
            return Err((Reject::WrongCredentials, Some(key)));
        }
        unknown_attributes(m).map_err(|r| (r, Some(key)))?;
        Ok((id, key))
    }
}

/// The event for a permission or channel that went away.
pub(super) fn lapse_event(allocation: u64, lapsed: Lapsed, reason: Lapse) -> Event {
    match lapsed {
        Lapsed::Permission(peer) => Event::PermissionRemoved {
            allocation,
            peer,
            reason,
        },
        Lapsed::Channel(number, peer) => Event::ChannelUnbound {
            allocation,
            number,
            peer,
            reason,
        },
    }
}

pub(super) type Answer = Result<Option<Vec<u8>>, (Reject, Option<Key>)>;

pub(super) fn unknown_attributes(m: &Message) -> Result<(), Reject> {
    let unknown: Vec<u16> = m
        .attributes
        .0
        .iter()
        .map(|a| a.typ.value())
        .filter(|t| *t < 0x8000 && !KNOWN_REQUIRED.contains(t))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(Reject::UnknownAttributes(unknown))
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
