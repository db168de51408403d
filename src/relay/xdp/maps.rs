//! The XDP program's maps as Rust types (the layout of
//! `bpf/turnkey_xdp.c`, field for field), and the few `bpf(2)` calls the
//! shell makes on them: put, delete, read a per-CPU slot, and run the
//! program on a packet (`BPF_PROG_TEST_RUN`, for the table tests).
//!
//! The calls go through `libc::syscall` on map descriptors rather than
//! aya's typed maps, so that every shard can hold the same maps (a
//! duplicated descriptor each) and write the entries of its own
//! allocations: each entry has one writer, the shard that owns it.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

/// Bindings each direction map holds (`MAX_BINDINGS` in the C source);
/// per-binding counter slots are twice that (one per direction).
pub const MAX_BINDINGS: u32 = 16_384;

/// What happened to a packet in XDP: the index of the `reasons` map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Reason {
    ToPeer = 0,
    ToClient,
    Other,
    Fragment,
    IpOptions,
    NotChannelData,
    UnknownChannel,
    UnknownPeer,
    BadLength,
    ZeroChecksum,
    Oversize,
    Local,
    NoNeighbour,
    NoRoute,
    Family,
    ForwardingOff,
}

impl Reason {
    pub const ALL: [Reason; 16] = [
        Reason::ToPeer,
        Reason::ToClient,
        Reason::Other,
        Reason::Fragment,
        Reason::IpOptions,
        Reason::NotChannelData,
        Reason::UnknownChannel,
        Reason::UnknownPeer,
        Reason::BadLength,
        Reason::ZeroChecksum,
        Reason::Oversize,
        Reason::Local,
        Reason::NoNeighbour,
        Reason::NoRoute,
        Reason::Family,
        Reason::ForwardingOff,
    ];

    /// Relayed in XDP (the two directions), or passed to the kernel.
    pub fn handled(self) -> bool {
        matches!(self, Reason::ToPeer | Reason::ToClient)
    }

    /// The `/metrics` label.
    pub fn name(self) -> &'static str {
        match self {
            Reason::ToPeer => "client_to_peer",
            Reason::ToClient => "peer_to_client",
            Reason::Other => "other",
            Reason::Fragment => "fragment",
            Reason::IpOptions => "ip_options",
            Reason::NotChannelData => "not_channel_data",
            Reason::UnknownChannel => "unknown_channel",
            Reason::UnknownPeer => "unknown_peer",
            Reason::BadLength => "bad_length",
            Reason::ZeroChecksum => "zero_checksum",
            Reason::Oversize => "oversize",
            Reason::Local => "local",
            Reason::NoNeighbour => "no_neighbour",
            Reason::NoRoute => "no_route",
            Reason::Family => "family",
            Reason::ForwardingOff => "forwarding_off",
        }
    }
}

/// An address as the program keeps it: IPv4 as v4-mapped IPv6, so the
/// unspecified IPv4 address (a wildcard listener) is `::ffff:0.0.0.0`.
pub fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn ip_of(b: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AddrPort {
    pub ip: [u8; 16],
    pub port: u16,
    pub pad: u16,
}

impl AddrPort {
    pub fn of(a: SocketAddr) -> Self {
        AddrPort {
            ip: ip16(a.ip()),
            port: a.port().to_be(),
            pad: 0,
        }
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ClientKey {
    pub client_ip: [u8; 16],
    pub server_ip: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub channel: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientVal {
    pub relay_ip: [u8; 16],
    pub peer_ip: [u8; 16],
    pub relay_port: u16,
    pub peer_port: u16,
    pub entry: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PeerKey {
    pub peer_ip: [u8; 16],
    pub relay_ip: [u8; 16],
    pub peer_port: u16,
    pub relay_port: u16,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerVal {
    pub client_ip: [u8; 16],
    pub server_ip: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub channel: u16,
    pub pad: u16,
    pub entry: u32,
}

/// One binding in both maps: what the shell writes for a channel whose
/// every condition holds (`cache.rs`). `slot` numbers its counters: the
/// client → peer entry is `2 * slot`, the peer → client one `2 * slot + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub client_key: ClientKey,
    pub client_val: ClientVal,
    pub peer_key: PeerKey,
    pub peer_val: PeerVal,
}

impl Entry {
    /// `client` sends to `server` (a listen address, maybe the wildcard
    /// one) on `channel`, relayed from `relay` (the relay sockets' bind
    /// address, maybe the wildcard one, with the allocation's port) to
    /// `peer`.
    pub fn new(
        client: SocketAddr,
        server: SocketAddr,
        channel: u16,
        relay: SocketAddr,
        peer: SocketAddr,
        slot: u32,
    ) -> Self {
        let channel = channel.to_be();
        Entry {
            client_key: ClientKey {
                client_ip: ip16(client.ip()),
                server_ip: ip16(server.ip()),
                client_port: client.port().to_be(),
                server_port: server.port().to_be(),
                channel,
                pad: 0,
            },
            client_val: ClientVal {
                relay_ip: ip16(relay.ip()),
                peer_ip: ip16(peer.ip()),
                relay_port: relay.port().to_be(),
                peer_port: peer.port().to_be(),
                entry: 2 * slot,
            },
            peer_key: PeerKey {
                peer_ip: ip16(peer.ip()),
                relay_ip: ip16(relay.ip()),
                peer_port: peer.port().to_be(),
                relay_port: relay.port().to_be(),
                pad: 0,
            },
            peer_val: PeerVal {
                client_ip: ip16(client.ip()),
                server_ip: ip16(server.ip()),
                client_port: client.port().to_be(),
                server_port: server.port().to_be(),
                channel,
                pad: 0,
                entry: 2 * slot + 1,
            },
        }
    }
}

/// Packets and application bytes of one entry, on one CPU.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EntryCount {
    pub packets: u64,
    pub bytes: u64,
}

/// One map, by descriptor.
pub struct MapFd {
    fd: OwnedFd,
}

// The kernel's `union bpf_attr` for the map element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `union bpf_attr` prefix of
    // the size passed; the kernel reads and writes within it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl MapFd {
    pub fn new(fd: OwnedFd) -> Self {
        MapFd { fd }
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(MapFd {
            fd: self.fd.try_clone()?,
        })
    }

    pub fn put<K: Copy, V: Copy>(&self, key: &K, value: &V) -> io::Result<()> {
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            value: value as *const V as u64,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }

    /// Deletes `key`; a key that is not there is not an error.
    pub fn delete<K: Copy>(&self, key: &K) -> io::Result<()> {
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r.map(drop),
        }
    }

    pub fn get<K: Copy, V: Copy + Default>(&self, key: &K) -> io::Result<Option<V>> {
        let mut value = V::default();
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            value: &mut value as *mut V as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Slot `index` of a per-CPU array, every CPU's value. `V` must be a
    /// multiple of 8 bytes (the kernel's per-CPU stride).
    pub fn per_cpu<V: Copy + Default>(&self, index: u32, cpus: usize) -> io::Result<Vec<V>> {
        debug_assert_eq!(std::mem::size_of::<V>() % 8, 0);
        let mut values = vec![V::default(); cpus];
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: &index as *const u32 as u64,
            value: values.as_mut_ptr() as u64,
            ..Default::default()
        };
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)?;
        Ok(values)
    }

    /// Sets slot `index` of a per-CPU array to zero on every CPU.
    pub fn zero_per_cpu<V: Copy + Default>(&self, index: u32, cpus: usize) -> io::Result<()> {
        let values = vec![V::default(); cpus];
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: &index as *const u32 as u64,
            value: values.as_ptr() as u64,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }
}

// `union bpf_attr` for BPF_PROG_TEST_RUN.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

// `struct xdp_md`, the context a test run may be given.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// Runs the program once on `packet` as if it came in on `ifindex`: its
/// action (XDP_PASS 2, XDP_TX 3, ...) and the packet as it left.
pub fn test_run(prog: &impl AsRawFd, packet: &[u8], ifindex: u32) -> io::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; packet.len() + 256];
    let ctx = XdpMd {
        data_end: packet.len() as u32,
        ingress_ifindex: ifindex,
        ..Default::default()
    };
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
        ctx_in: &ctx as *const XdpMd as u64,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_c_structs() {
        use std::mem::size_of;
        assert_eq!(size_of::<AddrPort>(), 20);
        assert_eq!(size_of::<ClientKey>(), 40);
        assert_eq!(size_of::<ClientVal>(), 40);
        assert_eq!(size_of::<PeerKey>(), 40);
        assert_eq!(size_of::<PeerVal>(), 44);
        assert_eq!(size_of::<EntryCount>(), 16);
    }

    #[test]
    fn ipv4_is_kept_mapped_and_the_wildcard_too() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(ip_of(ip16(v4)), v4);
        assert_eq!(
            ip16("0.0.0.0".parse().unwrap()),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0]
        );
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(ip_of(ip16(v6)), v6);
    }

    #[test]
    fn an_entry_numbers_its_two_directions_from_its_slot() {
        let e = Entry::new(
            "198.51.100.1:5000".parse().unwrap(),
            "192.0.2.1:3478".parse().unwrap(),
            0x4001,
            "192.0.2.1:50000".parse().unwrap(),
            "203.0.113.9:7000".parse().unwrap(),
            7,
        );
        assert_eq!((e.client_val.entry, e.peer_val.entry), (14, 15));
        assert_eq!(e.client_key.channel, 0x4001u16.to_be());
        assert_eq!(e.peer_key.relay_port, 50000u16.to_be());
    }
}
