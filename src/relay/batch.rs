//! Batched UDP I/O: `recvmmsg` fills up to [`BATCH`] datagrams from one
//! socket in one system call, and `sendmmsg` sends what one turn of the
//! loop queued, one call per socket. On a relay nearly all the CPU is the
//! kernel's (see `bench/RESULTS.md`), and one syscall per packet each way
//! was the part of it a user-space program controls.
//!
//! Plain buffers and `libc` calls, no policy: the shard's loop (and the
//! bare forwarder in `bench/`, which measures this machine's ceiling with
//! the same calls) decides what to read and when to flush. Errors are
//! returned or counted by the caller, never fatal.
//!
//! A queue made with [`SendQueue::with_gso`] also sends consecutive
//! datagrams from one socket to one destination with one size (a video
//! frame's packets, relayed) as one UDP GSO send (`UDP_SEGMENT`, Linux
//! 4.18+): the kernel builds, routes and hands down one packet and cuts it
//! into datagrams at the last moment (on loopback, at the receiving
//! socket), several times cheaper per datagram than a send each. A
//! kernel or device that refuses it turns it off for that queue; an
//! oversize group (a path MTU below the segment) goes again datagram by
//! datagram.
//!
//! The batched calls exist on Linux, Android and FreeBSD. Elsewhere, and
//! where a sandbox refuses them (a seccomp filter answering `ENOSYS`), the
//! same types read and send one datagram per `recvfrom`/`sendto`: slower,
//! same results. A batch or queue that meets `ENOSYS` remembers it and
//! takes that path from then on, so the choice is one flag tested per
//! call, never a failed system call per packet.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Room per received datagram: the largest UDP payload, so nothing is
/// truncated. The pages of a slot are only touched as far as datagrams
/// reach, so small packets keep the resident size small.
pub const SLOT: usize = 65536;
/// Bytes a send queue holds before it flushes by itself.
const ARENA: usize = 256 * 1024;
/// Datagrams a send queue holds before it flushes by itself: a whole turn
/// of the shard's loop (many sockets' batches), so the datagrams that many
/// relay sockets send to their clients through one listener leave in one
/// `sendmmsg` instead of one each.
pub const QUEUE: usize = 256;
/// Datagrams in one GSO send at most (the kernel's `UDP_MAX_SEGMENTS`).
const MAX_SEGMENTS: usize = 64;
/// Bytes in one GSO send at most: under the largest UDP payload.
const MAX_GSO_BYTES: usize = 65000;
/// `UDP_SEGMENT` (linux/udp.h), missing from the libc crate for glibc.
#[cfg(any(target_os = "linux", target_os = "android"))]
const UDP_SEGMENT: libc::c_int = 103;

/// Up to [`BATCH`] datagrams received from one socket.
pub struct RecvBatch {
    bufs: Box<[u8]>,
    addrs: [libc::sockaddr_storage; BATCH],
    lens: [usize; BATCH],
    count: usize,
    /// `recvmmsg` is missing: read with one `recvfrom` per datagram.
    one_by_one: bool,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    pub fn new() -> Self {
        RecvBatch {
            bufs: vec![0u8; BATCH * SLOT].into_boxed_slice(),
            // SAFETY: sockaddr_storage is plain data; all-zero is valid.
            addrs: unsafe { zeroed() },
            lens: [0; BATCH],
            count: 0,
            one_by_one: false,
        }
    }

    /// A batch that reads one datagram per system call, as it does where
    /// `recvmmsg` is missing.
    #[cfg(test)]
    fn one_by_one() -> Self {
        RecvBatch {
            one_by_one: true,
            ..Self::new()
        }
    }

    /// Reads what `fd` has, up to [`BATCH`] datagrams; how many. `WouldBlock`
    /// when there was nothing.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.count = 0;
        let n = self.recv_some(fd)?;
        self.count = n;
        Ok(n)
    }

    fn recv_some(&mut self, fd: RawFd) -> io::Result<usize> {
        if !self.one_by_one {
            match self.recvmmsg(fd) {
                Err(e) if is_missing(&e) => self.one_by_one = true,
                r => return r,
            }
        }
        self.recvfrom_each(fd)
    }

    /// One `recvmmsg`: fills `lens` and `addrs`, returns how many.
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    fn recvmmsg(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: iovec/mmsghdr are plain data; all-zero is valid.
        let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let base = self.bufs.as_mut_ptr();
        for (i, (v, h)) in iov.iter_mut().zip(hdrs.iter_mut()).enumerate() {
            // SAFETY: i * SLOT + SLOT <= bufs.len().
            v.iov_base = unsafe { base.add(i * SLOT) }.cast();
            v.iov_len = SLOT;
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = v;
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points into buffers owned by self or by this
        // frame, all outliving the call. (`as _`: the length and flags are
        // `c_uint`, `size_t` or `c_int` depending on the libc.)
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as _,
                libc::MSG_DONTWAIT as _,
                std::ptr::null_mut::<libc::timespec>(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (len, h) in self.lens.iter_mut().zip(&hdrs[..n]) {
            *len = (h.msg_len as usize).min(SLOT);
        }
        Ok(n)
    }

    /// Without the call, the answer of a kernel without it.
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    fn recvmmsg(&mut self, _fd: RawFd) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    /// What `recvmmsg` does, one `recvfrom` per datagram.
    fn recvfrom_each(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut n = 0;
        let mut skipped = 0;
        while n < BATCH {
            let slot = &mut self.bufs[n * SLOT..(n + 1) * SLOT];
            match recvfrom(fd, slot, &mut self.addrs[n]) {
                Ok(len) => {
                    self.lens[n] = len.min(SLOT);
                    n += 1;
                }
                Err(e) if n == 0 => return Err(e),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // An error notice (say ICMP unreachable) after some
                // datagrams: reading goes on, so that a short batch still
                // means an empty socket to the caller; a bounded number,
                // so a socket that keeps failing cannot hold the loop.
                Err(_) if skipped < BATCH => skipped += 1,
                Err(_) => break,
            }
        }
        Ok(n)
    }

    /// Datagram `i` of the last `recv`: its sender and bytes. `None` for a
    /// sender of a family we do not speak (never seen on a UDP socket).
    pub fn get(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        if i >= self.count {
            return None;
        }
        let from = to_std(&self.addrs[i])?;
        let at = i * SLOT;
        Some((from, self.bufs.get(at..at + self.lens[i])?))
    }
}

struct Queued {
    fd: RawFd,
    to: SocketAddr,
    at: usize,
    len: usize,
}

/// Datagrams waiting to be sent, to any number of sockets; [`flush`]
/// sends them with one `sendmmsg` per socket, each socket's datagrams in
/// the order they were queued.
///
/// [`flush`]: SendQueue::flush
pub struct SendQueue {
    arena: Vec<u8>,
    queued: Vec<Queued>,
    /// `sendmmsg` is missing: send with one `sendto` per datagram.
    one_by_one: bool,
    /// Group runs of datagrams to one destination into GSO sends.
    gso: bool,
    /// GSO sends made (each carries two datagrams or more).
    gso_sends: u64,
}

impl Default for SendQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl SendQueue {
    pub fn new() -> Self {
        SendQueue {
            arena: Vec::with_capacity(ARENA),
            queued: Vec::with_capacity(QUEUE),
            one_by_one: false,
            gso: false,
            gso_sends: 0,
        }
    }

    /// A queue that sends runs of same-size datagrams to one destination
    /// as GSO sends where the kernel has them ([`gso_available`]).
    pub fn with_gso() -> Self {
        SendQueue {
            gso: gso_available(),
            ..Self::new()
        }
    }

    /// Whether this queue still makes GSO sends.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// How many GSO sends this queue has made.
    pub fn gso_sends(&self) -> u64 {
        self.gso_sends
    }

    /// A queue that sends one datagram per system call, as it does where
    /// `sendmmsg` is missing.
    #[cfg(test)]
    fn one_by_one() -> Self {
        SendQueue {
            one_by_one: true,
            ..Self::new()
        }
    }

    /// Queues a copy of `data` for `to` through `fd`, flushing first when
    /// the queue is full. Returns how many earlier sends failed in that
    /// flush.
    pub fn push(&mut self, fd: RawFd, to: SocketAddr, data: &[u8]) -> usize {
        let failed = if self.queued.len() == QUEUE || self.arena.len() + data.len() > ARENA {
            self.flush()
        } else {
            0
        };
        let at = self.arena.len();
        self.arena.extend_from_slice(data);
        self.queued.push(Queued {
            fd,
            to,
            at,
            len: data.len(),
        });
        failed
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Sends everything queued; how many datagrams failed (each is
    /// skipped, the rest still go).
    pub fn flush(&mut self) -> usize {
        if self.queued.is_empty() {
            return 0;
        }
        // Group by socket, keeping each socket's order (a stable sort).
        self.queued.sort_by_key(|q| q.fd);
        let mut failed = 0;
        let mut start = 0;
        while start < self.queued.len() {
            let fd = self.queued[start].fd;
            let end = start
                + self.queued[start..]
                    .iter()
                    .take_while(|q| q.fd == fd)
                    .count();
            failed += self.send_run(start, end);
            start = end;
        }
        self.queued.clear();
        self.arena.clear();
        failed
    }

    /// One socket's datagrams `queued[start..end]`; how many failed.
    fn send_run(&mut self, start: usize, end: usize) -> usize {
        let fd = self.queued[start].fd;
        let mut failed = 0;
        let mut next = start;
        while next < end {
            match self.send_some(fd, next, end, self.gso) {
                Ok(sent) => next += sent.max(1),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The kernel or the device has no GSO: off for good, and
                // this group goes again without it.
                Err(e) if self.gso && gso_missing(&e) => self.gso = false,
                // A GSO group the route refuses (a segment over its MTU):
                // again, one datagram at a time.
                Err(e) if self.gso && self.group_len(next, end, true) > 1 && gso_refused(&e) => {
                    let g = self.group_len(next, end, true);
                    failed += self.send_plain(fd, next, next + g);
                    next += g;
                }
                // The first datagram (or group) of the rest was refused:
                // skip it.
                Err(_) => {
                    let g = self.group_len(next, end, self.gso);
                    failed += g;
                    next += g;
                }
            }
        }
        failed
    }

    /// `queued[start..end]` without GSO; how many failed.
    fn send_plain(&mut self, fd: RawFd, start: usize, end: usize) -> usize {
        let mut failed = 0;
        let mut next = start;
        while next < end {
            match self.send_some(fd, next, end, false) {
                Ok(sent) => next += sent.max(1),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    failed += 1;
                    next += 1;
                }
            }
        }
        failed
    }

    /// How many datagrams from `queued[i]` on leave in one send: a run to
    /// one destination, all of the first one's size but the last, which
    /// may be shorter (what GSO cuts); 1 without GSO.
    fn group_len(&self, i: usize, end: usize, gso: bool) -> usize {
        let first = &self.queued[i];
        if !gso || first.len == 0 {
            return 1;
        }
        let mut n = 1;
        let mut bytes = first.len;
        for q in &self.queued[i + 1..end] {
            if n == MAX_SEGMENTS || q.to != first.to || q.len == 0 || q.len > first.len {
                break;
            }
            if bytes + q.len > MAX_GSO_BYTES {
                break;
            }
            bytes += q.len;
            n += 1;
            if q.len < first.len {
                break;
            }
        }
        n
    }

    /// Sends the first of `queued[start..end]` (or its GSO group), and as
    /// many after it as one call takes; how many datagrams.
    fn send_some(&mut self, fd: RawFd, start: usize, end: usize, gso: bool) -> io::Result<usize> {
        if !self.one_by_one {
            match self.sendmmsg(fd, start, end, gso) {
                Err(e) if is_missing(&e) => self.one_by_one = true,
                r => return r,
            }
        }
        let q = &self.queued[start];
        sendto(fd, &self.arena[q.at..q.at + q.len], q.to).map(|()| 1)
    }

    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    fn sendmmsg(&mut self, fd: RawFd, start: usize, end: usize, gso: bool) -> io::Result<usize> {
        // SAFETY: plain data; all-zero is valid.
        let mut iov: [libc::iovec; QUEUE] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        // Room for one cmsghdr with a u16 (UDP_SEGMENT) per header,
        // aligned as cmsghdr wants.
        let mut controls: [[u64; 4]; BATCH] = [[0; 4]; BATCH];
        let mut counts = [0usize; BATCH];
        let base = self.arena.as_mut_ptr();
        let end = end.min(start + QUEUE);
        let (mut i, mut h, mut used) = (start, 0, 0);
        while i < end && h < BATCH {
            let g = self.group_len(i, end, gso);
            for (k, q) in self.queued[i..i + g].iter().enumerate() {
                // SAFETY: q.at + q.len <= arena.len() (set by push).
                iov[used + k].iov_base = unsafe { base.add(q.at) }.cast();
                iov[used + k].iov_len = q.len;
            }
            let hdr = &mut hdrs[h].msg_hdr;
            hdr.msg_namelen = from_std(self.queued[i].to, &mut addrs[h]);
            hdr.msg_name = (&mut addrs[h] as *mut libc::sockaddr_storage).cast();
            hdr.msg_iov = &mut iov[used];
            hdr.msg_iovlen = g as _;
            if g > 1 {
                set_segment(hdr, &mut controls[h], self.queued[i].len)?;
            }
            counts[h] = g;
            used += g;
            i += g;
            h += 1;
        }
        // SAFETY: every header points into buffers that outlive the call.
        let sent = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), h as _, 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let sent = sent as usize;
        self.gso_sends += counts[..sent].iter().filter(|&&g| g > 1).count() as u64;
        Ok(counts[..sent].iter().sum())
    }

    /// Without the call, the answer of a kernel without it.
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    fn sendmmsg(
        &mut self,
        _fd: RawFd,
        _start: usize,
        _end: usize,
        _gso: bool,
    ) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }
}

/// Points `hdr`'s control data at `room`, holding one `UDP_SEGMENT` of
/// `size` bytes.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_segment(hdr: &mut libc::msghdr, room: &mut [u64; 4], size: usize) -> io::Result<()> {
    let size = u16::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: CMSG_SPACE of a u16 (24 bytes on 64-bit, 16 on 32-bit) fits
    // in `room`'s 32 bytes, which are aligned for cmsghdr; the header is
    // written through the pointers the CMSG macros give for that buffer.
    unsafe {
        let space = libc::CMSG_SPACE(size_of::<u16>() as _) as usize;
        debug_assert!(space <= size_of::<[u64; 4]>());
        hdr.msg_control = room.as_mut_ptr().cast();
        hdr.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(hdr);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as _) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size);
    }
    Ok(())
}

/// Never called: groups have one datagram where GSO does not exist.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_segment(_hdr: &mut libc::msghdr, _room: &mut [u64; 4], _size: usize) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
}

/// Whether this kernel takes `UDP_SEGMENT` (Linux 4.18 and later): asked
/// of a socket made for the purpose.
pub fn gso_available() -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // SAFETY: a socket made, configured and closed here.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return false;
            }
            let size: libc::c_int = 1200;
            let ok = libc::setsockopt(
                fd,
                libc::SOL_UDP,
                UDP_SEGMENT,
                (&size as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0;
            libc::close(fd);
            ok
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        false
    }
}

/// Whether `e` says GSO cannot be used on this path at all: no checksum
/// offload on the device (`EIO`), or no support (`ENOPROTOOPT`,
/// `EOPNOTSUPP`).
fn gso_missing(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO) | Some(libc::ENOPROTOOPT) | Some(libc::EOPNOTSUPP)
    )
}

/// Whether `e` is the kernel refusing one GSO group (`EINVAL`: a segment
/// over the route's MTU, or too many segments).
fn gso_refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Whether `e` says the system call does not exist (an old kernel, or a
/// sandbox that refuses it that way).
fn is_missing(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSYS)
}

/// One datagram from `fd` into `buf`, its sender into `from`; its length.
fn recvfrom(fd: RawFd, buf: &mut [u8], from: &mut libc::sockaddr_storage) -> io::Result<usize> {
    let mut from_len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: buf and from are valid for writes of the lengths given.
    let n = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
            (from as *mut libc::sockaddr_storage).cast(),
            &mut from_len,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One datagram through `fd` to `to`.
fn sendto(fd: RawFd, data: &[u8], to: SocketAddr) -> io::Result<()> {
    // SAFETY: plain data; all-zero is valid.
    let mut addr: libc::sockaddr_storage = unsafe { zeroed() };
    let addr_len = from_std(to, &mut addr);
    // SAFETY: data and addr are valid for reads of the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            0,
            (&addr as *const libc::sockaddr_storage).cast(),
            addr_len,
        )
    };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn to_std(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn from_std(addr: SocketAddr, s: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let out =
                unsafe { &mut *(s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            out.sin_family = libc::AF_INET as libc::sa_family_t;
            out.sin_port = a.port().to_be();
            out.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let out =
                unsafe { &mut *(s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            out.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            out.sin6_port = a.port().to_be();
            out.sin6_flowinfo = a.flowinfo();
            out.sin6_addr.s6_addr = a.ip().octets();
            out.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    /// A send queue and a receive batch, every way: batched, batched with
    /// GSO, and one datagram per call.
    fn both_paths() -> [(&'static str, SendQueue, RecvBatch); 3] {
        [
            ("batched", SendQueue::new(), RecvBatch::new()),
            ("gso", SendQueue::with_gso(), RecvBatch::new()),
            (
                "one by one",
                SendQueue::one_by_one(),
                RecvBatch::one_by_one(),
            ),
        ]
    }

    /// Everything `b` reads from `rx` until it would block.
    fn read_all(b: &mut RecvBatch, rx: &UdpSocket) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut seen = Vec::new();
        loop {
            match b.recv(rx.as_raw_fd()) {
                Ok(n) => seen.extend((0..n).map(|i| {
                    let (from, data) = b.get(i).unwrap();
                    (from, data.to_vec())
                })),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return seen,
                Err(e) => panic!("recv: {e}"),
            }
        }
    }

    #[test]
    fn a_queue_sends_in_order_and_a_batch_reads_them_back() {
        for (path, mut q, mut b) in both_paths() {
            let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let to = rx.local_addr().unwrap();
            for i in 0..(BATCH as u8 + 3) {
                assert_eq!(q.push(tx.as_raw_fd(), to, &[i; 3]), 0, "{path}");
            }
            assert_eq!(q.flush(), 0, "{path}");
            assert!(q.is_empty());
            // A full batch, then the rest.
            assert_eq!(b.recv(rx.as_raw_fd()).unwrap(), BATCH, "{path}");
            assert_eq!(b.get(BATCH - 1).unwrap().1, [BATCH as u8 - 1; 3]);
            assert!(b.get(BATCH).is_none());
            let rest = read_all(&mut b, &rx);
            assert!(rest
                .iter()
                .all(|(from, _)| *from == tx.local_addr().unwrap()));
            let rest: Vec<u8> = rest.iter().map(|(_, data)| data[0]).collect();
            assert_eq!(
                rest,
                (BATCH as u8..BATCH as u8 + 3).collect::<Vec<_>>(),
                "{path}"
            );
            // Nothing left: the error of an empty socket, and nothing to get.
            let e = b.recv(rx.as_raw_fd()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{path}");
            assert!(b.get(0).is_none());
            // Each took the path it was given (no silent fallback here).
            assert_eq!(
                (q.one_by_one, b.one_by_one),
                (path == "one by one", path == "one by one")
            );
            // 35 datagrams of one size to one destination: one GSO send.
            assert_eq!(q.gso_sends(), u64::from(path == "gso"), "{path}");
        }
    }

    #[test]
    fn a_refused_datagram_is_counted_and_the_rest_still_go() {
        for (path, mut q, _) in both_paths() {
            let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let to = rx.local_addr().unwrap();
            q.push(tx.as_raw_fd(), to, b"a");
            // IPv6 destination on an IPv4 socket: refused by the kernel.
            q.push(tx.as_raw_fd(), "[::1]:9".parse().unwrap(), b"x");
            q.push(tx.as_raw_fd(), to, b"b");
            assert_eq!(q.flush(), 1, "{path}");
            let mut buf = [0u8; 4];
            assert_eq!(rx.recv(&mut buf).unwrap(), 1);
            assert_eq!(&buf[..1], b"a", "{path}");
            assert_eq!(rx.recv(&mut buf).unwrap(), 1);
            assert_eq!(&buf[..1], b"b", "{path}");
        }
    }

    #[test]
    fn datagrams_of_any_size_from_several_senders_keep_their_length_and_sender() {
        // Up to the largest UDP payload over IPv4.
        let sizes = [1, 20, 1200, 1500, 9000, 65_507];
        for (path, mut q, mut b) in both_paths() {
            let rx = [
                UdpSocket::bind("127.0.0.1:0").unwrap(),
                UdpSocket::bind("127.0.0.1:0").unwrap(),
            ];
            let tx = [
                UdpSocket::bind("127.0.0.1:0").unwrap(),
                UdpSocket::bind("127.0.0.1:0").unwrap(),
            ];
            for r in &rx {
                // Room for all the large datagrams at once.
                socket2::SockRef::from(r)
                    .set_recv_buffer_size(1 << 20)
                    .unwrap();
            }
            // Every sender to every receiver, each size, through one queue.
            let mut sent = [Vec::new(), Vec::new()];
            for (k, &len) in sizes.iter().enumerate() {
                for (t, tx) in tx.iter().enumerate() {
                    for (r, rx) in rx.iter().enumerate() {
                        let data: Vec<u8> = (0..len).map(|i| (i + k + t + r) as u8).collect();
                        q.push(tx.as_raw_fd(), rx.local_addr().unwrap(), &data);
                        sent[r].push((tx.local_addr().unwrap(), data));
                    }
                }
            }
            assert_eq!(q.flush(), 0, "{path}");
            for (r, rx) in rx.iter().enumerate() {
                let mut got = read_all(&mut b, rx);
                // Each sender's datagrams arrive in order; senders interleave.
                got.sort_by_key(|(from, _)| *from);
                sent[r].sort_by_key(|(from, _)| *from);
                assert_eq!(got.len(), sent[r].len(), "{path}");
                for ((from, data), (want_from, want)) in got.iter().zip(&sent[r]) {
                    assert_eq!(from, want_from, "{path}");
                    assert_eq!(data.len(), want.len(), "{path}");
                    assert!(data == want, "{path}: {} bytes differ", want.len());
                }
            }
        }
    }

    /// A sandbox that refuses `recvmmsg` and `sendmmsg` with `ENOSYS` (as
    /// some seccomp filters do) still gets every datagram through: the
    /// first refusal switches the batch and the queue to one datagram per
    /// call. The filter is installed on a thread of its own, as filters
    /// are per thread.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn a_sandbox_without_the_batched_calls_falls_back_to_one_by_one() {
        std::thread::spawn(|| {
            refuse_mmsg_on_this_thread();
            let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let to = rx.local_addr().unwrap();
            let (mut q, mut b) = (SendQueue::new(), RecvBatch::new());
            let sizes = [5usize, 1500, 3];
            for len in sizes {
                q.push(tx.as_raw_fd(), to, &vec![len as u8; len]);
            }
            assert_eq!(q.flush(), 0);
            assert!(q.one_by_one, "the queue noticed sendmmsg is missing");
            let got = read_all(&mut b, &rx);
            assert!(b.one_by_one, "the batch noticed recvmmsg is missing");
            let got: Vec<usize> = got.iter().map(|(_, d)| d.len()).collect();
            assert_eq!(got, sizes);
        })
        .join()
        .unwrap();
    }

    /// Installs a seccomp filter on the calling thread that answers
    /// `recvmmsg` and `sendmmsg` with `ENOSYS` and allows everything else.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    fn refuse_mmsg_on_this_thread() {
        const NR: u32 = 0; // offset of seccomp_data.nr
        let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
        let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        };
        let mut prog = [
            op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, NR),
            op(
                libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                2,
                0,
                libc::SYS_recvmmsg as u32,
            ),
            op(
                libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                1,
                0,
                libc::SYS_sendmmsg as u32,
            ),
            op(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
            op(libc::BPF_RET | libc::BPF_K, 0, 0, enosys),
        ];
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_mut_ptr(),
        };
        // SAFETY: prctl with the documented arguments; fprog outlives the call.
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
            let rc = libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog,
            );
            assert_eq!(rc, 0, "seccomp: {}", io::Error::last_os_error());
        }
    }

    /// Runs to one destination (a frame's packets) leave as GSO sends and
    /// arrive as the datagrams they were, in order, over IPv4 and IPv6,
    /// beside datagrams to other destinations and through other sockets.
    #[test]
    fn runs_to_one_destination_leave_as_gso_sends_and_arrive_datagram_by_datagram() {
        assert!(gso_available(), "Linux 4.18+ has UDP_SEGMENT");
        for ip in ["127.0.0.1", "[::1]"] {
            let bind = |ip: &str| UdpSocket::bind(format!("{ip}:0")).unwrap();
            let (rx_a, rx_b, tx1, tx2) = (bind(ip), bind(ip), bind(ip), bind(ip));
            for r in [&rx_a, &rx_b] {
                socket2::SockRef::from(r)
                    .set_recv_buffer_size(4 << 20)
                    .unwrap();
            }
            let (a, b) = (rx_a.local_addr().unwrap(), rx_b.local_addr().unwrap());
            let mut q = SendQueue::with_gso();
            let mut want_a = Vec::new();
            let mut want_b = Vec::new();
            let datagram = |tag: u8, seq: usize, len: usize| -> Vec<u8> {
                (0..len).map(|i| tag ^ (seq + i) as u8).collect()
            };
            // tx1 → a: 10 of 1200 bytes and a shorter last (one group),
            // then 70 of 100 (64 + 6: the segment cap), interleaved with
            // tx2 → b: 3 of 1200 and one larger (which starts a group).
            let mut sends: Vec<(&UdpSocket, SocketAddr, Vec<u8>)> = Vec::new();
            for seq in 0..10 {
                sends.push((&tx1, a, datagram(1, seq, 1200)));
            }
            sends.push((&tx1, a, datagram(1, 10, 700)));
            for seq in 0..3 {
                sends.push((&tx2, b, datagram(2, seq, 1200)));
            }
            sends.push((&tx2, b, datagram(2, 3, 1300)));
            for seq in 0..70 {
                sends.push((&tx1, a, datagram(3, seq, 100)));
            }
            for (tx, to, data) in &sends {
                assert_eq!(q.push(tx.as_raw_fd(), *to, data), 0, "{ip}");
                if *to == a {
                    want_a.push(data.clone());
                } else {
                    want_b.push(data.clone());
                }
            }
            assert_eq!(q.flush(), 0, "{ip}");
            assert!(q.gso(), "{ip}: GSO still on");
            // tx1: [11] [64] [6]; tx2: [3] [1].
            assert_eq!(q.gso_sends(), 4, "{ip}");
            let mut batch = RecvBatch::new();
            for (rx, want, from) in [(&rx_a, &want_a, &tx1), (&rx_b, &want_b, &tx2)] {
                let got = read_all(&mut batch, rx);
                assert_eq!(got.len(), want.len(), "{ip}");
                for ((sender, data), want) in got.iter().zip(want) {
                    assert_eq!(*sender, from.local_addr().unwrap(), "{ip}");
                    assert!(data == want, "{ip}: a {} byte datagram differs", want.len());
                }
            }
        }
    }

    #[test]
    fn gso_groups_stop_at_a_new_destination_a_larger_datagram_and_the_caps() {
        let mut q = SendQueue::with_gso();
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let lens_to = |q: &mut SendQueue, items: &[(SocketAddr, usize)]| {
            q.queued.clear();
            for &(to, len) in items {
                q.queued.push(Queued {
                    fd: 3,
                    to,
                    at: 0,
                    len,
                });
            }
            let mut groups = Vec::new();
            let mut i = 0;
            while i < q.queued.len() {
                let g = q.group_len(i, q.queued.len(), true);
                groups.push(g);
                i += g;
            }
            groups
        };
        assert_eq!(
            lens_to(&mut q, &[(a, 100), (a, 100), (a, 50), (a, 50)]),
            [3, 1]
        );
        assert_eq!(
            lens_to(&mut q, &[(a, 100), (b, 100), (b, 100), (a, 100)]),
            [1, 2, 1]
        );
        assert_eq!(lens_to(&mut q, &[(a, 100), (a, 200), (a, 200)]), [1, 2]);
        // Empty datagrams never join a group (a zero segment size is invalid).
        assert_eq!(
            lens_to(&mut q, &[(a, 0), (a, 0), (a, 10), (a, 0)]),
            [1, 1, 1, 1]
        );
        assert_eq!(lens_to(&mut q, &vec![(a, 10); 130]), [64, 64, 2]);
        // 65,000 bytes at most: 54 datagrams of 1,200.
        assert_eq!(lens_to(&mut q, &vec![(a, 1200); 60]), [54, 6]);
        // Without GSO every datagram is its own send.
        q.queued.truncate(3);
        assert_eq!(q.group_len(0, 3, false), 1);
        q.queued.clear();
    }

    #[test]
    fn addresses_round_trip_through_sockaddr() {
        for a in ["1.2.3.4:5", "[2001:db8::1]:443"] {
            let a: SocketAddr = a.parse().unwrap();
            let mut s: libc::sockaddr_storage = unsafe { zeroed() };
            from_std(a, &mut s);
            assert_eq!(to_std(&s), Some(a));
        }
    }
}
