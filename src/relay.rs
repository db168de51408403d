//! The UDP shell around the TURN core: one event-loop thread per shard.
//!
//! Each shard owns a core, its own SO_REUSEPORT listener socket per listen
//! address (the kernel hashes a client's 4-tuple to one shard, so a client
//! always meets the same allocation table), its slice of the relay port
//! range and those relay sockets. Nothing is shared on the packet path: no
//! lock, no channel, no allocation, no log line. A tokio task cannot wait on
//! thousands of relay sockets at once without a task each and a channel
//! between them, so the shard drives `mio` (tokio's own poller) directly.
//!
//! Socket errors on one send or receive (an unreachable peer, ICMP-induced
//! refusal, a full buffer) are counted and skipped; they never end a loop.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::turn::allocation::{FiveTuple, Transport};
use crate::turn::server::{Io, Server};
use crate::turn::stats::{inc, TurnStats};

const WAKER: Token = Token(usize::MAX);
const RELAY_BASE: usize = 1 << 20;
/// Datagrams read from one socket before the loop looks at the others.
const BUDGET: usize = 256;
/// Consecutive receive errors tolerated on one socket in one turn.
const MAX_ERRORS: usize = 64;
const RECV_BUF: usize = 65536;

/// Everything a shard thread needs to start.
pub struct ShardSpec {
    pub index: usize,
    pub listen: Vec<SocketAddr>,
    pub relay_bind: IpAddr,
    pub core: Server,
    pub stats: Arc<TurnStats>,
}

/// A handle on the running shards: stop them and wait.
pub struct Relay {
    local_addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    wakers: Vec<Arc<Waker>>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    pub fn start(specs: Vec<ShardSpec>) -> io::Result<Relay> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut wakers = Vec::new();
        let mut threads = Vec::new();
        // Port 0 means "any": the first shard picks, the others follow it.
        let mut resolved: Option<Vec<SocketAddr>> = None;
        for spec in specs {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            let mut listeners = Vec::new();
            let addrs = resolved.clone().unwrap_or(spec.listen.clone());
            for (i, addr) in addrs.iter().enumerate() {
                let mut sock = bind_listener(*addr)?;
                poll.registry()
                    .register(&mut sock, Token(i), Interest::READABLE)?;
                let local = sock.local_addr()?;
                listeners.push((sock, local));
            }
            resolved.get_or_insert_with(|| listeners.iter().map(|(_, a)| *a).collect());
            let io = ShardIo {
                registry: poll.registry().try_clone()?,
                listeners,
                relays: Vec::new(),
                relay_bind: spec.relay_bind,
                stats: spec.stats.clone(),
            };
            let stop = stop.clone();
            let name = format!("turn-shard-{}", spec.index);
            let core = spec.core;
            threads.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || run(poll, io, core, stop))?,
            );
            wakers.push(waker);
        }
        let local_addrs = resolved.unwrap_or_default();
        Ok(Relay {
            local_addrs,
            stop,
            wakers,
            threads,
        })
    }

    /// The bound listener addresses (the real ports when 0 was asked for).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for w in &self.wakers {
            let _ = w.wake();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn bind_listener(addr: SocketAddr) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // Bigger buffers absorb bursts; the kernel caps them at rmem_max/wmem_max.
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(UdpSocket::from_std(sock.into()))
}

fn bind_relay(addr: SocketAddr, dont_fragment: bool) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if dont_fragment {
        set_dont_fragment(&sock, addr.is_ipv4())?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(UdpSocket::from_std(sock.into()))
}

/// DONT-FRAGMENT (RFC 8656 §14.8): set DF on every datagram of this relay.
fn set_dont_fragment(sock: &Socket, v4: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (level, name) = if v4 {
        (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER)
    };
    let val: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: a valid fd and a pointer to a c_int of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

struct ShardIo {
    registry: Registry,
    listeners: Vec<(UdpSocket, SocketAddr)>,
    /// Relay sockets indexed by port.
    relays: Vec<Option<UdpSocket>>,
    relay_bind: IpAddr,
    stats: Arc<TurnStats>,
}

impl Io for ShardIo {
    fn send_to_client(&mut self, to: &FiveTuple, data: &[u8]) {
        let sock = match self.listeners.as_slice() {
            [(s, _)] => s,
            many => match many.iter().find(|(_, local)| *local == to.server) {
                Some((s, _)) => s,
                None => return,
            },
        };
        if sock.send_to(data, to.client).is_err() {
            inc(&self.stats.send_errors);
        }
    }

    fn send_to_peer(&mut self, relay_port: u16, peer: SocketAddr, data: &[u8]) {
        if let Some(Some(sock)) = self.relays.get(usize::from(relay_port)) {
            if sock.send_to(data, peer).is_err() {
                inc(&self.stats.send_errors);
            }
        }
    }

    fn open_relay(&mut self, port: u16, dont_fragment: bool) -> bool {
        let Ok(mut sock) = bind_relay(SocketAddr::new(self.relay_bind, port), dont_fragment) else {
            return false;
        };
        let token = Token(RELAY_BASE + usize::from(port));
        if self
            .registry
            .register(&mut sock, token, Interest::READABLE)
            .is_err()
        {
            return false;
        }
        let i = usize::from(port);
        if self.relays.len() <= i {
            self.relays.resize_with(i + 1, || None);
        }
        self.relays[i] = Some(sock);
        true
    }

    fn close_relay(&mut self, port: u16) {
        if let Some(slot) = self.relays.get_mut(usize::from(port)) {
            if let Some(mut sock) = slot.take() {
                let _ = self.registry.deregister(&mut sock);
            }
        }
    }
}

/// Which socket to read, and whether its budget ran out last time.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Listener(usize),
    Relay(u16),
}

fn run(mut poll: Poll, mut io: ShardIo, mut core: Server, stop: Arc<AtomicBool>) {
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; RECV_BUF];
    let mut pending: Vec<Source> = Vec::new();
    let mut ready: Vec<Source> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let timeout = if pending.is_empty() {
            let now = Instant::now();
            core.poll_timeout()
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1))
        } else {
            Duration::ZERO
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                inc(&io.stats.recv_errors);
            }
            continue;
        }
        ready.clear();
        ready.append(&mut pending);
        for ev in events.iter() {
            let src = match ev.token() {
                WAKER => continue,
                Token(t) if t >= RELAY_BASE => match u16::try_from(t - RELAY_BASE) {
                    Ok(port) => Source::Relay(port),
                    Err(_) => continue,
                },
                Token(i) => Source::Listener(i),
            };
            if !ready.contains(&src) {
                ready.push(src);
            }
        }
        let now = Instant::now();
        for &src in &ready {
            if drain(src, now, &mut io, &mut core, &mut buf) {
                pending.push(src);
            }
        }
        core.handle_timeout(Instant::now(), &mut io);
    }
}

/// Reads up to BUDGET datagrams from one socket; true if it may have more.
fn drain(src: Source, now: Instant, io: &mut ShardIo, core: &mut Server, buf: &mut [u8]) -> bool {
    let mut errors = 0;
    for _ in 0..BUDGET {
        let r = match src {
            Source::Listener(i) => match io.listeners.get(i) {
                Some((s, _)) => s.recv_from(buf),
                None => return false,
            },
            Source::Relay(port) => match io.relays.get(usize::from(port)) {
                Some(Some(s)) => s.recv_from(buf),
                _ => return false,
            },
        };
        match r {
            Ok((n, from)) => match src {
                Source::Listener(i) => {
                    let server = io.listeners[i].1;
                    let ft = FiveTuple {
                        client: from,
                        server,
                        transport: Transport::Udp,
                    };
                    core.handle_client(now, ft, &buf[..n], io);
                }
                Source::Relay(port) => core.peer_datagram(now, port, from, &buf[..n], io),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => {
                inc(&io.stats.recv_errors);
                errors += 1;
                if errors >= MAX_ERRORS {
                    return true;
                }
            }
        }
    }
    true
}
