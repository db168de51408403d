//! The sans-IO TURN server of one shard (RFC 8489 Binding, RFC 8656 TURN).
//!
//! It owns allocations, permissions, channels and the relay port pool, and
//! touches no socket and no clock: the shell feeds it datagrams with the
//! current `Instant` and gives it an [`Io`] to put answers and relayed
//! packets into; `poll_timeout` says when it next wants `handle_timeout`.
//! The relay fast paths (`client_channel_data`, `peer_datagram`) are short
//! and allocate nothing; everything else is the control path.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use stun::attributes::*;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use stun::uattrs::UnknownAttributes;
use stun::xoraddr::XorMappedAddress;
use turn::proto::channum::ChannelNumber as ProtoChannelNumber;
use turn::proto::lifetime::Lifetime;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::rsrvtoken::ReservationToken;
use turn::proto::PROTO_UDP;

use super::allocation::{Allocation, BindError, ChannelNumber, FiveTuple, Transport};
use super::auth::{CredentialError, Credentials, Key, NonceError, Nonces};
use super::policy::PeerPolicy;
use super::ports::PortPool;
use super::reply::{answer, AlternateServer, Reject};
use super::stats::{add, inc, TurnStats};
use super::wire;

/// What the core asks of the world. The shell implements it over sockets;
/// tests implement it over vectors.
pub trait Io {
    fn send_to_client(&mut self, to: &FiveTuple, data: &[u8]);
    fn send_to_peer(&mut self, relay_port: u16, peer: SocketAddr, data: &[u8]);
    /// Opens the relay socket for `port`; false when it cannot be bound.
    fn open_relay(&mut self, port: u16, dont_fragment: bool) -> bool;
    fn close_relay(&mut self, port: u16);
}

/// Settings that reload may replace; every shard reads the same copy.
pub struct Rules {
    pub credentials: Credentials,
    pub policy: PeerPolicy,
    pub default_lifetime: Duration,
    pub max_lifetime: Duration,
    pub user_quota: usize,
    pub total_quota: usize,
    pub max_permissions: usize,
    pub max_channels: usize,
    /// Where a draining server sends new allocations (300 Try Alternate).
    pub alternate_server: Option<SocketAddr>,
}

/// State shared by all shards, touched only on the control path: the
/// relay port pool and EVEN-PORT reservations (a reserved port may be
/// claimed by a client that the kernel hashes to another shard),
/// allocation counts for quotas, and the drain flag.
pub struct Shared {
    ports: Mutex<PortState>,
    ports_range: std::ops::RangeInclusive<u16>,
    users: Mutex<HashMap<String, usize>>,
    total: AtomicUsize,
    reservations: AtomicUsize,
    pub draining: AtomicBool,
}

struct PortState {
    pool: PortPool,
    reservations: HashMap<[u8; 8], (u16, Instant)>,
}

impl Shared {
    pub fn new(ports: std::ops::RangeInclusive<u16>) -> Self {
        Shared {
            ports: Mutex::new(PortState {
                pool: PortPool::new(ports.clone(), &mut rand::rng()),
                reservations: HashMap::new(),
            }),
            ports_range: ports,
            users: Mutex::new(HashMap::new()),
            total: AtomicUsize::new(0),
            reservations: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        }
    }

    pub fn total_allocations(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub fn free_ports(&self) -> usize {
        self.lock_ports().pool.free_count()
    }

    fn lock_ports(&self) -> std::sync::MutexGuard<'_, PortState> {
        // A panic elsewhere cannot leave the pool half-updated in a way that
        // matters more than refusing all allocations would.
        self.ports.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Fixed settings of one shard.
pub struct CoreConfig {
    /// The address put into XOR-RELAYED-ADDRESS.
    pub advertised_ip: IpAddr,
    pub nonce_key: [u8; 32],
    pub nonce_lifetime: Duration,
}

/// Maps the shell's monotonic clock to Unix seconds, for REST expiries and
/// nonce stamps, without reading the system clock in the core.
#[derive(Clone, Copy)]
pub struct Clock {
    pub mono0: Instant,
    pub unix0: u64,
}

impl Clock {
    pub fn unix(&self, now: Instant) -> u64 {
        self.unix0 + now.saturating_duration_since(self.mono0).as_secs()
    }
}

const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// Scratch space for one relayed packet plus its TURN framing.
const SCRATCH_LEN: usize = 65536 + wire::MAX_DATA_INDICATION_OVERHEAD + 8;

/// Attributes we understand; an unknown one in 0x0000–0x7FFF gets 420.
const KNOWN_REQUIRED: &[u16] = &[
    0x0001, 0x0006, 0x0008, 0x0009, 0x000A, 0x000C, 0x000D, 0x0012, 0x0013, 0x0014, 0x0015, 0x0016,
    0x0017, 0x0018, 0x0019, 0x001A, 0x001C, 0x001D, 0x001E, 0x0020, 0x0022, 0x0024, 0x0025,
];

pub struct Server {
    cfg: CoreConfig,
    clock: Clock,
    rules: Arc<ArcSwap<Rules>>,
    shared: Arc<Shared>,
    stats: Arc<TurnStats>,
    nonces: Nonces,
    port_base: u16,
    slots: Vec<Option<Box<Allocation>>>,
    by_client: HashMap<FiveTuple, u16>,
    next_sweep: Instant,
    rng: SmallRng,
    scratch: Box<[u8]>,
}

impl Server {
    pub fn new(
        cfg: CoreConfig,
        clock: Clock,
        rules: Arc<ArcSwap<Rules>>,
        shared: Arc<Shared>,
        stats: Arc<TurnStats>,
    ) -> Self {
        let rng = SmallRng::from_os_rng();
        let port_base = *shared.ports_range.start();
        let nslots = shared.ports_range.clone().count();
        Server {
            nonces: Nonces::new(cfg.nonce_key, cfg.nonce_lifetime.as_secs()),
            cfg,
            clock,
            rules,
            shared,
            stats,
            port_base,
            slots: (0..nslots).map(|_| None).collect(),
            by_client: HashMap::new(),
            next_sweep: clock.mono0 + SWEEP_INTERVAL,
            rng,
            scratch: vec![0u8; SCRATCH_LEN].into_boxed_slice(),
        }
    }

    pub fn allocation_count(&self) -> usize {
        self.by_client.len()
    }

    fn slot(&self, port: u16) -> Option<&Allocation> {
        let i = usize::from(port.checked_sub(self.port_base)?);
        self.slots.get(i)?.as_deref()
    }

    fn slot_mut(&mut self, port: u16) -> Option<&mut Allocation> {
        let i = usize::from(port.checked_sub(self.port_base)?);
        self.slots.get_mut(i)?.as_deref_mut()
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
        let Some(&port) = self.by_client.get(ft) else {
            inc(&self.stats.dropped_no_allocation);
            return;
        };
        let Some(a) = self.slot(port) else { return };
        match a.channel_peer(number, now) {
            Some(peer) if a.has_permission(peer.ip(), now) => {
                io.send_to_peer(port, peer, payload);
                inc(&self.stats.c2p_channel_packets);
                add(&self.stats.c2p_channel_bytes, payload.len());
            }
            _ => inc(&self.stats.dropped_no_permission),
        }
    }

    fn send_indication(&mut self, now: Instant, ft: &FiveTuple, data: &[u8], io: &mut impl Io) {
        let Ok((peer, payload)) = wire::parse_send_indication(data) else {
            inc(&self.stats.dropped_malformed);
            return;
        };
        let Some(&port) = self.by_client.get(ft) else {
            inc(&self.stats.dropped_no_allocation);
            return;
        };
        let Some(a) = self.slot(port) else { return };
        if peer.is_ipv4() != a.relayed.is_ipv4() || !a.has_permission(peer.ip(), now) {
            inc(&self.stats.dropped_no_permission);
            return;
        }
        if let Err(d) = self.rules.load().policy.check(peer) {
            self.stats.denied(d);
            return;
        }
        io.send_to_peer(port, peer, payload);
        inc(&self.stats.c2p_send_packets);
        add(&self.stats.c2p_send_bytes, payload.len());
    }

    /// A datagram from a peer on the relay socket of `port`.
    pub fn peer_datagram(
        &mut self,
        now: Instant,
        port: u16,
        from: SocketAddr,
        data: &[u8],
        io: &mut impl Io,
    ) {
        let Some(i) = port.checked_sub(self.port_base) else {
            return;
        };
        let Some(Some(a)) = self.slots.get(usize::from(i)) else {
            return;
        };
        if !a.has_permission(from.ip(), now) {
            inc(&self.stats.dropped_no_permission);
            return;
        }
        let out = &mut self.scratch;
        if let Some(ch) = a.channel_for(from, now) {
            let pad = a.five_tuple.transport == Transport::Tcp;
            if let Some(n) = wire::write_channel_data(out, ch, data, pad) {
                io.send_to_client(&a.five_tuple, &out[..n]);
                inc(&self.stats.p2c_channel_packets);
                add(&self.stats.p2c_channel_bytes, data.len());
            }
        } else {
            let txid: [u8; 12] = self.rng.random();
            if let Some(n) = wire::write_data_indication(out, &txid, from, data) {
                io.send_to_client(&a.five_tuple, &out[..n]);
                inc(&self.stats.p2c_data_packets);
                add(&self.stats.p2c_data_bytes, data.len());
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
        let expired: Vec<u16> = self
            .by_client
            .values()
            .copied()
            .filter(|&p| self.slot(p).is_some_and(|a| a.expires <= now))
            .collect();
        for port in expired {
            self.delete(port, io);
            inc(&self.stats.allocations_expired);
        }
        for slot in self.slots.iter_mut().flatten() {
            slot.prune(now);
        }
        if self.shared.reservations.load(Ordering::Relaxed) > 0 {
            let mut ports = self.shared.lock_ports();
            let stale: Vec<[u8; 8]> = ports
                .reservations
                .iter()
                .filter(|(_, (_, exp))| *exp <= now)
                .map(|(k, _)| *k)
                .collect();
            for token in stale {
                if let Some((port, _)) = ports.reservations.remove(&token) {
                    ports.pool.give_back(port);
                    self.shared.reservations.fetch_sub(1, Ordering::Relaxed);
                    self.stats.relay_ports_used.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn release_port(&mut self, port: u16) {
        self.shared.lock_ports().pool.give_back(port);
        self.stats.relay_ports_used.fetch_sub(1, Ordering::Relaxed);
    }

    fn delete(&mut self, port: u16, io: &mut impl Io) {
        let Some(i) = port.checked_sub(self.port_base) else {
            return;
        };
        let Some(a) = self.slots.get_mut(usize::from(i)).and_then(Option::take) else {
            return;
        };
        self.by_client.remove(&a.five_tuple);
        io.close_relay(port);
        self.release_port(port);
        self.shared.total.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut users) = self.shared.users.lock() {
            if let Some(n) = users.get_mut(&a.username) {
                *n -= 1;
                if *n == 0 {
                    users.remove(&a.username);
                }
            }
        }
        self.stats
            .allocations_active
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// Ends every allocation of a stream connection that closed.
    pub fn connection_closed(&mut self, ft: &FiveTuple, io: &mut impl Io) {
        if let Some(&port) = self.by_client.get(ft) {
            self.delete(port, io);
            inc(&self.stats.allocations_deleted);
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
        let result = match m.typ.method {
            METHOD_BINDING => self.binding(&m, &ft),
            METHOD_ALLOCATE => self.allocate(now, &ft, &mut m, io),
            METHOD_REFRESH => self.refresh(now, &ft, &mut m, io),
            METHOD_CREATE_PERMISSION => self.create_permission(now, &ft, &mut m),
            METHOD_CHANNEL_BIND => self.channel_bind(now, &ft, &mut m),
            _ => Err((Reject::BadRequest, None)),
        };
        let bytes = match result {
            Ok(bytes) => bytes,
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
            Reject::QuotaReached => inc(&self.stats.quota_rejections),
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
    fn authenticate(
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
        if let Err(e) = self.nonces.check(&nonce, unix, ft.client) {
            match e {
                NonceError::Stale | NonceError::Invalid => inc(&self.stats.auth_stale_nonce),
            }
            return Err((Reject::StaleNonce, None));
        }
        let keys = match self.rules.load().credentials.keys(&username, unix) {
            Ok(k) => k,
            Err(CredentialError::Expired) => {
                inc(&self.stats.auth_expired);
                return unauthorized;
            }
            Err(CredentialError::UnknownUser) => {
                inc(&self.stats.auth_bad_credential);
                return unauthorized;
            }
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
    fn existing(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        m: &mut Message,
    ) -> Result<(u16, Key), (Reject, Option<Key>)> {
        let (username, key) = self.authenticate(now, ft, m)?;
        let Some(&port) = self.by_client.get(ft) else {
            return Err((Reject::AllocationMismatch, Some(key)));
        };
        if self.slot(port).is_none_or(|a| a.username != username) {
            return Err((Reject::WrongCredentials, Some(key)));
        }
        unknown_attributes(m).map_err(|r| (r, Some(key)))?;
        Ok((port, key))
    }

    fn allocate(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        m: &mut Message,
        io: &mut impl Io,
    ) -> Answer {
        let (username, key) = self.authenticate(now, ft, m)?;
        let fail = |r| Err((r, Some(key)));
        if let Some(&port) = self.by_client.get(ft) {
            // A retransmitted Allocate gets the same success again (§7.2).
            return match self.slot(port) {
                Some(a) if a.txid == m.transaction_id.0 => {
                    let lifetime = a.expires.saturating_duration_since(now);
                    Ok(self.allocate_success(m, ft, a.relayed, lifetime, None, &key))
                }
                _ => fail(Reject::AllocationMismatch),
            };
        }
        unknown_attributes(m).map_err(|r| (r, Some(key)))?;
        if self.shared.draining.load(Ordering::Relaxed) {
            return fail(match self.rules.load().alternate_server {
                Some(alt) => Reject::TryAlternate(alt),
                None => Reject::Forbidden(None),
            });
        }
        let mut transport = RequestedTransport::default();
        if transport.get_from(m).is_err() {
            return fail(Reject::BadRequest);
        }
        if transport.protocol != PROTO_UDP {
            return fail(Reject::UnsupportedTransport);
        }
        let token = m.get(ATTR_RESERVATION_TOKEN).ok();
        let even = m.get(ATTR_EVEN_PORT).ok();
        let family = m.get(ATTR_REQUESTED_ADDRESS_FAMILY).ok();
        if token.is_some() && (even.is_some() || family.is_some()) {
            return fail(Reject::BadRequest);
        }
        if let Some(f) = &family {
            let wanted_v4 = f.first() == Some(&0x01);
            if f.len() != 4 || wanted_v4 != self.cfg.advertised_ip.is_ipv4() {
                return fail(Reject::AddressFamilyNotSupported);
            }
        }
        let dont_fragment = m.contains(ATTR_DONT_FRAGMENT);
        let rules = self.rules.load_full();
        if rules.total_quota > 0 && self.shared.total.load(Ordering::Relaxed) >= rules.total_quota {
            return fail(Reject::InsufficientCapacity);
        }
        if rules.user_quota > 0 {
            let users = self
                .shared
                .users
                .lock()
                .map_err(|_| (Reject::InsufficientCapacity, Some(key)))?;
            if users.get(&username).copied().unwrap_or(0) >= rules.user_quota {
                return fail(Reject::QuotaReached);
            }
        }
        // Pick the port: a reserved one, an even one (maybe reserving its
        // neighbour), or any.
        let (port, reserve) = if let Some(t) = token {
            let t: [u8; 8] = t
                .as_slice()
                .try_into()
                .map_err(|_| (Reject::BadRequest, Some(key)))?;
            let claimed = self.shared.lock_ports().reservations.remove(&t);
            if claimed.is_some() {
                self.shared.reservations.fetch_sub(1, Ordering::Relaxed);
            }
            match claimed {
                Some((p, exp)) if exp > now && io.open_relay(p, dont_fragment) => (p, false),
                Some((p, _)) => {
                    self.release_port(p);
                    return fail(Reject::InsufficientCapacity);
                }
                None => return fail(Reject::InsufficientCapacity),
            }
        } else {
            let reserve = even
                .as_ref()
                .and_then(|e| e.first())
                .is_some_and(|b| b & 0x80 != 0);
            match self.take_port(even.is_some(), reserve, dont_fragment, io) {
                Some(p) => (p, reserve),
                None => return fail(Reject::InsufficientCapacity),
            }
        };
        let mut token_out = None;
        if reserve {
            let t: [u8; 8] = self.rng.random();
            self.shared
                .lock_ports()
                .reservations
                .insert(t, (port + 1, now + RESERVATION_LIFETIME));
            self.shared.reservations.fetch_add(1, Ordering::Relaxed);
            token_out = Some(t);
        }
        let lifetime = {
            let mut l = Lifetime::default();
            let asked = if l.get_from(m).is_ok() {
                l.0
            } else {
                rules.default_lifetime
            };
            asked.min(rules.max_lifetime).max(rules.default_lifetime)
        };
        let relayed = SocketAddr::new(self.cfg.advertised_ip, port);
        let a = Allocation::new(
            *ft,
            port,
            relayed,
            username.clone(),
            key,
            now + lifetime,
            m.transaction_id.0,
            dont_fragment,
        );
        if let Some(slot) = port
            .checked_sub(self.port_base)
            .and_then(|i| self.slots.get_mut(usize::from(i)))
        {
            *slot = Some(Box::new(a));
        }
        self.by_client.insert(*ft, port);
        self.shared.total.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut users) = self.shared.users.lock() {
            *users.entry(username).or_insert(0) += 1;
        }
        inc(&self.stats.allocations_created);
        self.stats
            .allocations_active
            .fetch_add(1, Ordering::Relaxed);
        Ok(self.allocate_success(m, ft, relayed, lifetime, token_out, &key))
    }

    /// Takes a port (with `pair`, also its odd neighbour) from the pool and
    /// opens its socket, skipping ports some other process holds; those
    /// stay out of the pool.
    fn take_port(
        &mut self,
        even: bool,
        pair: bool,
        dont_fragment: bool,
        io: &mut impl Io,
    ) -> Option<u16> {
        for _ in 0..16 {
            let port = self.shared.lock_ports().pool.take(even, pair)?;
            if io.open_relay(port, dont_fragment) {
                self.stats
                    .relay_ports_used
                    .fetch_add(1 + i64::from(pair), Ordering::Relaxed);
                return Some(port);
            }
            if pair {
                self.shared.lock_ports().pool.give_back(port + 1);
            }
        }
        None
    }

    fn allocate_success(
        &self,
        m: &Message,
        ft: &FiveTuple,
        relayed: SocketAddr,
        lifetime: Duration,
        token: Option<[u8; 8]>,
        key: &Key,
    ) -> Option<Vec<u8>> {
        let mut attrs: Vec<Box<dyn Setter>> = vec![
            Box::new(RelayedAddress {
                ip: relayed.ip(),
                port: relayed.port(),
            }),
            Box::new(Lifetime(Duration::from_secs(lifetime.as_secs()))),
            Box::new(XorMappedAddress {
                ip: ft.client.ip(),
                port: ft.client.port(),
            }),
        ];
        if let Some(t) = token {
            attrs.push(Box::new(ReservationToken(t.to_vec())));
        }
        answer(m, CLASS_SUCCESS_RESPONSE, attrs, Some(key))
    }

    fn refresh(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        m: &mut Message,
        io: &mut impl Io,
    ) -> Answer {
        let (port, key) = self.existing(now, ft, m)?;
        if let Ok(f) = m.get(ATTR_REQUESTED_ADDRESS_FAMILY) {
            let v4 = f.first() == Some(&0x01);
            if v4 != self.cfg.advertised_ip.is_ipv4() {
                return Err((Reject::PeerAddressFamilyMismatch, Some(key)));
            }
        }
        let rules = self.rules.load();
        let mut l = Lifetime::default();
        let desired = if l.get_from(m).is_ok() {
            l.0.min(rules.max_lifetime)
        } else {
            rules.default_lifetime
        };
        if desired.is_zero() {
            self.delete(port, io);
            inc(&self.stats.allocations_deleted);
        } else if let Some(a) = self.slot_mut(port) {
            a.expires = now + desired;
        }
        Ok(answer(
            m,
            CLASS_SUCCESS_RESPONSE,
            vec![Box::new(Lifetime(desired))],
            Some(&key),
        ))
    }

    fn create_permission(&mut self, now: Instant, ft: &FiveTuple, m: &mut Message) -> Answer {
        let (port, key) = self.existing(now, ft, m)?;
        let fail = |r| Err((r, Some(key)));
        let peers = xor_peer_addresses(m);
        let Some(peers) = peers.filter(|p| !p.is_empty()) else {
            return fail(Reject::BadRequest);
        };
        let rules = self.rules.load();
        let v4 = self.cfg.advertised_ip.is_ipv4();
        let mut ips = Vec::with_capacity(peers.len());
        for p in &peers {
            if p.is_ipv4() != v4 {
                return fail(Reject::PeerAddressFamilyMismatch);
            }
            if let Err(d) = rules.policy.check_ip(p.ip()) {
                return fail(Reject::Forbidden(Some(d)));
            }
            ips.push(p.ip());
        }
        let Some(a) = self.slot_mut(port) else {
            return fail(Reject::AllocationMismatch);
        };
        if !a.room_for_permissions(&ips, rules.max_permissions) {
            return fail(Reject::InsufficientCapacity);
        }
        for ip in ips {
            a.permit(ip, now);
        }
        Ok(answer(m, CLASS_SUCCESS_RESPONSE, Vec::new(), Some(&key)))
    }

    fn channel_bind(&mut self, now: Instant, ft: &FiveTuple, m: &mut Message) -> Answer {
        let (port, key) = self.existing(now, ft, m)?;
        let fail = |r| Err((r, Some(key)));
        let mut n = ProtoChannelNumber::default();
        let peers = xor_peer_addresses(m).unwrap_or_default();
        let (Ok(()), Some(&peer)) = (n.get_from(m), peers.first()) else {
            return fail(Reject::BadRequest);
        };
        let Some(number) = ChannelNumber::new(n.0) else {
            return fail(Reject::BadRequest);
        };
        if peer.is_ipv4() != self.cfg.advertised_ip.is_ipv4() {
            return fail(Reject::PeerAddressFamilyMismatch);
        }
        let rules = self.rules.load();
        if let Err(d) = rules.policy.check(peer) {
            return fail(Reject::Forbidden(Some(d)));
        }
        let Some(a) = self.slot_mut(port) else {
            return fail(Reject::AllocationMismatch);
        };
        match a.bind_channel(number, peer, now, rules.max_channels, rules.max_permissions) {
            Ok(()) => Ok(answer(m, CLASS_SUCCESS_RESPONSE, Vec::new(), Some(&key))),
            Err(BindError::Conflict) => fail(Reject::BadRequest),
            Err(BindError::Full) => fail(Reject::InsufficientCapacity),
        }
    }
}

type Answer = Result<Option<Vec<u8>>, (Reject, Option<Key>)>;

fn unknown_attributes(m: &Message) -> Result<(), Reject> {
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

/// Every XOR-PEER-ADDRESS of a request (CreatePermission may carry several);
/// None when one of them is malformed.
fn xor_peer_addresses(m: &Message) -> Option<Vec<SocketAddr>> {
    m.attributes
        .0
        .iter()
        .filter(|a| a.typ == ATTR_XOR_PEER_ADDRESS)
        .map(|a| wire::decode_xor_addr(&a.value, &m.transaction_id.0).ok())
        .collect()
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
