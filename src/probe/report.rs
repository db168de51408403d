//! What the probe found: one row per transport with its timings, the
//! credential's clock check, and the one line to fix. Serialized with
//! `--json`, printed as a table otherwise.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use super::diagnose::Stage;
use super::ice::{ClockCheck, Target, Transport};

/// Milliseconds with two decimals (loopback round trips are tens of µs).
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 100_000.0).round() / 100.0
}

/// One advertised URL, tested.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub transport: Transport,
    pub url: String,
    /// `host:port` from the URL.
    pub server: String,
    /// The address the probe reached it at.
    pub address: Option<SocketAddr>,
    pub ok: bool,
    pub connect_ms: Option<f64>,
    pub tls_ms: Option<f64>,
    pub binding_ms: Option<f64>,
    pub allocate_ms: Option<f64>,
    pub permission_ms: Option<f64>,
    pub channel_bind_ms: Option<f64>,
    /// This machine's address as the server saw it.
    pub mapped: Option<SocketAddr>,
    pub relayed: Option<SocketAddr>,
    /// Round trips client → relay → relayed address → relay → client.
    pub rtt_ms: Vec<f64>,
    pub failed_at: Option<Stage>,
    pub error: Option<String>,
}

impl Row {
    pub fn new(t: &Target) -> Row {
        Row {
            transport: t.transport,
            url: t.url.clone(),
            server: t.server(),
            address: None,
            ok: false,
            connect_ms: None,
            tls_ms: None,
            binding_ms: None,
            allocate_ms: None,
            permission_ms: None,
            channel_bind_ms: None,
            mapped: None,
            relayed: None,
            rtt_ms: Vec::new(),
            failed_at: None,
            error: None,
        }
    }
}

/// The credential the API handed out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CredentialReport {
    pub username: String,
    pub ttl: Option<u64>,
    /// None for a static (non-REST) username.
    pub clock: Option<ClockCheck>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub url: String,
    pub ok: bool,
    /// The one line saying what to fix, when something failed.
    pub fix: Option<String>,
    pub api_ms: Option<f64>,
    pub credential: Option<CredentialReport>,
    pub rows: Vec<Row>,
}

impl Report {
    /// A report that stopped before any TURN check.
    pub fn stopped(url: &str, fix: String) -> Report {
        Report {
            url: url.to_string(),
            ok: false,
            fix: Some(fix),
            api_ms: None,
            credential: None,
            rows: Vec::new(),
        }
    }

    /// Settles `ok` and `fix`: a clock problem first (it explains refused
    /// credentials), then the first failed row in the order browsers try
    /// them.
    pub fn settle(&mut self, clock_fix: Option<String>) {
        self.fix = clock_fix.or_else(|| self.rows.iter().find_map(|r| r.error.clone()));
        self.ok = self.fix.is_none() && !self.rows.is_empty();
    }

    /// The table for people.
    pub fn table(&self) -> String {
        let mut out = format!("turnkey probe {}\n", self.url);
        if let Some(api) = self.api_ms {
            let _ = write!(out, "  /api/ice-servers answered in {api} ms");
        }
        if let Some(c) = &self.credential {
            let _ = write!(out, "; credential {}", c.username);
            if let Some(clock) = &c.clock {
                let _ = write!(out, " expires in {} s", clock.expires_in_secs);
                if let Some(skew) = clock.server_clock_skew_secs {
                    let _ = write!(out, " (server clock {skew:+} s)");
                }
            }
        }
        out.push('\n');
        let header = [
            "transport",
            "server",
            "connect",
            "tls",
            "stun/alloc",
            "mapped",
            "relayed",
            "round trip min/med/max",
            "result",
        ];
        let mut lines = vec![header.map(String::from).to_vec()];
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v} ms"));
        let addr = |a: Option<SocketAddr>| a.map_or_else(|| "-".to_string(), |a| a.to_string());
        for r in &self.rows {
            lines.push(vec![
                r.transport.name().to_string(),
                r.server.clone(),
                opt(r.connect_ms),
                opt(r.tls_ms),
                opt(r.binding_ms.or(r.allocate_ms)),
                addr(r.mapped),
                addr(r.relayed),
                rtt_summary(&r.rtt_ms),
                match (r.ok, r.failed_at) {
                    (true, _) => "ok".to_string(),
                    (false, Some(stage)) => format!("FAIL at {stage:?}"),
                    (false, None) => "FAIL".to_string(),
                },
            ]);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
            .collect();
        for l in &lines {
            let cells: Vec<String> = l
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str("  ");
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

fn rtt_summary(rtts: &[f64]) -> String {
    if rtts.is_empty() {
        return "-".to_string();
    }
    let mut v = rtts.to_vec();
    v.sort_by(f64::total_cmp);
    let (min, med, max) = (v[0], v[v.len() / 2], v[v.len() - 1]);
    format!("{min}/{med}/{max} ms ({})", v.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ice::parse_url;

    fn row(url: &str) -> Row {
        Row::new(&parse_url(url).unwrap())
    }

    #[test]
    fn the_first_failure_is_the_fix_unless_the_clock_explains_it() {
        let mut r = Report::stopped("http://h", String::new());
        let mut a = row("stun:h");
        a.ok = true;
        let mut b = row("turn:h?transport=udp");
        b.error = Some("udp broke".into());
        let mut c = row("turns:h");
        c.error = Some("tls broke".into());
        r.rows = vec![a, b, c];
        r.settle(None);
        assert_eq!((r.ok, r.fix.as_deref()), (false, Some("udp broke")));
        r.settle(Some("clock".into()));
        assert_eq!(r.fix.as_deref(), Some("clock"));
        r.rows.retain(|x| x.error.is_none());
        r.settle(None);
        assert_eq!((r.ok, r.fix.as_deref()), (true, None));
        r.rows.clear();
        r.settle(None);
        assert!(!r.ok, "nothing tested is not a pass");
    }

    #[test]
    fn table_has_one_line_per_row() {
        let mut r = Report::stopped("http://h", String::new());
        let mut a = row("turn:h:3478?transport=udp");
        a.ok = true;
        a.allocate_ms = Some(1.5);
        a.relayed = Some("127.0.0.1:50000".parse().unwrap());
        a.rtt_ms = vec![0.3, 0.1, 0.2];
        let mut b = row("turns:h:443?transport=tcp");
        b.failed_at = Some(Stage::TlsHandshake);
        r.rows = vec![a, b];
        let t = r.table();
        assert_eq!(t.lines().count(), 2 + 1 + 2, "{t}");
        assert!(t.contains("0.1/0.2/0.3 ms (3)"), "{t}");
        assert!(t.contains("FAIL at TlsHandshake"), "{t}");
        assert!(t.contains("127.0.0.1:50000"), "{t}");
        assert_eq!(ms(Duration::from_micros(1234)), 1.23);
    }
}
