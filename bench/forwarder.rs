//! turnkey-forwarder: a bare UDP forwarder, this machine's ceiling for a
//! relay.
//!
//! It has turnkey's socket layout and system calls (one thread per two
//! cores, each with its own SO_REUSEPORT listener with 4 MiB buffers and
//! one relay socket per client, `mio` readiness, `recvmmsg` and a
//! `sendmmsg` per socket per batch, from `turnkey::relay::batch`) and
//! none of its
//! TURN logic: no STUN, no authentication, no permissions, no budgets, no
//! counters. What turnkey spends beyond this is the price of being a TURN
//! server.
//!
//! Protocol (spoken by `turnkey-loadgen --bare`): a client sends `HELLO`
//! to the listener and gets `RELAY` + the big-endian port of a relay
//! socket of its own. It then sends `[peer port u16][len u16][data]`; the
//! forwarder sends `data` from the client's relay socket to that port on
//! the listener's IP. A datagram arriving on a relay socket goes back to
//! its client through the listener as `[0x4000][len][data]`, like
//! ChannelData.
//!
//! `--direct` mirrors turnkey's relay-to-relay handover
//! (`src/relay/shortcut.rs`): a datagram for another client's relay port
//! goes straight back out of the listener to that client, never through
//! the relay sockets, so both do the same system calls per packet.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use anyhow::Result;
use clap::Parser;
use mio::{Events, Interest, Poll, Token};
use turnkey::relay::batch::{RecvBatch, SendQueue, BATCH};

#[derive(Parser)]
#[command(about = "A bare UDP forwarder: turnkey's syscalls without TURN")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:3479")]
    listen: SocketAddr,
    /// Threads, each with its own listener (0 = one per two cores, as
    /// turnkey).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Client to client without the relay sockets, as turnkey's handover.
    #[arg(long)]
    direct: bool,
}

/// Which client owns each relay port, for `--direct` (all threads).
type Owners = std::sync::Arc<std::sync::RwLock<HashMap<u16, SocketAddr>>>;

/// One thread's side of `--direct`: the shared owners, a copy of what it
/// has looked up (the lock is taken once per port, not per packet), and
/// one frame buffer (no allocation per packet).
struct Direct {
    owners: Owners,
    seen: HashMap<u16, SocketAddr>,
    frame: Vec<u8>,
}

impl Direct {
    fn owner(&mut self, port: u16) -> Option<SocketAddr> {
        if let Some(&a) = self.seen.get(&port) {
            return Some(a);
        }
        let a = *self
            .owners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&port)?;
        self.seen.insert(port, a);
        Some(a)
    }
}

const LISTENER: Token = Token(usize::MAX);
/// Datagrams read from one socket before the loop looks at the others.
const BUDGET: usize = 256;

struct Relay {
    sock: mio::net::UdpSocket,
    client: SocketAddr,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let threads = match args.threads {
        0 => (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1),
        n => n,
    };
    let owners: Option<Owners> = args.direct.then(Owners::default);
    let mut listeners = Vec::new();
    for _ in 0..threads {
        listeners.push(bind_listener(args.listen)?);
    }
    println!("listening on {}", args.listen);
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let owners = owners.clone();
            std::thread::spawn(move || forward(l, owners))
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("a thread panicked"))??;
    }
    Ok(())
}

/// As turnkey's listener: SO_REUSEPORT, 4 MiB buffers, non-blocking.
fn bind_listener(addr: SocketAddr) -> Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_port(true)?;
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

fn forward(std_listener: UdpSocket, owners: Option<Owners>) -> Result<()> {
    let mut direct = owners.map(|owners| Direct {
        owners,
        seen: HashMap::new(),
        frame: Vec::with_capacity(turnkey::relay::batch::SLOT + 4),
    });
    let mut poll = Poll::new()?;
    let mut listener = mio::net::UdpSocket::from_std(std_listener);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut relays: Vec<Relay> = Vec::new();
    let mut by_client: HashMap<SocketAddr, usize> = HashMap::new();
    let mut events = Events::with_capacity(1024);
    let mut rx = RecvBatch::new();
    let mut out = SendQueue::new();
    let mut frame = vec![0u8; turnkey::relay::batch::SLOT + 4];
    let mut pending: Vec<Token> = Vec::new();
    loop {
        let timeout = (!pending.is_empty()).then_some(std::time::Duration::ZERO);
        poll.poll(&mut events, timeout)?;
        let mut ready: Vec<Token> = std::mem::take(&mut pending);
        for t in events.iter().map(|e| e.token()) {
            if !ready.contains(&t) {
                ready.push(t);
            }
        }
        for t in ready {
            let more = if t == LISTENER {
                drain(&listener, &mut rx, &mut out, |from, d, out| {
                    from_client(
                        &mut poll,
                        &listener,
                        &mut relays,
                        &mut by_client,
                        direct.as_mut(),
                        from,
                        d,
                        out,
                    )
                })
            } else {
                let Some(r) = relays.get(t.0) else { continue };
                let fd = listener.as_raw_fd();
                let client = r.client;
                drain(&r.sock, &mut rx, &mut out, |_, d, out| {
                    let n = d.len().min(frame.len() - 4);
                    frame[0..2].copy_from_slice(&0x4000u16.to_be_bytes());
                    frame[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                    frame[4..4 + n].copy_from_slice(&d[..n]);
                    out.push(fd, client, &frame[..4 + n]);
                })
            };
            if more {
                pending.push(t);
            }
        }
    }
}

/// Reads up to BUDGET datagrams, a batch at a time, flushing the sends of
/// each batch; true if the socket may have more.
fn drain(
    sock: &mio::net::UdpSocket,
    rx: &mut RecvBatch,
    out: &mut SendQueue,
    mut each: impl FnMut(SocketAddr, &[u8], &mut SendQueue),
) -> bool {
    for _ in 0..BUDGET / BATCH {
        let Ok(n) = rx.recv(sock.as_raw_fd()) else {
            return false;
        };
        for (from, d) in (0..n).filter_map(|i| rx.get(i)) {
            each(from, d, out);
        }
        out.flush();
        if n < BATCH {
            return false;
        }
    }
    true
}

#[allow(clippy::too_many_arguments)]
fn from_client(
    poll: &mut Poll,
    listener: &mio::net::UdpSocket,
    relays: &mut Vec<Relay>,
    by_client: &mut HashMap<SocketAddr, usize>,
    mut direct: Option<&mut Direct>,
    from: SocketAddr,
    d: &[u8],
    out: &mut SendQueue,
) {
    if d == b"HELLO" {
        let Ok(port) = relay_for(poll, listener, relays, by_client, from) else {
            return;
        };
        if let Some(d) = direct.as_deref_mut() {
            d.owners
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(port, from);
        }
        let mut answer = *b"RELAY\0\0";
        answer[5..].copy_from_slice(&port.to_be_bytes());
        out.push(listener.as_raw_fd(), from, &answer);
        return;
    }
    let (Some(&i), Some(head)) = (by_client.get(&from), d.get(..4)) else {
        return;
    };
    let port = u16::from_be_bytes([head[0], head[1]]);
    if let Some(direct) = direct {
        if let Some(to) = direct.owner(port) {
            let data = &d[4..];
            let frame = &mut direct.frame;
            frame.clear();
            frame.extend_from_slice(&0x4000u16.to_be_bytes());
            frame.extend_from_slice(&(data.len() as u16).to_be_bytes());
            frame.extend_from_slice(data);
            out.push(listener.as_raw_fd(), to, frame);
            return;
        }
    }
    let Ok(ip) = listener.local_addr().map(|a| a.ip()) else {
        return;
    };
    if let Some(r) = relays.get(i) {
        out.push(r.sock.as_raw_fd(), SocketAddr::new(ip, port), &d[4..]);
    }
}

/// The client's relay port, opening its socket on the first HELLO.
fn relay_for(
    poll: &mut Poll,
    listener: &mio::net::UdpSocket,
    relays: &mut Vec<Relay>,
    by_client: &mut HashMap<SocketAddr, usize>,
    client: SocketAddr,
) -> std::io::Result<u16> {
    if let Some(&i) = by_client.get(&client) {
        return relays[i].sock.local_addr().map(|a| a.port());
    }
    let bind = SocketAddr::new(listener.local_addr()?.ip(), 0);
    let std_sock = UdpSocket::bind(bind)?;
    std_sock.set_nonblocking(true)?;
    let mut sock = mio::net::UdpSocket::from_std(std_sock);
    poll.registry()
        .register(&mut sock, Token(relays.len()), Interest::READABLE)?;
    let port = sock.local_addr()?.port();
    by_client.insert(client, relays.len());
    relays.push(Relay { sock, client });
    Ok(port)
}
