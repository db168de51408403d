//! What a SIGHUP may change: every configuration key is either applied to
//! the running appliance or needs a restart, decided here and nowhere else.
//!
//! Keys that need a restart are the ones bound into something built once:
//! a listening socket, the relay port pools, the shard threads, the tracing
//! subscriber, the core's nonce lifetime. The rest are read through the
//! control handle (`control.rs`) at the moment they matter, so swapping
//! them is enough. `config/turnkey.toml` and the README's configuration
//! table say the same per key (a test checks the README).

use crate::config::{Config, ConfigError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnReload {
    /// Takes effect on SIGHUP.
    Applied,
    /// Logged as `restart needed: KEY`; the running value stays.
    Restart,
}

use OnReload::{Applied, Restart};

/// Every key of [`Config`], `section.key`. A unit test checks that this is
/// exactly the set of keys the config has.
pub const KEYS: &[(&str, OnReload)] = &[
    ("log.level", Restart),
    ("log.format", Restart),
    ("http.listen", Restart),
    ("http.static_dir", Restart),
    ("http.public_host", Applied),
    ("http.header_timeout_secs", Applied),
    ("http.idle_timeout_secs", Applied),
    ("http.max_body_bytes", Restart),
    ("http.max_connections_per_ip", Applied),
    ("http.max_connections", Applied),
    ("http.trusted_proxies", Applied),
    ("http.threads", Restart),
    ("http.acme_listen", Restart),
    ("turn.listen", Restart),
    ("turn.relay_ip", Restart),
    ("turn.external_ip", Restart),
    ("turn.relay_ip_v6", Restart),
    ("turn.external_ip_v6", Restart),
    ("turn.tcp_listen", Restart),
    ("turn.tcp_http", Applied),
    ("turn.tcp_unauth_timeout_secs", Applied),
    ("turn.tcp_unauth_per_ip", Applied),
    ("turn.tcp_unauth_total", Applied),
    ("turn.tcp_idle_timeout_secs", Applied),
    ("turn.proxy_protocol_from", Applied),
    ("turn.relay_port_min", Restart),
    ("turn.relay_port_max", Restart),
    ("turn.threads", Restart),
    ("turn.xdp", Restart),
    ("turn.xdp_interface", Restart),
    ("turn.realm", Applied),
    ("turn.default_lifetime_secs", Applied),
    ("turn.max_lifetime_secs", Applied),
    ("turn.nonce_lifetime_secs", Restart),
    ("turn.user_quota", Applied),
    ("turn.ip_quota", Applied),
    ("turn.max_bps", Applied),
    ("turn.bps_capacity", Applied),
    ("turn.max_allocation_age_secs", Applied),
    ("turn.unauth_requests_per_sec", Applied),
    ("turn.binding_requests_per_sec", Applied),
    ("turn.total_quota", Applied),
    ("turn.max_permissions", Applied),
    ("turn.max_channels", Applied),
    ("turn.permission_lifetime_secs", Applied),
    ("turn.channel_lifetime_secs", Applied),
    ("turn.allowed_peer_ranges", Applied),
    ("turn.denied_peer_ranges", Applied),
    ("auth.secrets", Applied),
    ("auth.rest_ttl_secs", Applied),
    ("auth.users", Applied),
    ("auth.revoke_on_reload", Applied),
    ("signaling.room_capacity", Applied),
    ("signaling.max_message_bytes", Applied),
    ("signaling.ping_interval_ms", Applied),
    ("signaling.pong_timeout_ms", Applied),
    ("signaling.join_timeout_secs", Applied),
    ("signaling.max_sockets_per_ip", Applied),
    ("signaling.messages_per_sec", Applied),
    ("signaling.bytes_per_sec", Applied),
    ("signaling.joins_per_sec_per_ip", Applied),
    ("signaling.max_rooms", Applied),
    ("signaling.resume_secs", Applied),
    ("signaling.resume_buffer_bytes", Applied),
    ("signaling.backend", Restart),
    ("signaling.redis_url", Restart),
    ("signaling.redis_prefix", Restart),
    ("signaling.presence_ttl_secs", Restart),
    ("metrics.listen", Restart),
    ("drain.grace_secs", Applied),
    ("drain.alternate_server", Applied),
    ("tls.listen", Restart),
    ("tls.cert_file", Restart),
    ("tls.key_file", Restart),
    ("tls.handshake_timeout_ms", Applied),
    ("tls.public_port", Applied),
    ("tls.acme_domains", Restart),
    ("tls.acme_email", Restart),
    ("tls.acme_directory", Restart),
    ("tls.acme_ca_file", Restart),
    ("tls.acme_cache_dir", Restart),
    ("admin.listen", Restart),
    ("admin.token", Applied),
    ("access.mode", Applied),
    ("access.allowed_origins", Applied),
    ("access.token_secret", Applied),
    ("access.mints_per_minute", Applied),
    ("usage.max_labels", Restart),
    ("usage.budgets", Applied),
    ("webhooks.url", Applied),
    ("webhooks.secret", Applied),
    ("webhooks.events", Applied),
    ("webhooks.queue", Restart),
    ("webhooks.timeout_secs", Applied),
    ("webhooks.retry_max_secs", Applied),
    ("webhooks.max_attempts", Applied),
];

pub fn on_reload(key: &str) -> Option<OnReload> {
    KEYS.iter().find(|(k, _)| *k == key).map(|(_, r)| *r)
}

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Changed keys now in force.
    pub applied: Vec<&'static str>,
    /// Changed keys that keep their running value until a restart.
    pub restart_needed: Vec<&'static str>,
}

/// A config as `section.key → value`, secrets included (compared, never
/// shown).
fn flatten(cfg: &Config) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    if let Ok(serde_json::Value::Object(sections)) = serde_json::to_value(cfg) {
        for (section, keys) in sections {
            if let serde_json::Value::Object(keys) = keys {
                for (key, value) in keys {
                    out.push((format!("{section}.{key}"), value));
                }
            }
        }
    }
    out
}

/// The keys whose values differ. Secrets serialize masked, so they are
/// compared directly.
fn changed(old: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (flatten(old), flatten(new));
    KEYS.iter()
        .map(|(k, _)| *k)
        .filter(|k| match *k {
            "auth.secrets" => old.auth.secrets != new.auth.secrets,
            "auth.users" => old.auth.users != new.auth.users,
            "admin.token" => old.admin.token != new.admin.token,
            "access.token_secret" => old.access.token_secret != new.access.token_secret,
            "webhooks.secret" => old.webhooks.secret != new.webhooks.secret,
            _ => {
                let get = |v: &[(String, serde_json::Value)]| {
                    v.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone())
                };
                get(&a) != get(&b)
            }
        })
        .collect()
}

/// The configuration to run with after `new` was loaded over `old`: every
/// applied key from `new`, every restart key still from `old`; and what
/// changed. Refused when that mix is not a valid configuration.
pub fn plan(old: &Config, new: &Config) -> Result<(Config, Report), ConfigError> {
    let changed = changed(old, new);
    let (restart_needed, applied): (Vec<_>, Vec<_>) = changed
        .into_iter()
        .partition(|k| on_reload(k) == Some(Restart));
    let mut next = new.clone();
    // Restart keys are never secrets: copy them back field by field through
    // their JSON form, then restore the sections that hold secrets.
    if !restart_needed.is_empty() {
        let mut v = serde_json::to_value(&next).map_err(|e| ConfigError::Load(e.to_string()))?;
        let old_v = serde_json::to_value(old).map_err(|e| ConfigError::Load(e.to_string()))?;
        for key in &restart_needed {
            let (section, field) = key.split_once('.').unwrap_or((key, ""));
            if let (Some(slot), Some(was)) = (
                v.get_mut(section).and_then(|s| s.get_mut(field)),
                old_v.get(section).and_then(|s| s.get(field)),
            ) {
                *slot = was.clone();
            }
        }
        let (auth, admin_token, token_secret, webhook_secret) = (
            next.auth.clone(),
            next.admin.token.clone(),
            next.access.token_secret.clone(),
            next.webhooks.secret.clone(),
        );
        next = serde_json::from_value(v).map_err(|e| ConfigError::Load(e.to_string()))?;
        next.auth = auth;
        next.admin.token = admin_token;
        next.access.token_secret = token_secret;
        next.webhooks.secret = webhook_secret;
    }
    next.validate()?;
    Ok((
        next,
        Report {
            applied,
            restart_needed,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn every_config_key_is_classified_once() {
        let mut keys: Vec<String> = flatten(&Config::default())
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        keys.sort();
        let mut table: Vec<String> = KEYS.iter().map(|(k, _)| k.to_string()).collect();
        table.sort();
        assert_eq!(keys, table);
    }

    #[test]
    fn applied_keys_change_and_restart_keys_keep_their_running_value() {
        let old = Config::default();
        let mut new = old.clone();
        new.http.public_host = Some("turn.example".into());
        new.auth.rest_ttl_secs = 600;
        new.http.listen = "127.0.0.1:9999".parse().unwrap();
        new.turn.relay_port_min = 50000;
        new.auth.secrets = vec![Secret::new("a-new-secret-0123456789")];
        let (next, report) = plan(&old, &new).unwrap();
        assert_eq!(
            report.applied,
            ["http.public_host", "auth.secrets", "auth.rest_ttl_secs"]
        );
        assert_eq!(
            report.restart_needed,
            ["http.listen", "turn.relay_port_min"]
        );
        assert_eq!(next.http.public_host.as_deref(), Some("turn.example"));
        assert_eq!(next.auth.rest_ttl_secs, 600);
        assert_eq!(next.http.listen, old.http.listen);
        assert_eq!(next.turn.relay_port_min, old.turn.relay_port_min);
        assert_eq!(
            next.auth.secrets, new.auth.secrets,
            "secrets survive the mix"
        );
    }

    /// The README's configuration table says the same as [`KEYS`], row by
    /// row (a row may name several keys of one kind).
    #[test]
    fn the_readme_table_agrees() {
        let readme = include_str!("../README.md");
        let mut seen = Vec::new();
        for row in readme.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let (Some(keys), Some(reload)) = (cells.get(1), cells.get(3)) else {
                continue;
            };
            for key in keys.split(" / ") {
                let key = key.trim_matches('`');
                let Some(want) = on_reload(key) else {
                    continue;
                };
                let said = match *reload {
                    "SIGHUP" => Applied,
                    "restart" => Restart,
                    other => panic!("README row for {key}: reload {other:?}"),
                };
                assert_eq!(said, want, "README row for {key}");
                seen.push(key);
            }
        }
        for (key, _) in KEYS {
            assert!(seen.contains(key), "README table has no row for {key}");
        }
    }

    /// `config/turnkey.toml` says "Needs a restart" in the comment of
    /// exactly the keys that need one.
    #[test]
    fn the_example_config_agrees() {
        let text = include_str!("../config/turnkey.toml");
        let lines: Vec<&str> = text.lines().collect();
        let assignment = |l: &str| {
            let l = l.trim_start_matches('#').trim_start();
            l.split_once(" = ")
                .filter(|(k, _)| k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
                .map(|(k, _)| k.to_string())
        };
        for (key, want) in KEYS {
            let (section, name) = key.split_once('.').unwrap();
            let mut current = "";
            let at = lines
                .iter()
                .position(|l| {
                    // A table key (`auth.users`) is its own section.
                    if *l == format!("[{key}]") {
                        return true;
                    }
                    if let Some(s) = l.strip_prefix('[') {
                        current = s.trim_end_matches(']');
                    }
                    current == section && assignment(l).as_deref() == Some(name)
                })
                .unwrap_or_else(|| panic!("{key} is not in config/turnkey.toml"));
            // Its comment: the lines above its group of assignments.
            let mut i = at;
            while i > 0 && assignment(lines[i - 1]).is_some() {
                i -= 1;
            }
            let mut restart = false;
            while i > 0 && lines[i - 1].starts_with('#') && assignment(lines[i - 1]).is_none() {
                i -= 1;
                restart |= lines[i].contains("Needs a restart");
            }
            assert_eq!(restart, *want == Restart, "comment of {key}");
        }
    }

    #[test]
    fn nothing_changed_reports_nothing() {
        let c = Config::default();
        assert_eq!(plan(&c, &c).unwrap().1, Report::default());
    }

    #[test]
    fn the_mix_is_validated() {
        let old = Config::default();
        let mut new = old.clone();
        // The idle backstop may not fall below the longest lifetime.
        new.turn.max_lifetime_secs = 7200;
        new.turn.default_lifetime_secs = 600;
        assert!(new.validate().is_err(), "idle backstop below max lifetime");
        assert!(plan(&old, &new).is_err());
    }
}
