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

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rand::Rng;
use tokio::net::TcpListener;
use tower_http::limit::RequestBodyLimitLayer;

use crate::acme::Acme;
use crate::config::{Config, Secret};
use crate::control::{rules_from, Bound, Control, Parts};
use crate::http::HttpState;
use crate::lifecycle::Lifecycle;
use crate::metrics::{Metrics, TlsSources};
use crate::public::{Gate, PublicStats};
use crate::relay::setup::{Built, RelayFamilies};
use crate::relay::Relay;
use crate::stream::{StreamParts, StreamStats, Streams};
use crate::tls::CertStore;
use crate::turn::server::Shared;

/// How long stop waits for connection tasks before it gives up on them.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How often the certificate files' modification time is read.
const CERT_POLL: Duration = Duration::from_millis(200);

/// Runs the appliance until SIGINT/SIGTERM (or the end of a drain).
pub async fn serve(cfg: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    // Before anything can announce readiness: a SIGHUP or SIGUSR1 arriving
    // earlier would otherwise kill the process (their default action).
    let signals = Signals::install().context("installing signal handlers")?;
    let life = Lifecycle::new();
    let running = start(cfg, config_path, &life).await?;
    control_loop(signals, &running.control).await;
    running.stop(&life).await;
    Ok(())
}

/// The started appliance: what stop needs.
struct Running {
    control: Arc<Control>,
    relay: Relay,
}

/// Build, then start: the relay (its addresses go into the rules and
/// `iceServers`), every listener bound before anything is announced, the
/// control handle, the web app and the stream listeners.
async fn start(
    cfg: Config,
    config_path: Option<PathBuf>,
    life: &Lifecycle,
) -> anyhow::Result<Running> {
    let families = RelayFamilies::from_config(&cfg.turn);
    let generated = Secret::new(hex(&rand::rng().random::<[u8; 32]>()));
    if cfg.auth.secrets.is_empty() {
        tracing::info!("no auth.secrets configured: generated a random REST secret for this run");
    }
    let rules = Arc::new(ArcSwap::from_pointee(rules_from(
        &cfg,
        &generated,
        families.relay_ips(),
    )));
    let shared = Arc::new(Shared::new(
        cfg.turn.relay_ports(),
        life.drain.flag(),
        &mut rand::rng(),
    ));
    let Built {
        relay,
        stats,
        shards,
        usage,
    } = Relay::from_config(&cfg, &families, rules.clone(), shared.clone(), life)
        .context("starting the TURN listeners")?;
    let listeners = Listeners::bind(&cfg, relay.local_addrs()).await?;
    let (certs, acme) = certificates(&cfg, !listeners.tls.is_empty())?;
    let control = Control::new(Parts {
        config: cfg.clone(),
        path: config_path,
        generated,
        relay_ips: families.relay_ips(),
        rules,
        shared,
        drain: life.drain.clone(),
        stop: life.child(),
        bound: listeners.bound(families.advertised_ip(), relay.local_addrs()),
        certs: certs.clone(),
        webhooks: usage.webhooks().clone(),
    })?;
    let stream_stats = Arc::new(StreamStats::default());
    let public_stats = Arc::new(PublicStats::default());
    let metrics = Arc::new(Metrics::new(
        stats,
        control.signaling().clone(),
        stream_stats.clone(),
        public_stats.clone(),
        control.doorman().stats.clone(),
        usage.clone(),
        cfg.turn.relay_ports().len(),
        TlsSources {
            store: certs.clone(),
            acme: acme.as_ref().map(Acme::stats),
        },
    )?);
    let http_state = HttpState {
        control: control.clone(),
        metrics,
        static_dir: cfg.http.static_dir.clone(),
    };
    let ready = format!(
        "ready: {} relay={} ports={}-{} shards={shards}",
        listeners.describe(relay.local_addrs()),
        families.advertised_ip(),
        cfg.turn.relay_port_min,
        cfg.turn.relay_port_max
    );
    let public_app = crate::http::router(http_state.clone())
        .layer(RequestBodyLimitLayer::new(cfg.http.max_body_bytes));
    let gate = Gate::new(control.public_limits(), public_stats);
    let streams = Streams::new(StreamParts {
        shards: relay.handles(),
        limits: control.stream_limits(),
        http: public_app.clone(),
        redirect: crate::http::redirect_router(control.clone()),
        gate: gate.clone(),
        tls: certs.as_ref().map(CertStore::server_config).transpose()?,
        stats: stream_stats,
        tasks: life.tasks(),
        stop: life.child(),
    });
    crate::usage_budgets::start(control.clone(), relay.handles(), usage.clone(), life);
    let admin_app = crate::admin::router(control.clone(), relay.handles(), usage, life);
    listeners.serve(
        life,
        &control,
        gate,
        public_app,
        crate::http::metrics_router(http_state),
        admin_app,
        acme.as_ref().map(Acme::http01_app),
        &streams,
    );
    keep_current(life, certs, acme);
    tracing::info!("{ready}");
    Ok(Running { control, relay })
}

/// Where the TLS certificate comes from, with a TLS listener: files or
/// ACME (exclusive, checked at load); either way one store that every
/// handshake reads, kept current by the file watch or the ACME loop.
fn certificates(
    cfg: &Config,
    tls_listeners: bool,
) -> anyhow::Result<(Option<Arc<CertStore>>, Option<Acme>)> {
    if !tls_listeners {
        return Ok((None, None));
    }
    if !cfg.tls.acme_domains.is_empty() {
        let http01 = cfg.http.acme_listen.is_some();
        let (acme, store) = Acme::prepare(&cfg.tls, http01).context("ACME (tls.acme_*)")?;
        return Ok((Some(store), Some(acme)));
    }
    match (&cfg.tls.cert_file, &cfg.tls.key_file) {
        (Some(c), Some(k)) => Ok((Some(CertStore::open(c, k)?), None)),
        _ => Ok((None, None)),
    }
}

/// The task that keeps the certificate current until stop.
fn keep_current(life: &Lifecycle, certs: Option<Arc<CertStore>>, acme: Option<Acme>) {
    match (certs, acme) {
        (_, Some(acme)) => life.spawn(acme.run(life.child())),
        (Some(store), None) => life.spawn(store.watch(CERT_POLL, life.child())),
        (None, None) => {}
    }
}

impl Running {
    /// Stops everything and waits for it: no task outlives this.
    async fn stop(self, life: &Lifecycle) {
        let signaling = self.control.signaling().clone();
        // WebSockets first, with a close frame, so peers know why.
        signaling.shutdown();
        let all_ended = async {
            let ended = life.stop(STOP_GRACE).await;
            ended
                && tokio::time::timeout(STOP_GRACE, signaling.wait_idle())
                    .await
                    .is_ok()
        };
        if !all_ended.await {
            tracing::warn!("some connections did not end within {STOP_GRACE:?}");
        }
        // Stream connections hold shard queues; the shards go last.
        self.relay.stop();
        let alive = alive_tasks().await;
        tracing::info!("stopped: {alive} tasks alive");
    }
}

/// Every TCP listener, bound at start (before anything is announced).
struct Listeners {
    tcp: Vec<TcpListener>,
    tls: Vec<TcpListener>,
    http: Vec<TcpListener>,
    metrics: Vec<TcpListener>,
    admin: Vec<TcpListener>,
    /// `http.acme_listen`: ACME's HTTP-01 challenge only.
    acme: Vec<TcpListener>,
}

impl Listeners {
    async fn bind(cfg: &Config, turn_addrs: &[SocketAddr]) -> anyhow::Result<Listeners> {
        let tcp = cfg.turn.tcp_listen.clone();
        Ok(Listeners {
            tcp: bind_all(
                tcp.unwrap_or_else(|| turn_addrs.to_vec()),
                "turn.tcp_listen",
            )
            .await?,
            tls: bind_all(cfg.tls.listen.clone(), "tls.listen").await?,
            http: bind_all(vec![cfg.http.listen], "http.listen").await?,
            metrics: bind_all(vec![cfg.metrics.listen], "metrics.listen").await?,
            admin: bind_all(cfg.admin.listen.into_iter().collect(), "admin.listen").await?,
            acme: bind_all(
                cfg.http.acme_listen.into_iter().collect(),
                "http.acme_listen",
            )
            .await?,
        })
    }

    /// What went into `iceServers`: the ports clients are told.
    fn bound(&self, advertised_ip: std::net::IpAddr, turn_addrs: &[SocketAddr]) -> Bound {
        Bound {
            advertised_ip,
            turn_port: turn_addrs.first().map_or(3478, SocketAddr::port),
            tcp_port: local(&self.tcp).first().map(SocketAddr::port),
            tls_port: local(&self.tls).first().map(SocketAddr::port),
        }
    }

    /// For the ready line: every address, by what it serves.
    fn describe(&self, turn_addrs: &[SocketAddr]) -> String {
        format!(
            "http={} turn={} tcp={} tls={} metrics={} admin={} acme={}",
            addr_list(&local(&self.http)),
            addr_list(turn_addrs),
            addr_list(&local(&self.tcp)),
            addr_list(&local(&self.tls)),
            addr_list(&local(&self.metrics)),
            addr_list(&local(&self.admin)),
            addr_list(&local(&self.acme)),
        )
    }

    /// Accepts on every listener until stop. The operator's listeners
    /// (metrics, admin) get the same caps and timeouts as the public ones
    /// through a gate of their own, so a flood of the public port never
    /// starves a scrape, nor the other way round.
    #[allow(clippy::too_many_arguments)]
    fn serve(
        self,
        life: &Lifecycle,
        control: &Control,
        gate: Arc<Gate>,
        public_app: axum::Router,
        metrics_app: axum::Router,
        admin_app: axum::Router,
        acme_app: Option<axum::Router>,
        streams: &Arc<Streams>,
    ) {
        let operator_gate = Gate::new(control.public_limits(), Arc::new(PublicStats::default()));
        let http = |gate: &Arc<Gate>, l: TcpListener, app: &axum::Router| {
            crate::public::serve_listener(gate.clone(), l, app.clone(), life.tasks(), life.child())
        };
        for l in self.metrics {
            life.spawn(http(&operator_gate, l, &metrics_app));
        }
        for l in self.admin {
            life.spawn(http(&operator_gate, l, &admin_app));
        }
        for l in self.http {
            life.spawn(http(&gate, l, &public_app));
        }
        // Port 80 for HTTP-01 counts against the public caps like the page.
        for (l, app) in self
            .acme
            .into_iter()
            .zip(std::iter::repeat(acme_app).flatten())
        {
            life.spawn(http(&gate, l, &app));
        }
        for (listeners, tls) in [(self.tcp, false), (self.tls, true)] {
            for l in listeners {
                life.spawn(streams.clone().serve(l, tls));
            }
        }
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
    // An ACME store has no files: its loop renews by itself.
    if let Some(store) = control.certs().filter(|s| s.has_files()) {
        match store.reload() {
            Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
            Err(e) => tracing::error!("SIGHUP: TLS certificate refused, the old one stays: {e}"),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
