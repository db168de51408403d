//! What the types of [`Config`] cannot say: ranges, relations between
//! keys, files that must exist. One function per section, called in order
//! by [`Config::validate`]; a problem names its key (`section.key`) and
//! what is wrong with it.

use super::{
    AccessConfig, AccessMode, AdminConfig, AuthConfig, Config, ConfigError, HttpConfig, LogConfig,
    MetricsConfig, SignalingConfig, TlsConfig, TurnConfig, UsageConfig, WebhooksConfig,
};

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        problem: problem.into(),
    }
}

impl Config {
    /// Checks what types alone cannot: ranges, relations between keys, files.
    /// One function per section, in this order; the first problem found is
    /// the one reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_turn(&self.turn)?;
        validate_http(&self.http, &self.signaling)?;
        validate_auth(&self.auth)?;
        validate_signaling(&self.signaling)?;
        validate_tls(&self.tls)?;
        validate_acme_listen(&self.http, &self.tls)?;
        validate_metrics(&self.metrics, &self.http)?;
        validate_access(&self.access)?;
        validate_admin(&self.admin, &self.http)?;
        validate_usage(&self.usage)?;
        validate_webhooks(&self.webhooks)?;
        validate_log(&self.log)
    }
}

fn validate_turn(t: &TurnConfig) -> Result<(), ConfigError> {
    if t.listen.is_empty() {
        return Err(invalid("turn.listen", "needs at least one address"));
    }
    if t.relay_port_min == 0 {
        return Err(invalid("turn.relay_port_min", "must be at least 1"));
    }
    if t.xdp != super::XdpMode::Off && t.xdp_interface.trim().is_empty() {
        return Err(invalid(
            "turn.xdp_interface",
            "names the interface to attach to when turn.xdp is on",
        ));
    }
    if t.relay_port_min > t.relay_port_max {
        return Err(invalid(
            "turn.relay_port_min",
            format!(
                "port range is reversed: relay_port_min {} > relay_port_max {}",
                t.relay_port_min, t.relay_port_max
            ),
        ));
    }
    if t.realm.is_empty() || t.realm.len() > 127 || t.realm.contains('"') {
        return Err(invalid(
            "turn.realm",
            "must be 1–127 characters without quotes",
        ));
    }
    if t.default_lifetime_secs == 0 || t.default_lifetime_secs > t.max_lifetime_secs {
        return Err(invalid(
            "turn.default_lifetime_secs",
            "must be between 1 and turn.max_lifetime_secs",
        ));
    }
    if t.nonce_lifetime_secs == 0 {
        return Err(invalid("turn.nonce_lifetime_secs", "must be at least 1"));
    }
    if t.max_permissions == 0 {
        return Err(invalid("turn.max_permissions", "must be at least 1"));
    }
    if t.max_channels == 0 || t.max_channels > 0x1000 {
        return Err(invalid("turn.max_channels", "must be between 1 and 4096"));
    }
    if !(1..=3600).contains(&t.permission_lifetime_secs) {
        return Err(invalid(
            "turn.permission_lifetime_secs",
            "must be between 1 and 3600 (RFC 8656: 300)",
        ));
    }
    if !(1..=3600).contains(&t.channel_lifetime_secs) {
        return Err(invalid(
            "turn.channel_lifetime_secs",
            "must be between 1 and 3600 (RFC 8656: 600)",
        ));
    }
    if let Some(ip) = t.external_ip {
        if ip.is_unspecified() {
            return Err(invalid(
                "turn.external_ip",
                "must be a concrete address, not 0.0.0.0 or ::",
            ));
        }
    }
    for (key, ip) in [
        ("turn.relay_ip_v6", t.relay_ip_v6),
        ("turn.external_ip_v6", t.external_ip_v6),
    ] {
        if ip.is_some_and(|ip| !ip.is_ipv6()) {
            return Err(invalid(key, "must be an IPv6 address"));
        }
    }
    for (key, ip) in [
        ("turn.relay_ip", t.relay_ip),
        ("turn.external_ip", t.external_ip),
    ] {
        if ip.is_some_and(|ip| !ip.is_ipv4()) {
            return Err(invalid(
                key,
                "must be an IPv4 address (use the _v6 key for IPv6)",
            ));
        }
    }
    if t.tcp_unauth_timeout_secs == 0 {
        return Err(invalid(
            "turn.tcp_unauth_timeout_secs",
            "must be at least 1 second",
        ));
    }
    // A live allocation is refreshed at least every max_lifetime_secs,
    // so an idle timeout below it could cut a quiet but live one.
    if t.tcp_idle_timeout_secs < t.max_lifetime_secs {
        return Err(invalid(
            "turn.tcp_idle_timeout_secs",
            "must be at least turn.max_lifetime_secs (a quiet allocation refreshes that rarely)",
        ));
    }
    for (key, n) in [
        ("turn.tcp_unauth_per_ip", t.tcp_unauth_per_ip),
        ("turn.tcp_unauth_total", t.tcp_unauth_total),
    ] {
        if n == 0 {
            return Err(invalid(key, "must be at least 1"));
        }
    }
    Ok(())
}

/// `signaling` because WebSocket pings are what keeps a quiet call's
/// socket busy, so the idle timeout must outlast their interval.
fn validate_http(h: &HttpConfig, signaling: &SignalingConfig) -> Result<(), ConfigError> {
    if let Some(dir) = &h.static_dir {
        if !dir.is_dir() {
            return Err(invalid(
                "http.static_dir",
                format!("{} is not a directory", dir.display()),
            ));
        }
    }
    for (key, n) in [
        ("http.header_timeout_secs", h.header_timeout_secs as usize),
        ("http.idle_timeout_secs", h.idle_timeout_secs as usize),
        ("http.max_body_bytes", h.max_body_bytes),
        ("http.max_connections_per_ip", h.max_connections_per_ip),
        ("http.max_connections", h.max_connections),
    ] {
        if n == 0 {
            return Err(invalid(key, "must be at least 1"));
        }
    }
    if h.idle_timeout_secs * 1000 <= signaling.ping_interval_ms {
        return Err(invalid(
            "http.idle_timeout_secs",
            "must be longer than signaling.ping_interval_ms",
        ));
    }
    Ok(())
}

fn validate_auth(a: &AuthConfig) -> Result<(), ConfigError> {
    if a.rest_ttl_secs < 60 {
        return Err(invalid("auth.rest_ttl_secs", "must be at least 60"));
    }
    for (i, s) in a.secrets.iter().enumerate() {
        if s.expose().len() < 16 {
            return Err(invalid(
                &format!("auth.secrets[{i}]"),
                "is shorter than 16 characters",
            ));
        }
    }
    for (name, pw) in &a.users {
        if name.is_empty() || name.contains(':') {
            return Err(invalid(
                &format!("auth.users.{name}"),
                "user names must be non-empty and contain no ':' (reserved for REST credentials)",
            ));
        }
        if pw.expose().chars().count() < 12 {
            return Err(invalid(
                &format!("auth.users.{name}"),
                "password shorter than 12 characters",
            ));
        }
    }
    Ok(())
}

fn validate_signaling(s: &SignalingConfig) -> Result<(), ConfigError> {
    if s.room_capacity < 2 {
        return Err(invalid("signaling.room_capacity", "must be at least 2"));
    }
    if !(s.redis_url.starts_with("redis://") && s.redis_url.len() > "redis://".len()) {
        return Err(invalid(
            "signaling.redis_url",
            "must be a redis://HOST:PORT URL",
        ));
    }
    let prefix_ok = |b: u8| b.is_ascii_graphic() && b != b'*' && b != b'?';
    if s.redis_prefix.len() > 64 || !s.redis_prefix.bytes().all(prefix_ok) {
        return Err(invalid(
            "signaling.redis_prefix",
            "must be at most 64 printable characters without spaces, * or ?",
        ));
    }
    if !(2..=3600).contains(&s.presence_ttl_secs) {
        return Err(invalid(
            "signaling.presence_ttl_secs",
            "must be 2 to 3600 seconds",
        ));
    }
    if s.max_message_bytes < 1024 {
        return Err(invalid(
            "signaling.max_message_bytes",
            "must be at least 1024",
        ));
    }
    if s.ping_interval_ms == 0 || s.pong_timeout_ms <= s.ping_interval_ms {
        return Err(invalid(
            "signaling.pong_timeout_ms",
            "must be greater than signaling.ping_interval_ms (> 0)",
        ));
    }
    if s.resume_secs > 3600 {
        return Err(invalid(
            "signaling.resume_secs",
            "must be at most 3600 seconds (0 turns resumption off)",
        ));
    }
    if s.resume_buffer_bytes < 1024 {
        return Err(invalid(
            "signaling.resume_buffer_bytes",
            "must be at least 1024",
        ));
    }
    for (key, n) in [
        ("signaling.join_timeout_secs", s.join_timeout_secs as usize),
        ("signaling.max_sockets_per_ip", s.max_sockets_per_ip),
        ("signaling.max_rooms", s.max_rooms),
    ] {
        if n == 0 {
            return Err(invalid(key, "must be at least 1"));
        }
    }
    Ok(())
}

fn validate_tls(tls: &TlsConfig) -> Result<(), ConfigError> {
    if !tls.acme_domains.is_empty() {
        validate_acme(tls)?;
    } else if !tls.listen.is_empty() {
        for (key, file) in [
            ("tls.cert_file", &tls.cert_file),
            ("tls.key_file", &tls.key_file),
        ] {
            match file {
                None => {
                    return Err(invalid(
                        key,
                        "is required when tls.listen is set (or set tls.acme_domains)",
                    ))
                }
                Some(f) if !f.is_file() => {
                    return Err(invalid(
                        key,
                        format!("{} does not exist or is not a file", f.display()),
                    ))
                }
                Some(_) => {}
            }
        }
    }
    if tls.handshake_timeout_ms == 0 {
        return Err(invalid("tls.handshake_timeout_ms", "must be at least 1"));
    }
    Ok(())
}

/// HTTP-01 is an ACME challenge: without ACME the listener would serve
/// nothing.
fn validate_acme_listen(http: &HttpConfig, tls: &TlsConfig) -> Result<(), ConfigError> {
    if http.acme_listen.is_some() && tls.acme_domains.is_empty() {
        return Err(invalid(
            "http.acme_listen",
            "answers ACME's HTTP-01 challenge: it needs tls.acme_domains",
        ));
    }
    Ok(())
}

/// ACME answers TLS-ALPN-01 on the TLS port, so it needs one; it owns the
/// certificate, so files are refused rather than silently ignored.
fn validate_acme(tls: &TlsConfig) -> Result<(), ConfigError> {
    if tls.cert_file.is_some() || tls.key_file.is_some() {
        return Err(invalid(
            "tls.acme_domains",
            "and tls.cert_file/tls.key_file are exclusive: ACME gets the certificate itself",
        ));
    }
    if tls.listen.is_empty() {
        return Err(invalid(
            "tls.acme_domains",
            "needs tls.listen: the ACME server checks the domain on the TLS port (TLS-ALPN-01)",
        ));
    }
    for d in &tls.acme_domains {
        let name = rustls::pki_types::ServerName::try_from(d.as_str());
        if !matches!(name, Ok(rustls::pki_types::ServerName::DnsName(_))) || d.starts_with("*.") {
            return Err(invalid(
                "tls.acme_domains",
                format!("{d:?} is not a DNS name (no addresses, no wildcards)"),
            ));
        }
    }
    if !tls.acme_directory.starts_with("https://") {
        return Err(invalid("tls.acme_directory", "must be an https:// URL"));
    }
    if let Some(e) = &tls.acme_email {
        if !e.contains('@') || e.contains(char::is_whitespace) {
            return Err(invalid(
                "tls.acme_email",
                format!("{e:?} is not an e-mail address"),
            ));
        }
    }
    if let Some(f) = &tls.acme_ca_file {
        if !f.is_file() {
            return Err(invalid(
                "tls.acme_ca_file",
                format!("{} does not exist or is not a file", f.display()),
            ));
        }
    }
    Ok(())
}

fn validate_metrics(m: &MetricsConfig, http: &HttpConfig) -> Result<(), ConfigError> {
    if m.listen == http.listen && m.listen.port() != 0 {
        return Err(invalid(
            "metrics.listen",
            "is the same as http.listen: /metrics is never served on a public listener",
        ));
    }
    Ok(())
}

fn validate_access(a: &AccessConfig) -> Result<(), ConfigError> {
    for (i, o) in a.allowed_origins.iter().enumerate() {
        if !valid_origin(o) {
            return Err(invalid(
                &format!("access.allowed_origins[{i}]"),
                format!("{o:?} is not scheme://host[:port]"),
            ));
        }
    }
    match a.mode {
        AccessMode::Origin if a.allowed_origins.is_empty() => {
            return Err(invalid(
                "access.allowed_origins",
                "is empty, so mode = \"origin\" would refuse everyone",
            ))
        }
        AccessMode::Token if a.token_secret.is_empty() => {
            return Err(invalid(
                "access.token_secret",
                "is required with mode = \"token\"",
            ))
        }
        _ => {}
    }
    for (i, s) in a.token_secret.iter().enumerate() {
        if s.expose().len() < 32 {
            return Err(invalid(
                &format!("access.token_secret[{i}]"),
                "is shorter than 32 characters",
            ));
        }
    }
    Ok(())
}

fn validate_admin(a: &AdminConfig, http: &HttpConfig) -> Result<(), ConfigError> {
    let Some(addr) = a.listen else {
        return Ok(());
    };
    match &a.token {
        None => {
            return Err(invalid(
                "admin.token",
                "is required when admin.listen is set",
            ))
        }
        Some(t) if t.expose().len() < 16 => {
            return Err(invalid("admin.token", "is shorter than 16 characters"))
        }
        Some(_) => {}
    }
    if addr == http.listen && addr.port() != 0 {
        return Err(invalid(
            "admin.listen",
            "must not be http.listen (a public listener)",
        ));
    }
    Ok(())
}

fn validate_usage(u: &UsageConfig) -> Result<(), ConfigError> {
    // Each label is a few Prometheus series: thousands would be a
    // cardinality problem of their own.
    if u.max_labels > 10_000 {
        return Err(invalid("usage.max_labels", "must be at most 10000"));
    }
    for b in &u.budgets {
        if b.user.is_some() == b.label.is_some() {
            return Err(invalid(
                "usage.budgets",
                "each budget names exactly one of `user` and `label`",
            ));
        }
        if b.bytes_per_day == 0 && b.bytes_per_month == 0 && b.allocations == 0 {
            return Err(invalid(
                "usage.budgets",
                "each budget needs bytes_per_day, bytes_per_month or allocations",
            ));
        }
    }
    Ok(())
}

fn validate_webhooks(w: &WebhooksConfig) -> Result<(), ConfigError> {
    for e in &w.events {
        if !super::WEBHOOK_EVENTS.contains(&e.as_str()) {
            return Err(invalid(
                "webhooks.events",
                format!(
                    "unknown event `{e}` (known: {})",
                    super::WEBHOOK_EVENTS.join(", ")
                ),
            ));
        }
    }
    if w.url.is_empty() {
        return Ok(());
    }
    if w.url.starts_with("https://") {
        return Err(invalid(
            "webhooks.url",
            "https:// is not supported yet: use http:// (to a local forwarder for TLS)",
        ));
    }
    let uri: hyper::Uri = w
        .url
        .parse()
        .map_err(|e| invalid("webhooks.url", format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(invalid("webhooks.url", "must be http://HOST[:PORT]/PATH"));
    }
    if w.secret.expose().len() < 16 {
        return Err(invalid("webhooks.secret", "needs at least 16 characters"));
    }
    if w.queue == 0 || w.timeout_secs == 0 || w.retry_max_secs == 0 {
        return Err(invalid(
            "webhooks",
            "queue, timeout_secs and retry_max_secs must be at least 1",
        ));
    }
    Ok(())
}

fn validate_log(l: &LogConfig) -> Result<(), ConfigError> {
    if l.level.trim().is_empty() {
        return Err(invalid("log.level", "is empty"));
    }
    Ok(())
}

/// Whether `o` is an origin as browsers send it: `http(s)://host[:port]`,
/// no path.
fn valid_origin(o: &str) -> bool {
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    // A port follows the last ':' outside an IPv6 literal's brackets.
    let (host, port) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains(']') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    (scheme == "http" || scheme == "https")
        && !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-[]:".contains(&b))
        && port.is_none_or(|p| p.parse::<u16>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_scheme_host_and_port() {
        for ok in [
            "https://app.example",
            "http://localhost:8080",
            "http://[::1]:8080",
            "https://[2001:db8::1]",
        ] {
            assert!(valid_origin(ok), "{ok}");
        }
        for bad in [
            "app.example",
            "https://app.example/path",
            "ftp://app.example",
            "https://",
            "https://a:b",
        ] {
            assert!(!valid_origin(bad), "{bad}");
        }
    }

    #[test]
    fn a_budget_names_one_subject_and_a_limit() {
        use crate::config::BudgetConfig;
        let check = |b: BudgetConfig| {
            validate_usage(&UsageConfig {
                budgets: vec![b],
                ..UsageConfig::default()
            })
        };
        let ok = BudgetConfig {
            label: Some("acme".into()),
            bytes_per_month: 1,
            ..BudgetConfig::default()
        };
        assert!(check(ok.clone()).is_ok());
        let both = BudgetConfig {
            user: Some("alice".into()),
            ..ok.clone()
        };
        let neither = BudgetConfig {
            label: None,
            ..ok.clone()
        };
        let no_limit = BudgetConfig {
            bytes_per_month: 0,
            ..ok
        };
        for bad in [both, neither, no_limit] {
            assert!(check(bad.clone()).is_err(), "{bad:?}");
        }
    }

    fn acme_tls() -> TlsConfig {
        TlsConfig {
            listen: vec!["127.0.0.1:443".parse().unwrap()],
            acme_domains: vec!["turn.example.com".into()],
            ..TlsConfig::default()
        }
    }

    fn problem(tls: &TlsConfig) -> Option<String> {
        validate_tls(tls).err().map(|e| e.to_string())
    }

    #[test]
    fn acme_needs_no_files_and_refuses_them() {
        assert_eq!(problem(&acme_tls()), None);
        let mut both = acme_tls();
        both.cert_file = Some("/etc/hostname".into());
        let p = problem(&both).unwrap();
        assert!(
            p.contains("tls.acme_domains") && p.contains("exclusive"),
            "{p}"
        );
        // Without ACME, files stay required.
        let mut neither = acme_tls();
        neither.acme_domains.clear();
        assert!(problem(&neither).unwrap().contains("tls.cert_file"));
    }

    #[test]
    fn http01_needs_acme() {
        let http = HttpConfig {
            acme_listen: Some("127.0.0.1:80".parse().unwrap()),
            ..HttpConfig::default()
        };
        assert!(validate_acme_listen(&http, &acme_tls()).is_ok());
        let e = validate_acme_listen(&http, &TlsConfig::default()).unwrap_err();
        assert!(e.to_string().contains("http.acme_listen"), "{e}");
    }

    #[test]
    fn acme_checks_its_keys() {
        let mut no_listener = acme_tls();
        no_listener.listen.clear();
        assert!(problem(&no_listener).unwrap().contains("needs tls.listen"));
        for bad in ["*.example.com", "127.0.0.1", "not a name", ""] {
            let mut t = acme_tls();
            t.acme_domains = vec![bad.into()];
            assert!(problem(&t).unwrap().contains("tls.acme_domains"), "{bad}");
        }
        let mut plain = acme_tls();
        plain.acme_directory = "http://acme.example/dir".into();
        assert!(problem(&plain).unwrap().contains("tls.acme_directory"));
        let mut mail = acme_tls();
        mail.acme_email = Some("nobody".into());
        assert!(problem(&mail).unwrap().contains("tls.acme_email"));
        let mut ca = acme_tls();
        ca.acme_ca_file = Some("/nonexistent/ca.pem".into());
        assert!(problem(&ca).unwrap().contains("tls.acme_ca_file"));
    }
}
