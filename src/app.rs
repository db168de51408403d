//! The composition root: builds the appliance from one `Config`, starts
//! it, answers signals through the control handle, and stops it.
//!
//! Signals: SIGINT stops at once; SIGTERM drains first (up to
//! `drain.grace_secs`; a second SIGTERM stops at once); SIGUSR1 drains and
//! stays up until drained; SIGHUP reloads the config file through
//! [`Control::reload`] (a bad file is refused and the old one stays; keys
//! that need a restart are logged as `restart needed: KEY`).
//!
//! Stop is orderly and complete: signaling closes its sockets with 1001,
//! the listeners stop accepting, every connection task ends (they are
//! tracked), the relay threads are joined, and the last log line says how
//! many tasks are still alive (none, unless something leaked).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Secret};
use crate::control::{rules_from, Bound, Control, Parts};
use crate::http::HttpState;
use crate::ice::unix_now;
use crate::metrics::Metrics;
use crate::public::{Gate, PublicStats};
use crate::relay::{Relay, ShardSpec};
use crate::stream::{StreamParts, StreamStats, Streams};
use crate::turn::server::{Clock, CoreConfig, Server, Shared};
use crate::turn::stats::TurnStats;
use tower_http::limit::RequestBodyLimitLayer;

/// How long stop waits for connection tasks before it gives up on them.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Runs the appliance until SIGINT/SIGTERM (or the end of a drain).
pub async fn serve(cfg: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    // Before anything can announce readiness: a SIGHUP or SIGUSR1 arriving
    // earlier would otherwise kill the process (their default action).
    let signals = Signals::install().context("installing signal handlers")?;
    let running = start(cfg, config_path).await?;
    control_loop(signals, &running.control).await;
    running.stop().await;
    Ok(())
}

/// The started appliance: what stop needs.
struct Running {
    control: Arc<Control>,
    relay: Relay,
    stop: CancellationToken,
    tasks: TaskTracker,
}

async fn start(cfg: Config, config_path: Option<PathBuf>) -> anyhow::Result<Running> {
    let t = &cfg.turn;
    let families = RelayFamilies::from_config(t);
    let relay_ips = families.relay_ips();
    let advertised_ip = families
        .advertised
        .iter()
        .flatten()
        .copied()
        .next()
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let generated = Secret::new(hex(&rand::rng().random::<[u8; 32]>()));
    if cfg.auth.secrets.is_empty() {
        tracing::info!("no auth.secrets configured: generated a random REST secret for this run");
    }
    let rules = Arc::new(ArcSwap::from_pointee(rules_from(
        &cfg,
        &generated,
        relay_ips.clone(),
    )));
    let draining = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared::new(
        t.relay_ports(),
        draining.clone(),
        &mut rand::rng(),
    ));

    // The relay shards: one event-loop thread each. By default one per two
    // cores: the kernel's UDP work (most of a relay's CPU) runs beside
    // them, and a shard that is kept busy batches more and sleeps less.
    // On the 2-core bench machine one shard relays uclient's burst for
    // 0.63x the CPU of two, and more packets/s at 300k offered
    // (bench/RESULTS.md, issue 13).
    let threads = match t.threads {
        0 => default_shards(std::thread::available_parallelism().map_or(1, |n| n.get())),
        n => n,
    };
    let clock = Clock {
        mono0: Instant::now(),
        unix0: unix_now(),
    };
    let nonce_key: [u8; 32] = rand::rng().random();
    let mut specs = Vec::new();
    let mut shard_stats = Vec::new();
    for index in 0..threads {
        let stats = Arc::new(TurnStats::default());
        let core = Server::new(
            CoreConfig {
                relay_v4: families.advertised[0],
                relay_v6: families.advertised[1],
                nonce_key,
                nonce_lifetime: t.nonce_lifetime(),
                shards: threads,
            },
            clock,
            rules.clone(),
            shared.clone(),
            stats.clone(),
            SmallRng::from_os_rng(),
        );
        shard_stats.push(stats.clone());
        specs.push(ShardSpec {
            index,
            listen: t.listen.clone(),
            relay_bind: families.bind,
            relay_handover: families.handover_addrs(),
            core,
            stats,
        });
    }
    let relay = Relay::start(specs).context("starting the TURN listeners")?;
    if let Some((lo, hi)) = ephemeral_ports() {
        if lo <= t.relay_port_max && t.relay_port_min <= hi {
            tracing::warn!(
                "the relay ports {}-{} overlap the kernel's ephemeral ports {lo}-{hi} \
                 (net.ipv4.ip_local_port_range): the host's own connections may hold relay \
                 ports; choose a range above {hi} or reserve it (net.ipv4.ip_local_reserved_ports)",
                t.relay_port_min,
                t.relay_port_max
            );
        }
    }
    let turn_addrs = relay.local_addrs().to_vec();

    // Every TCP listener, bound before anything is announced.
    let tcp_listeners = bind_all(
        t.tcp_listen.clone().unwrap_or_else(|| turn_addrs.clone()),
        "turn.tcp_listen",
    )
    .await?;
    let tls_listeners = bind_all(cfg.tls.listen.clone(), "tls.listen").await?;
    let http_listener = bind_all(vec![cfg.http.listen], "http.listen").await?;
    let metrics_listener = bind_all(vec![cfg.metrics.listen], "metrics.listen").await?;
    let admin_listener = bind_all(cfg.admin.listen.into_iter().collect(), "admin.listen").await?;
    let admin_addr = local(&admin_listener);
    let (tcp_addrs, tls_addrs) = (local(&tcp_listeners), local(&tls_listeners));
    let http_addr = local(&http_listener);
    let metrics_addr = local(&metrics_listener);
    let certs = match (&cfg.tls.cert_file, &cfg.tls.key_file) {
        (Some(c), Some(k)) if !tls_listeners.is_empty() => Some(crate::tls::CertStore::open(c, k)?),
        _ => None,
    };

    let control = Control::new(Parts {
        config: cfg.clone(),
        path: config_path,
        generated,
        relay_ips,
        rules,
        shared,
        draining,
        bound: Bound {
            advertised_ip,
            turn_port: turn_addrs.first().map_or(3478, SocketAddr::port),
            tcp_port: tcp_addrs.first().map(SocketAddr::port),
            tls_port: tls_addrs.first().map(SocketAddr::port),
        },
        certs: certs.clone(),
    })?;
    let stream_stats = Arc::new(StreamStats::default());
    let public_stats = Arc::new(PublicStats::default());
    let gate = Gate::new(control.public_limits(), public_stats.clone());
    let metrics = Arc::new(Metrics::new(
        shard_stats,
        control.signaling().clone(),
        stream_stats.clone(),
        public_stats,
        control.doorman().stats.clone(),
        usize::from(t.relay_port_max - t.relay_port_min) + 1,
    )?);
    let http_state = HttpState {
        control: control.clone(),
        metrics,
        static_dir: cfg.http.static_dir.clone(),
    };

    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    // The operator's listeners (metrics, admin) get the same caps and
    // timeouts as the public ones, through a gate of their own, so a flood
    // of the public port never starves a scrape, nor the other way round.
    let operator_gate = Gate::new(control.public_limits(), Arc::new(PublicStats::default()));
    let metrics_app = crate::http::metrics_router(http_state.clone());
    let admin_app = crate::admin::router(crate::admin::AdminState {
        control: control.clone(),
        shards: relay.handles(),
    });
    for (l, app) in metrics_listener
        .into_iter()
        .map(|l| (l, metrics_app.clone()))
        .chain(admin_listener.into_iter().map(|l| (l, admin_app.clone())))
    {
        tasks.spawn(crate::public::serve_listener(
            operator_gate.clone(),
            l,
            app,
            tasks.clone(),
            stop.clone(),
        ));
    }
    let public_app = crate::http::router(http_state.clone())
        .layer(RequestBodyLimitLayer::new(cfg.http.max_body_bytes));
    for l in http_listener {
        tasks.spawn(crate::public::serve_listener(
            gate.clone(),
            l,
            public_app.clone(),
            tasks.clone(),
            stop.clone(),
        ));
    }
    let tls_config = match &certs {
        Some(store) => Some(store.server_config()?),
        None => None,
    };
    let streams = Streams::new(StreamParts {
        shards: relay.handles(),
        limits: control.stream_limits(),
        http: public_app,
        redirect: crate::http::redirect_router(control.clone()),
        gate,
        tls: tls_config,
        stats: stream_stats,
        tasks: tasks.clone(),
        stop: stop.clone(),
    });
    for (listeners, tls) in [(tcp_listeners, false), (tls_listeners, true)] {
        for l in listeners {
            tasks.spawn(streams.clone().serve(l, tls));
        }
    }

    tracing::info!(
        "ready: http={} turn={} tcp={} tls={} metrics={} admin={} relay={advertised_ip} ports={}-{} shards={threads}",
        addr_list(&http_addr),
        addr_list(&turn_addrs),
        addr_list(&tcp_addrs),
        addr_list(&tls_addrs),
        addr_list(&metrics_addr),
        addr_list(&admin_addr),
        t.relay_port_min,
        t.relay_port_max
    );
    Ok(Running {
        control,
        relay,
        stop,
        tasks,
    })
}

impl Running {
    /// Stops everything and waits for it: no task outlives this.
    async fn stop(self) {
        let signaling = self.control.signaling().clone();
        // WebSockets first, with a close frame, so peers know why.
        signaling.shutdown();
        self.stop.cancel();
        self.tasks.close();
        let all_ended = async {
            self.tasks.wait().await;
            signaling.wait_idle().await;
        };
        if tokio::time::timeout(STOP_GRACE, all_ended).await.is_err() {
            tracing::warn!("some connections did not end within {STOP_GRACE:?}");
        }
        // Stream connections hold shard queues; the shards go last.
        self.relay.stop();
        let alive = alive_tasks().await;
        tracing::info!("stopped: {alive} tasks alive");
    }
}

/// Tasks still alive on the runtime, after giving ones that are finishing
/// (an aborted WebSocket writer, say) a moment to be dropped.
async fn alive_tasks() -> usize {
    let metrics = tokio::runtime::Handle::current().metrics();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    loop {
        let n = metrics.num_alive_tasks();
        if n == 0 || tokio::time::Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn bind_all(addrs: Vec<SocketAddr>, key: &'static str) -> anyhow::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for a in addrs {
        let l = TcpListener::bind(a)
            .await
            .with_context(|| format!("binding {key} {a}"))?;
        out.push(l);
    }
    Ok(out)
}

fn local(ls: &[TcpListener]) -> Vec<SocketAddr> {
    ls.iter().filter_map(|l| l.local_addr().ok()).collect()
}

/// Addresses for the ready line: `a,b`, or `-` for none.
fn addr_list(v: &[SocketAddr]) -> String {
    if v.is_empty() {
        return "-".to_string();
    }
    v.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The signals the control loop acts on, registered once at start.
struct Signals {
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// Answers signals through the control handle; returns when the process
/// should stop.
async fn control_loop(signals: Signals, control: &Control) {
    let Signals {
        mut hup,
        mut usr1,
        mut term,
        mut int,
    } = signals;
    // Armed when a drain starts.
    let drain_over = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(drain_over);
    let mut draining = false;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping");
                return;
            }
            _ = term.recv() => {
                if draining {
                    tracing::info!("second SIGTERM: stopping now");
                    return;
                }
                tracing::info!("SIGTERM: draining before stop");
                if let Some(grace) = control.start_drain() {
                    drain_over.as_mut().reset(tokio::time::Instant::now() + grace);
                }
                draining = true;
            }
            _ = usr1.recv() => {
                if let Some(grace) = control.start_drain() {
                    tracing::info!("SIGUSR1: draining");
                    drain_over.as_mut().reset(tokio::time::Instant::now() + grace);
                    draining = true;
                }
            }
            _ = hup.recv() => reload(control),
            () = control.drained(), if draining => {
                tracing::info!("drained: no allocations or rooms left");
                return;
            }
            () = &mut drain_over, if draining => {
                let (allocations, rooms) = control.remaining();
                tracing::info!(allocations, rooms, "drain grace period over");
                return;
            }
            _ = tick.tick() => {
                if let Some(store) = control.certs() {
                    match store.reload_if_changed() {
                        Ok(true) => tracing::info!("TLS certificate files changed: reloaded"),
                        Ok(false) => {}
                        Err(e) => tracing::error!("TLS certificate files changed but are unusable, the old certificate stays: {e}"),
                    }
                }
            }
        }
    }
}

/// SIGHUP: the config file and the certificates, read again.
fn reload(control: &Control) {
    match control.reload_file() {
        Ok(report) => {
            for key in &report.restart_needed {
                tracing::warn!("restart needed: {key}");
            }
            tracing::info!(
                applied = report.applied.join(","),
                "SIGHUP: configuration reloaded"
            );
        }
        Err(e) => tracing::error!("SIGHUP: new configuration refused, the old one stays: {e}"),
    }
    if let Some(store) = control.certs() {
        match store.reload() {
            Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
            Err(e) => tracing::error!("SIGHUP: TLS certificate refused, the old one stays: {e}"),
        }
    }
}

/// Relay shards for `turn.threads = 0`: one per two cores, at least one.
fn default_shards(cores: usize) -> usize {
    (cores / 2).max(1)
}

/// Where relays bind and what they advertise, per family (IPv4 [0], IPv6 [1]).
struct RelayFamilies {
    bind: [Option<IpAddr>; 2],
    advertised: [Option<IpAddr>; 2],
    /// Whether the advertised address is the bind address's own (no
    /// external IP configured, or the same one).
    on_host: [bool; 2],
}

impl RelayFamilies {
    fn from_config(t: &crate::config::TurnConfig) -> Self {
        let first = |v6: bool| {
            t.listen
                .iter()
                .find(|a| a.is_ipv6() == v6)
                .map(SocketAddr::ip)
        };
        let bind_v4 = t.relay_ip.or(first(false));
        let adv_v4 = bind_v4.map(|b| match t.external_ip {
            Some(ip) => ip,
            None if !b.is_unspecified() => b,
            None => default_route_ip().unwrap_or_else(|| {
                tracing::warn!("no default route; advertising 127.0.0.1 as the relay address (set turn.external_ip)");
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            }),
        });
        let bind_v6 = t.relay_ip_v6.or(first(true));
        let adv_v6 = bind_v6.and_then(|b| {
            let adv = t.external_ip_v6.or((!b.is_unspecified()).then_some(b));
            if adv.is_none() {
                tracing::warn!("IPv6 relays need turn.external_ip_v6 (or a concrete turn.relay_ip_v6); IPv6 allocations get 440");
            }
            adv
        });
        RelayFamilies {
            bind: [bind_v4, bind_v6.filter(|_| adv_v6.is_some())],
            advertised: [adv_v4, adv_v6],
            on_host: [
                t.external_ip.is_none() || t.external_ip == bind_v4,
                t.external_ip_v6.is_none() || t.external_ip_v6 == bind_v6,
            ],
        }
    }

    /// The advertised relay addresses that are this host's own (no
    /// `external_ip` of a NAT in front): relay to relay between them is
    /// handed over in memory, which is what the kernel would do with it
    /// anyway. Behind a NAT such a datagram goes to the advertised address
    /// for real, so a wrong `external_ip` shows (in calls, `turnkey
    /// probe` and `/selftest`) instead of being papered over.
    fn handover_addrs(&self) -> [Option<IpAddr>; 2] {
        [0, 1].map(|i| self.advertised[i].filter(|_| self.on_host[i]))
    }

    /// Our own relay addresses, which the peer policy always allows (on
    /// relay ports): the advertised ones, which is what clients of this
    /// server see as each other's relayed addresses. A bind address behind
    /// 1:1 NAT is not one; it stays subject to the policy.
    fn relay_ips(&self) -> Vec<IpAddr> {
        self.advertised.iter().flatten().copied().collect()
    }
}

/// Linux's range for the host's own outgoing ports, if it can be read.
fn ephemeral_ports() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|n| n.parse::<u16>().ok());
    Some((it.next()??, it.next()??))
}

/// The address of the interface that routes to the internet, found by a
/// UDP connect (which sends nothing).
fn default_route_ip() -> Option<IpAddr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::default_shards;

    #[test]
    fn relay_handover_only_where_the_advertised_address_is_the_hosts() {
        use super::RelayFamilies;
        let ip = |s: &str| s.parse::<std::net::IpAddr>().ok();
        let mut t = crate::config::TurnConfig {
            listen: vec!["192.0.2.10:3478".parse().unwrap()],
            ..Default::default()
        };
        let f = RelayFamilies::from_config(&t);
        assert_eq!(f.handover_addrs()[0], ip("192.0.2.10"));
        // Behind a NAT: datagrams go to the advertised address for real.
        t.external_ip = ip("198.51.100.7");
        let f = RelayFamilies::from_config(&t);
        assert_eq!(f.advertised[0], ip("198.51.100.7"));
        assert_eq!(f.handover_addrs()[0], None);
        t.external_ip = ip("192.0.2.10");
        assert_eq!(
            RelayFamilies::from_config(&t).handover_addrs()[0],
            ip("192.0.2.10")
        );
    }

    #[test]
    fn default_shards_are_one_per_two_cores_and_never_zero() {
        assert_eq!(
            [1, 2, 3, 4, 8].map(default_shards),
            [1, 1, 1, 2, 4],
            "cores 1, 2, 3, 4, 8"
        );
    }
}
