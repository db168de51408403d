//! Counters of one relay shard. Each shard owns its own block, so the
//! per-packet increments never contend between cores; the metrics module
//! sums the blocks at scrape time.

use std::sync::atomic::{AtomicI64, AtomicU64};

use super::allocation::Transport;
use super::policy::Denial;

/// Slots for peer denials, indexed by the reason's position in `Denial::ALL`.
pub const DENIAL_SLOTS: usize = 24;

#[derive(Default)]
pub struct TurnStats {
    /// Allocation lifecycles: counted by the shell from the core's
    /// events (`relay/lifecycle.rs`), never by the core itself.
    pub allocations_active: AtomicI64,
    pub allocations_created: AtomicU64,
    pub allocations_expired: AtomicU64,
    pub allocations_deleted: AtomicU64,
    pub relay_ports_used: AtomicI64,

    /// Relayed traffic: [transport][direction][framing] → packets, bytes.
    pub relayed: [[[Flow; 2]; 2]; 3],

    pub binding_requests: AtomicU64,
    pub auth_bad_credential: AtomicU64,
    pub auth_expired: AtomicU64,
    /// Refused because an operator revoked the user or label.
    pub auth_revoked: AtomicU64,
    /// Allocates refused because their user's or label's byte budget is
    /// spent.
    pub budget_rejections: AtomicU64,
    pub auth_stale_nonce: AtomicU64,
    pub peer_denied: [AtomicU64; DENIAL_SLOTS],
    /// 486: a user's or a client address's quota; 508: the total quota or
    /// no free port.
    pub quota_rejections: AtomicU64,
    pub ip_quota_rejections: AtomicU64,
    pub capacity_rejections: AtomicU64,
    /// Relayed datagrams dropped over an allocation's or the relay's
    /// bandwidth budget.
    pub dropped_over_bandwidth: AtomicU64,
    /// Requests without valid credentials, and Bindings, dropped over
    /// their sender's budget.
    pub rate_limited: AtomicU64,
    /// Relay ports that failed to bind (another process held them), and
    /// how many are cooling off before they return to the pool.
    pub relay_bind_failures: AtomicU64,
    pub relay_ports_cooling: AtomicI64,

    /// Datagrams dropped: malformed, no allocation, no permission, unknown channel.
    pub dropped_malformed: AtomicU64,
    pub dropped_no_allocation: AtomicU64,
    pub dropped_no_permission: AtomicU64,
    /// Socket errors, counted and skipped (never fatal to a loop).
    pub send_errors: AtomicU64,
    pub recv_errors: AtomicU64,
    /// Stream clients cut off because they stopped reading.
    pub stream_overflows: AtomicU64,
    /// Datagrams from one of our relays to another, handed over in memory
    /// (`relay/shortcut.rs`); and those dropped because the receiving
    /// shard's mailbox was full.
    pub handed_over: AtomicU64,
    pub dropped_mailbox_full: AtomicU64,
    /// The kernel fast path (`relay/xdp/`): packets per reason, indexed
    /// like `relay::xdp::maps::Reason::ALL`, copied (not added) from the
    /// program's counters by the first shard at each sweep, so the sum
    /// over shards is the program's count; and each shard's bindings in
    /// the fast path now.
    pub xdp_packets: [AtomicU64; XDP_REASONS],
    pub xdp_bindings: AtomicI64,
}

/// Reasons the XDP program counts packets under.
pub const XDP_REASONS: usize = 16;

/// Packets and application bytes of one kind of relayed traffic.
#[derive(Default)]
pub struct Flow {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToPeer = 0,
    PeerToClient = 1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    ChannelData = 0,
    Indication = 1,
}

pub const TRANSPORTS: [(Transport, &str); 3] = [
    (Transport::Udp, "udp"),
    (Transport::Tcp, "tcp"),
    (Transport::Tls, "tls"),
];
pub const DIRECTIONS: [(Direction, &str); 2] = [
    (Direction::ClientToPeer, "client_to_peer"),
    (Direction::PeerToClient, "peer_to_client"),
];
pub const FRAMINGS: [(Framing, &str); 2] = [
    (Framing::ChannelData, "channel_data"),
    (Framing::Indication, "indication"),
];

pub use crate::counter::{add, inc};

impl TurnStats {
    #[inline]
    pub fn flow(&self, t: Transport, d: Direction, f: Framing) -> &Flow {
        &self.relayed[t as usize][d as usize][f as usize]
    }

    /// Counts one relayed packet of `len` application bytes.
    #[inline]
    pub fn relayed(&self, t: Transport, d: Direction, f: Framing, len: usize) {
        let flow = self.flow(t, d, f);
        inc(&flow.packets);
        add(&flow.bytes, len);
    }

    /// Counts `packets` relayed outside the core (the kernel fast path)
    /// carrying `bytes` application bytes.
    pub fn relayed_many(&self, t: Transport, d: Direction, f: Framing, packets: u64, bytes: u64) {
        let flow = self.flow(t, d, f);
        add(&flow.packets, packets as usize);
        add(&flow.bytes, bytes as usize);
    }

    pub fn denied(&self, reason: Denial) {
        if let Some(i) = Denial::ALL.iter().position(|d| *d == reason) {
            if let Some(c) = self.peer_denied.get(i) {
                inc(c);
            }
        }
    }
}
