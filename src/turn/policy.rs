//! Which peer addresses a TURN allocation may relay to.
//!
//! A TURN server sends datagrams wherever its clients ask, from an address
//! inside the operator's network. Left unchecked that makes it a proxy into
//! loopback services, private networks and cloud metadata endpoints: the
//! SSRF-via-TURN problem described in RFC 8656 §17 ("Security
//! Considerations"). This module is the single place that decides; it is
//! secure by default and denies every address that is not globally routable.
//!
//! # Decision order
//!
//! The peer address is first [`normalise`]d: IPv4-mapped, IPv4-compatible,
//! NAT64 well-known-prefix, 6to4 and Teredo addresses are reduced to the IPv4
//! address they carry, because that is where the packet ends up (directly on
//! a dual-stack socket, or via a translator or tunnel relay). Then, first
//! match wins:
//!
//! 1. **The server's own relay addresses.** If the address is exactly one
//!    of `relay_ips` (not an IPv4-embedded spelling of one: our relays are
//!    reached by their own address, and an embedded form would only reach a
//!    translator's or the host's loopback), [`PeerPolicy::check_ip`] allows
//!    it, and [`PeerPolicy::check`] allows it only when the port lies in the
//!    relay port range, otherwise [`Denial::RelayPortOutOfRange`]. Two
//!    clients of the same server can reach each other's relayed addresses,
//!    even on loopback, but nobody can use the relay to reach other services
//!    on the server itself. This step is terminal: no allowed range reopens
//!    other ports on the server's own address.
//! 2. **Operator allow list** (`allowed_peer_ranges`). A match allows: allow
//!    wins over deny, so a narrow exception can be cut from a wide denial.
//! 3. **Operator deny list** (`denied_peer_ranges`) gives
//!    [`Denial::ConfiguredDeny`].
//! 4. **Built-in rules**, [`classify`].
//!
//! Operator ranges are tested against both the raw and the normalised
//! address, so `10.0.0.0/8` also matches `::ffff:10.1.2.3`, and `2002::/16`
//! matches every 6to4 address even though normalising turns them into IPv4.
//! A denied range written in IPv4-mapped form (inside `::ffff:0:0/96`) also
//! denies the plain IPv4 range it embeds, since on a dual-stack socket the
//! two spellings are one destination and a denial must not be sidestepped by
//! writing the peer as plain IPv4. NAT64 ranges are not widened (denying
//! `64:ff9b::/96` means "not through the translator", not "no IPv4"), and
//! allowed ranges never are: widening an allow can only open more.
//!
//! The checks run on the control path and on Send indications: at
//! CreatePermission, at ChannelBind (a bound channel's peer was checked
//! then, so ChannelData is not checked per datagram), and for each Send
//! indication's destination. They allocate nothing: they are straight
//! scans over small slices and constant tables.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;

use ipnet::{IpNet, Ipv4Net};

/// Why a peer was refused.
///
/// [`Denial::as_str`] gives a short, stable snake_case label for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Denial {
    /// `0.0.0.0/8` ("this network") or `::`.
    #[error("peer address is unspecified")]
    Unspecified,
    /// `127.0.0.0/8` or `::1`.
    #[error("peer address is loopback")]
    Loopback,
    /// RFC 1918 space, IPv6 unique-local and site-local, local-use NAT64.
    #[error("peer address is private")]
    Private,
    /// `100.64.0.0/10`, carrier-grade NAT space (RFC 6598).
    #[error("peer address is in shared (CGNAT) address space")]
    SharedAddressSpace,
    /// `169.254.0.0/16` or `fe80::/10`.
    #[error("peer address is link-local")]
    LinkLocal,
    /// A cloud instance-metadata endpoint.
    #[error("peer address is a cloud metadata endpoint")]
    Metadata,
    /// `224.0.0.0/4` or `ff00::/8`.
    #[error("peer address is multicast")]
    Multicast,
    /// `255.255.255.255`.
    #[error("peer address is the limited broadcast address")]
    Broadcast,
    /// Documentation prefixes (RFC 5737, RFC 3849, RFC 9637).
    #[error("peer address is reserved for documentation")]
    Documentation,
    /// Reserved, special-purpose or unallocated space.
    #[error("peer address is reserved")]
    Reserved,
    /// `198.18.0.0/15`, benchmarking (RFC 2544).
    #[error("peer address is reserved for benchmarking")]
    Benchmarking,
    /// Matched the operator's `denied_peer_ranges`.
    #[error("peer address is in a denied peer range")]
    ConfiguredDeny,
    /// One of this server's relay addresses, but outside the relay port range.
    #[error("peer is this relay's own address on a port outside the relay range")]
    RelayPortOutOfRange,
}

impl Denial {
    /// Every variant, for pre-registering metric labels.
    pub const ALL: &'static [Denial] = &[
        Denial::Unspecified,
        Denial::Loopback,
        Denial::Private,
        Denial::SharedAddressSpace,
        Denial::LinkLocal,
        Denial::Metadata,
        Denial::Multicast,
        Denial::Broadcast,
        Denial::Documentation,
        Denial::Reserved,
        Denial::Benchmarking,
        Denial::ConfiguredDeny,
        Denial::RelayPortOutOfRange,
    ];

    /// Short stable label; changing one breaks dashboards, so don't.
    pub fn as_str(self) -> &'static str {
        match self {
            Denial::Unspecified => "unspecified",
            Denial::Loopback => "loopback",
            Denial::Private => "private",
            Denial::SharedAddressSpace => "shared_address_space",
            Denial::LinkLocal => "link_local",
            Denial::Metadata => "metadata",
            Denial::Multicast => "multicast",
            Denial::Broadcast => "broadcast",
            Denial::Documentation => "documentation",
            Denial::Reserved => "reserved",
            Denial::Benchmarking => "benchmarking",
            Denial::ConfiguredDeny => "configured_deny",
            Denial::RelayPortOutOfRange => "relay_port_out_of_range",
        }
    }
}

/// Reduces IPv4-embedded IPv6 forms to the IPv4 address they carry.
///
/// Handled: IPv4-mapped `::ffff:a.b.c.d`; deprecated IPv4-compatible
/// `::a.b.c.d` (but not `::` or `::1`, which are IPv6's own unspecified and
/// loopback); NAT64 well-known prefix `64:ff9b::/96`; 6to4 `2002::/16` (IPv4
/// in bits 16..48); Teredo `2001:0::/32` (client IPv4 in the last 32 bits,
/// inverted). Every other address is returned unchanged, so the result is
/// never itself an embedded form and normalising twice changes nothing.
pub fn normalise(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
    }
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from_be_bytes(v6.octets());
    // Truncation is the point: the embedded address is the low 32 bits.
    let low32 = bits as u32;
    match v6.segments() {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(Ipv4Addr::from(low32)),
        [0, 0, 0, 0, 0, 0, _, _] if bits > 1 => Some(Ipv4Addr::from(low32)),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(Ipv4Addr::from(low32)),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::from(u32::from(hi) << 16 | u32::from(lo))),
        // RFC 4380 §4: the client address is stored bit-inverted so that
        // NATs rewriting IPv4 addresses in payloads leave it alone.
        [0x2001, 0, ..] => Some(Ipv4Addr::from(!low32)),
        _ => None,
    }
}

/// The built-in verdict on an address: `None` if globally routable,
/// `Some(reason)` if denied by default.
///
/// Meant for normalised addresses; it normalises anyway, so an embedded form
/// passed by mistake is judged by the IPv4 address it carries rather than
/// slipping through as "global unicast IPv6" (6to4 lies in `2000::/3`).
pub fn classify(ip: IpAddr) -> Option<Denial> {
    classify_normalised(normalise(ip))
}

fn classify_normalised(ip: IpAddr) -> Option<Denial> {
    match ip {
        IpAddr::V4(v4) => first_match(V4_RULES, u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => {
            let bits = u128::from_be_bytes(v6.octets());
            first_match(V6_RULES, bits, 128).or_else(|| {
                // Only 2000::/3 is allocated as global unicast; anything else
                // that the table did not name is not a place to relay to.
                (!prefix_matches(bits, GLOBAL_UNICAST, 3, 128)).then_some(Denial::Reserved)
            })
        }
    }
}

/// One built-in rule: addresses whose top `len` bits equal `net`'s.
/// IPv4 rules keep the address in the low 32 bits of the `u128`.
#[derive(Clone, Copy)]
struct Rule {
    net: u128,
    len: u8,
    why: Denial,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8, why: Denial) -> Rule {
    let net = u32::from_be_bytes([a, b, c, d]) as u128;
    Rule { net, len, why }
}

const fn v6(addr: Ipv6Addr, len: u8, why: Denial) -> Rule {
    let net = u128::from_be_bytes(addr.octets());
    Rule { net, len, why }
}

const fn seg(s: [u16; 8]) -> Ipv6Addr {
    Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])
}

const GLOBAL_UNICAST: u128 = 0x2000 << 112;

// First match wins, so single metadata addresses come before the ranges that
// contain them (metrics should say "metadata", not "link_local"), and the
// broadcast address before 240/4.
const V4_RULES: &[Rule] = &{
    use Denial::*;
    [
        v4(169, 254, 169, 254, 32, Metadata), // AWS, GCP, Azure IMDS, OCI, ...
        v4(169, 254, 170, 2, 32, Metadata),   // AWS ECS task credentials
        v4(168, 63, 129, 16, 32, Metadata),   // Azure wireserver, in public space
        v4(100, 100, 100, 200, 32, Metadata), // Alibaba Cloud, inside 100.64/10
        v4(0, 0, 0, 0, 8, Unspecified),
        v4(10, 0, 0, 0, 8, Private),
        v4(100, 64, 0, 0, 10, SharedAddressSpace),
        v4(127, 0, 0, 0, 8, Loopback),
        v4(169, 254, 0, 0, 16, LinkLocal),
        v4(172, 16, 0, 0, 12, Private),
        // Also holds 192.0.0.9 and .10 (PCP and TURN anycast), which IANA marks
        // global; a relay has no business forwarding there.
        v4(192, 0, 0, 0, 24, Reserved),
        v4(192, 0, 2, 0, 24, Documentation),
        v4(192, 88, 99, 0, 24, Reserved), // deprecated 6to4 relay anycast
        v4(192, 168, 0, 0, 16, Private),
        v4(198, 18, 0, 0, 15, Benchmarking),
        v4(198, 51, 100, 0, 24, Documentation),
        v4(203, 0, 113, 0, 24, Documentation),
        v4(224, 0, 0, 0, 4, Multicast),
        v4(255, 255, 255, 255, 32, Broadcast),
        v4(240, 0, 0, 0, 4, Reserved),
    ]
};

const V6_RULES: &[Rule] = &{
    use Denial::*;
    [
        v6(seg([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254]), 128, Metadata), // AWS IMDS
        v6(Ipv6Addr::UNSPECIFIED, 128, Unspecified),
        v6(Ipv6Addr::LOCALHOST, 128, Loopback),
        v6(seg([0xfe80, 0, 0, 0, 0, 0, 0, 0]), 10, LinkLocal),
        v6(seg([0xfec0, 0, 0, 0, 0, 0, 0, 0]), 10, Private), // old site-local
        v6(seg([0xfc00, 0, 0, 0, 0, 0, 0, 0]), 7, Private),  // unique local
        v6(seg([0xff00, 0, 0, 0, 0, 0, 0, 0]), 8, Multicast),
        v6(seg([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0]), 32, Documentation),
        v6(seg([0x3fff, 0, 0, 0, 0, 0, 0, 0]), 20, Documentation),
        v6(seg([0x100, 0, 0, 0, 0, 0, 0, 0]), 64, Reserved), // discard-only
        // Local-use NAT64 prefix: translates into whatever the operator's
        // NAT64 reaches, typically internal networks.
        v6(seg([0x64, 0xff9b, 1, 0, 0, 0, 0, 0]), 48, Private),
        v6(seg([0x2001, 0x10, 0, 0, 0, 0, 0, 0]), 28, Reserved), // ORCHID
        v6(seg([0x2001, 0x20, 0, 0, 0, 0, 0, 0]), 28, Reserved), // ORCHIDv2
        // IETF protocol assignments; its Teredo /32 never gets here because
        // normalise has already turned it into IPv4.
        v6(seg([0x2001, 0, 0, 0, 0, 0, 0, 0]), 23, Reserved),
        // SRv6 SIDs: already outside 2000::/3, named so the intent survives
        // if that catch-all ever changes.
        v6(seg([0x5f00, 0, 0, 0, 0, 0, 0, 0]), 16, Reserved),
    ]
};

fn first_match(rules: &[Rule], bits: u128, width: u8) -> Option<Denial> {
    rules
        .iter()
        .find(|r| prefix_matches(bits, r.net, r.len, width))
        .map(|r| r.why)
}

fn prefix_matches(bits: u128, net: u128, len: u8, width: u8) -> bool {
    // len == 0 would need a shift by the full width, which overflows.
    len == 0 || (bits ^ net) >> (width - len.min(width)) == 0
}

/// Peer policy for one server, built once from configuration.
///
/// Immutable once built: a config reload builds a new one and swaps it in.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    allowed: Vec<IpNet>,
    denied: Vec<IpNet>,
    relay_ips: Vec<IpAddr>,
    relay_ports: RangeInclusive<u16>,
}

impl PeerPolicy {
    /// `allowed`/`denied` are the operator's `allowed_peer_ranges` and
    /// `denied_peer_ranges`; `relay_ips` are this server's own relayed
    /// addresses (advertised external IP, relay bind IP) and `relay_ports`
    /// the relay port range.
    ///
    /// Unspecified relay IPs (a `0.0.0.0` wildcard bind) are dropped: they
    /// name no address a peer could use, and treating `0.0.0.0` as "us"
    /// would let clients address the host's loopback through it.
    pub fn new(
        allowed: Vec<IpNet>,
        mut denied: Vec<IpNet>,
        relay_ips: Vec<IpAddr>,
        relay_ports: RangeInclusive<u16>,
    ) -> Self {
        let lifted: Vec<IpNet> = denied.iter().filter_map(mapped_v4_net).collect();
        denied.extend(lifted);
        let mut relay_ips: Vec<IpAddr> = relay_ips
            .into_iter()
            .filter(|ip| !ip.is_unspecified())
            .collect();
        relay_ips.sort_unstable();
        relay_ips.dedup();
        PeerPolicy {
            allowed,
            denied,
            relay_ips,
            relay_ports,
        }
    }

    /// For CreatePermission, which names an address but no port.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Denial> {
        if self.relay_ips.contains(&ip) {
            return Ok(());
        }
        self.judge(ip, normalise(ip))
    }

    /// For Send indications and ChannelBind, which name a port too.
    pub fn check(&self, peer: SocketAddr) -> Result<(), Denial> {
        if self.relay_ips.contains(&peer.ip()) {
            return if self.relay_ports.contains(&peer.port()) {
                Ok(())
            } else {
                Err(Denial::RelayPortOutOfRange)
            };
        }
        self.judge(peer.ip(), normalise(peer.ip()))
    }

    fn judge(&self, raw: IpAddr, norm: IpAddr) -> Result<(), Denial> {
        if any_contains(&self.allowed, raw, norm) {
            return Ok(());
        }
        if any_contains(&self.denied, raw, norm) {
            return Err(Denial::ConfiguredDeny);
        }
        match classify_normalised(norm) {
            None => Ok(()),
            Some(why) => Err(why),
        }
    }
}

fn any_contains(nets: &[IpNet], raw: IpAddr, norm: IpAddr) -> bool {
    nets.iter()
        .any(|n| n.contains(&raw) || (norm != raw && n.contains(&norm)))
}

/// The IPv4 range an IPv4-mapped range (inside `::ffff:0:0/96`) stands for.
fn mapped_v4_net(net: &IpNet) -> Option<IpNet> {
    let IpNet::V6(net) = net else { return None };
    // A shorter prefix reaches outside ::ffff:0:0/96 and embeds nothing.
    let len = net.prefix_len().checked_sub(96)?;
    let v4 = net.network().to_ipv4_mapped()?;
    Ipv4Net::new(v4, len).ok().map(IpNet::V4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::net::Ipv6Addr;
    use Denial::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address literal")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test range literal")
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test socket address literal")
    }

    fn from_bits(bits: u128) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(bits))
    }

    fn mapped(v4: Ipv4Addr) -> IpAddr {
        IpAddr::V6(v4.to_ipv6_mapped())
    }

    fn compatible(v4: Ipv4Addr) -> IpAddr {
        from_bits(u128::from(u32::from(v4)))
    }

    fn nat64(v4: Ipv4Addr) -> IpAddr {
        from_bits(0x64_ff9b << 96 | u128::from(u32::from(v4)))
    }

    fn six_to_four(v4: Ipv4Addr) -> IpAddr {
        from_bits(0x2002 << 112 | u128::from(u32::from(v4)) << 80 | 1)
    }

    fn teredo(v4: Ipv4Addr) -> IpAddr {
        // Server 65.54.227.120, cone flag, obfuscated port 40000, as in RFC 4380 examples.
        from_bits(0x2001_0000_4136_e378_8000_63bf << 32 | u128::from(!u32::from(v4)))
    }

    fn default_policy() -> PeerPolicy {
        PeerPolicy::new(vec![], vec![], vec![], 49152..=65535)
    }

    fn midpoint(a: IpAddr, b: IpAddr) -> IpAddr {
        match (a, b) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let (a, b) = (u32::from(a), u32::from(b));
                IpAddr::V4(Ipv4Addr::from(a + (b - a) / 2))
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let (a, b) = (u128::from(a), u128::from(b));
                from_bits(a + (b - a) / 2)
            }
            _ => panic!("mixed families in range table"),
        }
    }

    /// Each built-in range as a CIDR, or as "first-last" where a more
    /// specific rule sits at an edge of the CIDR or the range is no CIDR.
    const RANGES: &[(&str, Denial)] = &[
        ("0.0.0.0/8", Unspecified),
        ("10.0.0.0/8", Private),
        ("100.64.0.0/10", SharedAddressSpace),
        ("127.0.0.0/8", Loopback),
        ("169.254.0.0/16", LinkLocal),
        ("172.16.0.0/12", Private),
        ("192.0.0.0/24", Reserved),
        ("192.0.2.0/24", Documentation),
        ("192.88.99.0/24", Reserved),
        ("192.168.0.0/16", Private),
        ("198.18.0.0/15", Benchmarking),
        ("198.51.100.0/24", Documentation),
        ("203.0.113.0/24", Documentation),
        ("224.0.0.0/4", Multicast),
        ("240.0.0.0-255.255.255.254", Reserved),
        ("255.255.255.255/32", Broadcast),
        ("::/128", Unspecified),
        ("::1/128", Loopback),
        (
            "0:0:0:1::-1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            Reserved,
        ),
        ("100::/64", Reserved),
        ("64:ff9b:1::/48", Private),
        ("2001:1::-2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", Reserved),
        ("2001:10::/28", Reserved),
        ("2001:20::/28", Reserved),
        ("2001:db8::/32", Documentation),
        ("3fff::/20", Documentation),
        ("5f00::/16", Reserved),
        ("4000::-fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Reserved),
        ("fc00::/7", Private),
        ("fe00::/9", Reserved),
        ("fe80::/10", LinkLocal),
        ("fec0::/10", Private),
        ("ff00::/8", Multicast),
    ];

    fn bounds(range: &str) -> (IpAddr, IpAddr) {
        match range.split_once('-') {
            Some((first, last)) => (ip(first), ip(last)),
            None => (net(range).network(), net(range).broadcast()),
        }
    }

    /// Just outside some range, and globally routable.
    const PUBLIC: &str = "\
        1.0.0.0 1.1.1.1 8.8.8.8 9.255.255.255 11.0.0.0 100.63.255.255 100.128.0.0 \
        126.255.255.255 128.0.0.0 168.63.129.15 168.63.129.17 169.253.255.255 \
        169.255.0.0 172.15.255.255 172.32.0.0 191.255.255.255 192.0.1.0 192.0.3.0 \
        192.88.98.255 192.88.100.0 192.167.255.255 192.169.0.0 198.17.255.255 \
        198.20.0.0 198.51.99.255 198.51.101.0 203.0.112.255 203.0.114.0 223.255.255.255 \
        2000:: 2001:200:: 2001:db7:ffff:ffff:ffff:ffff:ffff:ffff 2001:db9:: \
        2001:4860:4860::8888 2003::1 2606:4700::1111 \
        3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff 3fff:1000:: \
        3fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";

    #[test]
    fn every_builtin_range_denied_at_first_middle_and_last() {
        for &(range, why) in RANGES {
            let (first, last) = bounds(range);
            for addr in [first, midpoint(first, last), last] {
                assert_eq!(classify(addr), Some(why), "{addr}");
                assert_eq!(default_policy().check_ip(addr), Err(why), "{addr}");
            }
        }
    }

    #[test]
    fn addresses_just_outside_ranges_are_allowed() {
        for s in PUBLIC.split_whitespace() {
            assert_eq!(classify(ip(s)), None, "{s}");
            assert_eq!(
                default_policy().check(SocketAddr::new(ip(s), 3478)),
                Ok(()),
                "{s}"
            );
        }
    }

    #[test]
    fn public_neighbours_really_border_a_denied_range() {
        // Guards the PUBLIC table against drifting into meaningless entries.
        let step = |a: IpAddr, up: bool| match a {
            IpAddr::V4(v) => u32::from(v)
                .checked_add_signed(if up { 1 } else { -1 })
                .map(|n| IpAddr::V4(n.into())),
            IpAddr::V6(v) => u128::from(v)
                .checked_add_signed(if up { 1 } else { -1 })
                .map(from_bits),
        };
        let exempt = [
            "1.1.1.1",
            "8.8.8.8",
            "2001:4860:4860::8888",
            "2606:4700::1111",
            "2003::1",
        ];
        for s in PUBLIC.split_whitespace().filter(|s| !exempt.contains(s)) {
            let borders = [true, false]
                .into_iter()
                .filter_map(|up| step(ip(s), up))
                .any(|n| classify(n).is_some());
            assert!(borders, "{s} borders no denied range");
        }
    }

    #[test]
    fn metadata_endpoints_win_over_their_enclosing_range() {
        for s in [
            "169.254.169.254",
            "169.254.170.2",
            "168.63.129.16",
            "100.100.100.200",
            "fd00:ec2::254",
        ] {
            assert_eq!(classify(ip(s)), Some(Metadata), "{s}");
        }
        assert_eq!(classify(ip("169.254.169.253")), Some(LinkLocal));
        assert_eq!(classify(ip("169.254.169.255")), Some(LinkLocal));
        assert_eq!(classify(ip("100.100.100.199")), Some(SharedAddressSpace));
        assert_eq!(classify(ip("100.100.100.201")), Some(SharedAddressSpace));
        assert_eq!(classify(ip("fd00:ec2::253")), Some(Private));
    }

    const INNER: &[(&str, Option<Denial>)] = &[
        ("127.0.0.1", Some(Loopback)),
        ("10.1.2.3", Some(Private)),
        ("192.168.1.1", Some(Private)),
        ("100.64.0.1", Some(SharedAddressSpace)),
        ("169.254.169.254", Some(Metadata)),
        ("100.100.100.200", Some(Metadata)),
        ("168.63.129.16", Some(Metadata)),
        ("224.0.0.1", Some(Multicast)),
        ("255.255.255.255", Some(Broadcast)),
        ("0.0.0.2", Some(Unspecified)),
        ("8.8.8.8", None),
        ("1.1.1.1", None),
    ];

    #[test]
    fn every_embedded_form_is_judged_by_its_ipv4() {
        type Form = fn(Ipv4Addr) -> IpAddr;
        let forms: [(&str, Form); 5] = [
            ("mapped", mapped),
            ("compatible", compatible),
            ("nat64", nat64),
            ("6to4", six_to_four),
            ("teredo", teredo),
        ];
        for &(inner, why) in INNER {
            let IpAddr::V4(v4) = ip(inner) else {
                panic!("INNER holds IPv4 only")
            };
            for (name, form) in forms {
                let outer = form(v4);
                assert_eq!(normalise(outer), IpAddr::V4(v4), "{name} {outer}");
                assert_eq!(classify(outer), why, "{name} {outer}");
                let verdict = why.map_or(Ok(()), Err);
                assert_eq!(default_policy().check_ip(outer), verdict, "{name} {outer}");
            }
        }
    }

    #[test]
    fn embedded_form_edge_cases() {
        let cases: &[(&str, &str)] = &[
            // IPv6's own unspecified and loopback are not IPv4-compatible forms.
            ("::", "::"),
            ("::1", "::1"),
            ("::2", "0.0.0.2"),
            ("::ffff:ffff", "255.255.255.255"),
            ("::0.1.0.0", "0.1.0.0"),
            ("::ffff:0:0", "0.0.0.0"),
            ("::ffff:7f00:1", "127.0.0.1"),
            ("::ffff:ffff:ffff", "255.255.255.255"),
            ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
            ("64:ff9b::", "0.0.0.0"),
            ("2002:c0a8:0101::1", "192.168.1.1"),
            ("2002:7f00:1:ffff:ffff:ffff:ffff:ffff", "127.0.0.1"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"),
            ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1"),
            ("2001::", "255.255.255.255"),
            ("2001:0:ffff:ffff:ffff:ffff:ffff:ffff", "0.0.0.0"),
            // Not embedded forms: left alone.
            ("::1:0:0:0", "::1:0:0:0"),
            ("::ffff:0:1:2", "::ffff:0:1:2"),
            ("::fffe:7f00:1", "::fffe:7f00:1"),
            ("64:ff9b:1::7f00:1", "64:ff9b:1::7f00:1"),
            ("64:ff9a::7f00:1", "64:ff9a::7f00:1"),
            ("2001:1::7f00:1", "2001:1::7f00:1"),
            ("2001:db8::1", "2001:db8::1"),
            ("2003:7f00:1::", "2003:7f00:1::"),
            ("2606:4700::1111", "2606:4700::1111"),
            ("127.0.0.1", "127.0.0.1"),
        ];
        for &(input, want) in cases {
            assert_eq!(normalise(ip(input)), ip(want), "{input}");
        }
        assert_eq!(classify(ip("::")), Some(Unspecified));
        assert_eq!(classify(ip("::1")), Some(Loopback));
        assert_eq!(classify(ip("::ffff:0:0")), Some(Unspecified));
        assert_eq!(classify(ip("::ffff:127.0.0.1")), Some(Loopback));
        assert_eq!(classify(ip("64:ff9b::a9fe:a9fe")), Some(Metadata));
        assert_eq!(classify(ip("2002:c0a8:0101::1")), Some(Private));
        assert_eq!(classify(ip("64:ff9b:1::7f00:1")), Some(Private));
        assert_eq!(classify(ip("::1:0:0:0")), Some(Reserved));
        assert_eq!(classify(ip("::ffff:0:1:2")), Some(Reserved));
        assert_eq!(classify(ip("2002:0808:0808::1")), None);
    }

    #[test]
    fn relay_ip_on_loopback_is_reachable_only_on_relay_ports() {
        let p = PeerPolicy::new(vec![], vec![], vec![ip("127.0.0.1")], 49152..=65535);
        assert_eq!(p.check_ip(ip("127.0.0.1")), Ok(()));
        assert_eq!(p.check_ip(ip("::ffff:127.0.0.1")), Err(Loopback));
        for ok in ["127.0.0.1:50000", "127.0.0.1:49152", "127.0.0.1:65535"] {
            assert_eq!(p.check(sa(ok)), Ok(()), "{ok}");
        }
        assert_eq!(p.check(sa("[::ffff:127.0.0.1]:50000")), Err(Loopback));
        for bad in ["127.0.0.1:22", "127.0.0.1:49151", "127.0.0.1:0"] {
            assert_eq!(p.check(sa(bad)), Err(RelayPortOutOfRange), "{bad}");
        }
        // Other loopback addresses are not the relay.
        assert_eq!(p.check_ip(ip("127.0.0.2")), Err(Loopback));
        assert_eq!(p.check(sa("127.0.0.2:50000")), Err(Loopback));
        assert_eq!(p.check(sa("[::1]:50000")), Err(Loopback));
    }

    #[test]
    fn relay_ip_exemption_needs_the_exact_address() {
        let p = PeerPolicy::new(vec![], vec![], vec![ip("127.0.0.1")], 3000..=3999);
        assert_eq!(p.check_ip(ip("127.0.0.1")), Ok(()));
        assert_eq!(p.check(sa("127.0.0.1:3000")), Ok(()));
        assert_eq!(p.check(sa("127.0.0.1:4000")), Err(RelayPortOutOfRange));
        // Embedded spellings of our relay are judged like any other address.
        assert_eq!(p.check_ip(ip("::ffff:127.0.0.1")), Err(Loopback));
        assert_eq!(p.check(sa("[64:ff9b::7f00:1]:3999")), Err(Loopback));
    }

    #[test]
    fn relay_ip_rule_is_terminal_even_inside_an_allowed_range() {
        let p = PeerPolicy::new(
            vec![net("203.0.113.0/24")],
            vec![],
            vec![ip("203.0.113.5"), ip("2001:db8::5")],
            49152..=65535,
        );
        assert_eq!(p.check(sa("203.0.113.5:22")), Err(RelayPortOutOfRange));
        assert_eq!(p.check(sa("203.0.113.5:60000")), Ok(()));
        assert_eq!(p.check(sa("203.0.113.6:22")), Ok(()));
        assert_eq!(p.check(sa("[2001:db8::5]:22")), Err(RelayPortOutOfRange));
        assert_eq!(p.check(sa("[2001:db8::5]:60000")), Ok(()));
        assert_eq!(p.check(sa("[2001:db8::6]:60000")), Err(Documentation));
    }

    #[test]
    fn wildcard_relay_ip_is_ignored() {
        let p = PeerPolicy::new(vec![], vec![], vec![ip("0.0.0.0"), ip("::")], 49152..=65535);
        assert_eq!(p.check(sa("0.0.0.0:50000")), Err(Unspecified));
        assert_eq!(p.check(sa("[::]:50000")), Err(Unspecified));
    }

    #[test]
    fn allowed_beats_denied() {
        let p = PeerPolicy::new(
            vec![net("10.1.0.0/16"), net("8.8.8.8/32")],
            vec![net("10.0.0.0/8"), net("8.8.8.0/24")],
            vec![],
            49152..=65535,
        );
        assert_eq!(p.check_ip(ip("10.1.2.3")), Ok(()));
        assert_eq!(p.check_ip(ip("10.2.0.1")), Err(ConfiguredDeny));
        assert_eq!(p.check_ip(ip("8.8.8.8")), Ok(()));
        assert_eq!(p.check_ip(ip("8.8.8.9")), Err(ConfiguredDeny));
    }

    #[test]
    fn denied_ranges_deny_public_addresses_in_every_spelling() {
        let p = PeerPolicy::new(vec![], vec![net("8.8.8.0/24")], vec![], 49152..=65535);
        for s in [
            "8.8.8.8",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(p.check_ip(ip(s)), Err(ConfiguredDeny), "{s}");
        }
        assert_eq!(p.check(sa("8.8.8.8:53")), Err(ConfiguredDeny));
        assert_eq!(p.check_ip(ip("8.8.4.4")), Ok(()));
        // A private address in a denied range reports the operator's reason.
        let p = PeerPolicy::new(vec![], vec![net("10.0.0.0/8")], vec![], 1..=2);
        assert_eq!(p.check_ip(ip("10.0.0.1")), Err(ConfiguredDeny));
    }

    #[test]
    fn denied_ranges_match_the_raw_address_too() {
        let p = PeerPolicy::new(vec![], vec![net("2002::/16")], vec![], 49152..=65535);
        assert_eq!(p.check_ip(ip("2002:808:808::1")), Err(ConfiguredDeny));
        assert_eq!(p.check_ip(ip("8.8.8.8")), Ok(()));
    }

    #[test]
    fn denied_mapped_ranges_also_deny_plain_ipv4() {
        let p = PeerPolicy::new(vec![], vec![net("::ffff:8.8.8.0/120")], vec![], 1..=2);
        for s in [
            "8.8.8.8",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::",
        ] {
            assert_eq!(p.check_ip(ip(s)), Err(ConfiguredDeny), "{s}");
        }
        assert_eq!(p.check_ip(ip("8.8.4.4")), Ok(()));
        let all_v4 = Some(net("0.0.0.0/0"));
        assert_eq!(mapped_v4_net(&net("::ffff:0:0/96")), all_v4);
        assert_eq!(
            mapped_v4_net(&net("::ffff:a00:0/104")),
            Some(net("10.0.0.0/8"))
        );
        assert_eq!(mapped_v4_net(&net("::ffff:0:0/95")), None);
        assert_eq!(mapped_v4_net(&net("::/96")), None);
        assert_eq!(mapped_v4_net(&net("64:ff9b::/96")), None);
        assert_eq!(mapped_v4_net(&net("10.0.0.0/8")), None);
    }

    #[test]
    fn denied_nat64_prefix_does_not_deny_all_ipv4() {
        let p = PeerPolicy::new(vec![], vec![net("64:ff9b::/96")], vec![], 1..=2);
        assert_eq!(p.check_ip(ip("64:ff9b::808:808")), Err(ConfiguredDeny));
        assert_eq!(p.check_ip(ip("8.8.8.8")), Ok(()));
    }

    #[test]
    fn allowed_range_opens_denied_space() {
        let p = PeerPolicy::new(
            vec![net("203.0.113.0/24"), net("10.0.0.0/8"), net("fd00::/8")],
            vec![],
            vec![],
            49152..=65535,
        );
        for s in [
            "203.0.113.9",
            "::ffff:203.0.113.9",
            "10.1.2.3",
            "::ffff:10.1.2.3",
            "fd00::1",
        ] {
            assert_eq!(p.check_ip(ip(s)), Ok(()), "{s}");
        }
        assert_eq!(p.check(sa("203.0.113.9:22")), Ok(()));
        assert_eq!(p.check_ip(ip("198.51.100.1")), Err(Documentation));
        assert_eq!(p.check_ip(ip("fc00::1")), Err(Private));
        assert_eq!(p.check_ip(ip("127.0.0.1")), Err(Loopback));
    }

    #[test]
    fn allowed_embedded_ranges_are_not_widened() {
        let p = PeerPolicy::new(vec![net("64:ff9b::/96")], vec![], vec![], 1..=2);
        assert_eq!(p.check_ip(ip("64:ff9b::a00:1")), Ok(()));
        assert_eq!(p.check_ip(ip("10.0.0.1")), Err(Private));
    }

    #[test]
    fn unconfigured_policy_agrees_with_classify() {
        let p = default_policy();
        for &(range, _) in RANGES {
            let (first, last) = bounds(range);
            for a in [first, last] {
                let verdict = classify(a).map_or(Ok(()), Err);
                assert_eq!(p.check_ip(a), verdict, "{a}");
                assert_eq!(p.check(SocketAddr::new(a, 9)), verdict, "{a}");
            }
        }
    }

    #[test]
    fn denial_labels_are_unique_snake_case_and_complete() {
        let mut seen = HashSet::new();
        for d in Denial::ALL {
            let label = d.as_str();
            assert!(seen.insert(label), "duplicate label {label}");
            assert!(!label.is_empty() && !label.starts_with('_') && !label.ends_with('_'));
            assert!(!label.contains("__"), "{label}");
            assert!(
                label.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{label}"
            );
            assert!(!d.to_string().is_empty());
        }
        // Every reason classify can produce is listed in ALL.
        for &(_, why) in RANGES {
            assert!(Denial::ALL.contains(&why), "{why:?}");
        }
        assert!(Denial::ALL.contains(&Metadata));
        assert!(Denial::ALL.contains(&ConfiguredDeny));
        assert!(Denial::ALL.contains(&RelayPortOutOfRange));
    }

    fn any_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, l)| {
                IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).expect("prefix <= 32"))
            }),
            (any::<u128>(), 0u8..=128).prop_map(|(a, l)| {
                IpNet::V6(ipnet::Ipv6Net::new(Ipv6Addr::from(a), l).expect("prefix <= 128"))
            }),
        ]
    }

    fn any_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|a| IpAddr::V4(a.into())),
            any::<u128>().prop_map(from_bits),
            any::<u32>().prop_map(|a| mapped(a.into())),
            any::<u32>().prop_map(|a| nat64(a.into())),
            any::<u32>().prop_map(|a| six_to_four(a.into())),
            any::<u32>().prop_map(|a| teredo(a.into())),
        ]
    }

    proptest! {
        #[test]
        fn embedded_forms_classify_like_their_ipv4(a in any::<u32>()) {
            let v4 = Ipv4Addr::from(a);
            let want = classify(IpAddr::V4(v4));
            let p = default_policy();
            let mut forms = vec![mapped(v4), nat64(v4), six_to_four(v4), teredo(v4)];
            if a > 1 {
                forms.push(compatible(v4));
            }
            for outer in forms {
                prop_assert_eq!(normalise(outer), IpAddr::V4(v4));
                prop_assert_eq!(classify(normalise(outer)), want);
                prop_assert_eq!(classify(outer), want);
                prop_assert_eq!(p.check_ip(outer), p.check_ip(IpAddr::V4(v4)));
            }
        }

        #[test]
        fn normalise_is_idempotent(a in any_ip()) {
            let once = normalise(a);
            prop_assert_eq!(normalise(once), once);
            prop_assert_eq!(classify(a), classify(once));
        }

        #[test]
        fn check_never_panics_and_matches_check_ip_off_relay(
            allowed in prop::collection::vec(any_net(), 0..4),
            denied in prop::collection::vec(any_net(), 0..4),
            relays in prop::collection::vec(any_ip(), 0..3),
            lo in any::<u16>(),
            hi in any::<u16>(),
            peer in any_ip(),
            port in any::<u16>(),
            aim_at_relay in any::<bool>(),
            pick in any::<prop::sample::Index>(),
        ) {
            // Random addresses almost never hit a relay IP; aim at one half the time.
            let peer = match relays.len() {
                n if aim_at_relay && n > 0 => relays[pick.index(n)],
                _ => peer,
            };
            let relay_set: Vec<IpAddr> = relays.clone();
            let p = PeerPolicy::new(allowed, denied, relays, lo..=hi);
            let by_addr = p.check_ip(peer);
            let by_sock = p.check(SocketAddr::new(peer, port));
            if !relay_set.contains(&peer) || peer.is_unspecified() {
                prop_assert_eq!(by_addr, by_sock);
            } else {
                prop_assert_eq!(by_addr, Ok(()));
                let in_range = (lo..=hi).contains(&port);
                prop_assert_eq!(by_sock.is_ok(), in_range);
            }
        }
    }
}
