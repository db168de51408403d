//! The world of one shard's TURN core: what it asks of its shell ([`Io`]),
//! what reload may replace ([`Rules`]), what all shards share on the
//! control path ([`Shared`]: port pools, quotas, the drain flag), and what
//! is fixed at start ([`CoreConfig`], [`Clock`]). The core itself is
//! `server.rs`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use super::allocation::{FiveTuple, RelayId};
use super::auth::Credentials;
use super::policy::PeerPolicy;
use super::ports::PortPool;

/// What the core asks of the world. The shell implements it over sockets;
/// tests implement it over vectors.
pub trait Io {
    fn send_to_client(&mut self, to: &FiveTuple, data: &[u8]);
    fn send_to_peer(&mut self, relay: RelayId, peer: SocketAddr, data: &[u8]);
    /// Opens the relay socket (or takes over the one a reservation holds);
    /// false when it cannot be bound.
    fn open_relay(&mut self, relay: RelayId, dont_fragment: bool) -> bool;
    fn close_relay(&mut self, relay: RelayId);
    /// The allocation of a TCP/TLS client ended (expired, deleted or
    /// revoked): its connection is closed, as it only served that
    /// allocation (RFC 8656 §3.1). Never called for UDP clients.
    fn close_client(&mut self, client: &FiveTuple);
    /// Binds a socket for an EVEN-PORT reservation and keeps it, unread,
    /// until `open_relay` claims it or `unreserve_relay` drops it.
    fn reserve_relay(&mut self, relay: RelayId) -> bool;
    fn unreserve_relay(&mut self, relay: RelayId);
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
/// relay port pools and EVEN-PORT reservations (a reserved port may be
/// claimed by a client that the kernel hashes to another shard),
/// allocation counts for quotas, and the drain flag.
pub struct Shared {
    /// Port pools for IPv4 [0] and IPv6 [1] relays.
    pub(super) ports: [Mutex<PortState>; 2],
    pub(super) ports_range: std::ops::RangeInclusive<u16>,
    pub(super) users: Mutex<HashMap<String, usize>>,
    pub(super) total: AtomicUsize,
    pub(super) reservations: AtomicUsize,
    /// The appliance's drain flag, shared with signaling: while set, new
    /// allocations are refused or sent to the alternate server.
    pub draining: Arc<AtomicBool>,
}

pub(super) struct PortState {
    pub(super) pool: PortPool,
    pub(super) reservations: HashMap<[u8; 8], (u16, Instant)>,
}

impl Shared {
    /// `rng` shuffles the port pools (seeded in tests and fuzzing, from
    /// the OS otherwise).
    pub fn new(
        ports: std::ops::RangeInclusive<u16>,
        draining: Arc<AtomicBool>,
        rng: &mut impl Rng,
    ) -> Self {
        let mut state = || {
            Mutex::new(PortState {
                pool: PortPool::new(ports.clone(), rng),
                reservations: HashMap::new(),
            })
        };
        Shared {
            ports: [state(), state()],
            ports_range: ports.clone(),
            users: Mutex::new(HashMap::new()),
            total: AtomicUsize::new(0),
            reservations: AtomicUsize::new(0),
            draining,
        }
    }

    pub fn total_allocations(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Free IPv4 relay ports.
    pub fn free_ports(&self) -> usize {
        self.lock_ports(false).pool.free_count()
    }

    pub(super) fn lock_ports(&self, v6: bool) -> std::sync::MutexGuard<'_, PortState> {
        // A panic elsewhere cannot leave the pool half-updated in a way that
        // matters more than refusing all allocations would.
        self.ports[usize::from(v6)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn count_user(&self, user: &str, delta: isize) -> usize {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let n = users.entry(user.to_string()).or_insert(0);
        *n = n.saturating_add_signed(delta);
        let now = *n;
        if now == 0 {
            users.remove(user);
        }
        now
    }

    pub(super) fn reservations_add(&self, delta: isize) {
        if delta >= 0 {
            self.reservations
                .fetch_add(delta.unsigned_abs(), Ordering::Relaxed);
        } else {
            self.reservations
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    pub(super) fn user_allocations(&self, user: &str) -> usize {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users.get(user).copied().unwrap_or(0)
    }
}

/// Fixed settings of one shard.
pub struct CoreConfig {
    /// The addresses put into XOR-RELAYED-ADDRESS, per family; a family
    /// without one is not offered (440 Address Family not Supported).
    pub relay_v4: Option<IpAddr>,
    pub relay_v6: Option<IpAddr>,
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
