//! The world of one shard's TURN core: what it asks of its shell ([`Io`]),
//! what reload may replace ([`Rules`]), what all shards share on the
//! control path ([`Shared`]: port pools, quotas, the drain flag), and what
//! is fixed at start ([`CoreConfig`], [`Clock`]). The core itself is
//! `server.rs`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use super::allocation::{FiveTuple, Lifetimes, RelayId};
use super::auth::{identity, Credentials};
use super::events::Event;
use super::policy::PeerPolicy;
use super::ports::PortPool;
use super::revoked::{Revocations, Revokee};
use crate::budget::Rate;
use arc_swap::ArcSwap;

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
    /// Something happened to an allocation, a permission or a channel
    /// (`events.rs`). Called on the control path only, never per relayed
    /// packet; a shell that does not listen keeps this default.
    fn event(&mut self, _event: Event) {}
}

/// Settings that reload may replace; every shard reads the same copy.
pub struct Rules {
    pub credentials: Credentials,
    pub policy: PeerPolicy,
    pub default_lifetime: Duration,
    pub max_lifetime: Duration,
    /// Allocations per user (the user part of a REST username) and in
    /// all; 0 = no cap.
    pub user_quota: usize,
    pub total_quota: usize,
    pub max_permissions: usize,
    pub max_channels: usize,
    /// Of the permissions and channels of allocations made from now on.
    pub lifetimes: Lifetimes,
    /// Where a draining server sends new allocations (300 Try Alternate).
    pub alternate_server: Option<SocketAddr>,
    pub limits: Limits,
}

/// What keeps one client from taking the relay, beyond the per-user and
/// total quotas. The default is no limit at all (tests start from it).
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Allocations per client address (IPv6: per /64); 0 = no cap.
    pub ip_quota: usize,
    /// Concurrent allocations per user or label (`[[usage.budgets]]
    /// allocations`); one more gets 486.
    pub allocation_caps: Vec<(Revokee, usize)>,
    /// Relayed bytes per second per allocation, each direction; and for
    /// the whole relay (each shard takes its share). 0 = unlimited.
    pub max_bps: u64,
    pub bps_capacity: u64,
    /// An allocation ends this long after it was made, refreshed or not.
    pub max_allocation_age: Option<Duration>,
    /// On reload, end allocations whose static user or REST secret was
    /// removed.
    pub revoke_on_reload: bool,
    /// Per client address: requests without valid credentials (answered
    /// 401/438/400) and Binding requests; beyond, they are dropped.
    pub unauth_rate: Rate,
    pub binding_rate: Rate,
}

impl Limits {
    /// The budget of one direction of one allocation: a quarter second of
    /// burst, and at least one largest datagram.
    pub fn allocation_rate(&self) -> Rate {
        Rate {
            per_sec: self.max_bps,
            burst: (self.max_bps / 4).max(65_536),
        }
    }

    /// One shard's share of the relay's capacity.
    pub fn shard_rate(&self, shards: usize) -> Rate {
        let per_sec = self.bps_capacity / shards.max(1) as u64;
        Rate {
            per_sec,
            burst: (per_sec / 4).max(65_536),
        }
    }
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
    /// Allocations per usage label (for `Limits::allocation_caps`).
    labels: Mutex<HashMap<String, usize>>,
    /// Allocations per client address key (see `crate::budget::client_key`).
    pub(super) ips: Mutex<HashMap<IpAddr, usize>>,
    pub(super) total: AtomicUsize,
    /// Allocation ids, unique for the process (the admin API names
    /// allocations by them).
    pub(super) next_id: AtomicU64,
    pub(super) reservations: AtomicUsize,
    /// The appliance's drain flag, shared with signaling: while set, new
    /// allocations are refused or sent to the alternate server.
    pub draining: Arc<AtomicBool>,
    /// Credentials the operator revoked (`revoked.rs`), read without a
    /// lock by every authenticated request.
    revocations: ArcSwap<Revocations>,
    /// Users and labels whose byte budget is spent: their Allocates get
    /// 486 (set by the shell, `usage_budgets.rs`).
    over_budget: ArcSwap<Vec<Revokee>>,
}

pub(super) struct PortState {
    pub(super) pool: PortPool,
    pub(super) reservations: HashMap<[u8; 8], (u16, Instant)>,
    /// Ports that failed to bind (another process held them), with when
    /// they go back into the pool: never lost, never retried at once.
    pub(super) cooling: Vec<(u16, Instant)>,
}

impl Shared {
    /// Refuses `who`'s credentials from now (`now_unix`) on; see
    /// `revoked.rs` for `until`.
    pub fn revoke(&self, who: Revokee, until: u64, now_unix: u64) {
        self.revocations
            .rcu(|r| r.with(who.clone(), until, now_unix));
    }

    /// Replaces the users and labels whose budget is spent.
    pub fn set_over_budget(&self, spent: Vec<Revokee>) {
        if **self.over_budget.load() != spent {
            self.over_budget.store(Arc::new(spent));
        }
    }

    /// Whether `username`'s user or label has spent its budget.
    pub fn is_over_budget(&self, username: &str) -> bool {
        self.over_budget.load().iter().any(|w| w.matches(username))
    }

    /// Whether `username` is revoked at `now_unix`.
    pub fn is_revoked(&self, username: &str, now_unix: u64) -> bool {
        self.revocations.load().refuses(username, now_unix)
    }

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
                cooling: Vec::new(),
            })
        };
        Shared {
            ports: [state(), state()],
            ports_range: ports.clone(),
            users: Mutex::new(HashMap::new()),
            labels: Mutex::new(HashMap::new()),
            ips: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            total: AtomicUsize::new(0),
            reservations: AtomicUsize::new(0),
            draining,
            revocations: ArcSwap::default(),
            over_budget: ArcSwap::default(),
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

    /// Counts an allocation made (+1) or ended (-1) for the quota user
    /// and the label of `username` and a client address key.
    pub(super) fn count_holder(&self, username: &str, ip: IpAddr, delta: isize) {
        let who = identity(username);
        adjust(&self.users, who.user.to_string(), delta);
        if let Some(label) = who.label {
            adjust(&self.labels, label.to_string(), delta);
        }
        adjust(&self.ips, ip, delta);
    }

    /// The live allocations of a user or a label.
    pub(super) fn allocations_of(&self, who: &Revokee) -> usize {
        match who {
            Revokee::User(u) => self.user_allocations(u),
            Revokee::Label(l) => {
                let labels = self.labels.lock().unwrap_or_else(|e| e.into_inner());
                labels.get(l).copied().unwrap_or(0)
            }
        }
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

    pub(super) fn ip_allocations(&self, ip: IpAddr) -> usize {
        let ips = self.ips.lock().unwrap_or_else(|e| e.into_inner());
        ips.get(&ip).copied().unwrap_or(0)
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
    /// How many shards share the relay (each takes its share of
    /// `Rules::bps_capacity`).
    pub shards: usize,
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

/// Adds `delta` to the count of `key`, forgetting keys that reach 0.
fn adjust<K: std::hash::Hash + Eq>(map: &Mutex<HashMap<K, usize>>, key: K, delta: isize) {
    use std::collections::hash_map::Entry;
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    match map.entry(key) {
        Entry::Occupied(mut e) => {
            let n = e.get().saturating_add_signed(delta);
            if n == 0 {
                e.remove();
            } else {
                *e.get_mut() = n;
            }
        }
        Entry::Vacant(e) => {
            if delta > 0 {
                e.insert(delta.unsigned_abs());
            }
        }
    }
}
