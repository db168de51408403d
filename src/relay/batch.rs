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

/// Up to [`BATCH`] datagrams received from one socket.
pub struct RecvBatch {
    bufs: Box<[u8]>,
    addrs: [libc::sockaddr_storage; BATCH],
    lens: [usize; BATCH],
    count: usize,
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
        }
    }

    /// Reads what `fd` has, up to [`BATCH`] datagrams; how many. `WouldBlock`
    /// when there was nothing.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
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
        self.count = 0;
        // SAFETY: every header points into buffers owned by self or by this
        // frame, all outliving the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (len, h) in self.lens.iter_mut().zip(&hdrs[..n]) {
            *len = (h.msg_len as usize).min(SLOT);
        }
        self.count = n;
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
            queued: Vec::with_capacity(BATCH),
        }
    }

    /// Queues a copy of `data` for `to` through `fd`, flushing first when
    /// the queue is full. Returns how many earlier sends failed in that
    /// flush.
    pub fn push(&mut self, fd: RawFd, to: SocketAddr, data: &[u8]) -> usize {
        let failed = if self.queued.len() == BATCH || self.arena.len() + data.len() > ARENA {
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
            match self.sendmmsg(fd, next, end) {
                Ok(sent) => next += sent.max(1),
                // The first datagram of the rest was refused: skip it.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    failed += 1;
                    next += 1;
                }
            }
        }
        failed
    }

    fn sendmmsg(&mut self, fd: RawFd, start: usize, end: usize) -> io::Result<usize> {
        let n = (end - start).min(BATCH);
        // SAFETY: plain data; all-zero is valid.
        let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let base = self.arena.as_mut_ptr();
        for (i, q) in self.queued[start..start + n].iter().enumerate() {
            // SAFETY: q.at + q.len <= arena.len() (set by push).
            iov[i].iov_base = unsafe { base.add(q.at) }.cast();
            iov[i].iov_len = q.len;
            let h = &mut hdrs[i].msg_hdr;
            h.msg_namelen = from_std(q.to, &mut addrs[i]);
            h.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
        }
        // SAFETY: every header points into buffers that outlive the call.
        let sent = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, 0) };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(sent as usize)
        }
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

    #[test]
    fn a_queue_sends_in_order_and_a_batch_reads_them_back() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut q = SendQueue::new();
        for i in 0..(BATCH as u8 + 3) {
            assert_eq!(q.push(tx.as_raw_fd(), to, &[i; 3]), 0);
        }
        assert_eq!(q.flush(), 0);
        assert!(q.is_empty());
        let mut b = RecvBatch::new();
        let mut seen = Vec::new();
        while seen.len() < BATCH + 3 {
            let n = b.recv(rx.as_raw_fd()).unwrap();
            for i in 0..n {
                let (from, data) = b.get(i).unwrap();
                assert_eq!(from, tx.local_addr().unwrap());
                seen.push(data[0]);
            }
        }
        assert_eq!(seen, (0..BATCH as u8 + 3).collect::<Vec<_>>());
        let e = b.recv(rx.as_raw_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_refused_datagram_is_counted_and_the_rest_still_go() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut q = SendQueue::new();
        q.push(tx.as_raw_fd(), to, b"a");
        // IPv6 destination on an IPv4 socket: refused by the kernel.
        q.push(tx.as_raw_fd(), "[::1]:9".parse().unwrap(), b"x");
        q.push(tx.as_raw_fd(), to, b"b");
        assert_eq!(q.flush(), 1);
        let mut buf = [0u8; 4];
        assert_eq!(rx.recv(&mut buf).unwrap(), 1);
        assert_eq!(&buf[..1], b"a");
        assert_eq!(rx.recv(&mut buf).unwrap(), 1);
        assert_eq!(&buf[..1], b"b");
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
