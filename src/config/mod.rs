//! The one typed configuration of the appliance.
//!
//! Sources, later ones winning: the defaults in this file (so a bare
//! `turnkey` runs), an optional TOML file (`config/turnkey.toml` documents
//! every key), then environment variables `TURNKEY_SECTION__KEY`
//! (e.g. `TURNKEY_TURN__EXTERNAL_IP=203.0.113.7`, lists comma-separated).
//! Nothing else in the program reads the environment.
//!
//! Loading validates everything once (`validate.rs`); a problem names the
//! key and what is wrong with it, and the caller exits non-zero.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize, Serializer};

mod validate;

/// Environment variables with this prefix override file and defaults.
pub const ENV_PREFIX: &str = "TURNKEY";

/// A configuration problem: which key, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config key `{key}`: {problem}")]
    Invalid { key: String, problem: String },
    #[error("{0}")]
    Load(String),
}

/// A string that must never reach a log line or the printed config.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub log: LogConfig,
    pub http: HttpConfig,
    pub turn: TurnConfig,
    pub auth: AuthConfig,
    pub signaling: SignalingConfig,
    pub metrics: MetricsConfig,
    pub drain: DrainConfig,
    pub tls: TlsConfig,
    pub admin: AdminConfig,
    pub access: AccessConfig,
    pub usage: UsageConfig,
    pub webhooks: WebhooksConfig,
}

/// Every webhook event type, as `webhooks.events` names them.
pub const WEBHOOK_EVENTS: &[&str] = &[
    "allocation.started",
    "allocation.ended",
    "budget.exceeded",
    "user.revoked",
    "node.draining",
];

/// Signed event notifications to one HTTP endpoint (`webhooks.rs`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Where events are POSTed (`http://` only); empty: no webhooks.
    pub url: String,
    /// The HMAC-SHA256 key of `X-Turnkey-Signature`.
    pub secret: Secret,
    /// The event types sent; empty: all of them.
    pub events: Vec<String>,
    /// Events waiting for delivery before new ones are dropped (counted).
    pub queue: usize,
    /// How long one POST may take.
    pub timeout_secs: u64,
    /// The longest pause between two attempts (the back-off doubles from
    /// 100 ms up to this).
    pub retry_max_secs: u64,
    /// Attempts at one event before it is dropped (counted); 0: no limit.
    pub max_attempts: u32,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            url: String::new(),
            secret: Secret::default(),
            events: Vec::new(),
            queue: 10_000,
            timeout_secs: 5,
            retry_max_secs: 30,
            max_attempts: 50,
        }
    }
}

/// Usage per user and label (`usage/`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Distinct labels counted (and exported to Prometheus) before new
    /// ones count under `other`.
    pub max_labels: usize,
    /// Byte budgets per user or label (`usage_budgets.rs`).
    pub budgets: Vec<BudgetConfig>,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            max_labels: 100,
            budgets: Vec::new(),
        }
    }
}

/// One `[[usage.budgets]]`: a user's or a label's bytes (both ways) per
/// UTC day and per UTC month; 0 = no limit.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    pub user: Option<String>,
    pub label: Option<String>,
    pub bytes_per_day: u64,
    pub bytes_per_month: u64,
    /// Concurrent allocations; one more gets 486 (whatever `action`).
    pub allocations: usize,
    pub action: BudgetAction,
}

/// What a spent budget does.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BudgetAction {
    /// Logs it, nothing more.
    #[default]
    Notify,
    /// Refuses new allocations (486) until the period ends.
    Refuse,
    /// Refuses new allocations and ends the live ones.
    End,
}

/// Who may get a TURN credential or a signaling socket (`access.rs`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AccessMode {
    /// Anyone (the demo and local use).
    #[default]
    Open,
    /// Browsers on the operator's own pages (`allowed_origins`).
    Origin,
    /// Holders of a JWT the application's backend signs.
    Token,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    pub mode: AccessMode,
    /// `scheme://host[:port]`, exactly as browsers send `Origin`.
    pub allowed_origins: Vec<String>,
    /// HS256 keys for access tokens; the first is the current one, all
    /// verify (rotate by adding the new one first).
    pub token_secret: Vec<Secret>,
    /// Credentials one client address may mint a minute (429 beyond);
    /// 0 = unlimited.
    pub mints_per_minute: u64,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            mode: AccessMode::Open,
            allowed_origins: Vec::new(),
            token_secret: Vec::new(),
            mints_per_minute: 30,
        }
    }
}

/// What the TURN TCP port does with a plain HTTP request.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TcpHttp {
    /// Closes the connection: the port is TURN only.
    #[default]
    Off,
    /// Serves the page, the API and `/ws` (no TLS, so only for tests and
    /// networks you trust).
    Serve,
    /// Answers a redirect to the HTTPS origin.
    Redirect,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The admin API (sessions: list, end by id or user). Off unless set;
    /// keep it on loopback or a private network.
    pub listen: Option<SocketAddr>,
    /// Bearer token the admin API requires (at least 16 characters).
    pub token: Option<Secret>,
}

/// How the program is attached (`turn.xdp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// No fast path.
    #[default]
    Off,
    /// In the driver (XDP_FLAGS_DRV_MODE): the fast one.
    Native,
    /// In the kernel's generic hook, for drivers without XDP (slower, for
    /// trying it out).
    Generic,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// TLS listeners: TURN over TLS (`turns:`), and HTTPS/WSS on the same
    /// port, told apart per connection (ALPN, then the first bytes).
    /// `["0.0.0.0:443"]` serves the whole appliance on one port.
    pub listen: Vec<SocketAddr>,
    /// PEM certificate chain and private key; re-read on SIGHUP and when
    /// the files change.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub handshake_timeout_ms: u64,
    /// The port clients should use in `turns:` URLs, when a balancer in
    /// front forwards a different one (e.g. 443 → 5349). Unset = the
    /// first `tls.listen` port.
    pub public_port: Option<u16>,
    /// Names to get a certificate for by ACME (TLS-ALPN-01 on the TLS
    /// port). Empty = off; exclusive with `cert_file`/`key_file`.
    pub acme_domains: Vec<String>,
    /// Contact address given to the ACME server (expiry notices).
    pub acme_email: Option<String>,
    /// The ACME server's directory URL.
    pub acme_directory: String,
    /// PEM of a CA to trust for the ACME server's own HTTPS (a private or
    /// test CA); unset = the system's roots.
    pub acme_ca_file: Option<PathBuf>,
    /// Where the ACME account key and the certificate are kept (0700), so
    /// a restart serves the cached certificate instead of ordering anew.
    pub acme_cache_dir: PathBuf,
}

/// Let's Encrypt's production directory: the default ACME server.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            listen: Vec::new(),
            cert_file: None,
            key_file: None,
            handshake_timeout_ms: 5000,
            public_port: None,
            acme_domains: Vec::new(),
            acme_email: None,
            acme_directory: LETS_ENCRYPT.to_string(),
            acme_ca_file: None,
            acme_cache_dir: PathBuf::from("/var/lib/turnkey/acme"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `/metrics` is served: its own listener, never a public one.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9100)),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// After SIGTERM or SIGUSR1, how long to wait for allocations to end
    /// before stopping anyway.
    pub grace_secs: u64,
    /// While draining, answer Allocate with 300 Try Alternate pointing
    /// here instead of 403 Forbidden.
    pub alternate_server: Option<SocketAddr>,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            grace_secs: 300,
            alternate_server: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `turnkey=debug,tower_http=info`.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Serve the page from this directory instead of the embedded copy.
    pub static_dir: Option<PathBuf>,
    /// Host name put into `iceServers` URLs; when unset, the Host header of
    /// the request (so the page's own host is used), else the external IP.
    pub public_host: Option<String>,
    /// A client must send a request's headers within this many seconds.
    pub header_timeout_secs: u64,
    /// A connection that sends and receives nothing this long is closed.
    pub idle_timeout_secs: u64,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Open HTTP connections (all public listeners) per client address
    /// (IPv6: per /64) and in total.
    pub max_connections_per_ip: usize,
    pub max_connections: usize,
    /// Reverse proxies (CIDRs) whose `X-Forwarded-For` and
    /// `X-Forwarded-Host` are believed (client address, host for
    /// `iceServers`); empty = none.
    pub trusted_proxies: Vec<IpNet>,
    /// Worker threads of the async runtime that serves HTTP, signaling,
    /// metrics, admin and TURN's TCP/TLS connections (framing and TLS; the
    /// relay's shards have `turn.threads` of their own);
    /// 0 = one per core. One by default: signaling work is a few
    /// microseconds per message, and with a second worker nearly every
    /// message also woke the idle one (issue 13: a third of the CPU).
    pub threads: usize,
    /// Plain HTTP for ACME's HTTP-01 challenge (port 80), for set-ups
    /// where 443 sits behind something else; off (TLS-ALPN-01) unless set.
    pub acme_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// UDP listeners for STUN/TURN.
    pub listen: Vec<SocketAddr>,
    /// Address relay sockets bind to; unspecified = the first listener's IP.
    pub relay_ip: Option<IpAddr>,
    /// Address advertised in XOR-RELAYED-ADDRESS (VPS behind 1:1 NAT).
    pub external_ip: Option<IpAddr>,
    /// IPv6 relays: the bind address (unset = the first IPv6 listener's)
    /// and the advertised one. Without either, IPv6 allocations get 440.
    pub relay_ip_v6: Option<IpAddr>,
    pub external_ip_v6: Option<IpAddr>,
    /// TCP listeners for STUN/TURN (RFC 8656 §3.2 framing); plain HTTP on
    /// the same port is recognised and served too. Unset = the same
    /// addresses and ports as `listen`; `[]` = no TCP.
    pub tcp_listen: Option<Vec<SocketAddr>>,
    /// A TCP/TLS connection with no allocation is closed after this long.
    pub tcp_unauth_timeout_secs: u64,
    /// What plain HTTP on the TCP port gets.
    pub tcp_http: TcpHttp,
    /// Connections without an allocation, per source IP and in total.
    pub tcp_unauth_per_ip: usize,
    pub tcp_unauth_total: usize,
    /// A TCP/TLS connection that sends nothing for this long is closed.
    pub tcp_idle_timeout_secs: u64,
    /// Load balancers whose TCP/TLS connections start with a PROXY
    /// protocol v2 header carrying the client's real address.
    pub proxy_protocol_from: Vec<IpNet>,
    pub relay_port_min: u16,
    pub relay_port_max: u16,
    /// Relay event-loop threads (SO_REUSEPORT shards); 0 = one per two
    /// cores, at least one.
    pub threads: usize,
    /// The kernel fast path (`relay/xdp/`): ChannelData relayed by an XDP
    /// program on `xdp_interface`, "native" (in the driver) or "generic";
    /// "off" by default. A build without the `xdp` feature, or a kernel or
    /// driver that refuses, logs why and relays in user space.
    pub xdp: XdpMode,
    pub xdp_interface: String,
    pub realm: String,
    pub default_lifetime_secs: u64,
    pub max_lifetime_secs: u64,
    /// How long a nonce stays fresh before 438 Stale Nonce.
    pub nonce_lifetime_secs: u64,
    /// Allocations one user may hold at once (486 beyond); a REST username
    /// `EXPIRY:USER` counts as USER. 0 = no cap.
    pub user_quota: usize,
    /// Allocations one client address (IPv6: one /64) may hold at once
    /// (486 beyond); 0 = no cap.
    pub ip_quota: usize,
    /// Relayed bytes per second per allocation, each direction (excess is
    /// dropped); 0 = unlimited.
    pub max_bps: u64,
    /// Relayed bytes per second for the whole relay; 0 = unlimited.
    pub bps_capacity: u64,
    /// An allocation ends this long after it was made, however often it is
    /// refreshed; 0 = never.
    pub max_allocation_age_secs: u64,
    /// Per client address (IPv6: /64): requests without valid credentials,
    /// and Binding requests, answered per second (twice that at once);
    /// beyond, they are dropped. 0 = unlimited.
    pub unauth_requests_per_sec: u64,
    pub binding_requests_per_sec: u64,
    /// Allocations in all; 0 = limited only by the port range.
    pub total_quota: usize,
    /// Permissions and channels per allocation.
    pub max_permissions: usize,
    pub max_channels: usize,
    /// How long a permission and a channel binding live unless the client
    /// refreshes them (RFC 8656: 300 s and 600 s), for allocations made
    /// after the setting is loaded.
    pub permission_lifetime_secs: u64,
    pub channel_lifetime_secs: u64,
    /// Peer ranges that are allowed even though the built-in policy denies
    /// them (allow wins over deny).
    pub allowed_peer_ranges: Vec<IpNet>,
    pub denied_peer_ranges: Vec<IpNet>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// TURN REST API shared secrets; the first mints, all verify.
    /// Empty = a random secret is generated at start.
    pub secrets: Vec<Secret>,
    /// Lifetime of minted REST credentials.
    pub rest_ttl_secs: u64,
    /// Static long-term users: name = password.
    pub users: BTreeMap<String, Secret>,
    /// On reload, end the allocations made with a static user or a REST
    /// secret that the new configuration removed.
    pub revoke_on_reload: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignalingConfig {
    pub room_capacity: usize,
    pub max_message_bytes: usize,
    pub ping_interval_ms: u64,
    pub pong_timeout_ms: u64,
    /// A socket that has not joined a room this long is closed.
    pub join_timeout_secs: u64,
    /// Signaling sockets per client address (IPv6: per /64).
    pub max_sockets_per_ip: usize,
    /// What one socket may send: messages and bytes per second (twice that
    /// at once). Beyond, its messages are refused with `rate-limited`.
    pub messages_per_sec: u64,
    pub bytes_per_sec: u64,
    /// Joins per second per client address (twice that at once).
    pub joins_per_sec_per_ip: u64,
    /// Rooms in all (with the Redis backend: rooms with a member on this
    /// node).
    pub max_rooms: usize,
    /// How long a joined `/ws` peer whose socket was lost keeps its id and
    /// room for a `resume`; 0 turns resumption off.
    pub resume_secs: u64,
    /// Most bytes buffered for one lost peer; more ends its session.
    pub resume_buffer_bytes: usize,
    /// Where rooms live: this process's memory, or Redis shared by several
    /// nodes (`signal/redis/`).
    pub backend: SignalingBackend,
    /// The Redis server of the `redis` backend (`redis://[:PASSWORD@]HOST:PORT[/DB]`).
    pub redis_url: String,
    /// Prefix of every key and channel turnkey uses in Redis, so several
    /// clusters can share one server.
    pub redis_prefix: String,
    /// A node that stops refreshing its presence (crashed, cut off) has its
    /// peers taken out of their rooms within this many seconds.
    pub presence_ttl_secs: u64,
}

/// Where the signaling rooms live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SignalingBackend {
    /// In this process: one node, no dependencies.
    #[default]
    Memory,
    /// In Redis: nodes that share it share rooms.
    Redis,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Human,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            static_dir: None,
            public_host: None,
            header_timeout_secs: 10,
            idle_timeout_secs: 120,
            max_body_bytes: 256 * 1024,
            max_connections_per_ip: 64,
            max_connections: 8192,
            trusted_proxies: Vec::new(),
            threads: 1,
            acme_listen: None,
        }
    }
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 3478))],
            relay_ip: None,
            external_ip: None,
            relay_ip_v6: None,
            external_ip_v6: None,
            tcp_listen: None,
            tcp_http: TcpHttp::Off,
            tcp_unauth_timeout_secs: 10,
            tcp_unauth_per_ip: 16,
            tcp_unauth_total: 4096,
            tcp_idle_timeout_secs: 3600,
            proxy_protocol_from: Vec::new(),
            relay_port_min: 49152,
            relay_port_max: 65535,
            threads: 0,
            xdp: XdpMode::Off,
            xdp_interface: String::new(),
            realm: "turnkey".into(),
            default_lifetime_secs: 600,
            max_lifetime_secs: 3600,
            nonce_lifetime_secs: 600,
            user_quota: 64,
            ip_quota: 128,
            max_bps: 3_000_000,
            bps_capacity: 0,
            max_allocation_age_secs: 86_400,
            unauth_requests_per_sec: 20,
            binding_requests_per_sec: 50,
            total_quota: 0,
            max_permissions: 64,
            max_channels: 64,
            permission_lifetime_secs: 300,
            channel_lifetime_secs: 600,
            allowed_peer_ranges: Vec::new(),
            denied_peer_ranges: Vec::new(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            secrets: Vec::new(),
            rest_ttl_secs: 24 * 3600,
            users: BTreeMap::new(),
            revoke_on_reload: false,
        }
    }
}

impl Default for SignalingConfig {
    fn default() -> Self {
        SignalingConfig {
            room_capacity: 2,
            max_message_bytes: 64 * 1024,
            ping_interval_ms: 20_000,
            pong_timeout_ms: 45_000,
            join_timeout_secs: 30,
            max_sockets_per_ip: 32,
            messages_per_sec: 50,
            bytes_per_sec: 256 * 1024,
            joins_per_sec_per_ip: 5,
            max_rooms: 10_000,
            resume_secs: 30,
            resume_buffer_bytes: 64 * 1024,
            backend: SignalingBackend::Memory,
            redis_url: "redis://127.0.0.1:6379/".into(),
            redis_prefix: "turnkey:".into(),
            presence_ttl_secs: 30,
        }
    }
}

impl Config {
    /// Defaults, then the file (if any), then `TURNKEY_…` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist or is not a file",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k[ENV_PREFIX.len()..].starts_with('_'))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("turn.listen")
                .with_list_parse_key("turn.tcp_listen")
                .with_list_parse_key("turn.proxy_protocol_from")
                .with_list_parse_key("tls.listen")
                .with_list_parse_key("tls.acme_domains")
                .with_list_parse_key("turn.allowed_peer_ranges")
                .with_list_parse_key("turn.denied_peer_ranges")
                .with_list_parse_key("auth.secrets")
                .with_list_parse_key("access.allowed_origins")
                .with_list_parse_key("http.trusted_proxies")
                .with_list_parse_key("access.token_secret")
                .try_parsing(true)
                .source(Some(env)),
        );
        let raw = builder
            .build()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        let cfg: Config = raw
            .try_deserialize()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.clone();
        shown.signaling.redis_url = mask_url_password(&self.signaling.redis_url);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

/// `redis://user:PASSWORD@host` with the password replaced by `***`.
fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

impl TurnConfig {
    pub fn relay_ports(&self) -> RangeInclusive<u16> {
        self.relay_port_min..=self.relay_port_max
    }
    pub fn default_lifetime(&self) -> Duration {
        Duration::from_secs(self.default_lifetime_secs)
    }
    pub fn max_lifetime(&self) -> Duration {
        Duration::from_secs(self.max_lifetime_secs)
    }
    pub fn max_allocation_age(&self) -> Option<Duration> {
        (self.max_allocation_age_secs > 0)
            .then(|| Duration::from_secs(self.max_allocation_age_secs))
    }
    pub fn nonce_lifetime(&self) -> Duration {
        Duration::from_secs(self.nonce_lifetime_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut f = tempfile();
        f.1.write_all(toml.as_bytes()).expect("write temp config");
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let r = Config::load(Some(&f.0), env);
        let _ = std::fs::remove_file(&f.0);
        r
    }

    fn tempfile() -> (PathBuf, std::fs::File) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "turnkey-cfg-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let f = std::fs::File::create(&p).expect("create temp config");
        (p, f)
    }

    fn err_text(r: Result<Config, ConfigError>) -> String {
        match r {
            Ok(_) => panic!("expected a config error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_load_without_a_file() {
        let c = Config::load(None, Vec::new()).expect("defaults are valid");
        assert_eq!(c.http.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.turn.listen, vec!["0.0.0.0:3478".parse().unwrap()]);
        assert_eq!(c.turn.relay_ports(), 49152..=65535);
        assert_eq!(c.turn.realm, "turnkey");
        assert_eq!(c.auth.rest_ttl_secs, 86400);
    }

    #[test]
    fn the_documented_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/turnkey.toml");
        Config::load(Some(&path), Vec::new()).expect("config/turnkey.toml loads");
    }

    #[test]
    fn file_and_env_override_defaults() {
        let c = load_str(
            "[turn]\nexternal_ip = \"198.51.100.7\"\nrelay_port_min = 50000\n",
            &[
                ("TURNKEY_TURN__RELAY_PORT_MAX", "50100"),
                ("TURNKEY_TURN__DENIED_PEER_RANGES", "1.2.3.0/24,5.6.0.0/16"),
                ("UNRELATED", "x"),
            ],
        )
        .expect("valid");
        assert_eq!(c.turn.external_ip, Some("198.51.100.7".parse().unwrap()));
        assert_eq!(c.turn.relay_ports(), 50000..=50100);
        assert_eq!(c.turn.denied_peer_ranges.len(), 2);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err_text(load_str("[turn]\nrelay_prot_min = 1\n", &[]));
        assert!(e.contains("relay_prot_min"), "{e}");
    }

    #[test]
    fn bad_cidr_is_named() {
        let e = err_text(load_str(
            "[turn]\nallowed_peer_ranges = [\"10.0.0/8\"]\n",
            &[],
        ));
        assert!(e.contains("allowed_peer_ranges"), "{e}");
    }

    #[test]
    fn reversed_port_range_is_named() {
        let e = err_text(load_str(
            "[turn]\nrelay_port_min = 60000\nrelay_port_max = 50000\n",
            &[],
        ));
        assert!(
            e.contains("turn.relay_port_min") && e.contains("reversed"),
            "{e}"
        );
    }

    #[test]
    fn bad_address_is_named() {
        let e = err_text(load_str("[http]\nlisten = \"localhost\"\n", &[]));
        assert!(e.contains("http.listen") || e.contains("listen"), "{e}");
    }

    #[test]
    fn missing_static_dir_is_named() {
        let e = err_text(load_str("[http]\nstatic_dir = \"/nonexistent/dir\"\n", &[]));
        assert!(e.contains("http.static_dir"), "{e}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/turnkey.toml")), Vec::new())
            .map(|_| ())
            .expect_err("missing file");
        assert!(e.to_string().contains("/nonexistent/turnkey.toml"));
    }

    #[test]
    fn secrets_are_masked_when_printed() {
        let c = load_str(
            "[auth]\nsecrets = [\"0123456789abcdef-very-secret\"]\n[auth.users]\nalice = \"hunter2hunter2\"\n",
            &[],
        )
        .expect("valid");
        let printed = c.to_masked_toml();
        assert!(!printed.contains("very-secret"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("alice"));
        assert!(!format!("{c:?}").contains("very-secret"));
    }

    #[test]
    fn the_redis_keys_are_checked_and_its_password_masked() {
        let c = load_str(
            "[signaling]\nbackend = \"redis\"\nredis_url = \"redis://:pa55word@10.0.0.5:6379/2\"\n",
            &[],
        )
        .expect("valid");
        assert_eq!(c.signaling.backend, SignalingBackend::Redis);
        let printed = c.to_masked_toml();
        assert!(!printed.contains("pa55word"), "{printed}");
        assert!(
            printed.contains("redis://:***@10.0.0.5:6379/2"),
            "{printed}"
        );
        for (bad, key) in [
            ("backend = \"etcd\"", "backend"),
            ("redis_url = \"http://x\"", "signaling.redis_url"),
            ("redis_prefix = \"a b\"", "signaling.redis_prefix"),
            ("presence_ttl_secs = 1", "signaling.presence_ttl_secs"),
        ] {
            let err = load_str(&format!("[signaling]\n{bad}\n"), &[]).unwrap_err();
            assert!(err.to_string().contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn short_secret_is_refused() {
        let e = err_text(load_str("[auth]\nsecrets = [\"short\"]\n", &[]));
        assert!(e.contains("auth.secrets[0]"), "{e}");
    }
}
