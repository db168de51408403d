//! The control handle: the one owner of what may change while the
//! appliance runs.
//!
//! It holds the relay's rules (credentials, peer policy, lifetimes, quotas;
//! every shard reads the same `ArcSwap`), the drain flag (one flag, read by
//! the TURN core and by signaling), the signaling settings, the TCP/TLS
//! connection limits, the TLS certificates and the ICE grant settings. A
//! reload goes through [`Control::reload`], which applies every key that can
//! change at run time and reports the ones that need a restart (decided in
//! `reload.rs`); drain goes through [`Control::start_drain`] and
//! [`Control::drained`]. The shells only read.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::access::Doorman;
use crate::budget::Rate;
use crate::config::{Config, ConfigError, Secret, SignalingBackend};
use crate::ice::{IceGrants, IceSettings};
use crate::lifecycle::Drain;
use crate::public::PublicLimits;
use crate::reload::{self, Report};
use crate::signal::{SignalConfig, Signaling};
use crate::stream::StreamLimits;
use crate::tls::CertStore;
use crate::turn::policy::PeerPolicy;
use crate::turn::revoked::Revokee;
use crate::turn::server::{Limits, Rules, Shared};
use crate::webhooks::{Hook, Webhooks};

/// What was bound at start and goes into `iceServers`.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub advertised_ip: IpAddr,
    pub turn_port: u16,
    pub tcp_port: Option<u16>,
    pub tls_port: Option<u16>,
}

/// What the control handle is built from (by the composition root).
pub struct Parts {
    pub config: Config,
    pub path: Option<PathBuf>,
    /// The REST secret used when the config has none (random per run).
    pub generated: Secret,
    /// Our own relay addresses, always allowed by the peer policy.
    pub relay_ips: Vec<IpAddr>,
    pub rules: Arc<ArcSwap<Rules>>,
    pub shared: Arc<Shared>,
    pub drain: Arc<Drain>,
    /// A child of the appliance's stop token, for signaling and its
    /// backend.
    pub stop: tokio_util::sync::CancellationToken,
    pub bound: Bound,
    pub certs: Option<Arc<CertStore>>,
    pub webhooks: Arc<Webhooks>,
}

pub struct Control {
    /// The configuration in force (restart keys keep their start values).
    current: Mutex<Config>,
    path: Option<PathBuf>,
    generated: Secret,
    relay_ips: Vec<IpAddr>,
    bound: Bound,
    rules: Arc<ArcSwap<Rules>>,
    shared: Arc<Shared>,
    drain: Arc<Drain>,
    signaling: Arc<Signaling>,
    ice: Arc<IceGrants>,
    stream_limits: Arc<ArcSwap<StreamLimits>>,
    public_limits: Arc<ArcSwap<PublicLimits>>,
    certs: Option<Arc<CertStore>>,
    /// Who may have a credential or a socket (rules, mint budget).
    doorman: Arc<Doorman>,
    webhooks: Arc<Webhooks>,
}

/// The relay's rules from a config.
/// The `allocations` of the byte budgets, per user or label.
fn allocation_caps(budgets: &[crate::config::BudgetConfig]) -> Vec<(Revokee, usize)> {
    budgets
        .iter()
        .filter(|b| b.allocations > 0)
        .filter_map(|b| match (&b.user, &b.label) {
            (Some(u), None) => Some((Revokee::User(u.clone()), b.allocations)),
            (None, Some(l)) => Some((Revokee::Label(l.clone()), b.allocations)),
            _ => None,
        })
        .collect()
}

pub fn rules_from(cfg: &Config, generated: &Secret, relay_ips: Vec<IpAddr>) -> Rules {
    let t = &cfg.turn;
    let secrets = if cfg.auth.secrets.is_empty() {
        vec![generated.clone()]
    } else {
        cfg.auth.secrets.clone()
    };
    Rules {
        credentials: crate::turn::auth::Credentials::new(
            t.realm.clone(),
            secrets,
            cfg.auth.users.clone(),
        ),
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
        lifetimes: crate::turn::allocation::Lifetimes {
            permission: Duration::from_secs(t.permission_lifetime_secs),
            channel: Duration::from_secs(t.channel_lifetime_secs),
        },
        alternate_server: cfg.drain.alternate_server,
        limits: Limits {
            ip_quota: t.ip_quota,
            allocation_caps: allocation_caps(&cfg.usage.budgets),
            max_bps: t.max_bps,
            bps_capacity: t.bps_capacity,
            max_allocation_age: t.max_allocation_age(),
            revoke_on_reload: cfg.auth.revoke_on_reload,
            // Twice the rate at once: a browser's first requests come together.
            unauth_rate: Rate {
                per_sec: t.unauth_requests_per_sec,
                burst: t.unauth_requests_per_sec * 2,
            },
            binding_rate: Rate {
                per_sec: t.binding_requests_per_sec,
                burst: t.binding_requests_per_sec * 2,
            },
        },
    }
}

fn signal_config(cfg: &Config) -> SignalConfig {
    SignalConfig {
        room_capacity: cfg.signaling.room_capacity,
        max_message_bytes: cfg.signaling.max_message_bytes,
        ping_interval: Duration::from_millis(cfg.signaling.ping_interval_ms),
        pong_timeout: Duration::from_millis(cfg.signaling.pong_timeout_ms),
        join_timeout: Duration::from_secs(cfg.signaling.join_timeout_secs),
        max_sockets_per_ip: cfg.signaling.max_sockets_per_ip,
        messages_per_sec: cfg.signaling.messages_per_sec,
        bytes_per_sec: cfg.signaling.bytes_per_sec,
        joins_per_sec_per_ip: cfg.signaling.joins_per_sec_per_ip,
        max_rooms: cfg.signaling.max_rooms,
        resume_window: Duration::from_secs(cfg.signaling.resume_secs),
        resume_buffer_bytes: cfg.signaling.resume_buffer_bytes,
    }
}

pub fn stream_limits(cfg: &Config) -> StreamLimits {
    let t = &cfg.turn;
    StreamLimits {
        handshake_timeout: Duration::from_millis(cfg.tls.handshake_timeout_ms),
        unauth_timeout: Duration::from_secs(t.tcp_unauth_timeout_secs),
        idle_timeout: Duration::from_secs(t.tcp_idle_timeout_secs),
        unauth_per_ip: t.tcp_unauth_per_ip,
        unauth_total: t.tcp_unauth_total,
        proxy_from: t.proxy_protocol_from.clone(),
        tcp_http: t.tcp_http,
    }
}

fn public_limits(cfg: &Config) -> PublicLimits {
    let h = &cfg.http;
    PublicLimits {
        header_timeout: Duration::from_secs(h.header_timeout_secs),
        idle_timeout: Duration::from_secs(h.idle_timeout_secs),
        per_ip: h.max_connections_per_ip,
        total: h.max_connections,
        trusted_proxies: h.trusted_proxies.clone(),
    }
}

fn ice_settings(cfg: &Config, b: &Bound) -> IceSettings {
    IceSettings {
        public_host: cfg.http.public_host.clone(),
        advertised_ip: b.advertised_ip,
        turn_port: b.turn_port,
        tcp_port: b.tcp_port,
        tls_port: cfg.tls.public_port.or(b.tls_port),
        rest_ttl_secs: cfg.auth.rest_ttl_secs,
    }
}

impl Control {
    /// Needs a tokio runtime when the signaling backend is Redis.
    pub fn new(p: Parts) -> Result<Arc<Control>, crate::signal::redis::BadRedisUrl> {
        let ice = Arc::new(IceGrants::new(
            ice_settings(&p.config, &p.bound),
            p.rules.clone(),
        ));
        let grants = ice.clone();
        let doorman = Doorman::new(&p.config.access);
        let ice_fn: crate::signal::IceServersFn =
            Arc::new(move |host: Option<&str>, who: &crate::access::Admission| {
                grants.grant_json(host, who.user.as_deref(), who.label.as_deref())
            });
        let s = &p.config.signaling;
        let sig_cfg = signal_config(&p.config);
        let signaling = match s.backend {
            SignalingBackend::Memory => Signaling::new(
                sig_cfg,
                ice_fn,
                doorman.clone(),
                p.drain.clone(),
                p.stop.clone(),
            ),
            SignalingBackend::Redis => Signaling::with_redis(
                sig_cfg,
                ice_fn,
                doorman.clone(),
                p.drain.clone(),
                p.stop.clone(),
                crate::signal::redis::Settings {
                    url: s.redis_url.clone(),
                    prefix: s.redis_prefix.clone(),
                    presence_ttl: Duration::from_secs(s.presence_ttl_secs),
                },
            )?,
        };
        Ok(Arc::new(Control {
            stream_limits: Arc::new(ArcSwap::from_pointee(stream_limits(&p.config))),
            public_limits: Arc::new(ArcSwap::from_pointee(public_limits(&p.config))),
            current: Mutex::new(p.config),
            path: p.path,
            generated: p.generated,
            relay_ips: p.relay_ips,
            bound: p.bound,
            rules: p.rules,
            shared: p.shared,
            drain: p.drain,
            signaling,
            ice,
            certs: p.certs,
            doorman,
            webhooks: p.webhooks,
        }))
    }

    /// Who may have a credential or a socket, and which pages may read
    /// the answers.
    pub fn doorman(&self) -> &Arc<Doorman> {
        &self.doorman
    }

    pub fn signaling(&self) -> &Arc<Signaling> {
        &self.signaling
    }

    pub fn ice(&self) -> &Arc<IceGrants> {
        &self.ice
    }

    pub fn stream_limits(&self) -> Arc<ArcSwap<StreamLimits>> {
        self.stream_limits.clone()
    }

    pub fn public_limits(&self) -> Arc<ArcSwap<PublicLimits>> {
        self.public_limits.clone()
    }

    /// Where events go (`webhooks.rs`).
    pub fn webhooks(&self) -> &Arc<Webhooks> {
        &self.webhooks
    }

    pub fn certs(&self) -> Option<&Arc<CertStore>> {
        self.certs.as_ref()
    }

    /// A copy of the configuration in force.
    pub fn config(&self) -> Config {
        self.lock_current().clone()
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Config> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the config file again and applies it (SIGHUP).
    pub fn reload_file(&self) -> Result<Report, ReloadError> {
        let path = self.path.as_deref().ok_or(ReloadError::NoFile)?;
        let new = Config::load(Some(path), std::env::vars())?;
        Ok(self.reload(&new)?)
    }

    /// Applies every key of `new` that may change while running; the keys
    /// that need a restart keep their running values and are reported.
    /// Certificates are re-read too. A refused config changes nothing.
    pub fn reload(&self, new: &Config) -> Result<Report, ConfigError> {
        let mut current = self.lock_current();
        let (next, report) = reload::plan(&current, new)?;
        self.rules.store(Arc::new(rules_from(
            &next,
            &self.generated,
            self.relay_ips.clone(),
        )));
        self.signaling.set_config(signal_config(&next));
        self.ice.set_settings(ice_settings(&next, &self.bound));
        self.stream_limits.store(Arc::new(stream_limits(&next)));
        self.public_limits.store(Arc::new(public_limits(&next)));
        self.doorman.set_rules(&next.access);
        self.webhooks.configure(&next.webhooks);
        *current = next;
        Ok(report)
    }

    pub fn is_draining(&self) -> bool {
        self.drain.is_draining()
    }

    /// Starts draining: `/readyz` 503, new allocations refused (or sent to
    /// `drain.alternate_server`), new joins refused; live calls go on.
    /// Returns how long the drain may last, or None if it had started.
    pub fn start_drain(&self) -> Option<Duration> {
        if !self.drain.start() {
            return None;
        }
        self.webhooks.send(Hook::NodeDraining {});
        Some(Duration::from_secs(self.lock_current().drain.grace_secs))
    }

    /// Whether no allocation and no signaling room is left.
    pub fn is_drained(&self) -> bool {
        self.shared.total_allocations() == 0
            && self.signaling.stats().rooms.load(Ordering::Relaxed) == 0
    }

    /// Resolves once [`Self::is_drained`] holds.
    pub async fn drained(&self) {
        self.drain.until(|| self.is_drained()).await;
    }

    /// Refuses `who`'s credentials from now until every credential minted
    /// before now has expired (`auth.rest_ttl_secs`); the unix time that
    /// is. Ending their allocations is the shards' part (`admin.rs`).
    pub fn revoke(&self, who: Revokee) -> u64 {
        let now = crate::ice::unix_now();
        let until = now.saturating_add(self.lock_current().auth.rest_ttl_secs);
        self.shared.revoke(who, until, now);
        until
    }

    /// Refuses the Allocates of these users and labels (their budget is
    /// spent, `usage_budgets.rs`) and no others.
    pub fn set_over_budget(&self, spent: Vec<Revokee>) {
        self.shared.set_over_budget(spent);
    }

    /// Refuses `who`'s credentials until `until`, as another node decided.
    pub fn revoke_until(&self, who: Revokee, until: u64) {
        self.shared.revoke(who, until, crate::ice::unix_now());
    }

    /// Allocations and rooms still open, for the log.
    pub fn remaining(&self) -> (usize, u64) {
        (
            self.shared.total_allocations(),
            self.signaling.stats().rooms.load(Ordering::Relaxed),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload (started without --config)")]
    NoFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
}
