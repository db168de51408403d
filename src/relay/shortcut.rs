//! Relay to relay without the kernel.
//!
//! When both peers of a call are relayed by this server (two relay-only
//! browsers on one appliance: the common case behind symmetric NATs and
//! strict firewalls), a datagram one allocation sends to the other's
//! relayed address used to leave through one relay socket and come back
//! in through another: a full UDP send and receive, two system calls and
//! a wake-up, for bytes that never leave the process. Here the shard
//! hands them over in memory instead: to its own core when the receiving
//! relay is its own, else into the owning shard's [`Mailbox`], one parcel
//! per turn of the loop.
//!
//! Nothing is skipped that the kernel path would do: the receiving core
//! still checks its allocation's permission for the sender and spends its
//! bandwidth budget, and the sender is the sending relay's advertised
//! address, which is what the kernel shows too. It applies only where the
//! advertised address is the host's own (no `external_ip` of a NAT in
//! front): behind a NAT the datagram goes to the advertised address for
//! real, so a wrong `external_ip` shows in calls, `turnkey probe` and
//! `/selftest` as before. A relay port without an open socket falls back
//! to the kernel.
//!
//! Who owns which relay port is one byte per port, written by the owning
//! shard when it opens or closes the socket. A reader racing a close hands
//! the datagram to a shard whose core no longer has the allocation, and the
//! core drops it, as the kernel would for a closed port.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mio::Waker;

use crate::turn::allocation::RelayId;

/// Bytes one shard's mailbox holds before parcels are dropped (the size of
/// the listener's socket buffer: the same bound as the kernel path had).
/// Each datagram counts its bytes and its bookkeeping, so empty datagrams
/// fill it too.
pub const MAILBOX_BYTES: usize = 4 << 20;

/// Which shard owns each relay port, and the addresses clients know.
pub struct Directory {
    /// Shard index + 1 per port, IPv4 then IPv6; 0 = no open relay.
    owners: Box<[AtomicU8]>,
    /// The advertised relay address per family (IPv4 [0], IPv6 [1]),
    /// where the handover applies (see the module's comment).
    advertised: [Option<IpAddr>; 2],
}

impl Directory {
    pub fn new(advertised: [Option<IpAddr>; 2]) -> Directory {
        Directory {
            owners: (0..2 * 65536).map(|_| AtomicU8::new(0)).collect(),
            advertised,
        }
    }

    fn slot(&self, relay: RelayId) -> &AtomicU8 {
        &self.owners[usize::from(relay.v6) << 16 | usize::from(relay.port)]
    }

    /// `shard` now has an open socket for `relay`.
    pub fn opened(&self, relay: RelayId, shard: usize) {
        // Shards are counted in a byte: past 254 the kernel path is used.
        if let Ok(v) = u8::try_from(shard + 1) {
            self.slot(relay).store(v, Ordering::Release);
        }
    }

    pub fn closed(&self, relay: RelayId) {
        self.slot(relay).store(0, Ordering::Release);
    }

    /// The open relay (and its shard) that `peer` names, if it is one of
    /// ours.
    pub fn route(&self, peer: SocketAddr) -> Option<(RelayId, usize)> {
        let v6 = peer.is_ipv6();
        if self.advertised[usize::from(v6)] != Some(peer.ip()) {
            return None;
        }
        let relay = RelayId {
            v6,
            port: peer.port(),
        };
        match self.slot(relay).load(Ordering::Acquire) {
            0 => None,
            owner => Some((relay, usize::from(owner) - 1)),
        }
    }

    /// The address a relay's datagrams come from, as its peers know it.
    pub fn relayed_addr(&self, relay: RelayId) -> Option<SocketAddr> {
        Some(SocketAddr::new(
            self.advertised[usize::from(relay.v6)]?,
            relay.port,
        ))
    }
}

/// One datagram in a parcel.
struct Item {
    to: RelayId,
    from: SocketAddr,
    at: usize,
    len: usize,
}

/// Datagrams for one shard's relays, gathered over one turn of a loop.
#[derive(Default)]
pub struct Parcel {
    bytes: Vec<u8>,
    items: Vec<Item>,
}

impl Parcel {
    pub fn push(&mut self, to: RelayId, from: SocketAddr, data: &[u8]) {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(data);
        self.items.push(Item {
            to,
            from,
            at,
            len: data.len(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// What the parcel weighs against a mailbox's bound.
    fn size(&self) -> usize {
        self.bytes.len() + self.items.len() * std::mem::size_of::<Item>()
    }

    /// Each datagram: the relay it is for, its sender, its bytes.
    pub fn iter(&self) -> impl Iterator<Item = (RelayId, SocketAddr, &[u8])> + '_ {
        self.items
            .iter()
            .filter_map(|i| Some((i.to, i.from, self.bytes.get(i.at..i.at + i.len)?)))
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.items.clear();
    }
}

/// Where other shards leave parcels for one shard, and how they wake it.
pub struct Mailbox {
    parcels: Mutex<Vec<Parcel>>,
    /// Bytes waiting; also the "anything there?" check without the lock.
    queued: AtomicUsize,
    /// The shard is about to wait (or waits) in its poller.
    asleep: AtomicBool,
    waker: Arc<Waker>,
}

impl Mailbox {
    pub fn new(waker: Arc<Waker>) -> Mailbox {
        Mailbox {
            parcels: Mutex::new(Vec::new()),
            queued: AtomicUsize::new(0),
            asleep: AtomicBool::new(false),
            waker,
        }
    }

    /// Leaves a parcel, waking the shard if it sleeps. A full mailbox
    /// refuses it: `Err` with the number of datagrams dropped.
    pub fn post(&self, parcel: Parcel) -> Result<(), usize> {
        let size = parcel.size();
        {
            let mut parcels = self.parcels.lock().unwrap_or_else(|e| e.into_inner());
            if self.queued.load(Ordering::Relaxed) + size > MAILBOX_BYTES {
                return Err(parcel.len());
            }
            parcels.push(parcel);
            self.queued.fetch_add(size, Ordering::SeqCst);
        }
        // Paired with `sleep`: either the shard sees `queued` before it
        // waits, or this sees `asleep` and wakes it; only one waker call
        // per sleep.
        if self.asleep.swap(false, Ordering::SeqCst) {
            let _ = self.waker.wake();
        }
        Ok(())
    }

    /// Called by the owning shard before it waits: false if mail is
    /// already there (then it must not wait).
    pub fn sleep(&self) -> bool {
        self.asleep.store(true, Ordering::SeqCst);
        if self.queued.load(Ordering::SeqCst) > 0 {
            self.asleep.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Called by the owning shard when its wait ends.
    pub fn awake(&self) {
        self.asleep.store(false, Ordering::Relaxed);
    }

    /// Moves every waiting parcel into `into`.
    pub fn take(&self, into: &mut Vec<Parcel>) {
        if self.queued.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut parcels = self.parcels.lock().unwrap_or_else(|e| e.into_inner());
        into.append(&mut parcels);
        self.queued.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip() -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))
    }

    #[test]
    fn only_open_relays_on_the_advertised_address_route() {
        let d = Directory::new([Some(ip()), None]);
        let r = RelayId {
            v6: false,
            port: 50_000,
        };
        let peer = SocketAddr::new(ip(), 50_000);
        assert_eq!(d.route(peer), None, "no socket open yet");
        d.opened(r, 1);
        assert_eq!(d.route(peer), Some((r, 1)));
        // Another address of the host (the bind address, loopback) is a
        // peer like any other.
        assert_eq!(
            d.route(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 50_000)),
            None
        );
        assert_eq!(d.route("[2001:db8::1]:50000".parse().unwrap()), None);
        d.closed(r);
        assert_eq!(d.route(peer), None);
        assert_eq!(d.relayed_addr(r), Some(peer));
        assert_eq!(d.relayed_addr(RelayId { v6: true, port: 1 }), None);
    }

    #[test]
    fn a_parcel_keeps_each_datagram_and_its_sender() {
        let mut p = Parcel::default();
        let a = RelayId { v6: false, port: 1 };
        let b = RelayId { v6: false, port: 2 };
        let from: SocketAddr = "192.0.2.7:3".parse().unwrap();
        p.push(a, from, b"one");
        p.push(b, from, b"");
        p.push(a, from, b"three");
        let got: Vec<_> = p.iter().map(|(r, f, d)| (r, f, d.to_vec())).collect();
        assert_eq!(
            got,
            vec![
                (a, from, b"one".to_vec()),
                (b, from, vec![]),
                (a, from, b"three".to_vec())
            ]
        );
    }

    #[test]
    fn a_sleeping_shard_is_woken_once_and_a_full_mailbox_refuses() {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let mb = Mailbox::new(waker);
        assert!(mb.sleep(), "empty: may wait");
        let mut p = Parcel::default();
        p.push(
            RelayId { v6: false, port: 1 },
            "192.0.2.7:3".parse().unwrap(),
            b"x",
        );
        assert!(mb.post(p).is_ok());
        assert!(!mb.asleep.load(Ordering::SeqCst), "the post woke it");
        assert!(!mb.sleep(), "mail waits: must not wait");
        let mut got = Vec::new();
        mb.take(&mut got);
        assert_eq!(got.len(), 1);
        assert!(mb.sleep());

        let mut big = Parcel::default();
        let data = vec![0u8; 60_000];
        let r = RelayId { v6: false, port: 1 };
        let from: SocketAddr = "192.0.2.7:3".parse().unwrap();
        while big.size() < MAILBOX_BYTES {
            big.push(r, from, &data);
        }
        let n = big.len();
        assert_eq!(mb.post(big), Err(n), "over the bound: dropped whole");
        let mut none = Vec::new();
        mb.take(&mut none);
        assert!(none.is_empty());

        // Empty datagrams weigh too: a flood of them is bounded as well.
        let mut empties = Parcel::default();
        while empties.size() <= MAILBOX_BYTES {
            empties.push(r, from, b"");
        }
        let n = empties.len();
        assert_eq!(mb.post(empties), Err(n));
    }
}
