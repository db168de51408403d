//! One allocation's state (RFC 8656 §2.2, §9, §12): its relayed port, the
//! client's 5-tuple and credentials, permissions and channel bindings.
//! Plain data with time passed in; lookups are linear scans over a few
//! entries, which beats hashing at the sizes a browser creates.

use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::auth::Key;
use crate::budget::Gcra;

pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);

/// How long a permission and a channel binding live unless refreshed:
/// RFC 8656's 300 s and 600 s unless the operator says otherwise (as
/// coturn's `--permission-lifetime` and `--channel-lifetime` do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub permission: Duration,
    pub channel: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            permission: PERMISSION_LIFETIME,
            channel: CHANNEL_LIFETIME,
        }
    }
}

/// How a client reached us. The core treats all transports alike (but
/// pads ChannelData on streams, RFC 8656 §12.5); the shell uses it to route
/// answers back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp = 0,
    Tcp = 1,
    Tls = 2,
}

impl Transport {
    pub fn is_stream(self) -> bool {
        self != Transport::Udp
    }
}

/// One relay socket: its address family and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayId {
    pub v6: bool,
    pub port: u16,
}

/// The client side of an allocation: (client address, server address, transport).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub transport: Transport,
}

/// How the map from 5-tuple to allocation hashes its keys: the hot path
/// looks one up for every packet a client sends. std's SipHash resists
/// hash flooding at several times the cost; this map only ever holds
/// authenticated allocations, bounded by the quotas, so a multiply-rotate
/// hash (rustc's FxHash, version 2) with a random seed per shard is enough.
#[derive(Debug, Clone, Copy)]
pub struct TupleHash {
    seed: u64,
}

impl TupleHash {
    /// A seed from std's per-process randomness (the core's own generator
    /// stays untouched, so seeded tests keep their port choices).
    pub fn random() -> Self {
        TupleHash {
            seed: std::collections::hash_map::RandomState::new().hash_one(0u64),
        }
    }
}

impl BuildHasher for TupleHash {
    type Hasher = TupleHasher;
    fn build_hasher(&self) -> TupleHasher {
        TupleHasher(self.seed)
    }
}

pub struct TupleHasher(u64);

impl TupleHasher {
    const K: u64 = 0xf135_7aea_2e62_a9c5;

    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = self.0.wrapping_add(word).wrapping_mul(Self::K);
    }
}

impl Hasher for TupleHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // The multiply leaves the low bits weak; the table indexes by them.
        self.0.rotate_left(26)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelNumber(u16);

impl ChannelNumber {
    pub fn new(n: u16) -> Option<Self> {
        (super::wire::CHANNEL_MIN..=super::wire::CHANNEL_MAX)
            .contains(&n)
            .then_some(ChannelNumber(n))
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

#[derive(Debug, Clone)]
struct Permission {
    ip: IpAddr,
    expires: Instant,
}

#[derive(Debug, Clone)]
struct Channel {
    number: ChannelNumber,
    peer: SocketAddr,
    expires: Instant,
}

/// What a successful ChannelBind changed, beyond refreshing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub new_channel: bool,
    pub new_permission: bool,
}

/// A permission or a channel that `prune` dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lapsed {
    Permission(IpAddr),
    Channel(ChannelNumber, SocketAddr),
}

/// Why a ChannelBind cannot be honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindError {
    /// The number is bound to another peer, or the peer to another number.
    Conflict,
    /// No room for another channel or permission.
    Full,
}

pub struct Allocation {
    /// Unique for the process: how the admin API names it.
    pub id: u64,
    pub created: Instant,
    pub five_tuple: FiveTuple,
    /// The relayed transport addresses, IPv4 in [0] and IPv6 in [1]; a dual
    /// allocation (RFC 8656 §7.2, ADDITIONAL-ADDRESS-FAMILY) has both.
    pub relayed: [Option<SocketAddr>; 2],
    pub username: String,
    pub key: Key,
    pub expires: Instant,
    /// The Allocate's transaction id, so a retransmission gets the same answer.
    pub txid: [u8; 12],
    pub dont_fragment: bool,
    /// Relayed application bytes and packets: client → peer [0], peer →
    /// client [1]. Side by side, so the fast path's two additions touch
    /// one cache line.
    pub bytes: [u64; 2],
    pub packets: [u64; 2],
    /// Bandwidth budgets, same order.
    pub budget: [Gcra; 2],
    permissions: Vec<Permission>,
    channels: Vec<Channel>,
    lifetimes: Lifetimes,
}

impl Allocation {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        created: Instant,
        five_tuple: FiveTuple,
        relayed: [Option<SocketAddr>; 2],
        username: String,
        key: Key,
        expires: Instant,
        txid: [u8; 12],
        dont_fragment: bool,
    ) -> Self {
        Allocation {
            id,
            created,
            five_tuple,
            relayed,
            username,
            key,
            expires,
            txid,
            dont_fragment,
            bytes: [0; 2],
            packets: [0; 2],
            budget: [Gcra::new(); 2],
            permissions: Vec::new(),
            channels: Vec::new(),
            lifetimes: Lifetimes::default(),
        }
    }

    /// The same allocation with other permission and channel lifetimes.
    pub fn with_lifetimes(self, lifetimes: Lifetimes) -> Self {
        Allocation { lifetimes, ..self }
    }

    /// The relay socket that reaches `peer`, if the allocation has its family.
    #[inline]
    pub fn relay_for(&self, peer: SocketAddr) -> Option<RelayId> {
        let v6 = peer.is_ipv6();
        self.relayed[usize::from(v6)].map(|a| RelayId { v6, port: a.port() })
    }

    pub fn relays(&self) -> impl Iterator<Item = RelayId> + '_ {
        self.relayed.iter().flatten().map(|a| RelayId {
            v6: a.is_ipv6(),
            port: a.port(),
        })
    }

    pub fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions
            .iter()
            .any(|p| p.ip == ip && p.expires > now)
    }

    pub fn permission_count(&self) -> usize {
        self.permissions.len()
    }

    /// Whether `ips` can be installed without exceeding `max`.
    pub fn room_for_permissions(&self, ips: &[IpAddr], max: usize) -> bool {
        let new = ips
            .iter()
            .enumerate()
            .filter(|(i, ip)| {
                !self.permissions.iter().any(|p| p.ip == **ip) && !ips[..*i].contains(ip)
            })
            .count();
        self.permissions.len() + new <= max
    }

    /// Installs or refreshes a permission; the caller has checked room.
    /// True when it is new.
    pub fn permit(&mut self, ip: IpAddr, now: Instant) -> bool {
        let expires = now + self.lifetimes.permission;
        match self.permissions.iter_mut().find(|p| p.ip == ip) {
            Some(p) => {
                p.expires = expires;
                false
            }
            None => {
                self.permissions.push(Permission { ip, expires });
                true
            }
        }
    }

    /// Every permission's peer address, expired or not (until pruned).
    pub fn permissions(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.permissions.iter().map(|p| p.ip)
    }

    /// Every channel, expired or not (until pruned).
    pub fn channels(&self) -> impl Iterator<Item = (ChannelNumber, SocketAddr)> + '_ {
        self.channels.iter().map(|c| (c.number, c.peer))
    }

    /// Binds or refreshes a channel and the peer's permission (RFC 8656 §12.2).
    pub fn bind_channel(
        &mut self,
        number: ChannelNumber,
        peer: SocketAddr,
        now: Instant,
        max_channels: usize,
        max_permissions: usize,
    ) -> Result<Bound, BindError> {
        let by_number = self.channels.iter().position(|c| c.number == number);
        let by_peer = self.channels.iter().position(|c| c.peer == peer);
        let idx = match (by_number, by_peer) {
            (Some(a), Some(b)) if a == b => Some(a),
            (None, None) => None,
            _ => return Err(BindError::Conflict),
        };
        if idx.is_none() && self.channels.len() >= max_channels {
            return Err(BindError::Full);
        }
        if !self.room_for_permissions(&[peer.ip()], max_permissions) {
            return Err(BindError::Full);
        }
        let expires = now + self.lifetimes.channel;
        match idx {
            Some(i) => self.channels[i].expires = expires,
            None => self.channels.push(Channel {
                number,
                peer,
                expires,
            }),
        }
        let new_permission = self.permit(peer.ip(), now);
        Ok(Bound {
            new_channel: idx.is_none(),
            new_permission,
        })
    }

    /// The peer a live channel is bound to (client → peer direction).
    #[inline]
    pub fn channel_peer(&self, number: u16, now: Instant) -> Option<SocketAddr> {
        self.channels
            .iter()
            .find(|c| c.number.0 == number && c.expires > now)
            .map(|c| c.peer)
    }

    /// The live channel bound to a peer (peer → client direction).
    #[inline]
    pub fn channel_for(&self, peer: SocketAddr, now: Instant) -> Option<u16> {
        self.channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
            .map(|c| c.number.0)
    }

    /// Drops expired channels, then expired permissions, telling
    /// `lapsed` of each.
    pub fn prune(&mut self, now: Instant, mut lapsed: impl FnMut(Lapsed)) {
        self.channels.retain(|c| {
            let live = c.expires > now;
            if !live {
                lapsed(Lapsed::Channel(c.number, c.peer));
            }
            live
        });
        self.permissions.retain(|p| {
            let live = p.expires > now;
            if !live {
                lapsed(Lapsed::Permission(p.ip));
            }
            live
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(now: Instant) -> Allocation {
        let ft = FiveTuple {
            client: "192.0.2.1:5000".parse().unwrap(),
            server: "192.0.2.2:3478".parse().unwrap(),
            transport: Transport::Udp,
        };
        Allocation::new(
            1,
            now,
            ft,
            [Some("192.0.2.2:50000".parse().unwrap()), None],
            "u".into(),
            [0; 16],
            now + Duration::from_secs(600),
            [0; 12],
            false,
        )
    }

    #[test]
    fn permissions_expire_after_five_minutes() {
        let t0 = Instant::now();
        let mut a = alloc(t0);
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        assert!(!a.has_permission(ip, t0));
        assert!(a.permit(ip, t0), "new");
        assert!(a.has_permission(ip, t0 + Duration::from_secs(299)));
        assert!(!a.has_permission(ip, t0 + Duration::from_secs(300)));
        assert!(!a.permit(ip, t0 + Duration::from_secs(200)), "refreshed");
        assert!(a.has_permission(ip, t0 + Duration::from_secs(499)));
        let mut gone = Vec::new();
        a.prune(t0 + Duration::from_secs(500), |l| gone.push(l));
        assert_eq!(a.permission_count(), 0);
        assert_eq!(gone, vec![Lapsed::Permission(ip)]);
    }

    #[test]
    fn the_operators_lifetimes_replace_the_rfcs() {
        let t0 = Instant::now();
        let mut a = alloc(t0).with_lifetimes(Lifetimes {
            permission: Duration::from_secs(4),
            channel: Duration::from_secs(8),
        });
        let peer: SocketAddr = "198.51.100.1:7000".parse().unwrap();
        let c = ChannelNumber::new(0x4000).unwrap();
        assert!(a.bind_channel(c, peer, t0, 8, 8).is_ok());
        assert!(a.has_permission(peer.ip(), t0 + Duration::from_millis(3999)));
        assert!(!a.has_permission(peer.ip(), t0 + Duration::from_secs(4)));
        assert_eq!(
            a.channel_for(peer, t0 + Duration::from_millis(7999)),
            Some(0x4000)
        );
        assert_eq!(a.channel_for(peer, t0 + Duration::from_secs(8)), None);
    }

    #[test]
    fn permission_room_counts_duplicates_once() {
        let t0 = Instant::now();
        let mut a = alloc(t0);
        let x: IpAddr = "198.51.100.1".parse().unwrap();
        let y: IpAddr = "198.51.100.2".parse().unwrap();
        a.permit(x, t0);
        assert!(a.room_for_permissions(&[x, y, y], 2));
        assert!(!a.room_for_permissions(&[x, y, "198.51.100.3".parse().unwrap()], 2));
    }

    #[test]
    fn channel_rebinding_rules() {
        let t0 = Instant::now();
        let mut a = alloc(t0);
        let p1: SocketAddr = "198.51.100.1:1000".parse().unwrap();
        let p2: SocketAddr = "198.51.100.1:1001".parse().unwrap();
        let c1 = ChannelNumber::new(0x4000).unwrap();
        let c2 = ChannelNumber::new(0x4001).unwrap();
        let bound = |new_channel, new_permission| {
            Ok(Bound {
                new_channel,
                new_permission,
            })
        };
        assert_eq!(a.bind_channel(c1, p1, t0, 8, 8), bound(true, true));
        assert!(a.has_permission(p1.ip(), t0));
        // Same pair refreshes.
        assert_eq!(
            a.bind_channel(c1, p1, t0 + Duration::from_secs(500), 8, 8),
            bound(false, false)
        );
        assert_eq!(
            a.channel_peer(0x4000, t0 + Duration::from_secs(1099)),
            Some(p1)
        );
        // Number to another peer, or peer to another number: conflict.
        assert_eq!(a.bind_channel(c1, p2, t0, 8, 8), Err(BindError::Conflict));
        assert_eq!(a.bind_channel(c2, p1, t0, 8, 8), Err(BindError::Conflict));
        assert_eq!(a.bind_channel(c2, p2, t0, 1, 8), Err(BindError::Full));
        // Another port of the same host: its permission is already there.
        assert_eq!(a.bind_channel(c2, p2, t0, 8, 8), bound(true, false));
        assert_eq!(a.channel_for(p2, t0), Some(0x4001));
        assert_eq!(a.channel_for(p2, t0 + Duration::from_secs(600)), None);
    }

    #[test]
    fn channel_numbers_are_validated() {
        assert!(ChannelNumber::new(0x3FFF).is_none());
        assert!(ChannelNumber::new(0x4000).is_some());
        assert!(ChannelNumber::new(0x7FFF).is_some());
        assert!(ChannelNumber::new(0x8000).is_none());
    }
}
