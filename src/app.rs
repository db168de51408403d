//! Wiring: builds the relay shards, the signaling service and the HTTP
//! server from one `Config`, and runs them until a signal says stop.
//!
//! Signals: SIGINT/SIGTERM stop (SIGTERM drains first, up to
//! `drain.grace_secs`), SIGHUP reloads the config file (secrets, users,
//! peer policy, limits; a bad file is refused and the old one stays),
//! SIGUSR1 drains: `/readyz` turns 503, new allocations get 403 and new
//! joins an error, and the process exits when the last allocation ends and
//! the last signaling room empties (or `drain.grace_secs` pass).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rand::Rng;

use crate::config::{Config, Secret};
use crate::http::{IceServer, IceServers};
use crate::metrics::Metrics;
use crate::relay::{Relay, ShardSpec};
use crate::signal::{SignalConfig, Signaling};
use crate::turn::auth::{mint, Credentials};
use crate::turn::policy::PeerPolicy;
use crate::turn::server::{Clock, CoreConfig, Rules, Server, Shared};
use crate::turn::stats::TurnStats;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct AppState {
    pub rules: Arc<ArcSwap<Rules>>,
    pub shared: Arc<Shared>,
    pub signaling: Arc<Signaling>,
    pub metrics: Arc<Metrics>,
    pub static_dir: Option<PathBuf>,
    pub serve_metrics_here: bool,
    ice: Arc<IceSettings>,
}

/// What goes into `iceServers` URLs.
struct IceSettings {
    public_host: Option<String>,
    advertised_ip: IpAddr,
    turn_port: u16,
    tcp_port: Option<u16>,
    tls_port: Option<u16>,
    rest_ttl_secs: u64,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AppState {
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }

    /// A fresh `RTCConfiguration` for a client that reached us as `host`.
    pub fn ice_servers(&self, host: Option<&str>) -> IceServers {
        let ice = &self.ice;
        let host = ice
            .public_host
            .clone()
            .or_else(|| host.map(str::to_string))
            .unwrap_or_else(|| match ice.advertised_ip {
                IpAddr::V6(v6) => format!("[{v6}]"),
                v4 => v4.to_string(),
            });
        let port = ice.turn_port;
        let mut servers = vec![IceServer {
            urls: vec![format!("stun:{host}:{port}")],
            username: None,
            credential: None,
        }];
        let rules = self.rules.load();
        if let Some(secret) = rules.credentials.minting_secret() {
            let id: u64 = rand::rng().random();
            let cred = mint(secret, &format!("{id:016x}"), unix_now(), ice.rest_ttl_secs);
            // In the order browsers should try them: UDP, TCP, then TLS.
            let mut urls = vec![format!("turn:{host}:{port}?transport=udp")];
            if let Some(p) = ice.tcp_port {
                urls.push(format!("turn:{host}:{p}?transport=tcp"));
            }
            if let Some(p) = ice.tls_port {
                urls.push(format!("turns:{host}:{p}?transport=tcp"));
            }
            servers.push(IceServer {
                urls,
                username: Some(cred.username),
                credential: Some(cred.password),
            });
        }
        IceServers {
            ice_servers: servers,
            ttl: ice.rest_ttl_secs,
        }
    }
}

/// Rules (the reloadable part of the config) from a config.
pub fn rules_from(cfg: &Config, secrets: Vec<Secret>, relay_ips: Vec<IpAddr>) -> Rules {
    let t = &cfg.turn;
    Rules {
        credentials: Credentials::new(t.realm.clone(), secrets, cfg.auth.users.clone()),
        policy: PeerPolicy::new(
            t.allowed_peer_ranges.clone(),
            t.denied_peer_ranges.clone(),
            relay_ips,
            t.relay_ports(),
        ),
        default_lifetime: t.default_lifetime(),
        max_lifetime: t.max_lifetime(),
        user_quota: t.user_quota,
        total_quota: t.total_quota,
        max_permissions: t.max_permissions,
        max_channels: t.max_channels,
        alternate_server: cfg.drain.alternate_server,
    }
}

/// The secrets in force: the configured ones, or one generated now.
fn secrets_or_generated(cfg: &Config, generated: &Secret) -> Vec<Secret> {
    if cfg.auth.secrets.is_empty() {
        vec![generated.clone()]
    } else {
        cfg.auth.secrets.clone()
    }
}

/// Where relays bind and what they advertise, per family (IPv4 [0], IPv6 [1]).
struct RelayFamilies {
    bind: [Option<IpAddr>; 2],
    advertised: [Option<IpAddr>; 2],
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
        }
    }

    /// Our own relay addresses, which the peer policy always allows (on
    /// relay ports): the advertised ones, which is what clients of this
    /// server see as each other's relayed addresses. A bind address behind
    /// 1:1 NAT is not one; it stays subject to the policy.
    fn relay_ips(&self) -> Vec<IpAddr> {
        self.advertised.iter().flatten().copied().collect()
    }
}

/// The address of the interface that routes to the internet, found by a
/// UDP connect (which sends nothing).
fn default_route_ip() -> Option<IpAddr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

fn signal_config(cfg: &Config) -> SignalConfig {
    SignalConfig {
        room_capacity: cfg.signaling.room_capacity,
        max_message_bytes: cfg.signaling.max_message_bytes,
        ping_interval: Duration::from_millis(cfg.signaling.ping_interval_ms),
        pong_timeout: Duration::from_millis(cfg.signaling.pong_timeout_ms),
    }
}

/// Runs the appliance until SIGINT/SIGTERM (or the end of a drain).
pub async fn serve(cfg: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    // Before anything can announce readiness: a SIGHUP or SIGUSR1 arriving
    // earlier would otherwise kill the process (their default action).
    let signals = Signals::install().context("installing signal handlers")?;
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
        secrets_or_generated(&cfg, &generated),
        relay_ips.clone(),
    )));
    let shared = Arc::new(Shared::new(t.relay_ports()));
    let threads = match t.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let clock = Clock {
        mono0: Instant::now(),
        unix0: unix_now(),
    };
    let nonce_key: [u8; 32] = rand::rng().random();
    let mut specs = Vec::new();
    let mut shard_stats = Vec::new();
    for i in 0..threads {
        let stats = Arc::new(TurnStats::default());
        let core = Server::new(
            CoreConfig {
                relay_v4: families.advertised[0],
                relay_v6: families.advertised[1],
                nonce_key,
                nonce_lifetime: t.nonce_lifetime(),
            },
            clock,
            rules.clone(),
            shared.clone(),
            stats.clone(),
        );
        shard_stats.push(stats.clone());
        specs.push(ShardSpec {
            index: i,
            listen: t.listen.clone(),
            relay_bind: families.bind,
            core,
            stats,
        });
    }
    let relay = Relay::start(specs).context("starting the TURN listeners")?;
    let turn_addrs = relay.local_addrs().to_vec();
    let turn_port = turn_addrs.first().map_or(3478, SocketAddr::port);
    let bind_all = |addrs: Vec<SocketAddr>, key: &'static str| async move {
        let mut out = Vec::new();
        for a in addrs {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding {key} {a}"))?;
            out.push(l);
        }
        anyhow::Ok(out)
    };
    let tcp_listeners = bind_all(
        t.tcp_listen.clone().unwrap_or_else(|| turn_addrs.clone()),
        "turn.tcp_listen",
    )
    .await?;
    let tls_listeners = bind_all(cfg.tls.listen.clone(), "tls.listen").await?;
    let local = |ls: &[tokio::net::TcpListener]| -> Vec<SocketAddr> {
        ls.iter().filter_map(|l| l.local_addr().ok()).collect()
    };
    let (tcp_addrs, tls_addrs) = (local(&tcp_listeners), local(&tls_listeners));
    let certs = match (&cfg.tls.cert_file, &cfg.tls.key_file) {
        (Some(c), Some(k)) if !tls_listeners.is_empty() => Some(crate::tls::CertStore::open(c, k)?),
        _ => None,
    };

    let ice = Arc::new(IceSettings {
        public_host: cfg.http.public_host.clone(),
        advertised_ip,
        turn_port,
        tcp_port: tcp_addrs.first().map(SocketAddr::port),
        tls_port: cfg
            .tls
            .public_port
            .or(tls_addrs.first().map(SocketAddr::port)),
        rest_ttl_secs: cfg.auth.rest_ttl_secs,
    });
    // The signaling service asks the app state for iceServers; the state
    // holds the signaling service, so the closure gets it through a cell.
    let state_cell: Arc<std::sync::OnceLock<AppState>> = Arc::new(std::sync::OnceLock::new());
    let cell = state_cell.clone();
    let signaling = Signaling::new(
        signal_config(&cfg),
        Arc::new(move |host: Option<&str>| match cell.get() {
            Some(state) => {
                let s = state.ice_servers(host);
                (
                    serde_json::to_value(&s.ice_servers).unwrap_or_default(),
                    Duration::from_secs(s.ttl),
                )
            }
            None => (serde_json::Value::Array(Vec::new()), Duration::ZERO),
        }),
    );
    let relay_ports_total = usize::from(t.relay_port_max - t.relay_port_min) + 1;
    let stream_stats = Arc::new(crate::stream::StreamStats::default());
    let metrics = Arc::new(Metrics::new(
        shard_stats,
        signaling.clone(),
        stream_stats.clone(),
        relay_ports_total,
    )?);
    let state = AppState {
        rules: rules.clone(),
        shared: shared.clone(),
        signaling: signaling.clone(),
        metrics,
        static_dir: cfg.http.static_dir.clone(),
        serve_metrics_here: cfg.metrics.listen.is_none(),
        ice,
    };
    let _ = state_cell.set(state.clone());

    let listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("binding http.listen {}", cfg.http.listen))?;
    let http_addr = listener.local_addr()?;
    let turn_list: Vec<String> = turn_addrs.iter().map(|a| a.to_string()).collect();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut metrics_addr = None;
    if let Some(addr) = cfg.metrics.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics.listen {addr}"))?;
        metrics_addr = Some(l.local_addr()?);
        let app = crate::http::metrics_router(state.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            axum::serve(l, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        });
    }
    let metrics_at = metrics_addr.map_or_else(|| format!("{http_addr}"), |a| a.to_string());
    let list = |v: &[SocketAddr]| {
        let s: Vec<String> = v.iter().map(|a| a.to_string()).collect();
        if s.is_empty() {
            "-".to_string()
        } else {
            s.join(",")
        }
    };
    tracing::info!(
        "ready: http={http_addr} turn={} tcp={} tls={} metrics={metrics_at} relay={advertised_ip} ports={}-{} shards={threads}",
        turn_list.join(","),
        list(&tcp_addrs),
        list(&tls_addrs),
        t.relay_port_min,
        t.relay_port_max
    );
    let tls_config = match &certs {
        Some(store) => Some(store.server_config()?),
        None => None,
    };
    let streams = crate::stream::Streams::new(
        relay.handles(),
        crate::stream::StreamLimits {
            handshake_timeout: Duration::from_millis(cfg.tls.handshake_timeout_ms),
            unauth_timeout: Duration::from_secs(t.tcp_unauth_timeout_secs),
            idle_timeout: Duration::from_secs(t.tcp_idle_timeout_secs),
            unauth_per_ip: t.tcp_unauth_per_ip,
            unauth_total: t.tcp_unauth_total,
            proxy_from: t.proxy_protocol_from.clone(),
        },
        crate::http::router(state.clone()),
        tls_config,
        stream_stats.clone(),
    );
    for (listeners, tls) in [(tcp_listeners, false), (tls_listeners, true)] {
        for l in listeners {
            tokio::spawn(streams.clone().serve(l, tls, stop_rx.clone()));
        }
    }
    let app = crate::http::router(state.clone());
    let mut http_stop = stop_rx.clone();
    let http = tokio::spawn(async move {
        // Signaling messages are small; Nagle would hold them back.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });

    control_loop(
        signals,
        &cfg,
        config_path,
        &state,
        &generated,
        relay_ips,
        certs,
    )
    .await;

    signaling.shutdown();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
    relay.stop();
    tracing::info!("stopped");
    Ok(())
}

/// Waits for signals: reload on SIGHUP, drain on SIGUSR1, stop on
/// SIGINT/SIGTERM. Returns when the process should stop.
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

async fn control_loop(
    signals: Signals,
    cfg: &Config,
    config_path: Option<PathBuf>,
    state: &AppState,
    generated: &Secret,
    relay_ips: Vec<IpAddr>,
    certs: Option<Arc<crate::tls::CertStore>>,
) {
    let Signals {
        mut hup,
        mut usr1,
        mut term,
        mut int,
    } = signals;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping");
                return;
            }
            _ = term.recv() => {
                if drain_deadline.is_some() {
                    tracing::info!("second SIGTERM: stopping now");
                    return;
                }
                tracing::info!("SIGTERM: draining before stop");
                drain_deadline = Some(start_drain(state, Duration::from_secs(cfg.drain.grace_secs)));
            }
            _ = usr1.recv() => {
                if drain_deadline.is_none() {
                    tracing::info!("SIGUSR1: draining");
                    drain_deadline = Some(start_drain(state, Duration::from_secs(cfg.drain.grace_secs)));
                }
            }
            _ = hup.recv() => {
                reload(cfg, config_path.as_deref(), state, generated, &relay_ips);
                if let Some(store) = &certs {
                    match store.reload() {
                        Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                        Err(e) => tracing::error!("SIGHUP: TLS certificate refused, the old one stays: {e}"),
                    }
                }
            }
            _ = tick.tick() => {
                if let Some(store) = &certs {
                    match store.reload_if_changed() {
                        Ok(true) => tracing::info!("TLS certificate files changed: reloaded"),
                        Ok(false) => {}
                        Err(e) => tracing::error!("TLS certificate files changed but are unusable, the old certificate stays: {e}"),
                    }
                }
                if let Some(deadline) = drain_deadline {
                    let left = state.shared.total_allocations();
                    let rooms = state.signaling.stats().rooms.load(Ordering::Relaxed);
                    if left == 0 && rooms == 0 {
                        tracing::info!("drained: no allocations or rooms left");
                        return;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        tracing::info!(allocations = left, rooms, "drain grace period over");
                        return;
                    }
                }
            }
        }
    }
}

fn start_drain(state: &AppState, grace: Duration) -> tokio::time::Instant {
    state.shared.draining.store(true, Ordering::Relaxed);
    state.signaling.set_draining(true);
    tokio::time::Instant::now() + grace
}

fn reload(
    old: &Config,
    path: Option<&std::path::Path>,
    state: &AppState,
    generated: &Secret,
    relay_ips: &[IpAddr],
) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: no config file to reload (started without --config)");
        return;
    };
    match Config::load(Some(path), std::env::vars()) {
        Ok(new) => {
            let rules = rules_from(
                &new,
                secrets_or_generated(&new, generated),
                relay_ips.to_vec(),
            );
            state.rules.store(Arc::new(rules));
            state.signaling.set_config(signal_config(&new));
            if new.turn.listen != old.turn.listen || new.http.listen != old.http.listen {
                tracing::warn!("SIGHUP: listen addresses change only on restart");
            }
            tracing::info!(file = %path.display(), "SIGHUP: configuration reloaded");
        }
        Err(e) => {
            tracing::error!(file = %path.display(), "SIGHUP: new configuration refused, the old one stays: {e}")
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
