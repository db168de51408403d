//! The XDP program run on packets by the kernel (`BPF_PROG_TEST_RUN`),
//! table by table: each direction in IPv4 and IPv6, wildcard listeners
//! and relay sockets, and every case that must go to user space
//! unchanged. Checksums of what comes out are recomputed from scratch.
//!
//! Needs root (loading a program, a network namespace of its own with
//! veth pairs, so the FIB and neighbour lookups have something to
//! find). Under CI (`CI=true`, as root) a failure to set up fails the
//! test; elsewhere, without root, the tests say so and return.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use super::maps::{test_run, Entry, Reason};
use super::Loaded;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const OUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// Whether these tests can run here; false (with a line saying why)
/// only outside CI.
pub(crate) fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "the XDP tests need root, and CI runs as root"
    );
    eprintln!("skipped: the XDP tests need root");
    false
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().expect("sh");
    assert!(st.success(), "{cmd}");
}

/// Runs `f` on a thread in a new network namespace holding
/// d0 (192.0.2.1/24, 2001:db8::1/64, MAC 02::01; default routes via
/// 192.0.2.254 / 2001:db8::fe, MAC 02::fe) and d1 (10.9.0.1/24, one
/// neighbour 10.9.0.5). The namespace goes with the thread.
fn in_netns<T: Send + 'static>(forwarding: bool, f: impl FnOnce(u32) -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare on this thread only; it owns no other namespace state.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        sh("ip link set lo up \
            && ip link add d0 address 02:00:00:00:00:01 type veth peer name d0p && ip link set d0 up && ip link set d0p up \
            && ip addr add 192.0.2.1/24 dev d0 && ip -6 addr add 2001:db8::1/64 dev d0 nodad \
            && ip neigh add 192.0.2.254 lladdr 02:00:00:00:00:fe dev d0 nud permanent \
            && ip -6 neigh add 2001:db8::fe lladdr 02:00:00:00:00:fe dev d0 nud permanent \
            && ip route add default via 192.0.2.254 \
            && ip -6 route add default via 2001:db8::fe \
            && ip link add d1 address 02:00:00:00:00:11 type veth peer name d1p && ip link set d1 up && ip link set d1p up \
            && ip addr add 10.9.0.1/24 dev d1 \
            && ip neigh add 10.9.0.5 lladdr 02:00:00:00:00:15 dev d1 nud permanent");
        // Before forwarding is on, the FIB helper answers nothing: the
        // program passes, and says why.
        if forwarding {
            sh("sysctl -qw net.ipv4.conf.d0.forwarding=1 net.ipv6.conf.d0.forwarding=1");
        }
        let name = std::ffi::CString::new("d0").unwrap();
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0);
        f(ifindex)
    })
    .join()
    .expect("the namespace thread panicked")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| (u32::from(c[0]) << 8) | u32::from(*c.get(1).unwrap_or(&0)))
        .sum()
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The UDP checksum of `udp` (its check field taken as zero), from scratch.
fn udp_csum(src: IpAddr, dst: IpAddr, udp: &[u8]) -> u16 {
    let mut seg = udp.to_vec();
    seg[6] = 0;
    seg[7] = 0;
    let acc = sum(&ip_bytes(src)) + sum(&ip_bytes(dst)) + 17 + udp.len() as u32 + sum(&seg);
    match !fold(acc) {
        0 => 0xffff,
        c => c,
    }
}

/// An Ethernet frame from the gateway carrying UDP `from` → `to`.
fn frame(from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&from.port().to_be_bytes());
    udp.extend_from_slice(&to.port().to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let c = udp_csum(from.ip(), to.ip(), &udp);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&OUR_MAC);
    f.extend_from_slice(&GW_MAC);
    match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&[0x08, 0x00]);
            let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 60, 17, 0, 0];
            ip[2..4].copy_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = !fold(sum(&ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&[0x86, 0xdd]);
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(udp.len() as u16).to_be_bytes());
            f.extend_from_slice(&[17, 60]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        _ => panic!("one family"),
    }
    f.extend_from_slice(&udp);
    f
}

fn channel_data(channel: u16, app: &[u8]) -> Vec<u8> {
    let mut m = channel.to_be_bytes().to_vec();
    m.extend_from_slice(&(app.len() as u16).to_be_bytes());
    m.extend_from_slice(app);
    m
}

/// What left XDP, parsed and checked: source, destination, UDP payload.
/// Panics on a bad IPv4 header checksum or UDP checksum, wrong MACs, a
/// TTL other than 64 or lengths that disagree.
fn parse_out(f: &[u8]) -> (SocketAddr, SocketAddr, Vec<u8>) {
    assert_eq!(&f[0..6], &GW_MAC, "to the next hop's MAC, from the FIB");
    assert_eq!(&f[6..12], &OUR_MAC, "from our interface's MAC");
    let (src, dst, udp): (IpAddr, IpAddr, &[u8]) = match [f[12], f[13]] {
        [0x08, 0x00] => {
            let ip = &f[14..34];
            assert_eq!(ip[0], 0x45);
            assert_eq!(fold(sum(ip)), 0xffff, "IPv4 header checksum");
            assert_eq!(ip[8], 64, "TTL");
            let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let s: [u8; 4] = ip[12..16].try_into().unwrap();
            let d: [u8; 4] = ip[16..20].try_into().unwrap();
            (s.into(), d.into(), &f[34..14 + tot])
        }
        [0x86, 0xdd] => {
            let ip = &f[14..54];
            assert_eq!(ip[7], 64, "hop limit");
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let s: [u8; 16] = ip[8..24].try_into().unwrap();
            let d: [u8; 16] = ip[24..40].try_into().unwrap();
            (s.into(), d.into(), &f[54..54 + len])
        }
        other => panic!("ethertype {other:?}"),
    };
    assert_eq!(usize::from(u16::from_be_bytes([udp[4], udp[5]])), udp.len());
    let check = u16::from_be_bytes([udp[6], udp[7]]);
    assert_eq!(
        check,
        udp_csum(src, dst, udp),
        "UDP checksum recomputed from scratch"
    );
    let sp = u16::from_be_bytes([udp[0], udp[1]]);
    let dp = u16::from_be_bytes([udp[2], udp[3]]);
    (
        SocketAddr::new(src, sp),
        SocketAddr::new(dst, dp),
        udp[8..].to_vec(),
    )
}

struct Bed {
    loaded: Loaded,
    ifindex: u32,
}

impl Bed {
    fn new(ifindex: u32) -> Bed {
        let loaded = Loaded::load().expect("load");
        loaded
            .maps
            .set_listen(&[
                sa("192.0.2.1:3478"),
                sa("[2001:db8::1]:3478"),
                sa("0.0.0.0:3479"),
                sa("[::]:3479"),
            ])
            .unwrap();
        Bed { loaded, ifindex }
    }

    fn install(&self, e: &Entry) {
        self.loaded
            .maps
            .clients
            .put(&e.client_key, &e.client_val)
            .unwrap();
        self.loaded
            .maps
            .peers
            .put(&e.peer_key, &e.peer_val)
            .unwrap();
    }

    fn run(&mut self, packet: &[u8]) -> (u32, Vec<u8>, Vec<(Reason, u64)>) {
        let before = self.loaded.maps.reasons();
        let fd = self.loaded.program_fd().unwrap();
        let (rc, out) = test_run(&fd, packet, self.ifindex).unwrap();
        let after = self.loaded.maps.reasons();
        let moved = after
            .iter()
            .zip(before)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, b)| (a.0, a.1 - b.1))
            .collect();
        (rc, out, moved)
    }

    /// Runs `packet`, which must pass unchanged, counted under `why`.
    fn passes(&mut self, packet: &[u8], why: Reason, case: &str) {
        let (rc, out, moved) = self.run(packet);
        assert_eq!(rc, XDP_PASS, "{case}: passed to the kernel");
        assert_eq!(out, packet, "{case}: unchanged");
        assert_eq!(moved, vec![(why, 1)], "{case}: counted once, as {why:?}");
    }

    fn relays(&mut self, packet: &[u8], why: Reason) -> (SocketAddr, SocketAddr, Vec<u8>) {
        let (rc, out, moved) = self.run(packet);
        assert_eq!(rc, XDP_TX, "relayed in XDP (counted {moved:?})");
        assert_eq!(moved, vec![(why, 1)]);
        parse_out(&out)
    }
}

/// Both directions, for a family's addresses: client, listen address,
/// relay socket (bind address), the source the relay's packets carry,
/// peer.
fn both_directions(
    bed: &mut Bed,
    client: &str,
    listen: &str,
    relay: &str,
    relay_src: &str,
    peer: &str,
    slot: u32,
) {
    let (client, listen, relay, peer) = (sa(client), sa(listen), sa(relay), sa(peer));
    let relay_src = SocketAddr::new(relay_src.parse().unwrap(), relay.port());
    let listen_src = SocketAddr::new(relay_src.ip(), listen.port());
    bed.install(&Entry::new(client, listen, 0x4001, relay, peer, slot));
    let server = if listen.ip().is_unspecified() {
        listen_src
    } else {
        listen
    };
    for len in [0usize, 1, 100, 101, 1200] {
        let app: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        let (src, dst, payload) = bed.relays(
            &frame(client, server, &channel_data(0x4001, &app)),
            Reason::ToPeer,
        );
        assert_eq!((src, dst), (relay_src, peer), "client -> peer, {len} bytes");
        assert_eq!(payload, app);
        let (src, dst, payload) = bed.relays(&frame(peer, relay_src, &app), Reason::ToClient);
        assert_eq!(
            (src, dst),
            (listen_src, client),
            "peer -> client, {len} bytes"
        );
        assert_eq!(payload, channel_data(0x4001, &app));
    }
    let maps = &bed.loaded.maps;
    let to_peer = maps.count(2 * slot).unwrap();
    let to_client = maps.count(2 * slot + 1).unwrap();
    assert_eq!(
        (to_peer.packets, to_peer.bytes),
        (5, 1402),
        "per-entry counters, client -> peer"
    );
    assert_eq!(
        (to_client.packets, to_client.bytes),
        (5, 1402),
        "per-entry counters, peer -> client"
    );
}

#[test]
fn relays_channel_data_both_ways_with_valid_checksums() {
    if !privileged() {
        return;
    }
    in_netns(true, |ifindex| {
        let mut bed = Bed::new(ifindex);
        both_directions(
            &mut bed,
            "198.51.100.10:5000",
            "192.0.2.1:3478",
            "192.0.2.1:50000",
            "192.0.2.1",
            "203.0.113.9:7000",
            1,
        );
        both_directions(
            &mut bed,
            "[2001:db8:1::10]:5000",
            "[2001:db8::1]:3478",
            "[2001:db8::1]:50000",
            "2001:db8::1",
            "[2001:db8:2::9]:7000",
            2,
        );
        // Wildcard listener and relay sockets: the source is the FIB's.
        both_directions(
            &mut bed,
            "198.51.100.11:5001",
            "0.0.0.0:3479",
            "0.0.0.0:50002",
            "192.0.2.1",
            "203.0.113.9:7002",
            3,
        );
        both_directions(
            &mut bed,
            "[2001:db8:1::11]:5001",
            "[::]:3479",
            "[::]:50002",
            "2001:db8::1",
            "[2001:db8:2::9]:7002",
            4,
        );
    });
}

/// The IPv4 binding several tables use: a client, our listener, the
/// relayed address and the peer.
fn v4_binding() -> (SocketAddr, SocketAddr, SocketAddr, SocketAddr) {
    (
        sa("198.51.100.10:5000"),
        sa("192.0.2.1:3478"),
        sa("192.0.2.1:50000"),
        sa("203.0.113.9:7000"),
    )
}

#[test]
fn an_ipv4_datagram_without_a_checksum_stays_without_one() {
    if !privileged() {
        return;
    }
    in_netns(true, |ifindex| {
        let mut bed = Bed::new(ifindex);
        let (client, listen, relay, peer) = v4_binding();
        bed.install(&Entry::new(client, listen, 0x4001, relay, peer, 1));
        let mut p = frame(peer, relay, b"no checksum");
        p[40] = 0;
        p[41] = 0;
        let (rc, out, _) = bed.run(&p);
        assert_eq!(rc, XDP_TX);
        assert_eq!(&out[40..42], &[0, 0]);
        assert_eq!(&out[42..46], &channel_data(0x4001, b"no checksum")[..4]);
    });
}

#[test]
fn everything_it_is_not_sure_of_passes_unchanged() {
    if !privileged() {
        return;
    }
    in_netns(true, |ifindex| {
        let mut bed = Bed::new(ifindex);
        let (client, listen, relay, peer) = v4_binding();
        bed.install(&Entry::new(client, listen, 0x4001, relay, peer, 1));
        let (c6, l6, r6, p6) = (
            sa("[2001:db8:1::10]:5000"),
            sa("[2001:db8::1]:3478"),
            sa("[2001:db8::1]:50000"),
            sa("[2001:db8:2::9]:7000"),
        );
        bed.install(&Entry::new(c6, l6, 0x4001, r6, p6, 2));
        let app = [7u8; 64];

        bed.passes(
            &frame(client, listen, &channel_data(0x4002, &app)),
            Reason::UnknownChannel,
            "an unknown channel",
        );
        bed.passes(
            &frame(
                sa("198.51.100.99:5000"),
                listen,
                &channel_data(0x4001, &app),
            ),
            Reason::UnknownChannel,
            "another client's channel",
        );
        bed.passes(
            &frame(c6, l6, &channel_data(0x4002, &app)),
            Reason::UnknownChannel,
            "an unknown channel, IPv6",
        );
        // STUN: a Binding request, a Send indication (0x0016): user space.
        let mut stun = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        stun.extend_from_slice(&[9; 12]);
        bed.passes(
            &frame(client, listen, &stun),
            Reason::NotChannelData,
            "a Binding request",
        );
        stun[1] = 0x16;
        bed.passes(
            &frame(client, listen, &stun),
            Reason::NotChannelData,
            "a Send indication",
        );
        bed.passes(
            &frame(sa("203.0.113.50:7000"), relay, &app),
            Reason::UnknownPeer,
            "a peer without a permission",
        );
        bed.passes(
            &frame(peer, sa("192.0.2.1:50001"), &app),
            Reason::UnknownPeer,
            "another relay port",
        );
        // ChannelData whose length field disagrees with the datagram
        // (padding, truncation).
        let mut padded = channel_data(0x4001, &app[..61]);
        padded.extend_from_slice(&[0, 0, 0]);
        bed.passes(
            &frame(client, listen, &padded),
            Reason::BadLength,
            "padded ChannelData",
        );
        bed.passes(
            &frame(client, listen, &[0x40, 0x01, 0x00]),
            Reason::NotChannelData,
            "3 bytes",
        );
        // IPv4: a fragment (MF), a later fragment (offset), options.
        let mut p = frame(client, listen, &channel_data(0x4001, &app));
        p[20] |= 0x20;
        bed.passes(&p, Reason::Fragment, "a first fragment");
        let mut p = frame(peer, relay, &app);
        p[21] = 8;
        bed.passes(&p, Reason::Fragment, "a later fragment");
        let mut p = frame(client, listen, &channel_data(0x4001, &app));
        p[14] = 0x46;
        bed.passes(&p, Reason::IpOptions, "IPv4 options");
        // IPv6: a fragment header, a hop-by-hop header, no checksum.
        let mut p = frame(p6, r6, &app);
        p[20] = 44;
        bed.passes(&p, Reason::Fragment, "an IPv6 fragment");
        p[20] = 0;
        bed.passes(&p, Reason::IpOptions, "an IPv6 extension header");
        let mut p = frame(p6, r6, &app);
        p[60] = 0;
        p[61] = 0;
        bed.passes(&p, Reason::ZeroChecksum, "IPv6 UDP without a checksum");
        // Not UDP: TCP, ARP.
        let mut p = frame(client, listen, &app);
        p[23] = 6;
        bed.passes(&p, Reason::Other, "TCP");
        let mut p = frame(client, listen, &app);
        p[12] = 0x08;
        p[13] = 0x06;
        bed.passes(&p, Reason::Other, "ARP");
        // 1,472 bytes fill a 1,500-byte MTU; ChannelData framing would not fit.
        bed.passes(
            &frame(peer, relay, &[1u8; 1472]),
            Reason::Oversize,
            "oversize once framed",
        );
        bed.passes(
            &frame(p6, r6, &[1u8; 1452]),
            Reason::Oversize,
            "oversize once framed, IPv6",
        );
        // Four bytes less fit: 1,500 bytes on the wire once framed.
        bed.relays(&frame(p6, r6, &[1u8; 1448]), Reason::ToClient);
        bed.relays(&frame(peer, relay, &[1u8; 1468]), Reason::ToClient);

        // Hairpin: a peer that is the relay's own address goes through
        // user space (which hands it over in memory), never out of the
        // interface.
        let own = sa("192.0.2.1:50010");
        bed.install(&Entry::new(client, listen, 0x4003, relay, own, 3));
        bed.passes(
            &frame(client, listen, &channel_data(0x4003, &app)),
            Reason::Local,
            "hairpin to our own address",
        );
        // A peer whose next hop is not resolved yet; one out of another
        // interface; one of the other family.
        bed.install(&Entry::new(
            client,
            listen,
            0x4004,
            relay,
            sa("192.0.2.77:7000"),
            4,
        ));
        bed.passes(
            &frame(client, listen, &channel_data(0x4004, &app)),
            Reason::NoNeighbour,
            "an unresolved neighbour",
        );
        bed.install(&Entry::new(
            client,
            listen,
            0x4005,
            relay,
            sa("10.9.0.5:7000"),
            5,
        ));
        bed.passes(
            &frame(client, listen, &channel_data(0x4005, &app)),
            Reason::NoRoute,
            "a route out of another interface",
        );
        bed.install(&Entry::new(client, listen, 0x4006, relay, p6, 6));
        bed.passes(
            &frame(client, listen, &channel_data(0x4006, &app)),
            Reason::Family,
            "an IPv6 peer for an IPv4 client",
        );

        // And the entry that does exist still relays.
        bed.relays(
            &frame(client, listen, &channel_data(0x4001, &app)),
            Reason::ToPeer,
        );
    });
}

#[test]
fn without_forwarding_on_the_interface_everything_passes() {
    if !privileged() {
        return;
    }
    in_netns(false, |ifindex| {
        let mut bed = Bed::new(ifindex);
        let (client, listen, relay, peer) = v4_binding();
        bed.install(&Entry::new(client, listen, 0x4001, relay, peer, 1));
        bed.passes(
            &frame(peer, relay, b"hello"),
            Reason::ForwardingOff,
            "peer -> client",
        );
        bed.passes(
            &frame(client, listen, &channel_data(0x4001, b"hello")),
            Reason::ForwardingOff,
            "client -> peer",
        );
    });
}
