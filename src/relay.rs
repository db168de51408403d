//! The shell around the TURN core: one event-loop thread per shard.
//!
//! Each shard owns a core, its own SO_REUSEPORT UDP listener per listen
//! address (the kernel hashes a client's 4-tuple to one shard, so a client
//! always meets the same allocation table) and the relay sockets of its
//! allocations, IPv4 and IPv6. Nothing is shared on the UDP packet path:
//! no lock, no channel, no allocation, no log line. A tokio task cannot
//! wait on thousands of relay sockets at once without a task each and a
//! channel between them, so the shard drives `mio` (tokio's own poller)
//! directly.
//!
//! TCP and TLS clients (see `stream.rs`) live in tokio tasks; their framed
//! messages reach the shard through a bounded channel and a waker, and
//! answers go back through each connection's own bounded queue.
//!
//! Datagrams are read a batch at a time (`recvmmsg`) and what one turn of
//! the loop (every ready socket's batches) makes the core send is queued
//! and flushed with one `sendmmsg` per socket at the end of the turn
//! (`batch.rs`), so a busy shard makes a few system calls per batch
//! instead of two per packet, and the answers of many relay sockets to
//! their clients leave through the listener in one call.
//!
//! Socket errors on one send or receive (an unreachable peer, ICMP-induced
//! refusal, a full buffer) are counted and skipped; they never end a loop.

pub mod batch;
pub mod events;
pub mod setup;
pub mod shortcut;
pub mod xdp;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::lifecycle::Drain;
use crate::turn::allocation::{FiveTuple, RelayId, Transport};
use crate::turn::events::Event;
use crate::turn::server::{AllocationInfo, EndWhich, Io, Server};
use crate::turn::stats::{inc, TurnStats};
use crate::usage::UsageBook;
use batch::{RecvBatch, SendQueue, BATCH};
use shortcut::{Directory, Mailbox, Parcel};

const WAKER: Token = Token(usize::MAX);
const RELAY_BASE: usize = 1 << 20;
/// Datagrams read from one socket before the loop looks at the others.
const BUDGET: usize = 256;
/// Consecutive receive errors tolerated on one socket in one turn.
const MAX_ERRORS: usize = 64;
/// Stream events queued towards one shard before senders wait.
const STREAM_QUEUE: usize = 4096;

/// What a TCP/TLS connection task tells its shard.
pub enum StreamEvent {
    /// A new connection; answers for it go into `tx`; `link` carries what
    /// the shard tells the connection task besides answers.
    Open {
        ft: FiveTuple,
        tx: mpsc::Sender<Vec<u8>>,
        link: Arc<StreamLink>,
    },
    /// One framed STUN message or ChannelData.
    Data {
        ft: FiveTuple,
        msg: bytes::Bytes,
    },
    Closed {
        ft: FiveTuple,
    },
    /// An operator's question or order (the admin API).
    Admin(AdminRequest),
}

/// What the admin API asks a shard.
pub enum AdminRequest {
    List(tokio::sync::oneshot::Sender<Vec<AllocationInfo>>),
    End(EndWhich, tokio::sync::oneshot::Sender<usize>),
}

/// Every shard's allocations.
pub async fn list_everywhere(shards: &[ShardHandle]) -> Vec<AllocationInfo> {
    let mut all = Vec::new();
    for shard in shards {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if shard.send(StreamEvent::Admin(AdminRequest::List(tx))).await {
            all.extend(rx.await.unwrap_or_default());
        }
    }
    all
}

/// Ends the allocations `which` names on every shard; how many ended.
pub async fn end_everywhere(shards: &[ShardHandle], which: EndWhich) -> usize {
    let mut ended = 0;
    for shard in shards {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if shard
            .send(StreamEvent::Admin(AdminRequest::End(which.clone(), tx)))
            .await
        {
            ended += rx.await.unwrap_or(0);
        }
    }
    ended
}

/// What a shard tells a stream connection's task.
#[derive(Default)]
pub struct StreamLink {
    /// Set once the connection holds an allocation (it then no longer
    /// counts against the unauthenticated-connection caps).
    pub authed: AtomicBool,
    /// Notified when `authed` turns true, so a read already waiting under
    /// the pre-authentication deadline drops that deadline at once.
    pub authed_now: tokio::sync::Notify,
    /// Notified when the shard cuts the connection off (it stopped reading).
    pub cut: tokio::sync::Notify,
}

/// How a connection task reaches a shard.
#[derive(Clone)]
pub struct ShardHandle {
    tx: mpsc::Sender<StreamEvent>,
    waker: Arc<Waker>,
}

impl ShardHandle {
    /// Queues an event, waiting while the shard is behind (backpressure
    /// onto the connection that is sending).
    pub async fn send(&self, ev: StreamEvent) -> bool {
        let ok = self.tx.send(ev).await.is_ok();
        let _ = self.waker.wake();
        ok
    }
}

/// Everything a shard thread needs to start.
pub struct ShardSpec {
    pub index: usize,
    pub listen: Vec<SocketAddr>,
    /// Addresses relay sockets bind to, per family.
    pub relay_bind: [Option<IpAddr>; 2],
    /// The advertised relay addresses, per family, for which relay to
    /// relay is handed over in memory (`shortcut.rs`): those that are the
    /// host's own, not a NAT's.
    pub relay_handover: [Option<IpAddr>; 2],
    pub core: Server,
    pub stats: Arc<TurnStats>,
    /// Where allocation events are counted per user and label.
    pub usage: Arc<UsageBook>,
    /// This shard's writer of the kernel fast path, when it is on.
    pub xdp: Option<xdp::shard::XdpShard>,
}

/// A handle on the running shards: reach them, stop them.
pub struct Relay {
    local_addrs: Vec<SocketAddr>,
    handles: Vec<ShardHandle>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The attached XDP program, detached when the relay is dropped.
    xdp: Option<xdp::FastPath>,
}

impl Relay {
    pub fn start(specs: Vec<ShardSpec>, drain: Arc<Drain>) -> io::Result<Relay> {
        let stop = Arc::new(AtomicBool::new(false));
        let directory = Arc::new(Directory::new(
            specs.first().map_or([None, None], |s| s.relay_handover),
        ));
        // Port 0 means "any": the first shard picks, the others follow it.
        let mut resolved: Option<Vec<SocketAddr>> = None;
        let reserved = Arc::new(Mutex::new(HashMap::new()));
        // Every shard's poller and waker first: each shard's mailbox is
        // reachable by all the others from their first packet.
        let mut built = Vec::new();
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
            built.push((spec, poll, waker, listeners));
        }
        let mailboxes: Arc<[Mailbox]> = built
            .iter()
            .map(|(_, _, waker, _)| Mailbox::new(waker.clone()))
            .collect();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for (spec, poll, waker, listeners) in built {
            let (tx, rx) = mpsc::channel(STREAM_QUEUE);
            let io = ShardIo {
                registry: poll.registry().try_clone()?,
                listeners,
                relays: [Vec::new(), Vec::new()],
                relay_bind: spec.relay_bind,
                streams: HashMap::new(),
                closing: Vec::new(),
                reserved: reserved.clone(),
                stats: spec.stats.clone(),
                usage: spec.usage.clone(),
                out: SendQueue::with_gso(),
                index: spec.index,
                directory: directory.clone(),
                outbox: (0..mailboxes.len()).map(|_| Parcel::default()).collect(),
                mailboxes: mailboxes.clone(),
                drain: drain.clone(),
                xdp: spec.xdp,
            };
            let stop = stop.clone();
            let core = spec.core;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("turn-shard-{}", spec.index))
                    .spawn(move || run(poll, io, core, rx, stop))?,
            );
            handles.push(ShardHandle { tx, waker });
        }
        let local_addrs = resolved.unwrap_or_default();
        Ok(Relay {
            local_addrs,
            handles,
            stop,
            threads,
            xdp: None,
        })
    }

    /// Keeps the attached XDP program, and tells it the listen addresses
    /// (their real ports) ChannelData comes to.
    pub fn keep_fast_path(&mut self, fast: xdp::FastPath) -> io::Result<()> {
        fast.set_listen(&self.local_addrs)?;
        self.xdp = Some(fast);
        Ok(())
    }

    /// The bound UDP listener addresses (the real ports when 0 was asked for).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    pub fn handles(&self) -> Vec<ShardHandle> {
        self.handles.clone()
    }

    /// Stops the shards when `token` is cancelled (a child of the
    /// appliance's stop token). The shard loops read a plain flag, not the
    /// token: a token's state is behind a lock, a flag is one load per
    /// loop turn.
    pub fn stop_when(&self, token: CancellationToken) -> impl std::future::Future<Output = ()> {
        let flag = self.stop.clone();
        let wakers: Vec<_> = self.handles.iter().map(|h| h.waker.clone()).collect();
        async move {
            token.cancelled().await;
            flag.store(true, Ordering::SeqCst);
            for w in wakers {
                let _ = w.wake();
            }
        }
    }

    /// Stops the shards (if the stop token has not already) and joins
    /// their threads.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in &self.handles {
            let _ = h.waker.wake();
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
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    if dont_fragment {
        set_dont_fragment(&socket2::SockRef::from(&sock), addr.is_ipv4())?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(UdpSocket::from_std(sock.into()))
}

/// DONT-FRAGMENT (RFC 8656 §14.8): set DF on every datagram of this relay.
fn set_dont_fragment(sock: &socket2::SockRef<'_>, v4: bool) -> io::Result<()> {
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

struct StreamConn {
    tx: mpsc::Sender<Vec<u8>>,
    link: Arc<StreamLink>,
}

struct ShardIo {
    registry: Registry,
    listeners: Vec<(UdpSocket, SocketAddr)>,
    /// Relay sockets indexed by port, IPv4 [0] and IPv6 [1].
    relays: [Vec<Option<UdpSocket>>; 2],
    relay_bind: [Option<IpAddr>; 2],
    streams: HashMap<FiveTuple, StreamConn>,
    /// Stream clients whose allocation ended in this turn of the loop.
    closing: Vec<FiveTuple>,
    /// Sockets bound for EVEN-PORT reservations, shared by all shards: the
    /// client that claims one may be hashed to any shard.
    reserved: Arc<Mutex<HashMap<RelayId, UdpSocket>>>,
    stats: Arc<TurnStats>,
    usage: Arc<UsageBook>,
    /// Datagrams the core sent in this batch, flushed before the next.
    out: SendQueue,
    /// This shard's place in `mailboxes` and `outbox`.
    index: usize,
    /// Relay to relay in memory (`shortcut.rs`): who owns which relay,
    /// every shard's mailbox, and what this turn hands to each shard (to
    /// this one too, delivered by `settle`).
    directory: Arc<Directory>,
    mailboxes: Arc<[Mailbox]>,
    outbox: Vec<Parcel>,
    drain: Arc<Drain>,
    xdp: Option<xdp::shard::XdpShard>,
}

impl Io for ShardIo {
    fn send_to_client(&mut self, to: &FiveTuple, data: &[u8]) {
        if to.transport.is_stream() {
            let Some(conn) = self.streams.get(to) else {
                return;
            };
            // A client that stops reading is cut off, not buffered without
            // bound: its connection task sees the queue close and ends.
            if conn.tx.try_send(data.to_vec()).is_err() {
                inc(&self.stats.send_errors);
                inc(&self.stats.stream_overflows);
                conn.link.cut.notify_one();
                self.streams.remove(to);
            }
            return;
        }
        let sock = match self.listeners.as_slice() {
            [(s, _)] => s,
            many => match many.iter().find(|(_, local)| *local == to.server) {
                Some((s, _)) => s,
                None => return,
            },
        };
        let failed = self.out.push(sock.as_raw_fd(), to.client, data);
        self.count_send_errors(failed);
    }

    fn send_to_peer(&mut self, relay: RelayId, peer: SocketAddr, data: &[u8]) {
        // Benchmarks only: `kernel-relay` sends relay to relay through
        // the sockets, to measure what the shortcut saves.
        #[cfg(not(feature = "kernel-relay"))]
        if let Some((to, shard)) = self.directory.route(peer) {
            if let (Some(from), Some(parcel)) = (
                self.directory.relayed_addr(relay),
                self.outbox.get_mut(shard),
            ) {
                parcel.push(to, from, data);
                inc(&self.stats.handed_over);
                return;
            }
        }
        if let Some(Some(sock)) = self.relays[usize::from(relay.v6)].get(usize::from(relay.port)) {
            let failed = self.out.push(sock.as_raw_fd(), peer, data);
            self.count_send_errors(failed);
        }
    }

    fn open_relay(&mut self, relay: RelayId, dont_fragment: bool) -> bool {
        let Some(ip) = self.relay_bind[usize::from(relay.v6)] else {
            return false;
        };
        let held = self.lock_reserved().remove(&relay);
        let sock = match held {
            Some(s) => {
                if dont_fragment {
                    let _ = set_dont_fragment(&socket2::SockRef::from(&s), !relay.v6);
                }
                Ok(s)
            }
            None => bind_relay(SocketAddr::new(ip, relay.port), dont_fragment),
        };
        let Ok(mut sock) = sock else {
            return false;
        };
        let token = Token(RELAY_BASE + (usize::from(relay.v6) << 16) + usize::from(relay.port));
        if self
            .registry
            .register(&mut sock, token, Interest::READABLE)
            .is_err()
        {
            return false;
        }
        let table = &mut self.relays[usize::from(relay.v6)];
        let i = usize::from(relay.port);
        if table.len() <= i {
            table.resize_with(i + 1, || None);
        }
        table[i] = Some(sock);
        self.directory.opened(relay, self.index);
        true
    }

    fn close_client(&mut self, client: &FiveTuple) {
        // Closed once the core has answered (the Refresh success comes
        // after the delete): see `close_ended_streams`.
        self.closing.push(*client);
    }

    fn close_relay(&mut self, relay: RelayId) {
        // What is queued for this socket goes before it closes.
        self.flush();
        if let Some(slot) = self.relays[usize::from(relay.v6)].get_mut(usize::from(relay.port)) {
            if let Some(mut sock) = slot.take() {
                self.directory.closed(relay);
                let _ = self.registry.deregister(&mut sock);
            }
        }
    }

    fn reserve_relay(&mut self, relay: RelayId) -> bool {
        let Some(ip) = self.relay_bind[usize::from(relay.v6)] else {
            return false;
        };
        match bind_relay(SocketAddr::new(ip, relay.port), false) {
            Ok(sock) => {
                self.lock_reserved().insert(relay, sock);
                true
            }
            Err(_) => false,
        }
    }

    fn unreserve_relay(&mut self, relay: RelayId) {
        self.lock_reserved().remove(&relay);
    }

    fn event(&mut self, mut event: Event) {
        if let Some(x) = self.xdp.as_mut() {
            x.on_event(&mut event);
        }
        events::record(&self.stats, &self.usage, &event);
        if matches!(event, Event::AllocationEnded { .. }) {
            // One allocation fewer may be what a drain waits for.
            self.drain.progressed();
        }
    }
}

impl ShardIo {
    /// Sends what the core queued, and posts what it handed to other
    /// shards.
    fn flush(&mut self) {
        let failed = self.out.flush();
        self.count_send_errors(failed);
        for (shard, parcel) in self.outbox.iter_mut().enumerate() {
            if shard == self.index || parcel.is_empty() {
                continue;
            }
            let Some(mailbox) = self.mailboxes.get(shard) else {
                continue;
            };
            if let Err(dropped) = mailbox.post(std::mem::take(parcel)) {
                self.stats
                    .dropped_mailbox_full
                    .fetch_add(dropped as u64, Ordering::Relaxed);
            }
        }
    }

    fn mailbox(&self) -> &Mailbox {
        &self.mailboxes[self.index]
    }

    fn count_send_errors(&self, failed: usize) {
        if failed > 0 {
            self.stats
                .send_errors
                .fetch_add(failed as u64, Ordering::Relaxed);
        }
    }

    fn lock_reserved(&self) -> std::sync::MutexGuard<'_, HashMap<RelayId, UdpSocket>> {
        self.reserved.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Which socket (or queue) to read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Listener(usize),
    Relay(RelayId),
    Streams,
}

fn run(
    mut poll: Poll,
    mut io: ShardIo,
    mut core: Server,
    mut rx: mpsc::Receiver<StreamEvent>,
    stop: Arc<AtomicBool>,
) {
    let mut events = Events::with_capacity(1024);
    let mut batch = RecvBatch::new();
    let mut pending: Vec<Source> = Vec::new();
    let mut ready: Vec<Source> = Vec::new();
    let mut inbox: Vec<Parcel> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let timeout = if pending.is_empty() && io.mailbox().sleep() {
            let now = Instant::now();
            core.poll_timeout()
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1))
        } else {
            Duration::ZERO
        };
        let polled = poll.poll(&mut events, Some(timeout));
        io.mailbox().awake();
        if let Err(e) = polled {
            if e.kind() != io::ErrorKind::Interrupted {
                inc(&io.stats.recv_errors);
            }
            continue;
        }
        ready.clear();
        ready.append(&mut pending);
        for ev in events.iter() {
            let src = match ev.token() {
                WAKER => Source::Streams,
                Token(t) if t >= RELAY_BASE => {
                    let t = t - RELAY_BASE;
                    match u16::try_from(t & 0xFFFF) {
                        Ok(port) => Source::Relay(RelayId {
                            v6: t >> 16 == 1,
                            port,
                        }),
                        Err(_) => continue,
                    }
                }
                Token(i) => Source::Listener(i),
            };
            if !ready.contains(&src) {
                ready.push(src);
            }
        }
        let now = Instant::now();
        for &src in &ready {
            let more = match src {
                Source::Streams => drain_streams(now, &mut io, &mut core, &mut rx),
                _ => drain(src, now, &mut io, &mut core, &mut batch),
            };
            settle(now, &mut io, &mut core);
            if more {
                pending.push(src);
            }
        }
        deliver_mail(now, &mut io, &mut core, &mut inbox);
        // One flush per turn: what every ready socket made the core send
        // leaves together, one `sendmmsg` per socket (the queue flushes by
        // itself before that if it fills).
        io.flush();
        core.handle_timeout(Instant::now(), &mut io);
        io.flush();
        if let Some(x) = io.xdp.as_mut() {
            x.sweep(Instant::now(), &mut core);
        }
        close_ended_streams(&mut io);
    }
}

/// Delivers what this shard's own allocations sent to each other in this
/// turn (each delivery only ever sends to a client, so one pass empties it).
fn settle(now: Instant, io: &mut ShardIo, core: &mut Server) {
    let mine = io.index;
    let Some(parcel) = io.outbox.get_mut(mine).filter(|p| !p.is_empty()) else {
        return;
    };
    let mut parcel = std::mem::take(parcel);
    for (to, from, data) in parcel.iter() {
        core.peer_datagram(now, to, from, data, io);
    }
    if io.outbox[mine].is_empty() {
        // Keep the buffers for the next turn.
        parcel.clear();
        io.outbox[mine] = parcel;
    }
}

/// Delivers what other shards' allocations sent to this shard's relays.
fn deliver_mail(now: Instant, io: &mut ShardIo, core: &mut Server, inbox: &mut Vec<Parcel>) {
    io.mailbox().take(inbox);
    for parcel in inbox.drain(..) {
        for (to, from, data) in parcel.iter() {
            core.peer_datagram(now, to, from, data, io);
        }
    }
}

/// Drops the answer queues of stream clients whose allocation ended: each
/// connection task writes what is queued, then closes.
fn close_ended_streams(io: &mut ShardIo) {
    for ft in io.closing.drain(..) {
        io.streams.remove(&ft);
    }
}

/// Reads up to BUDGET datagrams from one socket, a batch at a time, and
/// sends what each batch made the core send; true if it may have more.
fn drain(
    src: Source,
    now: Instant,
    io: &mut ShardIo,
    core: &mut Server,
    batch: &mut RecvBatch,
) -> bool {
    let mut errors = 0;
    for _ in 0..BUDGET / BATCH {
        let fd = match src {
            Source::Listener(i) => match io.listeners.get(i) {
                Some((s, _)) => s.as_raw_fd(),
                None => return false,
            },
            Source::Relay(r) => match io.relays[usize::from(r.v6)].get(usize::from(r.port)) {
                Some(Some(s)) => s.as_raw_fd(),
                _ => return false,
            },
            Source::Streams => return false,
        };
        let n = match batch.recv(fd) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => {
                inc(&io.stats.recv_errors);
                errors += 1;
                if errors >= MAX_ERRORS {
                    return true;
                }
                continue;
            }
        };
        for (from, data) in (0..n).filter_map(|i| batch.get(i)) {
            match src {
                Source::Listener(i) => {
                    let ft = FiveTuple {
                        client: from,
                        server: io.listeners[i].1,
                        transport: Transport::Udp,
                    };
                    core.handle_client(now, ft, data, io);
                }
                Source::Relay(r) => core.peer_datagram(now, r, from, data, io),
                Source::Streams => {}
            }
        }
        settle(now, io, core);
        if n < BATCH {
            return false;
        }
    }
    true
}

/// Handles up to BUDGET events from stream connections; true if more wait.
fn drain_streams(
    now: Instant,
    io: &mut ShardIo,
    core: &mut Server,
    rx: &mut mpsc::Receiver<StreamEvent>,
) -> bool {
    for _ in 0..BUDGET {
        match rx.try_recv() {
            Ok(StreamEvent::Open { ft, tx, link }) => {
                io.streams.insert(ft, StreamConn { tx, link });
            }
            Ok(StreamEvent::Data { ft, msg }) => {
                core.handle_client(now, ft, &msg, io);
                if let Some(conn) = io.streams.get(&ft) {
                    if !conn.link.authed.load(Ordering::Relaxed) && core.has_allocation(&ft) {
                        conn.link.authed.store(true, Ordering::Relaxed);
                        conn.link.authed_now.notify_one();
                    }
                }
            }
            Ok(StreamEvent::Closed { ft }) => {
                core.connection_closed(now, &ft, io);
                io.streams.remove(&ft);
            }
            Ok(StreamEvent::Admin(AdminRequest::List(reply))) => {
                let _ = reply.send(core.allocations(now));
            }
            Ok(StreamEvent::Admin(AdminRequest::End(which, reply))) => {
                let _ = reply.send(core.end_allocations(&which, now, io));
            }
            Err(_) => return false,
        }
    }
    true
}
