//! Which channel bindings belong in the kernel fast path: plain data,
//! fed the core's events (`turn/events.rs`) and, once a second, each
//! allocation's relayed bytes; it answers with [`Order`]s to put or drop
//! a binding. No I/O and no clock: time comes in as an argument.
//!
//! A binding is in the fast path exactly while
//! - its allocation lives and is a UDP one (XDP sees datagrams only),
//! - the channel is bound (`ChannelBound` .. `ChannelUnbound`),
//! - the permission for the peer's address lives (`PermissionInstalled`
//!   .. `PermissionRemoved`); the peer policy was the core's to check
//!   before either, and the core does not check it again per ChannelData,
//! - the peer is not one of our own relay addresses (relay to relay is
//!   handed over in memory by user space, `relay/shortcut.rs`),
//! - the relayed address has the client's family (XDP rewrites headers in
//!   place; it does not turn IPv4 into IPv6),
//! - the allocation is not near its bandwidth cap (`max_bps`) and the
//!   shard not near its share of `bps_capacity`: a cap is enforced by the
//!   core's budgets, exactly, in user space. An allocation that used half
//!   its cap in the last second leaves; it comes back after a calm spell
//!   (under a quarter for `CALM`); the same for the whole shard.
//!
//! The core emits every removal before the allocation's end (see
//! `turn/events.rs`), so following the events leaves no stale entry.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::turn::allocation::{ChannelNumber, FiveTuple};
use crate::turn::events::Event;

/// How long an allocation (or the shard) stays out of the fast path
/// after its rate fell under a quarter of its cap.
pub const CALM: Duration = Duration::from_secs(5);

/// One channel of one allocation, as the maps need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub allocation: u64,
    pub client: FiveTuple,
    pub channel: ChannelNumber,
    /// The allocation's relayed address of the peer's family.
    pub relayed: SocketAddr,
    pub peer: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    Put(Binding),
    Drop(Binding),
}

struct Alloc {
    client: FiveTuple,
    relayed: [Option<SocketAddr>; 2],
    permissions: HashSet<IpAddr>,
    /// Bound channels, and whether each is in the fast path now.
    channels: HashMap<ChannelNumber, (SocketAddr, bool)>,
    /// Out of the fast path for its rate, and since when calm.
    capped: Option<Option<Instant>>,
    /// Bytes each way at the last sweep, for the rate.
    last_bytes: [u64; 2],
}

/// A shard's view of its allocations, for the fast path.
pub struct Cache {
    allocs: HashMap<u64, Alloc>,
    /// Our relay addresses (the advertised ones).
    own: Vec<IpAddr>,
    /// The shard near its capacity, and since when calm.
    shard_capped: Option<Option<Instant>>,
    last_sweep: Option<Instant>,
}

/// The budgets the sweep compares rates with, bytes per second (0: none).
#[derive(Debug, Clone, Copy, Default)]
pub struct Caps {
    /// Per allocation and direction (`limits.max_bps`).
    pub allocation: u64,
    /// This shard's share of `limits.bps_capacity`.
    pub shard: u64,
}

impl Cache {
    pub fn new(own: Vec<IpAddr>) -> Self {
        Cache {
            allocs: HashMap::new(),
            own,
            shard_capped: None,
            last_sweep: None,
        }
    }

    /// The orders an event of the core calls for.
    pub fn on_event(&mut self, event: &Event) -> Vec<Order> {
        let mut orders = Vec::new();
        match event {
            Event::AllocationStarted {
                id,
                client,
                relayed,
                ..
            } => {
                self.allocs.insert(
                    *id,
                    Alloc {
                        client: *client,
                        relayed: *relayed,
                        permissions: HashSet::new(),
                        channels: HashMap::new(),
                        capped: None,
                        last_bytes: [0; 2],
                    },
                );
            }
            Event::AllocationEnded { id, .. } => {
                if let Some(a) = self.allocs.remove(id) {
                    for (&number, &(peer, put)) in &a.channels {
                        if put {
                            orders.extend(binding(*id, &a, number, peer).map(Order::Drop));
                        }
                    }
                }
            }
            Event::PermissionInstalled { allocation, peer } => {
                if let Some(a) = self.allocs.get_mut(allocation) {
                    a.permissions.insert(*peer);
                }
                self.settle(*allocation, |_, p| p.ip() == *peer, &mut orders);
            }
            Event::PermissionRemoved {
                allocation, peer, ..
            } => {
                if let Some(a) = self.allocs.get_mut(allocation) {
                    a.permissions.remove(peer);
                }
                self.settle(*allocation, |_, p| p.ip() == *peer, &mut orders);
            }
            Event::ChannelBound {
                allocation,
                number,
                peer,
            } => {
                if let Some(a) = self.allocs.get_mut(allocation) {
                    a.channels.entry(*number).or_insert((*peer, false));
                }
                self.settle(*allocation, |n, _| n == *number, &mut orders);
            }
            Event::ChannelUnbound {
                allocation, number, ..
            } => {
                if let Some(a) = self.allocs.get_mut(allocation) {
                    if let Some((peer, true)) = a.channels.remove(number) {
                        orders.extend(binding(*allocation, a, *number, peer).map(Order::Drop));
                    }
                }
            }
        }
        orders
    }

    /// Once a second: each allocation's relayed bytes so far (client →
    /// peer, peer → client, the fast path's included); the orders that
    /// moving allocations in or out of the fast path for their rate
    /// call for.
    pub fn sweep(
        &mut self,
        now: Instant,
        caps: Caps,
        bytes: impl Fn(u64) -> Option<[u64; 2]>,
    ) -> Vec<Order> {
        let secs = self
            .last_sweep
            .map_or(1.0, |t| now.saturating_duration_since(t).as_secs_f64())
            .max(0.001);
        self.last_sweep = Some(now);
        let mut shard_rate = 0.0;
        let ids: Vec<u64> = self.allocs.keys().copied().collect();
        let mut moved = Vec::new();
        for id in ids {
            let Some(a) = self.allocs.get_mut(&id) else {
                continue;
            };
            let Some(total) = bytes(id) else { continue };
            let rate = [0, 1].map(|d| total[d].saturating_sub(a.last_bytes[d]) as f64 / secs);
            a.last_bytes = total;
            shard_rate += rate[0] + rate[1];
            let peak = rate[0].max(rate[1]);
            if caps.allocation > 0 {
                let cap = caps.allocation as f64;
                a.capped = next_capped(a.capped, peak, cap, now);
            } else {
                a.capped = None;
            }
            moved.push(id);
        }
        self.shard_capped = if caps.shard > 0 {
            next_capped(self.shard_capped, shard_rate, caps.shard as f64, now)
        } else {
            None
        };
        let mut orders = Vec::new();
        for id in moved {
            self.settle(id, |_, _| true, &mut orders);
        }
        orders
    }

    /// Puts or drops the channels of `id` that `which` selects, so each
    /// is in the fast path exactly when it should be.
    fn settle(
        &mut self,
        id: u64,
        which: impl Fn(ChannelNumber, SocketAddr) -> bool,
        orders: &mut Vec<Order>,
    ) {
        let shard_ok = self.shard_capped.is_none();
        let own = &self.own;
        let Some(a) = self.allocs.get_mut(&id) else {
            return;
        };
        let fast_ok = shard_ok && a.capped.is_none() && !a.client.transport.is_stream();
        let numbers: Vec<ChannelNumber> = a.channels.keys().copied().collect();
        for number in numbers {
            let Some(&(peer, put)) = a.channels.get(&number) else {
                continue;
            };
            if !which(number, peer) {
                continue;
            }
            let Some(b) = binding(id, a, number, peer) else {
                continue;
            };
            let want = fast_ok
                && a.permissions.contains(&peer.ip())
                && !own.contains(&peer.ip())
                && b.relayed.is_ipv4() == a.client.client.is_ipv4();
            if want != put {
                a.channels.insert(number, (peer, want));
                orders.push(if want { Order::Put(b) } else { Order::Drop(b) });
            }
        }
    }

    /// Bindings in the fast path now.
    pub fn len(&self) -> usize {
        self.allocs
            .values()
            .map(|a| a.channels.values().filter(|(_, put)| *put).count())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Out of the fast path at half the cap; back after `CALM` under a quarter.
fn next_capped(
    capped: Option<Option<Instant>>,
    rate: f64,
    cap: f64,
    now: Instant,
) -> Option<Option<Instant>> {
    if rate * 2.0 >= cap {
        return Some(None);
    }
    match capped {
        None => None,
        Some(_) if rate * 4.0 >= cap => Some(None),
        Some(None) => Some(Some(now)),
        Some(Some(since)) if now.saturating_duration_since(since) >= CALM => None,
        still => still,
    }
}

fn binding(id: u64, a: &Alloc, channel: ChannelNumber, peer: SocketAddr) -> Option<Binding> {
    Some(Binding {
        allocation: id,
        client: a.client,
        channel,
        relayed: a.relayed[usize::from(peer.is_ipv6())]?,
        peer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::allocation::Transport;
    use crate::turn::events::{EndReason, Lapse, Usage};

    fn client(transport: Transport) -> FiveTuple {
        FiveTuple {
            client: "198.51.100.1:5000".parse().unwrap(),
            server: "192.0.2.1:3478".parse().unwrap(),
            transport,
        }
    }

    fn started(id: u64, transport: Transport) -> Event {
        Event::AllocationStarted {
            id,
            client: client(transport),
            relayed: [Some("192.0.2.1:50000".parse().unwrap()), None],
            username: "alice".into(),
        }
    }

    fn peer() -> SocketAddr {
        "203.0.113.9:7000".parse().unwrap()
    }

    fn ch(n: u16) -> ChannelNumber {
        ChannelNumber::new(n).unwrap()
    }

    fn permit(id: u64, p: SocketAddr) -> Event {
        Event::PermissionInstalled {
            allocation: id,
            peer: p.ip(),
        }
    }

    fn bind(id: u64, n: u16, p: SocketAddr) -> Event {
        Event::ChannelBound {
            allocation: id,
            number: ch(n),
            peer: p,
        }
    }

    fn puts(orders: &[Order]) -> usize {
        orders.iter().filter(|o| matches!(o, Order::Put(_))).count()
    }

    fn drops(orders: &[Order]) -> usize {
        orders
            .iter()
            .filter(|o| matches!(o, Order::Drop(_)))
            .count()
    }

    #[test]
    fn a_binding_goes_in_with_its_permission_and_channel_and_out_with_either() {
        let mut c = Cache::new(vec!["192.0.2.1".parse().unwrap()]);
        assert!(c.on_event(&started(1, Transport::Udp)).is_empty());
        assert_eq!(puts(&c.on_event(&permit(1, peer()))), 0, "no channel yet");
        let o = c.on_event(&bind(1, 0x4001, peer()));
        assert_eq!(o.len(), 1);
        let Order::Put(b) = o[0] else { panic!() };
        assert_eq!((b.channel, b.peer), (ch(0x4001), peer()));
        assert_eq!(b.relayed, "192.0.2.1:50000".parse().unwrap());
        // The permission lapses (channels outlive permissions in RFC 8656
        // only on paper: the core keeps both, the fast path follows).
        let o = c.on_event(&Event::PermissionRemoved {
            allocation: 1,
            peer: peer().ip(),
            reason: Lapse::Expired,
        });
        assert_eq!(drops(&o), 1);
        assert_eq!(
            puts(&c.on_event(&permit(1, peer()))),
            1,
            "refreshed: back in"
        );
        let o = c.on_event(&Event::ChannelUnbound {
            allocation: 1,
            number: ch(0x4001),
            peer: peer(),
            reason: Lapse::Expired,
        });
        assert_eq!(drops(&o), 1);
        assert!(c.is_empty());
    }

    #[test]
    fn a_channel_bound_before_its_permission_waits_for_it() {
        let mut c = Cache::new(vec![]);
        c.on_event(&started(1, Transport::Udp));
        assert!(c.on_event(&bind(1, 0x4001, peer())).is_empty());
        assert_eq!(puts(&c.on_event(&permit(1, peer()))), 1);
    }

    #[test]
    fn the_end_of_an_allocation_drops_what_is_left() {
        let mut c = Cache::new(vec![]);
        c.on_event(&started(1, Transport::Udp));
        c.on_event(&permit(1, peer()));
        c.on_event(&bind(1, 0x4001, peer()));
        let o = c.on_event(&Event::AllocationEnded {
            id: 1,
            client: client(Transport::Udp),
            relayed: [None, None],
            username: "alice".into(),
            reason: EndReason::Operator,
            duration: Duration::ZERO,
            usage: Usage::default(),
        });
        assert_eq!(drops(&o), 1);
        assert!(c.is_empty());
    }

    #[test]
    fn never_for_streams_our_own_addresses_or_another_family() {
        let mut c = Cache::new(vec!["192.0.2.1".parse().unwrap()]);
        c.on_event(&started(1, Transport::Tcp));
        c.on_event(&permit(1, peer()));
        assert!(c.on_event(&bind(1, 0x4001, peer())).is_empty(), "TCP");
        c.on_event(&started(2, Transport::Udp));
        let own: SocketAddr = "192.0.2.1:50010".parse().unwrap();
        c.on_event(&permit(2, own));
        assert!(c.on_event(&bind(2, 0x4001, own)).is_empty(), "hairpin");
        let v6: SocketAddr = "[2001:db8::9]:7000".parse().unwrap();
        c.on_event(&permit(2, v6));
        assert!(
            c.on_event(&bind(2, 0x4002, v6)).is_empty(),
            "no IPv6 relayed address"
        );
    }

    #[test]
    fn near_its_cap_an_allocation_leaves_and_comes_back_when_calm() {
        let mut c = Cache::new(vec![]);
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        c.on_event(&started(1, Transport::Udp));
        c.on_event(&permit(1, peer()));
        c.on_event(&bind(1, 0x4001, peer()));
        let caps = Caps {
            allocation: 1000,
            shard: 0,
        };
        assert!(
            c.sweep(s(1), caps, |_| Some([400, 0])).is_empty(),
            "0.4 of the cap"
        );
        let o = c.sweep(s(2), caps, |_| Some([900, 0]));
        assert_eq!(drops(&o), 1, "0.5 of the cap: out");
        assert!(
            c.sweep(s(3), caps, |_| Some([1200, 0])).is_empty(),
            "0.3: still out"
        );
        assert!(
            c.sweep(s(4), caps, |_| Some([1300, 0])).is_empty(),
            "calm from here"
        );
        assert!(c.sweep(s(8), caps, |_| Some([1300, 0])).is_empty());
        assert_eq!(
            puts(&c.sweep(s(9), caps, |_| Some([1300, 0]))),
            1,
            "calm for 5 s: back"
        );
    }

    #[test]
    fn the_shard_near_its_capacity_leaves_the_fast_path_whole() {
        let mut c = Cache::new(vec![]);
        let t0 = Instant::now();
        for id in [1, 2] {
            c.on_event(&started(id, Transport::Udp));
            c.on_event(&permit(id, peer()));
            c.on_event(&bind(id, 0x4001, peer()));
        }
        let caps = Caps {
            allocation: 0,
            shard: 1000,
        };
        let o = c.sweep(t0 + Duration::from_secs(1), caps, |_| Some([300, 0]));
        assert_eq!(drops(&o), 2, "600 of 1000 together");
    }
}
