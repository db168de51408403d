//! What happened to allocations, permissions and channels (RFC 8656 §7,
//! §9, §12), told by the core to its shell as typed [`Event`]s.
//!
//! The core emits each fact once; the shell decides what it is for (the
//! allocation log lines, the lifecycle counters, later perhaps an audit
//! trail or a billing record), so nobody counts it a second time.
//!
//! Delivery is a method of the shell's [`Io`](super::world::Io),
//! `Io::event`, whose default body does nothing, rather than a queue on
//! `Server` that the shell polls: a call needs no buffer, so nothing can
//! pile up if a shell never looks, and a shell (a test, a fuzz target) that
//! does not care writes nothing. Events come only from the control path
//! (requests, the once-a-second sweep, operator orders), never per relayed
//! packet: the relay fast paths only add to the allocation's byte and
//! packet counts, which travel in [`Event::AllocationEnded`].
//!
//! Every `PermissionInstalled` is followed, sooner or later, by exactly one
//! `PermissionRemoved` for the same allocation and peer, and every
//! `ChannelBound` by one `ChannelUnbound`: when an allocation ends, its
//! channels and then its permissions are reported removed (reason
//! [`Lapse::AllocationEnded`]) before its `AllocationEnded`, so a shell that
//! mirrors them (as Firezone's relay mirrors channels into eBPF) never holds
//! a stale entry. Refreshing a permission or a channel that is still in
//! place is not an event.
//!
//! Events carry the username, as the allocation log lines always did, and
//! never a password or key.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::allocation::{ChannelNumber, FiveTuple};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    AllocationStarted {
        /// Unique for the process; the admin API names allocations by it.
        id: u64,
        client: FiveTuple,
        /// IPv4 in [0], IPv6 in [1]; a dual allocation has both.
        relayed: [Option<SocketAddr>; 2],
        username: String,
    },
    AllocationEnded {
        id: u64,
        client: FiveTuple,
        relayed: [Option<SocketAddr>; 2],
        username: String,
        reason: EndReason,
        /// From the Allocate to the end.
        duration: Duration,
        usage: Usage,
    },
    PermissionInstalled {
        allocation: u64,
        peer: IpAddr,
    },
    PermissionRemoved {
        allocation: u64,
        peer: IpAddr,
        reason: Lapse,
    },
    /// A channel bound to a peer; its permission is reported on its own
    /// (`PermissionInstalled`, just before) when it is new.
    ChannelBound {
        allocation: u64,
        number: ChannelNumber,
        peer: SocketAddr,
    },
    ChannelUnbound {
        allocation: u64,
        number: ChannelNumber,
        peer: SocketAddr,
        reason: Lapse,
    },
}

/// Why an allocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Its lifetime ran out without a refresh (RFC 8656 §7).
    Expired,
    /// It reached the configured maximum age, however often refreshed.
    MaxAge,
    /// The client sent a Refresh with lifetime 0 (RFC 8656 §8).
    ClientDeleted,
    /// An operator ended it through the admin API.
    Operator,
    /// A reload removed the user or REST secret it was made with.
    Revoked,
    /// Its TCP/TLS connection closed (RFC 8656 §3.1).
    ConnectionClosed,
}

impl EndReason {
    /// Whether time ended it rather than somebody: the `expired` and
    /// `deleted` series of the allocation counter.
    pub fn is_expiry(self) -> bool {
        matches!(self, EndReason::Expired | EndReason::MaxAge)
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // These were the log line's words before the reason was typed;
        // operators (and tests) search logs for them.
        f.write_str(match self {
            EndReason::Expired => "expired",
            EndReason::MaxAge => "expired: maximum allocation age",
            EndReason::ClientDeleted => "deleted by the client",
            EndReason::Operator => "ended by the operator",
            EndReason::Revoked => "revoked by reload",
            EndReason::ConnectionClosed => "connection closed",
        })
    }
}

/// Why a permission or a channel went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lapse {
    /// Not refreshed in time (permissions live 300 s, channels 600 s).
    Expired,
    /// Its allocation ended, for whatever reason.
    AllocationEnded,
}

impl fmt::Display for Lapse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lapse::Expired => "expired",
            Lapse::AllocationEnded => "allocation ended",
        })
    }
}

/// What an allocation relayed in its life: application bytes (TURN
/// framing excluded) and packets, each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes_to_peer: u64,
    pub bytes_to_client: u64,
    pub packets_to_peer: u64,
    pub packets_to_client: u64,
}
