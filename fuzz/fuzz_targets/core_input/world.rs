//! The world as the fuzzed TURN core sees it: the peers and clients the
//! harness can name, and a recording `Io` that checks every command the
//! core gives (see the oracles listed in core_input.rs).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use stun::attributes::*;
use stun::message::*;
use stun::textattrs::TextAttribute;

use turnkey::turn::allocation::{FiveTuple, RelayId, Transport};
use turnkey::turn::server::Io;

use super::{PORTS, RELAY_IP, RELAY_IP6};

/// Peers a signed request or a peer datagram can name, by index: allowed
/// ones (our own relay addresses, public hosts of both families) and ones
/// the default policy must refuse (loopback, private, link-local, metadata,
/// unspecified), some of them in IPv4-embedded IPv6 forms. No packet is
/// ever sent anywhere.
pub fn peer(i: u8) -> SocketAddr {
    let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
    let ip: IpAddr = match i % 16 {
        0 => RELAY_IP.into(),
        1 => Ipv4Addr::new(8, 8, 8, 8).into(),
        2 => Ipv4Addr::new(1, 1, 1, 1).into(),
        3 => Ipv4Addr::LOCALHOST.into(),
        4 => Ipv4Addr::new(10, 0, 0, 1).into(),
        5 => v6("2001:4860::8888"),
        6 => Ipv4Addr::new(169, 254, 169, 254).into(),
        7 => Ipv4Addr::LOCALHOST.to_ipv6_mapped().into(),
        8 => RELAY_IP6.into(),
        9 => Ipv6Addr::LOCALHOST.into(),
        10 => v6("fe80::1"),
        11 => v6("fd00::1"),
        12 => v6("64:ff9b::7f00:1"),          // NAT64 of 127.0.0.1
        13 => v6("2002:a00:1::1"),            // 6to4 of 10.0.0.1
        14 => v6("2001:0:1:2:3:4:80ff:fffe"), // Teredo of 127.0.0.1
        _ => Ipv4Addr::UNSPECIFIED.into(),
    };
    let port = match i % 16 {
        0 | 8 => *PORTS.start() + 1,
        _ => 3478 + u16::from(i / 16),
    };
    SocketAddr::new(ip, port)
}

/// The IPv4 address an IPv6 address carries in the embedded forms the
/// policy must see through: mapped, NAT64 well-known prefix, 6to4, Teredo.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let low = u32::from_be_bytes(v6.octets()[12..].try_into().unwrap());
    match v6.segments() {
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low.into()),
        [0x2002, hi, lo, ..] => Some((u32::from(hi) << 16 | u32::from(lo)).into()),
        [0x2001, 0, ..] => Some((!low).into()),
        _ => None,
    }
}

/// Addresses the policy must never let a packet reach, judged here
/// independently of turnkey's own classifier.
fn never_a_peer(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
        }
        IpAddr::V6(v6) => {
            let s = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || s & 0xfe00 == 0xfc00
                || s & 0xffc0 == 0xfe80
        }
    }
}

pub fn clients() -> [FiveTuple; 3] {
    let server: SocketAddr = SocketAddr::new(RELAY_IP.into(), 3478);
    [
        FiveTuple {
            client: "198.51.100.20:40000".parse().unwrap(),
            server,
            transport: Transport::Udp,
        },
        FiveTuple {
            client: "198.51.100.20:40001".parse().unwrap(),
            server,
            transport: Transport::Udp,
        },
        FiveTuple {
            client: "203.0.113.5:50123".parse().unwrap(),
            server,
            transport: Transport::Tcp,
        },
    ]
}

/// The world as the core sees it: records open and reserved relay
/// sockets and the nonces and reservation tokens handed out, and checks
/// every command.
pub struct Rec {
    pub clients: [FiveTuple; 3],
    /// Open relay sockets, in the order they were opened (port numbers are
    /// drawn at random by the pool; the order is not).
    pub open: Vec<RelayId>,
    /// Sockets bound for EVEN-PORT reservations, not yet claimed.
    pub reserved: Vec<RelayId>,
    /// How many coming `open_relay`/`reserve_relay` calls fail, as if
    /// another process held the port.
    pub refuse: u8,
    /// Whether any call was refused: a refused port may stay out of the
    /// pool for good, so the pool is only audited while this is false.
    pub refused_any: bool,
    pub nonce: [Option<String>; 3],
    pub token: Option<[u8; 8]>,
}

impl Rec {
    fn who(&self, ft: &FiveTuple) -> usize {
        self.clients
            .iter()
            .position(|c| c == ft)
            .unwrap_or_else(|| panic!("answer sent to a client that never wrote: {ft:?}"))
    }

    fn refused(&mut self) -> bool {
        if self.refuse == 0 {
            return false;
        }
        self.refuse -= 1;
        self.refused_any = true;
        true
    }
}

impl Io for Rec {
    fn send_to_client(&mut self, to: &FiveTuple, data: &[u8]) {
        let who = self.who(to);
        match data.first() {
            Some(0x40..=0x7F) => {
                assert!(data.len() >= 4, "short ChannelData to client");
                let len = usize::from(u16::from_be_bytes([data[2], data[3]]));
                let want = if to.transport.is_stream() {
                    (4 + len + 3) & !3
                } else {
                    4 + len
                };
                assert_eq!(data.len(), want, "ChannelData length field disagrees");
            }
            _ => {
                let mut m = Message::new();
                m.raw = data.to_vec();
                if let Err(e) = m.decode() {
                    panic!("core sent an undecodable STUN message ({e}): {data:02x?}");
                }
                if let Ok(n) = TextAttribute::get_from_as(&m, ATTR_NONCE) {
                    self.nonce[who] = Some(n.text);
                }
                if let Ok(t) = m.get(ATTR_RESERVATION_TOKEN) {
                    self.token = t.as_slice().try_into().ok();
                }
            }
        }
    }

    fn send_to_peer(&mut self, relay: RelayId, peer: SocketAddr, _data: &[u8]) {
        assert!(
            self.open.contains(&relay),
            "relayed from {relay:?}, which is not open"
        );
        assert_eq!(relay.v6, peer.is_ipv6(), "relayed to {peer} from {relay:?}");
        assert!(!never_a_peer(peer.ip()), "relayed to forbidden peer {peer}");
    }

    fn open_relay(&mut self, relay: RelayId, _dont_fragment: bool) -> bool {
        assert!(
            PORTS.contains(&relay.port),
            "opened {relay:?}, outside the range"
        );
        assert!(!self.open.contains(&relay), "opened {relay:?} twice");
        if self.refused() {
            return false;
        }
        // Claiming a reservation takes over its socket.
        self.reserved.retain(|r| *r != relay);
        self.open.push(relay);
        true
    }

    fn close_relay(&mut self, relay: RelayId) {
        let i = self.open.iter().position(|r| *r == relay);
        let i = i.unwrap_or_else(|| panic!("closed {relay:?}, which is not open"));
        self.open.remove(i);
    }

    fn close_client(&mut self, client: &FiveTuple) {
        assert!(client.transport.is_stream(), "close_client for {client:?}");
    }

    fn reserve_relay(&mut self, relay: RelayId) -> bool {
        assert!(
            PORTS.contains(&relay.port),
            "reserved {relay:?}, outside the range"
        );
        assert!(
            !self.open.contains(&relay) && !self.reserved.contains(&relay),
            "reserved {relay:?}, which is in use"
        );
        if self.refused() {
            return false;
        }
        self.reserved.push(relay);
        true
    }

    fn unreserve_relay(&mut self, relay: RelayId) {
        let i = self.reserved.iter().position(|r| *r == relay);
        let i = i.unwrap_or_else(|| panic!("unreserved {relay:?}, which is not reserved"));
        self.reserved.remove(i);
    }
}
