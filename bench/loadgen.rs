//! turnkey-loadgen: an open-loop load generator for a TURN relay over UDP.
//!
//! It makes `2 × pairs` allocations (long-term credentials, any RFC 8656
//! server), pairs them up, gives each a permission and a channel to its
//! partner's relayed address, then sends ChannelData of `size` bytes from
//! every allocation at `rate` packets per second for `secs` seconds, on a
//! fixed schedule whatever comes back (open loop: a slow relay does not
//! slow the sender down, it loses or delays packets). Every packet crosses
//! the relay twice: client → its relay → the partner's relay → partner.
//!
//! Each payload carries its send time from the one monotonic clock of this
//! process, so the receiver reads one-way latency through the relay
//! directly. It prints one line of `key=value`: packets sent and
//! received, loss, delivered packets/s, latency percentiles.
//!
//! `--bare` speaks to `turnkey-forwarder` instead (the same path with no
//! TURN: see `bench/forwarder.rs`), for this machine's ceiling.
//!
//! `--peers IP` measures the other path real calls take: a client relayed
//! to a peer that is not a client of the server (the other browser's own
//! address). Each pair is then one allocation and one plain UDP socket on
//! `IP` (loopback; the server must allow it as a peer): the allocation
//! sends ChannelData to the peer, the peer sends plain datagrams to the
//! allocation's relayed address, so every packet crosses one relay socket,
//! each way, and the relay-to-relay handover never applies.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use mio::{Events, Interest, Poll, Token};
use turnkey::probe::client::{Answer, Client, Progress, Request};
use turnkey::probe::ice::TurnCredential;
use turnkey::relay::batch::{RecvBatch, SendQueue};

#[derive(Parser)]
#[command(about = "Open-loop TURN load: pairs of allocations, ChannelData both ways")]
struct Args {
    /// The TURN server (or the bare forwarder), UDP.
    #[arg(long, default_value = "127.0.0.1:3478")]
    server: SocketAddr,
    #[arg(long, default_value = "bench")]
    user: String,
    #[arg(long, default_value = "bench-password-123")]
    password: String,
    /// Pairs of allocations (2 × pairs allocations in all).
    #[arg(long, default_value_t = 50)]
    pairs: usize,
    /// Bytes of application data per packet (at least 24).
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Packets per second each allocation sends.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Packets each allocation sends back to back at each tick of its
    /// schedule (the rate stays packets per second): 1 = evenly paced; a
    /// video sender's frame is a burst (e.g. 8 × 1,200 B at 30 frames/s).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    burst: u64,
    /// Speak the bare forwarder's protocol instead of TURN.
    #[arg(long)]
    bare: bool,
    /// Pair each allocation with a plain UDP peer on this address instead
    /// of another allocation (client → outside peer, both ways).
    #[arg(long, value_name = "IP", conflicts_with = "bare")]
    peers: Option<std::net::IpAddr>,
}

const MAGIC: &[u8; 4] = b"TKLG";
const CHANNEL: u16 = 0x4000;
/// How long stragglers may take after the last send.
const DRAIN: Duration = Duration::from_secs(1);

/// One sender and receiver as the generator sees it: an allocation's
/// client socket, or (`--peers`) a plain peer.
struct Flow {
    sock: mio::net::UdpSocket,
    /// Where it sends: the server, or (a peer) its allocation's relayed
    /// address.
    dest: SocketAddr,
    /// The first word of every packet: the channel (TURN) or the partner's
    /// relay port (bare); `None` for a peer, which sends bare payloads.
    header: Option<u16>,
    sent: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.size < 24 || args.size > 65000 {
        bail!("--size must be 24..65000");
    }
    if let Some(ip) = args.peers {
        let mut ready = with_peers(&args, ip)?;
        let report = run(&args, &mut ready)?;
        println!("{report}");
        return Ok(());
    }
    let mut flows = Vec::new();
    let mut relayed = Vec::new();
    for _ in 0..2 * args.pairs {
        let (sock, mut client) = client_socket(&args)?;
        let r = if args.bare {
            bare_hello(&sock)?
        } else {
            allocate(&sock, &mut client)?
        };
        relayed.push(r);
        flows.push((sock, client));
    }
    let mut ready = Vec::new();
    for (i, (sock, mut client)) in flows.into_iter().enumerate() {
        let partner = relayed[i ^ 1];
        if !args.bare {
            transact(&sock, &mut client, Request::CreatePermission(partner))?;
            transact(&sock, &mut client, Request::ChannelBind(CHANNEL, partner))?;
        }
        sock.set_nonblocking(true)?;
        ready.push(Flow {
            sock: mio::net::UdpSocket::from_std(sock),
            dest: args.server,
            header: Some(if args.bare { partner.port() } else { CHANNEL }),
            sent: 0,
        });
    }
    let report = run(&args, &mut ready)?;
    println!("{report}");
    Ok(())
}

/// `pairs` allocations, each with a channel to a plain UDP peer of its own
/// on `ip`; the peers send to the relayed addresses.
fn with_peers(args: &Args, ip: std::net::IpAddr) -> Result<Vec<Flow>> {
    let mut ready = Vec::new();
    for _ in 0..args.pairs {
        let (sock, mut client) = client_socket(args)?;
        let relayed = allocate(&sock, &mut client)?;
        let peer = UdpSocket::bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding a peer on {ip}"))?;
        let peer_addr = peer.local_addr()?;
        transact(&sock, &mut client, Request::CreatePermission(peer_addr))?;
        transact(&sock, &mut client, Request::ChannelBind(CHANNEL, peer_addr))?;
        sock.set_nonblocking(true)?;
        peer.set_nonblocking(true)?;
        ready.push(Flow {
            sock: mio::net::UdpSocket::from_std(sock),
            dest: args.server,
            header: Some(CHANNEL),
            sent: 0,
        });
        ready.push(Flow {
            sock: mio::net::UdpSocket::from_std(peer),
            dest: relayed,
            header: None,
            sent: 0,
        });
    }
    Ok(ready)
}

/// A client's socket, connected to the server, and its TURN client. The
/// route picks its address (loopback for a server on loopback; the test
/// bed's client address for bench/xdp_vs_userspace.sh).
fn client_socket(args: &Args) -> Result<(UdpSocket, Client)> {
    let any = if args.server.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let sock = UdpSocket::bind(any)?;
    sock.connect(args.server)?;
    sock.set_read_timeout(Some(Duration::from_millis(300)))?;
    let client = Client::new(Some(TurnCredential {
        username: args.user.clone(),
        password: args.password.clone(),
    }));
    Ok((sock, client))
}

/// An allocation's relayed address.
fn allocate(sock: &UdpSocket, client: &mut Client) -> Result<SocketAddr> {
    match transact(sock, client, Request::Allocate)? {
        Answer::Allocated { relayed, .. } => Ok(relayed),
        _ => bail!("Allocate answered without a relayed address"),
    }
}

/// Sends a request until it is answered (re-signing after a challenge).
fn transact(sock: &UdpSocket, c: &mut Client, req: Request) -> Result<Answer> {
    let mut buf = [0u8; 2048];
    sock.send(c.start(req)?)?;
    for _ in 0..20 {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                sock.send(c.in_flight().context("nothing in flight")?)?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match c.handle(&buf[..n])? {
            Progress::Done(a) => return Ok(a),
            Progress::Resend => {
                sock.send(c.in_flight().context("nothing in flight")?)?;
            }
            Progress::Ignored => {}
        }
    }
    bail!("{} got no answer", req.name())
}

/// The bare forwarder's handshake: "HELLO" answered by the relay port.
fn bare_hello(sock: &UdpSocket) -> Result<SocketAddr> {
    let mut buf = [0u8; 64];
    for _ in 0..10 {
        sock.send(b"HELLO")?;
        if let Ok(n) = sock.recv(&mut buf) {
            if n == 7 && &buf[..5] == b"RELAY" {
                let port = u16::from_be_bytes([buf[5], buf[6]]);
                return Ok(SocketAddr::new(sock.peer_addr()?.ip(), port));
            }
        }
    }
    bail!("the forwarder did not answer HELLO")
}

struct Tally {
    received: u64,
    latencies_ns: Vec<u64>,
}

fn run(args: &Args, flows: &mut [Flow]) -> Result<String> {
    let mut poll = Poll::new()?;
    for (i, f) in flows.iter_mut().enumerate() {
        poll.registry()
            .register(&mut f.sock, Token(i), Interest::READABLE)?;
    }
    let n = flows.len() as u64;
    let interval = Duration::from_nanos(1_000_000_000 / args.rate.max(1));
    let per_flow = (args.secs * args.rate as f64).round() as u64;
    let start = Instant::now();
    let mut out = SendQueue::new();
    let mut rx = RecvBatch::new();
    let mut events = Events::with_capacity(1024);
    let mut tally = Tally {
        received: 0,
        latencies_ns: Vec::with_capacity((per_flow * n) as usize),
    };
    let mut payload = vec![0u8; 4 + args.size];
    payload[4..8].copy_from_slice(MAGIC);
    let mut send_errors = 0;
    let mut late_ns = 0u64;
    let mut done_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        // Every flow sends what its schedule says is due by now; flows
        // (bursts) are spread evenly over one tick.
        let mut next_due: Option<Instant> = None;
        for (i, f) in flows.iter_mut().enumerate() {
            let offset = interval * args.burst as u32 * i as u32 / n as u32;
            while f.sent < per_flow {
                // The packets of one burst share their due time.
                let due = start + offset + interval * (f.sent / args.burst * args.burst) as u32;
                if due > now {
                    next_due = Some(next_due.map_or(due, |d| d.min(due)));
                    break;
                }
                late_ns = late_ns.max((now - due).as_nanos() as u64);
                stamp(&mut payload, f.header.unwrap_or(0), i as u32, f.sent, start);
                // A peer sends the application data alone, as any UDP
                // endpoint of a call does.
                let data = if f.header.is_some() {
                    &payload[..]
                } else {
                    &payload[4..]
                };
                send_errors += out.push(f.sock.as_raw_fd(), f.dest, data);
                f.sent += 1;
            }
        }
        send_errors += out.flush();
        if next_due.is_none() && done_at.is_none() {
            done_at = Some(Instant::now());
        }
        let deadline = match (next_due, done_at) {
            (Some(d), _) => d,
            (None, Some(d)) => d + DRAIN,
            (None, None) => unreachable!(),
        };
        let sent: u64 = flows.iter().map(|f| f.sent).sum();
        if done_at.is_some_and(|d| d.elapsed() >= DRAIN)
            || (next_due.is_none() && tally.received >= sent)
        {
            break;
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        poll.poll(&mut events, Some(wait))?;
        for ev in events.iter() {
            if let Some(f) = flows.get(ev.token().0) {
                receive(f, &mut rx, start, &mut tally);
            }
        }
    }
    let sent: u64 = flows.iter().map(|f| f.sent).sum();
    let secs = done_at.map_or(args.secs, |d| (d - start).as_secs_f64());
    let lost = sent.saturating_sub(tally.received);
    let mut l = std::mem::take(&mut tally.latencies_ns);
    l.sort_unstable();
    let pct = |p: f64| -> f64 {
        if l.is_empty() {
            return 0.0;
        }
        let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
        l[i] as f64 / 1000.0
    };
    Ok(format!(
        "allocations={} size={} rate={} burst={} secs={:.2} sent={} received={} lost={} loss_pct={:.4} \
         offered_pps={:.0} delivered_pps={:.0} p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1} \
         send_errors={} max_late_us={:.0}",
        flows.len(),
        args.size,
        args.rate,
        args.burst,
        secs,
        sent,
        tally.received,
        lost,
        if sent > 0 { 100.0 * lost as f64 / sent as f64 } else { 0.0 },
        sent as f64 / secs,
        tally.received as f64 / secs,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        pct(1.0),
        send_errors,
        late_ns as f64 / 1000.0,
    ))
}

/// Header, flow, sequence number and send time into the packet.
fn stamp(p: &mut [u8], header: u16, flow: u32, seq: u64, start: Instant) {
    let len = (p.len() - 4) as u16;
    p[0..2].copy_from_slice(&header.to_be_bytes());
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[8..12].copy_from_slice(&flow.to_be_bytes());
    p[12..20].copy_from_slice(&seq.to_be_bytes());
    let t = start.elapsed().as_nanos() as u64;
    p[20..28].copy_from_slice(&t.to_be_bytes());
}

/// Reads everything a flow's socket has and tallies our packets: framed
/// (ChannelData, or the forwarder's header) on a client socket, bare on a
/// peer's.
fn receive(f: &Flow, rx: &mut RecvBatch, start: Instant, tally: &mut Tally) {
    let at = if f.header.is_some() { 4 } else { 0 };
    while let Ok(n) = rx.recv(f.sock.as_raw_fd()) {
        let now = start.elapsed().as_nanos() as u64;
        for (_, d) in (0..n).filter_map(|i| rx.get(i)) {
            let Some(d) = d.get(at..) else { continue };
            if d.len() < 24 || &d[0..4] != MAGIC {
                continue;
            }
            let mut t = [0u8; 8];
            t.copy_from_slice(&d[16..24]);
            tally.received += 1;
            tally
                .latencies_ns
                .push(now.saturating_sub(u64::from_be_bytes(t)));
        }
        if n < turnkey::relay::batch::BATCH {
            break;
        }
    }
}
